"""Object-level instance metrics of one image and their aggregation.

Definitions (each image is matched on its own; only same-category pairs can match):

- **Match at IoU threshold t**: one-to-one (Hungarian) assignment maximising the number of pairs
  with IoU > t (strictly, as the DSB2018 and PQ definitions say), ties broken by the sum of IoU.
  TP = matched pairs, FP = unmatched predictions, FN = unmatched ground-truth objects.
- **precision / recall / F1** at ``iou_thresh``: from TP, FP, FN summed over all images. With no
  predictions, precision is 0 (so F1 is 0); with no ground truth, recall is 0.
- **DSB2018 score** (Kaggle Data Science Bowl 2018): per image, the mean over
  t = 0.50, 0.55, ..., 0.95 of TP(t) / (TP(t) + FP(t) + FN(t)); then the mean over images. An
  image with neither ground truth nor predictions scores 1.0 (nothing to find, nothing found;
  the competition had no such images).
- **AJI** (Kumar et al. 2017): per image, each GT object takes the prediction of largest IoU
  (not one-to-one); AJI = sum of their intersections / (sum of their unions + areas of the GT
  objects without any overlapping prediction + areas of the predictions never taken); the mean
  over images is reported (as MoNuSeg does). Empty image: 1.0.
- **PQ** (Kirillov et al. 2019): matches at IoU > 0.5, SQ = mean IoU of the matches,
  DQ = TP / (TP + FP/2 + FN/2), PQ = DQ x SQ, per image then averaged (as HoVer-Net reports for
  CoNSeP/MoNuSeg). Empty image: 1.0.
In box mode the same formulas use box IoU and box areas.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np

from .inputs import ImageObjects
from .matching import iou_pairs, match_pairs

IOU_THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)
SCORE_GRID = np.round(np.linspace(0.0, 1.0, 101), 2)


def safe_div(a: float, b: float, empty: float = 0.0) -> float:
    return float(a) / float(b) if b else float(empty)


def prf(tp: float, fp: float, fn: float) -> Dict[str, float]:
    """Precision, recall and F1 from counts (0 when undefined)."""
    p = safe_div(tp, tp + fp)
    r = safe_div(tp, tp + fn)
    return {"precision": p, "recall": r, "f1": safe_div(2 * tp, 2 * tp + fp + fn)}


@dataclass
class ImageEval:
    """Counts of one image (predictions filtered by the score threshold).

    ``matched_pred``/``matched_gt`` index the image's full prediction / GT lists (for overlays);
    ``tp_iou`` holds TP at each of :data:`IOU_THRESHOLDS`; ``tp_sweep``/``npred_sweep`` TP and
    prediction counts at each score threshold of :data:`SCORE_GRID` (at ``iou_thresh``).
    """

    n_gt: int
    n_pred: int
    tp: int
    per_class: Dict[int, np.ndarray]  # category id -> [tp, n_pred, n_gt]
    matched_pred: np.ndarray
    matched_gt: np.ndarray
    tp_iou: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    iou_sum: float = 0.0  # sum of IoU of the matches at IoU > 0.5 (PQ)
    n_pq: int = 0  # matches at IoU > 0.5
    aji_inter: float = 0.0
    aji_union: float = 0.0
    tp_sweep: Optional[np.ndarray] = None
    npred_sweep: Optional[np.ndarray] = None

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        return self.n_gt - self.tp

    def f1(self) -> float:
        return safe_div(2 * self.tp, self.n_pred + self.n_gt, empty=1.0)

    def dsb(self) -> float:
        if self.n_gt + self.n_pred == 0:
            return 1.0
        return float(np.mean(self.tp_iou / (self.n_gt + self.n_pred - self.tp_iou)))

    def aji(self) -> float:
        return safe_div(self.aji_inter, self.aji_union, empty=1.0)

    def pq(self) -> Dict[str, float]:
        if self.n_gt + self.n_pred == 0:
            return {"pq": 1.0, "sq": 1.0, "dq": 1.0}
        dq = 2.0 * self.n_pq / (self.n_gt + self.n_pred)
        sq = safe_div(self.iou_sum, self.n_pq)
        return {"pq": dq * sq, "sq": sq, "dq": dq}


def sweep_scores(rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, scores: np.ndarray,
                 valid: np.ndarray) -> "tuple[np.ndarray, np.ndarray]":
    """TP and prediction counts at every score threshold of :data:`SCORE_GRID`.

    When the valid pairs do not conflict (each prediction and GT object in at most one), TP at
    threshold s is simply the number of valid pairs whose prediction scores >= s; otherwise the
    matching is redone per threshold.
    """
    srt = np.sort(scores)
    npred = len(srt) - np.searchsorted(srt, SCORE_GRID, side="left")
    idx = np.flatnonzero(valid)
    r, c = rows[idx], cols[idx]
    # a pair whose prediction and GT object are in no other valid pair is matched whenever its
    # prediction is kept; only the rest (conflicting groups) needs the assignment solved
    free = (np.bincount(r)[r] == 1) & (np.bincount(c)[c] == 1) if len(idx) else \
        np.zeros(0, bool)
    fs = np.sort(scores[r[free]])
    tp = len(fs) - np.searchsorted(fs, SCORE_GRID, side="left")
    sub = idx[~free]
    if len(sub):
        sub_scores = scores[rows[sub]]
        uniq = np.unique(sub_scores)
        ks = np.searchsorted(uniq, SCORE_GRID, side="left")  # kept set depends on k only
        solved = {}
        for k in np.unique(ks):
            keep = sub_scores >= uniq[k] if k < len(uniq) else np.zeros(len(sub), bool)
            solved[k] = len(match_pairs(rows[sub], cols[sub], weights[sub], valid=keep))
        tp = tp + np.array([solved[k] for k in ks])
    return tp.astype(np.int64), npred.astype(np.int64)


def _per_class(pred_labels: np.ndarray, gt_labels: np.ndarray,
               matched_gt_labels: np.ndarray) -> Dict[int, np.ndarray]:
    out: Dict[int, np.ndarray] = {}
    for c in np.union1d(pred_labels, gt_labels):
        out[int(c)] = np.array([int(np.sum(matched_gt_labels == c)), int(np.sum(pred_labels == c)),
                                int(np.sum(gt_labels == c))], np.int64)
    return out


def evaluate_image_instances(pred: ImageObjects, gt: ImageObjects, iou_thresh: float = 0.5,
                             score_thresh: float = 0.5, sweep: bool = True) -> ImageEval:
    """Match one image's predictions (masks or boxes) to its ground truth and count.

    Args:
        pred, gt: the image's objects (both with ``masks`` for mask IoU, else box IoU).
        iou_thresh: IoU (strictly) above which a pair can be a TP for precision/recall/F1.
        score_thresh: predictions with a lower score are dropped first.
        sweep: also count TP at every score threshold of :data:`SCORE_GRID`.
    """
    use_masks = pred.masks is not None and gt.masks is not None
    rows, cols, ious = iou_pairs(pred.boxes, gt.boxes, pred.masks if use_masks else None,
                                 gt.masks if use_masks else None, pred.labels, gt.labels)
    keep = pred.scores >= score_thresh
    pair_keep = keep[rows]
    n_pred, n_gt = int(keep.sum()), len(gt)

    tp_iou = np.zeros(len(IOU_THRESHOLDS), np.int64)
    m50 = None
    for k, t in enumerate(IOU_THRESHOLDS):
        m = match_pairs(rows, cols, ious, valid=pair_keep & (ious > t))
        tp_iou[k] = len(m)
        if k == 0:
            m50 = m
    if np.isclose(iou_thresh, IOU_THRESHOLDS[0]):
        m_at = m50
    else:
        m_at = match_pairs(rows, cols, ious, valid=pair_keep & (ious > iou_thresh))

    # AJI: each GT takes its best-IoU prediction (kept ones only)
    kr, kc, kv = rows[pair_keep], cols[pair_keep], ious[pair_keep]
    inter_sum = union_sum = 0.0
    used = np.zeros(len(pred), bool)
    covered = np.zeros(n_gt, bool)
    if len(kr):
        order = np.lexsort((-kv, kc))  # by GT, best IoU first
        first = np.r_[True, kc[order][1:] != kc[order][:-1]]
        best = order[first]
        bp, bg, bv = kr[best], kc[best], kv[best]
        ap, ag = pred.areas[bp], gt.areas[bg]
        inter = bv * (ap + ag) / (1.0 + bv)
        if use_masks:
            inter = np.round(inter)
        inter_sum = float(inter.sum())
        union_sum = float((ap + ag - inter).sum())
        used[bp] = True
        covered[bg] = True
    union_sum += float(gt.areas[~covered].sum()) + float(pred.areas[keep & ~used].sum())

    tp_sweep = npred_sweep = None
    if sweep:
        tp_sweep, npred_sweep = sweep_scores(rows, cols, ious, pred.scores, ious > iou_thresh)

    return ImageEval(
        n_gt=n_gt, n_pred=n_pred, tp=len(m_at),
        per_class=_per_class(pred.labels[keep], gt.labels, gt.labels[cols[m_at]]),
        matched_pred=rows[m_at], matched_gt=cols[m_at], tp_iou=tp_iou,
        iou_sum=float(ious[m50].sum()), n_pq=len(m50),
        aji_inter=inter_sum, aji_union=union_sum, tp_sweep=tp_sweep, npred_sweep=npred_sweep)


def summarize_counts(evals: "list[ImageEval]") -> Dict[str, float]:
    """Precision, recall and F1 from TP/FP/FN summed over images, with the counts."""
    tp = sum(e.tp for e in evals)
    n_pred = sum(e.n_pred for e in evals)
    n_gt = sum(e.n_gt for e in evals)
    out = prf(tp, n_pred - tp, n_gt - tp)
    out.update({"tp": float(tp), "fp": float(n_pred - tp), "fn": float(n_gt - tp),
                "n_gt": float(n_gt), "n_pred": float(n_pred)})
    return out


def summarize_instances(evals: "list[ImageEval]") -> Dict[str, float]:
    """Dataset-level instance metrics (see the module docstring for each definition)."""
    out = summarize_counts(evals)
    if evals:
        out["dsb_score"] = float(np.mean([e.dsb() for e in evals]))
        out["AJI"] = float(np.mean([e.aji() for e in evals]))
        pqs = [e.pq() for e in evals]
        for k in ("pq", "sq", "dq"):
            out[k.upper()] = float(np.mean([p[k] for p in pqs]))
    else:
        out.update({"dsb_score": 0.0, "AJI": 0.0, "PQ": 0.0, "SQ": 0.0, "DQ": 0.0})
    return out


def iou_curve(evals: "list[ImageEval]") -> Dict[str, list]:
    """Precision, recall and F1 (summed counts) at every IoU threshold 0.50:0.05:0.95."""
    n_pred = sum(e.n_pred for e in evals)
    n_gt = sum(e.n_gt for e in evals)
    tps = np.sum([e.tp_iou for e in evals], axis=0) if evals else np.zeros(len(IOU_THRESHOLDS))
    rows = [prf(t, n_pred - t, n_gt - t) for t in tps]
    return {"iou_thresholds": [float(t) for t in IOU_THRESHOLDS],
            "tp": [int(t) for t in tps],
            "precision": [r["precision"] for r in rows],
            "recall": [r["recall"] for r in rows],
            "f1": [r["f1"] for r in rows]}


def score_curve(evals: "list[ImageEval]") -> Dict[str, list]:
    """Precision, recall and F1 (summed counts) at every score threshold of SCORE_GRID, and the
    threshold of the best F1 (the lowest such threshold on ties)."""
    have = [e for e in evals if e.tp_sweep is not None]
    n_gt = sum(e.n_gt for e in evals)
    tps = np.sum([e.tp_sweep for e in have], axis=0) if have else np.zeros(len(SCORE_GRID))
    nps = np.sum([e.npred_sweep for e in have], axis=0) if have else np.zeros(len(SCORE_GRID))
    rows = [prf(t, p - t, n_gt - t) for t, p in zip(tps, nps)]
    f1 = np.array([r["f1"] for r in rows])
    best = int(np.argmax(f1)) if len(f1) else 0
    return {"score_thresholds": [float(s) for s in SCORE_GRID],
            "precision": [r["precision"] for r in rows],
            "recall": [r["recall"] for r in rows],
            "f1": [float(v) for v in f1],
            "n_pred": [int(v) for v in nps],
            "best_score_thresh": float(SCORE_GRID[best]),
            "best_f1": float(f1[best]) if len(f1) else 0.0}
