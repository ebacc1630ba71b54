"""Merging tile detections into one set of slide detections.

1. In each tile, a detection that touches an interior tile edge (one with an analysed
   neighbour across it) may be cut: it is dropped there and taken from the neighbour, which holds
   it whole as long as ``overlap`` >= the largest object (:func:`drop_cut`).
2. Detections move to level-0 slide pixels; a mask moves by an offset (and is resized with its
   crop when the analysis grid is resampled), never through a slide raster (:func:`tile_to_slide`).
3. Objects that lie whole in two overlapping tiles are found twice: torchvision's
   ``batched_nms`` on boxes (per class) removes the duplicates, and for masks a suppression
   stands only when the two masks' IoU (:meth:`CropMask.iou`, on their crops) confirms it
   (:func:`merge_detections`). NMS runs per spatial cell (with a margin of the largest object)
   so that a slide with a million nuclei is not one O(N^2) NMS.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torchvision.ops import batched_nms

from ..structures.instances import Instances
from ..structures.masks import mask_pair_ious
from .tiling import touches_edges


def drop_cut(inst: Instances, edges: Tuple[bool, bool, bool, bool], margin: float = 2.0
             ) -> Instances:
    """The detections of one tile (tile pixels) minus those within ``margin`` px of an interior
    edge ``(left, top, right, bottom)``: those are taken from the neighbouring tile."""
    if len(inst) == 0 or not any(edges):
        return inst
    return inst[~cut_by_edges(inst.boxes, inst.image_size, edges, margin)]


def cut_by_edges(boxes: np.ndarray, size: Tuple[int, int], edges: Tuple[bool, bool, bool, bool],
                 margin: float = 2.0) -> np.ndarray:
    """``(N,)`` bool: which of a tile's boxes (tile px, the tile ``size`` (h, w)) :func:`drop_cut`
    drops."""
    return touches_edges(boxes, int(size[1]), int(size[0]), edges, margin)


def tile_to_slide(inst: Instances, origin: Tuple[float, float], level0_per_analysis: float,
                  slide_size: Tuple[int, int]) -> Instances:
    """Move one tile's detections to level-0 slide pixels.

    Args:
        inst: detections in tile pixels of the analysis grid.
        origin: ``(x0, y0)`` of the tile in analysis pixels.
        level0_per_analysis: level-0 px per analysis px (1.0 when analysing level 0 at its own
            mpp).
        slide_size: ``(height, width)`` of level 0.

    Returns:
        Instances of image size ``slide_size``: boxes XYXY level-0 px (clipped to the slide),
        masks moved by the tile's offset (:meth:`CropMask.translate`), and resized with their
        crops when ``level0_per_analysis`` is not 1 (:meth:`CropMask.rescale`).
    """
    H, W = int(slide_size[0]), int(slide_size[1])
    ratio = float(level0_per_analysis)
    ox, oy = float(origin[0]), float(origin[1])
    boxes = (inst.boxes.astype(np.float64) + np.array([ox, oy, ox, oy])) * ratio
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, W)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, H)
    masks = None
    if inst.masks is not None:
        ix, iy = int(round(ox)), int(round(oy))
        if ratio == 1.0:
            masks = [m.translate(ix, iy, (H, W)) for m in inst.masks]
        else:
            big = (int(np.ceil(H / ratio)) + 1, int(np.ceil(W / ratio)) + 1)  # analysis grid
            masks = [m.translate(ix, iy, big).rescale(ratio, (H, W)) for m in inst.masks]
    return Instances((H, W), boxes.astype(np.float32), inst.scores, inst.labels, masks)


def merge_detections(inst: Instances, iou_thresh: float = 0.5, mask_iou_thresh: float = 0.5,
                     cell: Optional[float] = None) -> Instances:
    """Remove duplicates from slide detections gathered from overlapping tiles.

    Class-wise NMS (``torchvision.ops.batched_nms``) at ``iou_thresh`` on the boxes; when the
    detections have masks, a suppressed detection is restored unless its mask IoU with the
    detection that suppressed it (same class, highest box IoU) is >= ``mask_iou_thresh``.
    NMS runs per square cell of side ``cell`` (default: 8 x the largest box, at least 512 px),
    each cell seeing its neighbours' detections within two largest-object margins (so that a
    chain A suppresses B, B would suppress C is seen whole), so results equal one global NMS
    for objects no larger than the margin. Cells are small so that each NMS is cheap (its cost
    grows with the square of the detections it sees); a cell finds its neighbours' detections
    through the 3 x 3 cells around it, not by scanning the slide.

    Returns the kept detections, sorted by descending score.
    """
    n = len(inst)
    if n == 0:
        return inst
    boxes = inst.boxes.astype(np.float64)
    wh = boxes[:, 2:] - boxes[:, :2]
    margin = 2.0 * float(max(1.0, wh.max()))
    if cell is None:
        cell = max(512.0, 4.0 * margin)
    cell = max(float(cell), margin)  # the 3 x 3 neighbourhood must hold the margin
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    ci = np.floor(cx / cell).astype(np.int64)
    cj = np.floor(cy / cell).astype(np.int64)
    tb = torch.from_numpy(boxes.astype(np.float32))
    ts = torch.from_numpy(inst.scores.astype(np.float32))
    tl = torch.from_numpy(inst.labels)
    keep = np.zeros(n, bool)
    b32 = boxes.astype(np.float32)
    pair_s, pair_k = [], []  # suppressed detection, the kept one whose mask must confirm it
    # group detections by home cell
    ci0, cj0 = ci - ci.min() + 1, cj - cj.min() + 1
    stride = int(ci0.max()) + 2
    keys = cj0 * stride + ci0
    order = np.argsort(keys, kind="stable")
    ukeys, starts = np.unique(keys[order], return_index=True)
    bounds = np.r_[starts, n]
    where = {int(k): (int(a), int(b)) for k, a, b in zip(ukeys, bounds[:-1], bounds[1:])}
    nbr = [dj * stride + di for dj in (-1, 0, 1) for di in (-1, 0, 1)]
    for key, (a0, a1) in where.items():
        group = order[a0:a1]
        i0, j0 = ci[group[0]], cj[group[0]]
        x0, y0 = i0 * cell - margin, j0 * cell - margin
        x1, y1 = (i0 + 1) * cell + margin, (j0 + 1) * cell + margin
        near = np.concatenate([order[slice(*where[key + d])] for d in nbr if key + d in where])
        near.sort()
        ext = near[(cx[near] >= x0) & (cx[near] < x1) & (cy[near] >= y0) & (cy[near] < y1)]
        ext_t = torch.from_numpy(ext)
        k = batched_nms(tb[ext_t], ts[ext_t], tl[ext_t], iou_thresh).numpy()
        kept_ext = np.zeros(len(ext), bool)
        kept_ext[k] = True
        home = (ci[ext] == i0) & (cj[ext] == j0)
        keep[ext[kept_ext & home]] = True
        if inst.masks is not None:
            sup, kk = ext[home & ~kept_ext], ext[kept_ext]
            if len(sup) and len(kk):
                # each suppressed detection's kept detection of its class with the highest box
                # IoU (the first on ties); none (IoU 0): it stays
                best = _best_overlap(b32, inst.labels, sup, kk)
                keep[sup[best < 0]] = True
                pair_s.append(sup[best >= 0])
                pair_k.append(kk[best[best >= 0]])
    if pair_s and inst.masks is not None:
        masks = inst.masks
        s_idx, k_idx = np.concatenate(pair_s), np.concatenate(pair_k)
        ious = mask_pair_ious([masks[i] for i in s_idx.tolist()],
                              [masks[i] for i in k_idx.tolist()])
        keep[s_idx[ious < mask_iou_thresh]] = True  # boxes overlap but the masks do not: two objects
    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(-inst.scores[idx], kind="stable")]
    return inst[idx]


def _best_overlap(boxes: np.ndarray, labels: np.ndarray, sup: np.ndarray, kk: np.ndarray
                  ) -> np.ndarray:
    """For each detection ``sup[a]``: the position in ``kk`` of the detection of the same label
    whose box has the highest IoU with it (``torchvision.ops.box_iou``'s float32 arithmetic;
    the first in ``kk`` on ties), -1 when no such box overlaps it. Only pairs whose boxes
    overlap in x are formed (sorted by x0, within the widest box)."""
    xs = boxes[kk, 0]
    by_x = np.argsort(xs, kind="stable")
    xs = xs[by_x]
    wmax = float((boxes[kk, 2] - boxes[kk, 0]).max())
    sb = boxes[sup]
    lo = np.searchsorted(xs, sb[:, 0] - (wmax + 1.0), "left")  # a margin for rounding
    hi = np.searchsorted(xs, sb[:, 2], "left")
    cnt = np.maximum(hi - lo, 0)
    a = np.repeat(np.arange(len(sup)), cnt)
    b = by_x[np.repeat(lo - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))]
    same = labels[sup[a]] == labels[kk[b]]
    a, b = a[same], b[same]
    b1, b2 = boxes[sup[a]], boxes[kk[b]]
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    w = np.clip(np.minimum(b1[:, 2], b2[:, 2]) - np.maximum(b1[:, 0], b2[:, 0]), 0, None)
    h = np.clip(np.minimum(b1[:, 3], b2[:, 3]) - np.maximum(b1[:, 1], b2[:, 1]), 0, None)
    inter = w * h
    iou = inter / (area1 + area2 - inter)
    pos = iou > 0
    a, b, iou = a[pos], b[pos], iou[pos]
    best = np.full(len(sup), -1, np.int64)
    if len(a):
        o = np.lexsort((b, -iou, a))
        first = o[np.r_[True, a[o][1:] != a[o][:-1]]]
        best[a[first]] = b[first]
    return best
