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
    areas = np.zeros(n, np.float64)
    for i, m in enumerate(inst.masks):
        c = m.centroid()
        if c is not None:
            cents[i] = c
            areas[i] = m.area
    return cents, areas


def hotspot(points: np.ndarray, slide_size: Tuple[int, int], side_px: Tuple[float, float],
            bins_per_side: int = 16, region_mask: Optional[np.ndarray] = None,
            mask_scale: float = 1.0) -> Dict[str, Any]:
    """The window of ``side_px`` = (width, height) level-0 px with the most points.

    Points (``(N, 2)`` x, y level-0 px) are binned in a 2-D histogram whose bin is 1/
    ``bins_per_side`` of the window, and every window position on that grid is summed with an
    integral image (so the count is exact for the window found; the position is on the bin grid).
    The window stays inside the slide (it is clipped when the slide is smaller). Ties prefer
    windows centred on more tissue when ``region_mask`` (bool, one pixel = ``mask_scale``
    level-0 px) is given.

    Returns ``{"x0", "y0", "x1", "y1"}`` (level-0 px, XYXY) and ``"count"``; ``count`` 0 and no
    box when there are no points.
    """
    H, W = int(slide_size[0]), int(slide_size[1])
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    ww, wh = min(float(side_px[0]), W), min(float(side_px[1]), H)
    if len(pts) == 0:
        return {"x0": None, "y0": None, "x1": None, "y1": None, "count": 0}
    bw, bh = max(ww / bins_per_side, 1.0), max(wh / bins_per_side, 1.0)
    nx, ny = int(math.ceil(W / bw)), int(math.ceil(H / bh))
    hist, _, _ = np.histogram2d(pts[:, 1], pts[:, 0], bins=[ny, nx],
                                range=[[0, ny * bh], [0, nx * bw]])
    kx, ky = min(int(round(ww / bw)), nx), min(int(round(wh / bh)), ny)
    integral = np.pad(np.cumsum(np.cumsum(hist, 0), 1), ((1, 0), (1, 0)))
    sums = (integral[ky:, kx:] - integral[:-ky, kx:] - integral[ky:, :-kx] + integral[:-ky, :-kx])
    # window origins whose window ends inside the slide
    max_j = max(0, int(math.floor((H - wh) / bh + 1e-9)))
    max_i = max(0, int(math.floor((W - ww) / bw + 1e-9)))
    sums = sums[:max_j + 1, :max_i + 1]
    best = float(sums.max())
    cand = np.argwhere(sums == best)
    j, i = cand[0]
    if region_mask is not None and len(cand) > 1:
        scores = []
        for jj, ii in cand:
            a0, b0 = int(ii * bw / mask_scale), int(jj * bh / mask_scale)
            a1, b1 = int((ii * bw + ww) / mask_scale) + 1, int((jj * bh + wh) / mask_scale) + 1
            scores.append(region_mask[b0:b1, a0:a1].sum())
        j, i = cand[int(np.argmax(scores))]
    x0, y0 = float(i * bw), float(j * bh)
    x1, y1 = x0 + ww, y0 + wh
    # the exact count inside the window found
    inside = (pts[:, 0] >= x0) & (pts[:, 0] < x1) & (pts[:, 1] >= y0) & (pts[:, 1] < y1)
    return {"x0": x0, "y0": y0, "x1": x1, "y1": y1, "count": int(inside.sum())}


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
              region_mask: Optional[np.ndarray] = None, mask_scale: float = 1.0
              ) -> Dict[str, Any]:
    """The counting part of ``summary.json``.

    - ``counts``: detections per class name;
    - ``mitotic_figures``: total, ``per_mm2`` of analysed tissue, ``per_10_hpf`` (= per_mm2 x
      10 x ``hpf_area_mm2``), and ``hotspot``: the square window of 10 HPF area with the most
      mitotic figures (level-0 px box, count, area);
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
    side_px = math.sqrt(10.0 * hpf_area_mm2) * 1000.0 / mpp
    H, W = inst.image_size
    hs = hotspot(centroids[is_mit], (H, W), (side_px, side_px), region_mask=region_mask,
                 mask_scale=mask_scale)
    if hs["x0"] is not None:
        hs["area_mm2"] = (hs["x1"] - hs["x0"]) * (hs["y1"] - hs["y0"]) * (mpp / 1000.0) ** 2
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
