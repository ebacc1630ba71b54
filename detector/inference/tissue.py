"""Tissue detection on a low-resolution thumbnail (Otsu threshold, then morphology), and
regions of interest (``--roi``: a box or a GeoJSON polygon) rasterised at thumbnail scale.

Background tiles are skipped before any model runs; the tissue area reported in the summary is
the mask's area.
"""
from __future__ import annotations

import json
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
from skimage.filters import threshold_otsu


def tissue_mask(thumb: np.ndarray, min_contrast: float = 8.0, close_px: int = 7,
                min_object_px: int = 16) -> np.ndarray:
    """``(h, w)`` bool tissue mask of an RGB thumbnail ``(h, w, 3)`` uint8.

    Brightfield slides (bright background, e.g. H&E) keep pixels darker or more saturated than
    Otsu's threshold; fluorescence slides (dark background) keep brighter ones; which one is
    decided from the thumbnail's median brightness. A closing and a hole fill join nuclei and
    stroma into one tissue region; specks smaller than ``min_object_px`` thumbnail pixels are
    dropped. A nearly uniform thumbnail (an empty slide) has no tissue.
    """
    rgb = np.asarray(thumb)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gray = np.asarray(cv2.GaussianBlur(gray, (3, 3), 0), np.float32)
    # extreme percentiles: a small fragment of tissue on a large glass slide still counts
    lo, hi = np.percentile(gray, (0.05, 99.95))
    if hi - lo < min_contrast:
        return np.zeros(gray.shape, bool)
    t = threshold_otsu(gray)
    if np.median(gray) > 127:  # brightfield: the background is white and unsaturated
        sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32)
        # capped thresholds: on a field that is all tissue Otsu splits nuclei from stroma,
        # and the caps keep pale stroma as tissue
        mask = gray < min(t, 210.0)
        if sat.max() - sat.min() >= min_contrast:
            mask |= sat > min(threshold_otsu(sat), 25.0)
    else:  # fluorescence: the background is dark; nuclei are bright, cytoplasm dim
        mask = gray > lo + 0.25 * (t - lo)
        close_px = max(close_px, int(round(max(gray.shape) / 40)) | 1)
    m = mask.astype(np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (close_px, close_px))
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, k)
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    # fill holes (lumens, fat) inside tissue
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_object_px
    m = keep[lab].astype(np.uint8)
    inv = 1 - m
    n2, lab2, _, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    border = np.unique(np.concatenate([lab2[0], lab2[-1], lab2[:, 0], lab2[:, -1]]))
    holes = ~np.isin(lab2, border) & (inv > 0)
    return (m > 0) | holes


# ------------------------------------------------------------------------------------- ROI
def parse_roi(spec: str) -> List[np.ndarray]:
    """``--roi``: ``"x0,y0,x1,y1"`` (a box in level-0 px) or a GeoJSON file (Polygon /
    MultiPolygon geometries, Features or a FeatureCollection, in level-0 px as QuPath writes
    them). Returns a list of ``(K, 2)`` float polygons (x, y), outer rings only."""
    spec = spec.strip()
    parts = spec.split(",")
    if len(parts) == 4:
        try:
            x0, y0, x1, y1 = (float(p) for p in parts)
        except ValueError:
            x0 = None
        if x0 is not None:
            if x1 <= x0 or y1 <= y0:
                raise ValueError(f"--roi {spec!r}: the box must be x0,y0,x1,y1 with x1 > x0, y1 > y0")
            return [np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)]
    try:
        with open(spec, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"--roi {spec!r} is neither a box 'x0,y0,x1,y1' nor a readable GeoJSON "
                         f"file ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--roi {spec}: not valid JSON ({e})") from None
    polys: List[np.ndarray] = []

    def walk(obj) -> None:
        if isinstance(obj, list):
            for o in obj:
                walk(o)
            return
        if not isinstance(obj, dict):
            return
        t = obj.get("type")
        if t == "FeatureCollection":
            walk(obj.get("features", []))
        elif t == "Feature":
            walk(obj.get("geometry"))
        elif t == "GeometryCollection":
            walk(obj.get("geometries", []))
        elif t == "Polygon":
            polys.append(np.asarray(obj["coordinates"][0], np.float64)[:, :2])
        elif t == "MultiPolygon":
            for p in obj["coordinates"]:
                polys.append(np.asarray(p[0], np.float64)[:, :2])

    walk(data)
    if not polys:
        raise ValueError(f"--roi {spec}: no Polygon or MultiPolygon geometry found")
    return polys


def roi_mask(polys: Sequence[np.ndarray], shape: Tuple[int, int], scale: float) -> np.ndarray:
    """``(h, w)`` bool raster of level-0 polygons at a thumbnail where one pixel is ``scale``
    level-0 px."""
    m = np.zeros(shape, np.uint8)
    for p in polys:
        pts = np.round(np.asarray(p) / scale).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(m, [pts], 1)
    return m > 0


def points_in_roi(points: np.ndarray, polys: Optional[Sequence[np.ndarray]]) -> np.ndarray:
    """``(N,)`` bool: which level-0 points ``(N, 2)`` x, y lie inside any ROI polygon."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    if polys is None:
        return np.ones(len(points), bool)
    from matplotlib.path import Path

    inside = np.zeros(len(points), bool)
    for p in polys:
        inside |= Path(p).contains_points(points)
    return inside
