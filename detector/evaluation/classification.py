"""Metrics of the patch classifier (stage 2 of the mitosis counter).

Labels are 0 = look-alike and 1..K the figure classes (one "mitotic figure" class, or the
phases, or normal/atypical). Reported: accuracy, balanced accuracy (mean per-class recall),
each class's recall, the confusion matrix (rows true, columns predicted); figure vs look-alike at
``p(figure) = 1 - p(look-alike) >= thresh`` (precision, recall, F1, tp/fp/fn); among true
figures the accuracy of the figure class; and, when one class is "atypical", the balanced
accuracy of atypical vs normal among true figures (AMi-Br's task).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np


def confusion_matrix(labels: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """``(n, n)`` counts, rows the true label, columns the predicted one."""
    return np.bincount(labels * n + pred, minlength=n * n).reshape(n, n)


def balanced_accuracy(labels: np.ndarray, pred: np.ndarray, classes: Sequence[int]) -> float:
    """Mean recall over the ``classes`` present in ``labels`` (NaN when none is)."""
    recalls = [float((pred[labels == c] == c).mean()) for c in classes if (labels == c).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def classification_metrics(labels: np.ndarray, probs: np.ndarray, names: Sequence[str],
                           thresh: float = 0.5) -> Dict[str, Any]:
    """Metrics of ``probs`` (``[N, K + 1]``) against ``labels`` (``[N]``, 0..K); ``names[i]``
    is the name of label ``i`` (``names[0]`` the look-alike class)."""
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    n = probs.shape[1]
    pred = probs.argmax(1)
    out: Dict[str, Any] = {
        "n": int(len(labels)),
        "accuracy": float((pred == labels).mean()) if len(labels) else float("nan"),
        "balanced_accuracy": balanced_accuracy(labels, pred, range(n)),
        "confusion": confusion_matrix(labels, pred, n).tolist(),
        "labels": list(names),
    }
    for i, name in enumerate(names):
        if (labels == i).any():
            out[f"recall/{name}"] = float((pred[labels == i] == i).mean())
    fig = 1.0 - probs[:, 0]
    is_fig, said_fig = labels > 0, fig >= thresh
    tp = int((is_fig & said_fig).sum())
    fp = int((~is_fig & said_fig).sum())
    fn = int((is_fig & ~said_fig).sum())
    out.update(tp=tp, fp=fp, fn=fn,
               precision=tp / (tp + fp) if tp + fp else 0.0,
               recall=tp / (tp + fn) if tp + fn else 0.0)
    out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    if n > 2 and is_fig.any():  # which figure class, among true figures
        sub = probs[is_fig][:, 1:].argmax(1) + 1
        out["figure_class_accuracy"] = float((sub == labels[is_fig]).mean())
        out["figure_class_balanced_accuracy"] = balanced_accuracy(labels[is_fig], sub,
                                                                  range(1, n))
        lower = [s.lower() for s in names]
        if "atypical" in lower:
            a = lower.index("atypical")
            normal = [i for i in range(1, n) if i != a]
            p_atyp = probs[is_fig][:, a]
            p_norm = probs[is_fig][:, normal].sum(1)
            truth = (labels[is_fig] == a).astype(np.int64)
            said = (p_atyp > p_norm).astype(np.int64)
            out["atypical_balanced_accuracy"] = balanced_accuracy(truth, said, (0, 1))
    return out


def format_confusion(m: Dict[str, Any]) -> str:
    """The confusion matrix as a Markdown table (rows true, columns predicted)."""
    names: List[str] = m["labels"]
    rows = ["| true \\ predicted | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names)]
    for name, row in zip(names, m["confusion"]):
        rows.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(rows)
