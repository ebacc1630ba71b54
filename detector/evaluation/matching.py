"""One-to-one matching of predicted and true objects: sparse IoU between overlapping boxes,
mask IoU of :class:`CropMask` pairs (on their crops), and Hungarian assignment.

Pairs are kept sparse, as ``(rows, cols, values)`` arrays with ``rows`` indexing predictions and
``cols`` ground-truth objects: a dense IoU matrix of a slide with 10^5 nuclei would not fit in
memory, and mask IoU is only computed for pairs whose boxes overlap (what makes thousands of
nuclei fast). Boxes are XYXY pixels; masks are :class:`CropMask` of the image.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ..structures.masks import CropMask

Pairs = Tuple[np.ndarray, np.ndarray, np.ndarray]  # rows (pred idx), cols (gt idx), values

_DENSE_LIMIT = 4_000_000  # above this many box pairs, find overlaps with a k-d tree


def _empty_pairs() -> Pairs:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)


def box_overlap_candidates(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` of boxes ``a[i]`` and ``b[j]`` (both ``(N, 4)`` XYXY px) whose
    intersection has positive area.

    Small inputs use a dense broadcast; large ones (whole slides) a k-d tree on box centres
    with the Chebyshev radius of the largest boxes, so memory stays linear in N.
    """
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(a) * len(b) <= _DENSE_LIMIT:
        iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
        ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
        i, j = np.nonzero((iw > 0) & (ih > 0))
        return i.astype(np.int64), j.astype(np.int64)
    ca = (a[:, :2] + a[:, 2:]) / 2
    cb = (b[:, :2] + b[:, 2:]) / 2
    ra = np.max(a[:, 2:] - a[:, :2]) / 2
    rb = np.max(b[:, 2:] - b[:, :2]) / 2
    ta, tb = cKDTree(ca), cKDTree(cb)
    m = ta.sparse_distance_matrix(tb, ra + rb, p=np.inf, output_type="ndarray")
    i, j = m["i"].astype(np.int64), m["j"].astype(np.int64)
    iw = np.minimum(a[i, 2], b[j, 2]) - np.maximum(a[i, 0], b[j, 0])
    ih = np.minimum(a[i, 3], b[j, 3]) - np.maximum(a[i, 1], b[j, 1])
    keep = (iw > 0) & (ih > 0)
    return i[keep], j[keep]


def box_area(boxes: np.ndarray) -> np.ndarray:
    """``(N,)`` areas of ``(N, 4)`` XYXY boxes (negative extents count as 0)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    wh = np.clip(boxes[:, 2:] - boxes[:, :2], 0, None)
    return wh[:, 0] * wh[:, 1]


def pair_box_iou(a: np.ndarray, b: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """IoU of the box pairs ``(a[i[k]], b[j[k]])``, elementwise.

    Written out because ``torchvision.ops.box_iou`` computes the full N x M matrix, and only
    the (sparse) overlapping pairs are needed here.
    """
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[i, 2], b[j, 2]) - np.maximum(a[i, 0], b[j, 0]), 0, None)
    ih = np.clip(np.minimum(a[i, 3], b[j, 3]) - np.maximum(a[i, 1], b[j, 1]), 0, None)
    inter = iw * ih
    union = box_area(a)[i] + box_area(b)[j] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def pair_mask_iou(pred_masks: Sequence[CropMask], gt_masks: Sequence[CropMask], i: np.ndarray,
                  j: np.ndarray) -> np.ndarray:
    """Mask IoU of the pairs ``(pred_masks[i[k]], gt_masks[j[k]])`` (:meth:`CropMask.iou`)."""
    return np.asarray([pred_masks[a].iou(gt_masks[b]) for a, b in zip(i.tolist(), j.tolist())],
                      np.float64).reshape(-1)


def iou_pairs(pred_boxes: np.ndarray, gt_boxes: np.ndarray,
              pred_masks: Optional[Sequence[CropMask]] = None,
              gt_masks: Optional[Sequence[CropMask]] = None,
              pred_labels: Optional[np.ndarray] = None,
              gt_labels: Optional[np.ndarray] = None) -> Pairs:
    """Sparse IoU between predictions and ground truth of one image.

    Args:
        pred_boxes, gt_boxes: ``(N, 4)`` / ``(M, 4)`` XYXY px.
        pred_masks, gt_masks: masks of the image; when both are given, mask IoU is used, else
            box IoU.
        pred_labels, gt_labels: when both are given, only same-label pairs are kept.

    Returns:
        ``(rows, cols, iou)``: prediction index, ground-truth index and IoU (> 0) of every pair
        whose boxes overlap.
    """
    i, j = box_overlap_candidates(pred_boxes, gt_boxes)
    if pred_labels is not None and gt_labels is not None and len(i):
        same = np.asarray(pred_labels)[i] == np.asarray(gt_labels)[j]
        i, j = i[same], j[same]
    if len(i) == 0:
        return _empty_pairs()
    if pred_masks is not None and gt_masks is not None:
        v = pair_mask_iou(pred_masks, gt_masks, i, j)
    else:
        v = pair_box_iou(pred_boxes, gt_boxes, i, j)
    keep = v > 0
    return i[keep], j[keep], v[keep]


def distance_pairs(pred_xy: np.ndarray, gt_xy: np.ndarray, radius: np.ndarray | float,
                   pred_labels: Optional[np.ndarray] = None,
                   gt_labels: Optional[np.ndarray] = None) -> Pairs:
    """Pairs of points within ``radius`` px (Euclidean, inclusive) as ``(rows, cols, distance)``.

    Args:
        pred_xy, gt_xy: ``(N, 2)`` / ``(M, 2)`` x, y px.
        radius: the matching radius in px.
    """
    pred_xy = np.asarray(pred_xy, np.float64).reshape(-1, 2)
    gt_xy = np.asarray(gt_xy, np.float64).reshape(-1, 2)
    if len(pred_xy) == 0 or len(gt_xy) == 0:
        return _empty_pairs()
    tp, tg = cKDTree(pred_xy), cKDTree(gt_xy)
    hits = tp.query_ball_tree(tg, float(radius))
    i = np.asarray([a for a, js in enumerate(hits) for _ in js], np.int64)
    j = np.asarray([b for js in hits for b in js], np.int64)
    if len(i) == 0:
        return _empty_pairs()
    if pred_labels is not None and gt_labels is not None:
        same = np.asarray(pred_labels)[i] == np.asarray(gt_labels)[j]
        i, j = i[same], j[same]
    d = np.linalg.norm(pred_xy[i] - gt_xy[j], axis=1)
    return i, j, d


def match_pairs(rows: np.ndarray, cols: np.ndarray, weights: np.ndarray,
                valid: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """One-to-one assignment among candidate pairs (Hungarian, ``linear_sum_assignment``).

    Maximises first the number of matched pairs among the ``valid`` ones, then the sum of
    ``weights`` (in [0, 1]; IoU, or ``1 - distance / radius``) as a tie-break. When every row and
    column appears in at most one valid pair, that set is the answer and no solver runs; else
    the Hungarian algorithm runs on each connected group of conflicting pairs.

    Returns:
        indices into ``rows``/``cols`` of the matched pairs.
    """
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    weights = np.asarray(weights, np.float64)
    idx = np.arange(len(rows)) if valid is None else np.flatnonzero(valid)
    if len(idx) == 0:
        return np.zeros(0, np.int64)
    r, c = rows[idx], cols[idx]
    # a pair whose row and column are in no other pair is its own group: matched as is
    free = (np.bincount(r)[r] == 1) & (np.bincount(c)[c] == 1)
    if free.all():
        return idx
    keep: List[np.ndarray] = [idx[free]]
    idx = idx[~free]
    ur, ri = np.unique(rows[idx], return_inverse=True)
    uc, ci = np.unique(cols[idx], return_inverse=True)
    nr, nc = len(ur), len(uc)
    graph = coo_matrix((np.ones(len(idx)), (ri, nr + ci)), shape=(nr + nc, nr + nc))
    _, comp = connected_components(graph, directed=False)
    pair_comp = comp[ri]
    order = np.argsort(pair_comp, kind="stable")
    starts = np.flatnonzero(np.r_[True, pair_comp[order][1:] != pair_comp[order][:-1]])
    ends = np.r_[starts[1:], len(order)]
    for s, e in zip(starts, ends):
        sel = order[s:e]
        lr, lri = np.unique(ri[sel], return_inverse=True)
        lc, lci = np.unique(ci[sel], return_inverse=True)
        k = max(1, min(len(lr), len(lc)))
        cost = np.zeros((len(lr), len(lc)))
        cost[lri, lci] = -(1.0 + weights[idx[sel]] / (2.0 * k))
        pos = np.full((len(lr), len(lc)), -1, np.int64)
        pos[lri, lci] = idx[sel]
        a, b = linear_sum_assignment(cost)
        ok = cost[a, b] < 0
        keep.append(pos[a[ok], b[ok]])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
