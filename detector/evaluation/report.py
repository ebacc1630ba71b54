"""Outputs of an evaluation: printed table, ``metrics.json``, per-image CSV, bootstrap confidence
intervals, and the comparison report (Markdown + HTML, matplotlib curves, OpenCV overlays).

Bootstrap: images are resampled with replacement (``n_boot`` times, seeded) and every metric is
recomputed from the resampled per-image counts (precision/recall/F1 from summed TP/FP/FN; DSB,
AJI, PQ as means of per-image values; AP from COCOeval's per-image matches through
:class:`~detector.evaluation.coco_eval.APResampler`); the interval is the 2.5th..97.5th
percentile.
"""
from __future__ import annotations

import csv
import dataclasses
import html
import json
import os
import re
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .coco_eval import APResampler
from .evaluator import Evaluation
from .metrics import summarize_counts, summarize_instances
from .points import count_correlation
import cv2
from collections import defaultdict
from ..data.image_io import ImageReadError, read_image
from .inputs import objects_of

# rows of the comparison table: (key in summary, label)
INSTANCE_ROWS = [("precision", "Precision @0.5"), ("recall", "Recall @0.5"), ("f1", "F1 @0.5"),
                 ("dsb_score", "DSB2018 score"), ("AP", "AP (COCO)"), ("AP50", "AP50"),
                 ("AP75", "AP75"), ("AR", "AR (COCO)"), ("AJI", "AJI"), ("PQ", "PQ"),
                 ("SQ", "SQ"), ("DQ", "DQ")]
POINT_ROWS = [("precision", "Precision"), ("recall", "Recall"), ("f1", "F1 (MIDOG)"),
              ("AP", "AP (COCO, boxes)"), ("AP50", "AP50 (boxes)"), ("AR", "AR (boxes)")]
COUNT_ROWS = [("tp", "TP"), ("fp", "FP"), ("fn", "FN")]


# ----------------------------------------------------------------------------- bootstrap
def bootstrap_ci(ev: Evaluation, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> Dict[str, Tuple[float, float]]:
    """``{metric: (low, high)}`` percentile intervals over images resampled with replacement."""
    evals = ev.image_evals
    n = len(evals)
    if n == 0 or n_boot <= 0:
        return {}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    tp = np.array([e.tp for e in evals], np.float64)[idx].sum(1)
    npred = np.array([e.n_pred for e in evals], np.float64)[idx].sum(1)
    ngt = np.array([e.n_gt for e in evals], np.float64)[idx].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        samples: Dict[str, np.ndarray] = {
            "precision": np.where(npred > 0, tp / np.maximum(npred, 1), 0.0),
            "recall": np.where(ngt > 0, tp / np.maximum(ngt, 1), 0.0),
            "f1": np.where(npred + ngt > 0, 2 * tp / np.maximum(npred + ngt, 1), 0.0),
        }
    if ev.mode != "points":
        per = {"dsb_score": [e.dsb() for e in evals], "AJI": [e.aji() for e in evals]}
        pqs = [e.pq() for e in evals]
        for k in ("pq", "sq", "dq"):
            per[k.upper()] = [p[k] for p in pqs]
        for k, v in per.items():
            samples[k] = np.asarray(v, np.float64)[idx].mean(1)
    if ev.cocoeval is not None:
        rs = APResampler(ev.cocoeval, [im["id"] for im in ev.images])
        aps = np.array([rs.ap_by_iou(s) for s in idx])  # n_boot x 3
        samples["AP"], samples["AP50"], samples["AP75"] = aps[:, 0], aps[:, 1], aps[:, 2]
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi)))
            for k, v in samples.items()}


# ----------------------------------------------------------------------------- per group
#: Metrics reported per modality (or other image field): (key in summary, label).
GROUP_ROWS = [("f1", "F1 @0.5"), ("dsb_score", "DSB2018 score"), ("AJI", "AJI"), ("PQ", "PQ")]
GROUP_POINT_ROWS = [("f1", "F1 (MIDOG)"), ("precision", "Precision"), ("recall", "Recall")]


def metrics_by(ev: Evaluation, field: str = "modality", n_boot: int = 1000, seed: int = 0
               ) -> Dict[str, Dict[str, Any]]:
    """Metrics of the images grouped by a field of the GT image entries (``modality``:
    fluorescence / brightfield / he, see :mod:`detector.data.experiments`; or ``group``, the
    experiment), each with its bootstrap interval over that group's images
    (:func:`bootstrap_ci`, no AP).

    Returns ``{value: {"n_images", "n_gt", "n_pred", <GROUP_ROWS keys>, "ci95": {key: [lo,
    hi]}}}`` sorted by value; images without the field form the group ``"(none)"``; ``{}``
    when no image has it.
    """
    if not any(im.get(field) is not None for im in ev.images):
        return {}
    index: Dict[str, List[int]] = defaultdict(list)
    for k, im in enumerate(ev.images):
        v = im.get(field)
        index["(none)" if v is None else str(v)].append(k)
    rows = GROUP_POINT_ROWS if ev.mode == "points" else GROUP_ROWS
    out: Dict[str, Dict[str, Any]] = {}
    for value, idx in sorted(index.items()):
        evals = [ev.image_evals[i] for i in idx]
        summ = summarize_counts(evals) if ev.mode == "points" else summarize_instances(evals)
        sub = dataclasses.replace(ev, images=[ev.images[i] for i in idx], image_evals=evals,
                                  per_image=[ev.per_image[i] for i in idx], cocoeval=None)
        ci = bootstrap_ci(sub, n_boot, seed)
        rec: Dict[str, Any] = {"n_images": len(idx), "n_gt": int(summ["n_gt"]),
                               "n_pred": int(summ["n_pred"])}
        rec.update({k: float(summ[k]) for k, _ in rows})
        rec["ci95"] = {k: [float(ci[k][0]), float(ci[k][1])] for k, _ in rows if k in ci}
        out[value] = rec
    return out


def group_table(names: Sequence[str], groups: Sequence[Dict[str, Dict[str, Any]]],
                field: str = "modality", mode: str = "masks"
                ) -> Tuple[List[str], List[List[str]]]:
    """Header and rows (model x group value) of the per-group table of :func:`metrics_by`."""
    rows_spec = GROUP_POINT_ROWS if mode == "points" else GROUP_ROWS
    header = ["model", field, "images", "objects"] + [label for _, label in rows_spec]
    rows = []
    for name, by in zip(names, groups):
        for value, r in by.items():
            rows.append([name, value, str(r["n_images"]), str(r["n_gt"])]
                        + [format_value(r[k], tuple(r["ci95"][k]) if k in r["ci95"] else None)
                           for k, _ in rows_spec])
    return header, rows


# ----------------------------------------------------------------------------- tables
def table_rows(mode: str) -> List[Tuple[str, str]]:
    return POINT_ROWS if mode == "points" else INSTANCE_ROWS


def format_value(v: Optional[float], ci: Optional[Tuple[float, float]] = None) -> str:
    if v is None:
        return "-"
    s = f"{v:.3f}"
    if ci is not None:
        s += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return s


def comparison_table(names: Sequence[str], evs: Sequence[Evaluation],
                     cis: Optional[Sequence[Dict[str, Tuple[float, float]]]] = None
                     ) -> Tuple[List[str], List[List[str]]]:
    """Header and rows (metric x model) of the side-by-side table."""
    mode = evs[0].mode
    header = ["metric"] + list(names)
    rows = []
    for key, label in table_rows(mode):
        row = [label]
        for k, ev in enumerate(evs):
            ci = cis[k].get(key) if cis else None
            row.append(format_value(ev.summary.get(key), ci))
        rows.append(row)
    for key, label in COUNT_ROWS:
        rows.append([label] + [str(int(ev.summary.get(key, 0))) for ev in evs])
    rows.append(["score threshold"] + [f"{ev.params['score_thresh']:.2f}" for ev in evs])
    return header, rows


def per_class_rows(names: Sequence[str], evs: Sequence[Evaluation]) -> List[List[Any]]:
    rows = []
    for n, ev in zip(names, evs):
        for c in ev.per_class:
            ap = c.get("AP")
            rows.append([n, c["name"], c["n_gt"], c["n_pred"], f"{c['precision']:.3f}",
                         f"{c['recall']:.3f}", f"{c['f1']:.3f}",
                         "-" if ap is None or ap < 0 else f"{ap:.3f}"])
    return rows


PER_CLASS_HEADER = ["model", "class", "GT", "pred", "precision", "recall", "F1", "AP"]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    line = "  ".join(str(h).ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------- files
def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        v = float(o)
        return v if np.isfinite(v) else None
    return o


def model_record(name: str, pred_path: str, ev: Evaluation,
                 ci: Optional[Dict[str, Tuple[float, float]]] = None,
                 extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    rec = {"name": name, "predictions": os.path.abspath(pred_path), "mode": ev.mode,
           "params": ev.params, "summary": ev.summary, "per_class": ev.per_class,
           "iou_curve": ev.iou_curve, "score_curve": ev.score_curve,
           "ci95": {k: list(v) for k, v in (ci or {}).items()}, "warnings": ev.warnings}
    if ev.mode == "points":
        rec["counts"] = count_correlation([r["n_gt"] for r in ev.per_image],
                                          [r["n_pred"] for r in ev.per_image])
    if extra:
        rec.update(extra)
    return rec


def write_metrics_json(path: str, gt_path: str, records: List[Dict[str, Any]]) -> None:
    data: Dict[str, Any] = {"ground_truth": os.path.abspath(gt_path), "models": records}
    if len(records) == 1:
        data["summary"] = records[0]["summary"]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(data), f, indent=2)
    os.replace(tmp, path)


def write_per_image_csv(path: str, names: Sequence[str], evs: Sequence[Evaluation]) -> None:
    """One row per (model, image): counts and per-image metrics."""
    cols: List[str] = ["model"]
    for ev in evs:
        for r in ev.per_image:
            for k in r:
                if k not in cols:
                    cols.append(k)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for name, ev in zip(names, evs):
            for r in ev.per_image:
                w.writerow({"model": name, **{k: (f"{v:.6f}" if isinstance(v, float) else v)
                                              for k, v in r.items()}})


# ----------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_f1_vs_iou(path: str, names: Sequence[str], evs: Sequence[Evaluation]) -> Optional[str]:
    if all(ev.iou_curve is None for ev in evs):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for name, ev in zip(names, evs):
        if ev.iou_curve:
            ax.plot(ev.iou_curve["iou_thresholds"], ev.iou_curve["f1"], marker="o", label=name)
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("F1 (one-to-one matching)")
    ax.set_ylim(0, 1.02)
    ax.set_title("F1 against IoU threshold")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_pr(path: str, names: Sequence[str], evs: Sequence[Evaluation]) -> Optional[str]:
    if all(ev.score_curve is None for ev in evs):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for name, ev in zip(names, evs):
        c = ev.score_curve
        if not c:
            continue
        has = np.asarray(c.get("n_pred", [1] * len(c["recall"]))) > 0  # no predictions: no point
        line, = ax.plot(np.asarray(c["recall"])[has], np.asarray(c["precision"])[has], label=name)
        ax.plot([ev.summary["recall"]], [ev.summary["precision"]], "o", color=line.get_color())
    what = "distance" if evs[0].mode == "points" else f"IoU > {evs[0].params['iou_thresh']:g}"
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Precision-recall over score thresholds ({what}); dot = used threshold")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_f1_vs_score(path: str, names: Sequence[str], evs: Sequence[Evaluation]) -> Optional[str]:
    if all(ev.score_curve is None for ev in evs):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for name, ev in zip(names, evs):
        c = ev.score_curve
        if not c:
            continue
        line, = ax.plot(c["score_thresholds"], c["f1"], label=name)
        ax.axvline(ev.params["score_thresh"], color=line.get_color(), ls="--", lw=0.8)
    ax.set_xlabel("score threshold")
    ax.set_ylabel("F1")
    ax.set_ylim(0, 1.02)
    ax.set_title("F1 against score threshold (dashed: threshold used)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_counts(path: str, names: Sequence[str], evs: Sequence[Evaluation]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    top = 1
    for name, ev in zip(names, evs):
        t = np.array([r["n_gt"] for r in ev.per_image])
        p = np.array([r["n_pred"] for r in ev.per_image])
        c = count_correlation(t, p)
        r = "n/a" if c["pearson_r"] is None else f"{c['pearson_r']:.2f}"
        # integer counts coincide: one marker per (true, predicted) pair, sized by images
        pairs, n = np.unique(np.stack([t, p], 1), axis=0, return_counts=True) if len(t) else \
            (np.zeros((0, 2)), np.zeros(0))
        sc = ax.scatter(pairs[:, 0], pairs[:, 1], s=20 + 12 * np.sqrt(n), alpha=0.6,
                        label=f"{name} (r = {r}, MAE {c['mae']:.2f})")
        for (x, y), k in zip(pairs, n):
            if k > 1:
                ax.annotate(str(int(k)), (x, y), textcoords="offset points", xytext=(6, 4),
                            fontsize=7, color=sc.get_facecolor()[0])
        top = max(top, t.max(initial=0), p.max(initial=0))
    ax.plot([0, top], [0, top], "k--", lw=0.8)
    ax.set_xlabel("true count per image")
    ax.set_ylabel("predicted count per image")
    ax.set_title("Counts per image (numbers: images at that point)")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- overlays
GREEN, RED, YELLOW = (0, 200, 0), (255, 0, 0), (255, 215, 0)  # RGB


def _draw_objects(canvas: np.ndarray, objs, idx: np.ndarray, color, mode: str, scale: float,
                  radius_px: float, thickness: int = 2) -> None:
    for k in idx:
        if mode == "masks" and objs.masks is not None:
            rings = [np.round(np.asarray(ring, np.float64) * scale).astype(np.int32)
                     for poly in objs.masks[k].polygons() for ring in poly]
            cv2.polylines(canvas, rings, True, color, thickness, lineType=cv2.LINE_AA)
        elif mode == "points":
            cx, cy = objs.centres()[k] * scale
            cv2.circle(canvas, (int(round(cx)), int(round(cy))), max(3, int(radius_px * scale)),
                       color, thickness, lineType=cv2.LINE_AA)
        else:
            x0, y0, x1, y1 = (int(round(v * scale)) for v in objs.boxes[k])
            cv2.rectangle(canvas, (x0, y0), (x1, y1), color, thickness, lineType=cv2.LINE_AA)


def draw_overlay(ev: Evaluation, image_index: int, out_path: str, min_side: int = 512,
                 max_side: int = 2048) -> Optional[str]:
    """The image with TP predictions in green, FP predictions in red and FN (missed GT) in
    yellow; small images are enlarged (nearest) so that outlines stay readable. Returns None
    (with a warning) when the image cannot be read."""
    im = ev.images[image_index]
    e = ev.image_evals[image_index]
    root = ev.gt.get("_image_root", ".")
    path = os.path.join(root, im.get("file_name", ""))
    try:
        img = read_image(path)
    except (ImageReadError, OSError) as ex:
        warnings.warn(f"overlay skipped: {ex}")
        return None
    h, w = img.shape[:2]
    scale = 1.0
    if max(h, w) < min_side:
        scale = float(int(np.ceil(min_side / max(h, w))))
    elif max(h, w) > max_side:
        scale = max_side / max(h, w)
    interp = cv2.INTER_NEAREST if scale >= 1 else cv2.INTER_AREA
    canvas = cv2.resize(img, (int(round(w * scale)), int(round(h * scale))), interpolation=interp)
    canvas = np.ascontiguousarray(canvas)
    use_masks = ev.mode == "masks"
    by_img = defaultdict(list)
    for a in ev.gt["annotations"]:
        if a["image_id"] == im["id"]:
            by_img["gt"].append(a)
    preds = [r for r in ev.results if r["image_id"] == im["id"]]
    g = objects_of(by_img["gt"], im, use_masks, is_gt=True)
    p = objects_of(preds, im, use_masks, is_gt=False)
    kept = np.flatnonzero(p.scores >= ev.params["score_thresh"])
    tp_pred = np.asarray(e.matched_pred, np.int64)
    fp_pred = np.setdiff1d(kept, tp_pred)
    fn_gt = np.setdiff1d(np.arange(len(g)), e.matched_gt)
    radius_px = 0.0
    if ev.mode == "points":
        mpp = ev.params.get("mpp") or im.get("mpp") or 1.0
        radius_px = float(ev.params.get("radius_um") or 7.5) / float(mpp)
    _draw_objects(canvas, g, fn_gt, YELLOW, ev.mode, scale, radius_px)
    _draw_objects(canvas, p, tp_pred, GREEN, ev.mode, scale, radius_px)
    _draw_objects(canvas, p, fp_pred, RED, ev.mode, scale, radius_px)
    cv2.imwrite(out_path, cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    return out_path


def pick_examples(ev: Evaluation, k: int = 2) -> Dict[str, List[int]]:
    """Indices of the ``k`` worst and ``k`` best images by per-image F1 (images with neither
    GT nor predictions are left out; ties broken by more objects first)."""
    cand = [i for i, r in enumerate(ev.per_image) if r["n_gt"] + r["n_pred"] > 0]
    if not cand:
        return {"worst": [], "best": []}
    f1 = np.array([ev.per_image[i]["f1"] for i in cand])
    size = np.array([ev.per_image[i]["n_gt"] for i in cand])
    worst = [cand[i] for i in np.lexsort((-size, f1))[:k]]
    best = [cand[i] for i in np.lexsort((-size, -f1)) if cand[i] not in worst][:k]
    return {"worst": worst, "best": best}


# ----------------------------------------------------------------------------- report
class _Doc:
    """Blocks rendered to Markdown and to a self-contained HTML page (images linked
    relatively)."""

    def __init__(self) -> None:
        self.blocks: List[Tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", list(header), [list(r) for r in rows]))

    def img(self, path: str, alt: str) -> None:
        self.blocks.append(("img", path, alt))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                out.append(markdown_table(b[1], b[2]))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
               "</title><style>body{font-family:sans-serif;max-width:1100px;margin:auto;"
               "padding:1em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
               "padding:3px 8px;text-align:left}img{max-width:100%;margin:4px 0}"
               "</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                text = html.escape(b[1])
                text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
                text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
                out.append(f"<p>{text}</p>")
            elif b[0] == "table":
                out.append("<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>"
                                                   for c in b[1]) + "</tr>")
                for r in b[2]:
                    out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r)
                               + "</tr>")
                out.append("</table>")
            elif b[0] == "img":
                out.append(f"<figure><img src='{html.escape(b[1])}' alt='{html.escape(b[2])}'>"
                           f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)


def write_report(out_dir: str, gt_path: str, names: Sequence[str], evs: Sequence[Evaluation],
                 cis: Sequence[Dict[str, Tuple[float, float]]], n_examples: int = 2,
                 tuning: Optional[Sequence[Optional[Dict[str, Any]]]] = None,
                 by_group: Optional[Sequence[Dict[str, Dict[str, Any]]]] = None,
                 group_field: str = "modality") -> Dict[str, str]:
    """Write ``report.md``, ``report.html`` and their pictures into ``out_dir``; returns the
    paths written by kind. ``by_group``: :func:`metrics_by` per model, shown as a table."""
    os.makedirs(out_dir, exist_ok=True)
    written: Dict[str, str] = {}
    ev0 = evs[0]
    gt = ev0.gt
    doc = _Doc()
    doc.h(1, "Evaluation report")
    n_obj = len(gt["annotations"])
    if ev0.mode == "points":
        what = f"points (centre distance <= {ev0.params['radius_um']:g} um)"
    else:
        what = "instance masks (mask IoU)" if ev0.mode == "masks" else "boxes (box IoU)"
    doc.p(f"Ground truth: `{os.path.abspath(gt_path)}`: {len(gt['images'])} images, {n_obj} "
          f"objects, {len(gt['categories'])} categor{'y' if len(gt['categories']) == 1 else 'ies'}."
          f" Evaluated as {what}.")
    doc.p("Predictions: " + "; ".join(f"**{n}**: `{ev.params.get('source', '')}`"
                                       for n, ev in zip(names, evs)))
    doc.h(2, "Metrics")
    header, rows = comparison_table(names, evs, cis)
    doc.table(header, rows)
    if ev0.mode == "points":
        doc.p("Points are matched one-to-one (Hungarian) within the radius; TP, FP and FN are "
              "summed over images before F1 (MIDOG).")
    else:
        doc.p(f"One-to-one (Hungarian) matching at IoU > {ev0.params['iou_thresh']:g} among "
              "predictions with score >= the threshold; DSB2018 score = per-image mean over IoU "
              "0.50:0.05:0.95 of TP/(TP+FP+FN), averaged over images; AJI and PQ per image, "
              "averaged; AP is COCOeval's 0.50:0.95 AP at maxDets = "
              f"{ev0.params['max_dets']} over all predictions.")
    if cis and any(cis):
        doc.p("Brackets: 95% bootstrap confidence intervals over images.")
    if by_group and any(by_group):
        doc.h(2, f"Per {group_field}")
        doc.table(*group_table(names, by_group, group_field, ev0.mode))
        doc.p(f"Images grouped by the ground truth's `{group_field}` field; brackets: 95% "
              "bootstrap confidence intervals over that group's images.")
    if tuning and any(tuning):
        doc.h(2, "Score threshold chosen on the validation split")
        doc.table(["model", "threshold", "validation F1"],
                  [[n, f"{t['score_thresh']:.2f}", f"{t['val_f1']:.3f}"]
                   for n, t in zip(names, tuning) if t])
    if len(gt["categories"]) > 1:
        doc.h(2, "Per class")
        doc.table(PER_CLASS_HEADER, per_class_rows(names, evs))

    doc.h(2, "Curves")
    for fn, name, alt in ((plot_f1_vs_iou, "f1_vs_iou.png", "F1 against IoU threshold"),
                          (plot_pr, "pr_curve.png", "Precision-recall curve"),
                          (plot_f1_vs_score, "f1_vs_score.png", "F1 against score threshold")):
        if fn(os.path.join(out_dir, name), names, evs):
            doc.img(name, alt)
            written[name] = os.path.join(out_dir, name)

    if ev0.mode == "points":
        doc.h(2, "Counts per image")
        plot_counts(os.path.join(out_dir, "counts.png"), names, evs)
        written["counts.png"] = os.path.join(out_dir, "counts.png")
        doc.img("counts.png", "Predicted against true counts per image")
        crows = []
        for n, ev in zip(names, evs):
            c = count_correlation([r["n_gt"] for r in ev.per_image],
                                  [r["n_pred"] for r in ev.per_image])
            crows.append([n, format_value(c["pearson_r"]), format_value(c["spearman_rho"]),
                          f"{c['mae']:.2f}", f"{c['mean_error']:+.2f}"])
        doc.table(["model", "Pearson r", "Spearman rho", "MAE", "mean error (pred - true)"],
                  crows)
        rows = []
        for i, im in enumerate(ev0.images):
            rows.append([str(im["id"]), os.path.basename(str(im.get("file_name", ""))),
                         str(ev0.per_image[i]["n_gt"])]
                        + [str(ev.per_image[i]["n_pred"]) for ev in evs])
        doc.table(["image", "file", "true"] + [f"{n} predicted" for n in names], rows)

    doc.h(2, "Examples")
    doc.p("Green: true positives (prediction outline); red: false positives; yellow: false "
          "negatives (missed ground truth). Worst and best images by per-image F1.")
    os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
    for n, ev in zip(names, evs):
        doc.h(3, n)
        ex = pick_examples(ev, n_examples)
        for kind in ("worst", "best"):
            for i in ex[kind]:
                r = ev.per_image[i]
                stem = os.path.splitext(os.path.basename(str(r["file_name"])))[0][:40]
                rel = f"overlays/{slug(n)}_{kind}_{r['image_id']}_{slug(stem)}.png"
                if draw_overlay(ev, i, os.path.join(out_dir, rel)):
                    doc.img(rel, f"{n}, {kind}: image {r['image_id']} ({stem}): F1 "
                                 f"{r['f1']:.3f}, TP {r['tp']}, FP {r['fp']}, FN {r['fn']}")
                    written[rel] = os.path.join(out_dir, rel)
    md = os.path.join(out_dir, "report.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(doc.markdown())
    hp = os.path.join(out_dir, "report.html")
    with open(hp, "w", encoding="utf-8") as f:
        f.write(doc.html("Evaluation report"))
    written["report.md"] = md
    written["report.html"] = hp
    return written
