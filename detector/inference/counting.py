"""What a pathologist reads off a slide: counts per class, tissue area, mitotic figures per mm^2
and per 10 high-power fields (HPF), the hotspot and the mitotic index.

All positions are level-0 slide pixels; areas become mm^2 through the slide's ``mpp``.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..structures.instances import Instances
from ..structures.masks import mask_centroids_and_areas

#: The HPF area used by the WHO / Elston-Ellis grading tables for a 0.55 mm field diameter.
DEFAULT_HPF_AREA_MM2 = 0.237

_MITOTIC = re.compile(r"mito", re.I)
_NEGATED = re.compile(r"^\s*(non|not|no)[\s_-]", re.I)


def default_mitotic_ids(classes: Sequence[Dict[str, Any]]) -> List[int]:
    """Ids of the classes whose name says mitosis ("mitotic figure", "mitosis", "atypical
    mitosis"), but not "non-mitotic"/"not mitosis"."""
    return [int(c["id"]) for c in classes
            if _MITOTIC.search(str(c["name"])) and not _NEGATED.search(str(c["name"]))]


def resolve_class_ids(spec: Optional[str], classes: Sequence[Dict[str, Any]]) -> List[int]:
    """``--mitotic-classes``: comma-separated class names or ids of the checkpoint's classes
    (None: :func:`default_mitotic_ids`; "" or "none": no class). Raises ValueError naming the
    known classes when a name is unknown."""
    if spec is None:
        return default_mitotic_ids(classes)
    if spec.strip().lower() in ("", "none"):
        return []
    by_name = {str(c["name"]).lower(): int(c["id"]) for c in classes}
    ids = {int(c["id"]) for c in classes}
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part.isdigit() and int(part) in ids:
            out.append(int(part))
        elif part.lower() in by_name:
            out.append(by_name[part.lower()])
        else:
            known = ", ".join(f"{c['id']}={c['name']}" for c in classes)
            raise ValueError(f"--mitotic-classes: {part!r} is not a class of the checkpoint "
                             f"(classes: {known})")
    return sorted(set(out))


def centroids_and_areas(inst: Instances) -> Tuple[np.ndarray, np.ndarray]:
    """``(N, 2)`` centroids x, y (px; mask centroid when masks exist, else box centre) and
    ``(N,)`` areas (px; mask pixels or box area), from the objects' crops only."""
    n = len(inst)
    if inst.masks is None:
        return inst.centroids().astype(np.float64).reshape(n, 2), inst.areas()
    cents = inst.centroids().astype(np.float64).reshape(n, 2)  # box centres of empty masks
    mc, areas = mask_centroids_and_areas(inst.masks)
    has = ~np.isnan(mc[:, 0])
    cents[has] = mc[has]
    return cents, np.where(has, areas, 0.0)


#: Window shapes of the hotspot search (``--hotspot-shape``).
HOTSPOT_SHAPES = ("square", "circle")


def window_size_px(area_mm2: float, mpp: float, shape: str = "square") -> float:
    """Side (square) or diameter (circle) in level-0 px of a window of ``area_mm2``."""
    if shape not in HOTSPOT_SHAPES:
        raise ValueError(f"hotspot shape must be one of {HOTSPOT_SHAPES}, got {shape!r}")
    area_px = area_mm2 * 1e6 / (mpp * mpp)
    return math.sqrt(area_px) if shape == "square" else 2.0 * math.sqrt(area_px / math.pi)


def _region_bounds(region_mask: Optional[np.ndarray], mask_scale: float, pts: np.ndarray,
                   W: int, H: int) -> Tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` level-0 px that the window stays in: the bounding box of the
    analysed region (``region_mask`` pixels, or the slide), grown to hold every point, inside
    the slide."""
    if region_mask is not None and np.asarray(region_mask).any():
        rows = np.flatnonzero(np.asarray(region_mask).any(1))
        cols = np.flatnonzero(np.asarray(region_mask).any(0))
        x0, x1 = cols[0] * mask_scale, (cols[-1] + 1) * mask_scale
        y0, y1 = rows[0] * mask_scale, (rows[-1] + 1) * mask_scale
    else:
        x0, y0, x1, y1 = 0.0, 0.0, float(W), float(H)
    if len(pts):
        x0, y0 = min(x0, math.floor(pts[:, 0].min())), min(y0, math.floor(pts[:, 1].min()))
        x1, y1 = max(x1, math.floor(pts[:, 0].max()) + 1), max(y1, math.floor(pts[:, 1].max()) + 1)
    return max(0.0, x0), max(0.0, y0), min(float(W), x1), min(float(H), y1)


def _max_rectangle_count(px: np.ndarray, py: np.ndarray, ww: float, wh: float,
                         xs: Tuple[float, float], ys: Tuple[float, float]
                         ) -> Tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """The most points any window ``[x0, x0 + ww) x [y0, y0 + wh)`` holds, over every origin
    with ``xs[0] <= x0 <= xs[1]`` and ``ys[0] <= y0 <= ys[1]`` (exact).

    An optimal window can be slid right (down) until its left (top) edge meets one of its
    points or the end of the range without losing a point, so the origins worth trying are the
    points' coordinates clipped to the range plus the range's end: ``cx`` and ``cy``. Each point
    is held by the origins in a rectangle of that candidate grid; a sweep over ``cx`` with a
    segment tree over ``cy`` (range add, global max) finds the most overlapped cell in
    O(N log N). Returns the count, ``cx``, ``cy`` and the best count of every column of ``cx``.
    (No library offers this max-overlap sweep; it is a textbook algorithm, written here.)
    """
    cx = np.unique(np.append(np.clip(px, xs[0], xs[1]), xs[1]))
    cy = np.unique(np.append(np.clip(py, ys[0], ys[1]), ys[1]))
    # a point at p is held by origins p - w < x0 <= p: columns [i0, i1), rows [j0, j1)
    i0, i1 = np.searchsorted(cx, px - ww, "right"), np.searchsorted(cx, px, "right")
    j0, j1 = np.searchsorted(cy, py - wh, "right"), np.searchsorted(cy, py, "right")
    ok = (i0 < i1) & (j0 < j1)
    i0, i1, j0, j1 = i0[ok], i1[ok], j0[ok], j1[ok]
    size = 1
    while size < len(cy):
        size *= 2
    best_sub = [0] * (2 * size)  # max over a node's leaves, its own pending add included
    pending = [0] * (2 * size)

    def add(lo: int, hi: int, v: int) -> None:
        lo += size
        hi += size
        first, last = lo, hi - 1
        while lo < hi:
            if lo & 1:
                best_sub[lo] += v
                pending[lo] += v
                lo += 1
            if hi & 1:
                hi -= 1
                best_sub[hi] += v
                pending[hi] += v
            lo >>= 1
            hi >>= 1
        for leaf in (first, last):
            k = leaf >> 1
            while k:
                best_sub[k] = max(best_sub[2 * k], best_sub[2 * k + 1]) + pending[k]
                k >>= 1

    # events per column: points start being held at i0 and stop at i1
    col = np.concatenate([i0, i1])
    sign = np.concatenate([np.ones(len(i0), np.int64), -np.ones(len(i1), np.int64)])
    lo_j, hi_j = np.concatenate([j0, j0]), np.concatenate([j1, j1])
    order = np.argsort(col, kind="stable")
    col_best = np.zeros(len(cx), np.int64)
    k, n_ev = 0, len(order)
    col_l, sign_l = col[order].tolist(), sign[order].tolist()
    lo_l, hi_l = lo_j[order].tolist(), hi_j[order].tolist()
    while k < n_ev:
        c = col_l[k]
        while k < n_ev and col_l[k] == c:
            add(lo_l[k], hi_l[k], sign_l[k])
            k += 1
        if c < len(cx):
            nxt = col_l[k] if k < n_ev else len(cx)
            col_best[c:nxt] = best_sub[1]  # unchanged until the next event
    return int(col_best.max(initial=0)), cx, cy, col_best


def _column_counts(px, py, ww, wh, cx, cy, i) -> np.ndarray:
    """Points in the window at origin ``(cx[i], cy[j])`` for every ``j``."""
    inx = (px >= cx[i]) & (px < cx[i] + ww)
    ys = np.sort(py[inx])
    return np.searchsorted(ys, cy + wh, "left") - np.searchsorted(ys, cy, "left")


def _max_disc_count(pts: np.ndarray, r: float) -> Tuple[int, float, float]:
    """The most points any closed disc of radius ``r`` holds, and a centre that does (exact):
    an optimal disc can be moved until a point lies on its rim, so for each point the centres
    on the circle of radius ``r`` around it are swept by angle (each neighbour closer than 2r
    is inside for one arc of angles). O(N k log k) for k neighbours within 2r."""
    from scipy.spatial import cKDTree

    tree = cKDTree(pts)
    best, centre = 1, (float(pts[0, 0]), float(pts[0, 1]) - r)
    eps = 1e-9 * max(r, 1.0)
    for a, nb in enumerate(tree.query_ball_point(pts, 2 * r * (1 + 1e-12))):
        nb = [b for b in nb if b != a]
        if len(nb) + 1 <= best:
            continue
        d = pts[nb] - pts[a]
        dist = np.hypot(d[:, 0], d[:, 1])
        phi = np.arctan2(d[:, 1], d[:, 0])
        half = np.arccos(np.clip(dist / (2 * r), 0.0, 1.0))
        start = np.mod(phi - half + np.pi, 2 * np.pi) - np.pi
        end = start + 2 * half
        # arcs that wrap past +pi are held at the sweep's start angle -pi too
        wrap = end >= np.pi
        ang = np.concatenate([start, end, end[wrap] - 2 * np.pi])
        delta = np.concatenate([np.ones(len(start)), -np.ones(len(end)), -np.ones(wrap.sum())])
        init = int(wrap.sum())
        order = np.lexsort((-delta, ang))  # at equal angles enter before leaving (closed disc)
        run = init + np.cumsum(delta[order])
        k = int(np.argmax(run))
        if int(run[k]) + 1 > best:
            best = int(run[k]) + 1
            t = ang[order][k]
            centre = (float(pts[a, 0] + r * math.cos(t)), float(pts[a, 1] + r * math.sin(t)))
    # the exact count at the centre found (closed disc, tolerance for rounding of the rim)
    cnt = int((np.hypot(pts[:, 0] - centre[0], pts[:, 1] - centre[1]) <= r + eps).sum())
    return cnt, centre[0], centre[1]


def hotspot(points: np.ndarray, slide_size: Tuple[int, int], side_px: Tuple[float, float],
            region_mask: Optional[np.ndarray] = None, mask_scale: float = 1.0,
            shape: str = "square") -> Dict[str, Any]:
    """The window with the most points: exact, the maximum over every window position.

    - ``shape="square"``: a ``side_px`` = (width, height) level-0 px rectangle, half-open
      ``[x0, x1) x [y0, y1)``, kept inside the analysed region: the bounding box of
      ``region_mask`` (bool, one pixel = ``mask_scale`` level-0 px; the whole slide when None).
      Where the region is smaller than the window the window is cut to the region (its
      ``x1 - x0`` / ``y1 - y0`` say so). Among windows with the same count the one holding
      the most region pixels wins (ties looked at in up to 256 columns of origins).
    - ``shape="circle"``: a closed disc of diameter ``side_px[0]``; ``cx``, ``cy``, ``radius``
      and its bounding box. Its centre may lie anywhere (near the tissue edge the disc reaches
      onto glass, as a microscope field does).

    Points are ``(N, 2)`` x, y level-0 px. Returns ``{"x0", "y0", "x1", "y1", "count"}`` (and
    ``"tissue_px2"``: the region inside the window in level-0 px², when ``region_mask`` is
    given); ``count`` 0 and no box when there are no points.
    """
    if shape not in HOTSPOT_SHAPES:
        raise ValueError(f"hotspot shape must be one of {HOTSPOT_SHAPES}, got {shape!r}")
    H, W = int(slide_size[0]), int(slide_size[1])
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if len(pts) == 0:
        return {"x0": None, "y0": None, "x1": None, "y1": None, "count": 0}
    if shape == "circle":
        r = float(side_px[0]) / 2.0
        cnt, cxx, cyy = _max_disc_count(pts, r)
        out = {"x0": cxx - r, "y0": cyy - r, "x1": cxx + r, "y1": cyy + r, "count": cnt,
               "cx": cxx, "cy": cyy, "radius": r}
    else:
        bx0, by0, bx1, by1 = _region_bounds(region_mask, mask_scale, pts, W, H)
        ww, wh = min(float(side_px[0]), bx1 - bx0), min(float(side_px[1]), by1 - by0)
        px, py = pts[:, 0], pts[:, 1]
        best, cx, cy, col_best = _max_rectangle_count(px, py, ww, wh, (bx0, bx1 - ww),
                                                      (by0, by1 - wh))
        tied = np.flatnonzero(col_best == best)
        integral = None
        if region_mask is not None and len(tied):
            m = np.asarray(region_mask, bool)
            integral = np.pad(m.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        choice: Optional[Tuple[int, int]] = None
        choice_tissue = -1.0
        for i in tied[np.linspace(0, len(tied) - 1, min(len(tied), 256)).astype(int)]:
            js = np.flatnonzero(_column_counts(px, py, ww, wh, cx, cy, i) == best)
            if integral is None:
                choice = (i, js[0])
                break
            tissue = _mask_sum(integral, cx[i], cy[js], ww, wh, mask_scale)
            k = int(np.argmax(tissue))
            if tissue[k] > choice_tissue:
                choice, choice_tissue = (i, js[k]), tissue[k]
        assert choice is not None  # the densest column holds the best count
        x0, y0 = float(cx[choice[0]]), float(cy[choice[1]])
        out = {"x0": x0, "y0": y0, "x1": x0 + ww, "y1": y0 + wh}
        inside = (px >= x0) & (px < x0 + ww) & (py >= y0) & (py < y0 + wh)
        out["count"] = int(inside.sum())
    if region_mask is not None:
        # the region's thumbnail pixels whose centre lies in the window
        m = np.asarray(region_mask, bool)
        a0, a1 = (int(np.clip(math.ceil(v / mask_scale - 0.5), 0, m.shape[1]))
                  for v in (out["x0"], out["x1"]))
        b0, b1 = (int(np.clip(math.ceil(v / mask_scale - 0.5), 0, m.shape[0]))
                  for v in (out["y0"], out["y1"]))
        sub = m[b0:b1, a0:a1]
        if shape == "circle":
            ys, xs = np.mgrid[b0:b1, a0:a1]
            sub = sub & (np.hypot((xs + 0.5) * mask_scale - out["cx"],
                                  (ys + 0.5) * mask_scale - out["cy"]) <= out["radius"])
        out["tissue_px2"] = float(sub.sum()) * mask_scale * mask_scale
    return out


def _mask_sum(integral: np.ndarray, x0: float, y0s: np.ndarray, ww: float, wh: float,
              mask_scale: float) -> np.ndarray:
    """Region pixels in the windows at ``(x0, y0s[k])`` (mask pixels, from the integral image)."""
    hm, wm = integral.shape[0] - 1, integral.shape[1] - 1
    a0 = int(np.clip(round(x0 / mask_scale), 0, wm))
    a1 = int(np.clip(round((x0 + ww) / mask_scale), 0, wm))
    b0 = np.clip(np.round(y0s / mask_scale).astype(int), 0, hm)
    b1 = np.clip(np.round((y0s + wh) / mask_scale).astype(int), 0, hm)
    return integral[b1, a1] - integral[b0, a1] - integral[b1, a0] + integral[b0, a0]


def density_grid(points: np.ndarray, slide_size: Tuple[int, int], cell_px: float, mpp: float
                 ) -> Tuple[np.ndarray, float]:
    """Points per mm^2 on a grid of square cells of ``cell_px`` level-0 px: ``(rows, cols)``
    float array and the cell side in px."""
    H, W = int(slide_size[0]), int(slide_size[1])
    ny, nx = max(1, int(math.ceil(H / cell_px))), max(1, int(math.ceil(W / cell_px)))
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    hist, _, _ = np.histogram2d(pts[:, 1], pts[:, 0], bins=[ny, nx],
                                range=[[0, ny * cell_px], [0, nx * cell_px]])
    cell_mm2 = (cell_px * mpp / 1000.0) ** 2
    return hist / cell_mm2, cell_px


def summarize(inst: Instances, classes: Sequence[Dict[str, Any]], mpp: float,
              tissue_area_mm2: float, mitotic_ids: Sequence[int],
              hpf_area_mm2: float = DEFAULT_HPF_AREA_MM2,
              centroids: Optional[np.ndarray] = None,
              region_mask: Optional[np.ndarray] = None, mask_scale: float = 1.0,
              hotspot_shape: str = "square", hotspot_area_mm2: Optional[float] = None
              ) -> Dict[str, Any]:
    """The counting part of ``summary.json``.

    - ``counts``: detections per class name;
    - ``mitotic_figures``: total, ``per_mm2`` of analysed tissue, ``per_10_hpf`` (= per_mm2 x
      10 x ``hpf_area_mm2``), and ``hotspot``: the window with the most mitotic figures
      (:func:`hotspot`, exact): by default a square of 10 HPF (10 x ``hpf_area_mm2``);
      ``hotspot_area_mm2`` (e.g. 2.0, the 2 mm² of current guidelines) and ``hotspot_shape``
      ("square" or "circle") choose another window. It holds the level-0 px box, ``count``,
      ``window`` (shape, nominal ``area_mm2``, ``label`` such as "10 HPF" or "2 mm²"),
      ``area_mm2`` of the window as placed, ``tissue_area_mm2`` inside it, and
      ``tissue_smaller_than_window``: true when all the analysed tissue is smaller than one
      window, so the count is that of all the tissue, not of a full window (``note`` says so);
    - ``mitotic_index``: mitotic figures / all nuclei (every detection, mitotic figures
      included) when the model detects other nuclei too; null for a mitosis-only model.
    """
    if centroids is None:
        centroids, _ = centroids_and_areas(inst)
    names = {int(c["id"]): str(c["name"]) for c in classes}
    counts = {names[int(c["id"])]: int((inst.labels == int(c["id"])).sum()) for c in classes}
    is_mit = np.isin(inst.labels, np.asarray(list(mitotic_ids), np.int64))
    n_mit = int(is_mit.sum())
    other_classes = [c for c in classes if int(c["id"]) not in set(mitotic_ids)]
    per_mm2 = n_mit / tissue_area_mm2 if tissue_area_mm2 > 0 else 0.0
    if hotspot_area_mm2 is None:
        hotspot_area_mm2 = 10.0 * hpf_area_mm2
        label = "10 HPF"
    else:
        label = f"{hotspot_area_mm2:g} mm²"
    side_px = window_size_px(hotspot_area_mm2, mpp, hotspot_shape)
    H, W = inst.image_size
    hs = hotspot(centroids[is_mit], (H, W), (side_px, side_px), region_mask=region_mask,
                 mask_scale=mask_scale, shape=hotspot_shape)
    px_mm2 = (mpp / 1000.0) ** 2
    hs["window"] = {"shape": hotspot_shape, "area_mm2": float(hotspot_area_mm2), "label": label}
    small = tissue_area_mm2 < hotspot_area_mm2
    hs["tissue_smaller_than_window"] = bool(small)
    if hs["x0"] is not None:
        if hotspot_shape == "circle":
            hs["area_mm2"] = math.pi * hs["radius"] ** 2 * px_mm2
        else:
            hs["area_mm2"] = (hs["x1"] - hs["x0"]) * (hs["y1"] - hs["y0"]) * px_mm2
        if "tissue_px2" in hs:
            hs["tissue_area_mm2"] = hs.pop("tissue_px2") * px_mm2
    if small:
        held = hs.get("tissue_area_mm2", hs.get("area_mm2"))
        held = f"{held:.3g} mm² of tissue" if held is not None else "all the tissue"
        hs["note"] = (f"the analysed tissue ({tissue_area_mm2:.3g} mm²) is smaller than one "
                      f"{label} window ({hotspot_area_mm2:.3g} mm²): the hotspot holds {held}, "
                      f"so its count is not a count per {label}")
    mitotic_index = None
    if mitotic_ids and other_classes and len(inst) > 0:
        mitotic_index = n_mit / float(len(inst))
    elif mitotic_ids and other_classes:
        mitotic_index = 0.0
    return {
        "counts": counts,
        "total_detections": int(len(inst)),
        "tissue_area_mm2": float(tissue_area_mm2),
        "mitotic_classes": [names[i] for i in mitotic_ids if i in names],
        "mitotic_figures": {
            "total": n_mit,
            "per_mm2": float(per_mm2),
            "per_10_hpf": float(per_mm2 * 10.0 * hpf_area_mm2),
            "hpf_area_mm2": float(hpf_area_mm2),
            "hotspot": hs,
        },
        "mitotic_index": mitotic_index,
    }
