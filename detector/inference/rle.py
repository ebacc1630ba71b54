"""COCO run-length encoding of small objects in slide coordinates, without a slide raster.

A COCO RLE of one nucleus on a 40k x 40k slide is a handful of runs, but
``pycocotools.mask.encode`` needs the whole H x W raster (1.6 GB) to make it. These functions
build the slide-sized RLE directly from the object's local crop mask and its offset, and read a
crop back, so masks stay RLE in slide coordinates end to end. The string format is exactly
pycocotools' (column-major runs starting with background, LEB128-like ``counts`` string with
deltas from the run two back), so pycocotools reads what is written here and vice versa.
pycocotools itself counts runs in 32 bits: :func:`mask_iou` and :func:`rle_area` fall back to
crop arithmetic for slides above 2**32 px, where pycocotools would overflow.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import pycocotools.mask as mask_utils

_UINT32 = 2 ** 32


def counts_to_string(counts: List[int]) -> bytes:
    """pycocotools' ``rleToString`` (written here because pycocotools only exposes it through
    ``encode`` of a full raster)."""
    out = bytearray()
    for i, c in enumerate(counts):
        x = int(c)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            out.append(ch + 48)
    return bytes(out)


def counts_from_string(s: bytes | str) -> List[int]:
    """pycocotools' ``rleFrString``: the run lengths of a compressed ``counts`` string."""
    if isinstance(s, str):
        s = s.encode("ascii")
    counts: List[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            c = s[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _counts(rle: Dict[str, Any]) -> List[int]:
    c = rle["counts"]
    return list(c) if isinstance(c, list) else counts_from_string(c)


def encode_crop(crop: np.ndarray, x0: int, y0: int, height: int, width: int) -> Dict[str, Any]:
    """COCO RLE (``{"size": [height, width], "counts": bytes}``) of an image of size
    ``height`` x ``width`` that is zero except for the binary ``crop`` (h x w) placed with its
    top-left pixel at ``(x0, y0)``. Parts of the crop outside the image are clipped.
    Equal to ``pycocotools.mask.encode`` of the full raster, without making it."""
    crop = np.asarray(crop).astype(bool, copy=False)
    h, w = crop.shape
    # clip to the image
    cx0, cy0 = max(0, -x0), max(0, -y0)
    cx1, cy1 = min(w, width - x0), min(h, height - y0)
    if cx1 <= cx0 or cy1 <= cy0:
        return {"size": [int(height), int(width)], "counts": counts_to_string([height * width])}
    crop = crop[cy0:cy1, cx0:cx1]
    x0, y0 = x0 + cx0, y0 + cy0
    h, w = crop.shape
    # per column: 0->1 and 1->0 transitions (column-major, as COCO)
    padded = np.zeros((h + 2, w), np.int8)
    padded[1:-1] = crop
    d = np.diff(padded, axis=0)  # (h+1, w)
    sy, sx = np.nonzero(d.T == 1)  # transposed: ordered by column then row
    ey, ex = np.nonzero(d.T == -1)
    # after transposing, the first index is the column, the second the row
    starts = (x0 + sy).astype(np.int64) * height + y0 + sx
    ends = (x0 + ey).astype(np.int64) * height + y0 + ex
    if len(starts) == 0:
        return {"size": [int(height), int(width)], "counts": counts_to_string([height * width])}
    # runs that end at the bottom of one column and restart at the top of the next merge
    join = np.flatnonzero(ends[:-1] == starts[1:])
    if len(join):
        keep_s = np.ones(len(starts), bool)
        keep_e = np.ones(len(ends), bool)
        keep_s[join + 1] = False
        keep_e[join] = False
        starts, ends = starts[keep_s], ends[keep_e]
    edges = np.empty(2 * len(starts), np.int64)
    edges[0::2] = starts
    edges[1::2] = ends
    counts = np.diff(np.concatenate([[0], edges, [int(height) * int(width)]])).tolist()
    if counts[-1] == 0:
        counts.pop()
    return {"size": [int(height), int(width)], "counts": counts_to_string(counts)}


def _one_runs(rle: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    counts = np.asarray(_counts(rle), dtype=np.int64)
    pos = np.concatenate([[0], np.cumsum(counts)])
    starts = pos[1:-1:2]
    ends = pos[2::2]
    n = min(len(starts), len(ends))
    starts, ends = starts[:n], ends[:n]
    nz = ends > starts
    return starts[nz], ends[nz]


def decode_crop(rle: Dict[str, Any]) -> Tuple[np.ndarray, int, int]:
    """The object's tight crop of a slide-sized RLE: ``(mask (h, w) bool, x0, y0)`` with
    ``(x0, y0)`` the crop's top-left pixel in the RLE's image. An empty RLE gives a 0 x 0 crop
    at (0, 0). Never rasterises the whole image."""
    height = int(rle["size"][0])
    starts, ends = _one_runs(rle)
    if len(starts) == 0:
        return np.zeros((0, 0), bool), 0, 0
    col_s, col_e = starts // height, (ends - 1) // height
    x0, x1 = int(col_s.min()), int(col_e.max()) + 1
    if np.any(col_e > col_s):  # a run spans columns: the object spans the full height
        y0, y1 = 0, height
    else:
        y0, y1 = int((starts % height).min()), int(((ends - 1) % height).max()) + 1
    crop = np.zeros((y1 - y0, x1 - x0), bool)
    for s, e in zip(starts.tolist(), ends.tolist()):
        while s < e:
            col = s // height
            seg_end = min(e, (col + 1) * height)
            r0 = s - col * height
            crop[r0 - y0:seg_end - col * height - y0, col - x0] = True
            s = seg_end
    return crop, x0, y0


def rle_area(rle: Dict[str, Any]) -> int:
    """Pixel count of an RLE (any image size)."""
    starts, ends = _one_runs(rle)
    return int((ends - starts).sum())


def rle_bbox(rle: Dict[str, Any]) -> Tuple[float, float, float, float]:
    """XYXY box (pixel edges) of an RLE's pixels; zeros when empty."""
    crop, x0, y0 = decode_crop(rle)
    if crop.size == 0:
        return 0.0, 0.0, 0.0, 0.0
    ys = np.flatnonzero(crop.any(1))
    xs = np.flatnonzero(crop.any(0))
    return float(x0 + xs[0]), float(y0 + ys[0]), float(x0 + xs[-1] + 1), float(y0 + ys[-1] + 1)


def mask_iou(a: Dict[str, Any], b: Dict[str, Any]) -> float:
    """IoU of two RLEs of the same image. pycocotools' ``iou`` on the RLEs when their image fits
    its 32-bit counts, else from the two crops."""
    h, w = int(a["size"][0]), int(a["size"][1])
    if h * w < _UINT32:
        return float(mask_utils.iou([_bytes(a)], [_bytes(b)], [0])[0, 0])
    ca, ax, ay = decode_crop(a)
    cb, bx, by = decode_crop(b)
    if ca.size == 0 or cb.size == 0:
        return 0.0
    x0, y0 = min(ax, bx), min(ay, by)
    x1 = max(ax + ca.shape[1], bx + cb.shape[1])
    y1 = max(ay + ca.shape[0], by + cb.shape[0])
    ma = np.zeros((y1 - y0, x1 - x0), bool)
    mb = np.zeros_like(ma)
    ma[ay - y0:ay - y0 + ca.shape[0], ax - x0:ax - x0 + ca.shape[1]] = ca
    mb[by - y0:by - y0 + cb.shape[0], bx - x0:bx - x0 + cb.shape[1]] = cb
    union = np.count_nonzero(ma | mb)
    return float(np.count_nonzero(ma & mb) / union) if union else 0.0


def _bytes(rle: Dict[str, Any]) -> Dict[str, Any]:
    c = rle["counts"]
    if isinstance(c, str):
        c = c.encode("ascii")
    elif isinstance(c, list):
        return mask_utils.frPyObjects(rle, *rle["size"])
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": c}
