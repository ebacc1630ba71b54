"""The one instance-mask type: :class:`CropMask`, the COCO RLE of the object's crop plus the
crop's offset in its image and the image's size.

A nucleus on a 100k x 100k slide is a 20 x 20 crop at some offset: storing the crop's RLE keeps
every operation proportional to the object, not to the image, and moving a tile's objects onto
the slide is an offset (:meth:`CropMask.translate`), or an offset and a resize for a resampled
pyramid level (:meth:`CropMask.rescale`). Full-image COCO RLE appears only where COCO files are
read or written (:meth:`CropMask.from_coco_rle`, :meth:`CropMask.to_coco_rle`); those two work
without making an image-sized raster and beyond pycocotools' 32-bit run counts (slides above
2**32 px), through the counts-string codec below.

Coordinates: pixels, origin at the image's top-left, x right, y down; ``bbox`` is XYXY at pixel
edges; polygons run along pixel corners. Sizes are ``(height, width)``.
"""
from __future__ import annotations

from operator import attrgetter
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_utils

Size = Tuple[int, int]  # (height, width)
Ring = List[List[int]]  # closed [[x, y], ...] along pixel corners (integers)
Polygon = List[Ring]  # exterior ring, then holes

_UINT32 = 2 ** 32
_EMPTY_RLE: Dict[str, Any] = {"size": [0, 0], "counts": b""}


# ------------------------------------------------------------------ COCO counts-string codec
def counts_to_string(counts: Sequence[int]) -> bytes:
    """pycocotools' ``rleToString`` for run lengths of any size (pycocotools' own is 32-bit and
    only reachable through ``frPyObjects``); :func:`_encode_counts` with one sequence."""
    c = np.asarray(counts, np.int64).reshape(-1)
    return _encode_counts(c, np.asarray([len(c)], np.int64))[0]


def counts_from_string(s: bytes | str) -> np.ndarray:
    """pycocotools' ``rleFrString``, vectorised: the int64 run lengths of a ``counts`` string."""
    if isinstance(s, str):
        s = s.encode("ascii")
    if not s:
        return np.zeros(0, np.int64)
    c = np.frombuffer(s, np.uint8).astype(np.int64) - 48
    last = (c & 0x20) == 0  # a value ends at a char without the continuation bit
    ends = np.flatnonzero(last)
    starts = np.r_[0, ends[:-1] + 1]
    group = np.repeat(np.arange(len(ends)), ends - starts + 1)
    k = np.arange(len(c)) - starts[group]  # position of each char within its value
    x = np.zeros(len(ends), np.int64)
    np.add.at(x, group, (c & 0x1F) << (5 * k))
    nchar = ends - starts + 1
    neg = (c[ends] & 0x10) != 0
    x[neg] |= (-1) << (5 * nchar[neg])
    counts = x.copy()
    if len(counts) > 3:  # counts[i] = x[i] + counts[i - 2] for i > 2
        counts[3::2] = x[1] + np.cumsum(x[3::2])
        counts[4::2] = x[2] + np.cumsum(x[4::2]) if len(counts) > 4 else counts[4::2]
    return counts


def _coco_counts(rle: Dict[str, Any]) -> np.ndarray:
    c = rle["counts"]
    if isinstance(c, (list, tuple, np.ndarray)):
        return np.asarray(c, np.int64)
    return counts_from_string(c)


def _full_rle(counts: np.ndarray, height: int, width: int) -> Dict[str, Any]:
    """A compressed COCO RLE of ``counts`` (pycocotools' C encoder when the image fits it)."""
    size = [int(height), int(width)]
    if int(height) * int(width) < _UINT32:
        return mask_utils.frPyObjects({"size": size, "counts": [int(v) for v in counts]},
                                      size[0], size[1])
    return {"size": size, "counts": counts_to_string(counts.tolist())}


def rle_to_json(rle: Dict[str, Any]) -> Dict[str, Any]:
    """A full-image COCO RLE whose ``counts`` is a str, so that it can be written with json."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def rle_from_json(rle: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of :func:`rle_to_json`: ``counts`` as bytes, as pycocotools wants
    (an uncompressed ``counts`` list is compressed)."""
    counts = rle["counts"]
    if isinstance(counts, list):
        return _full_rle(np.asarray(counts, np.int64), int(rle["size"][0]), int(rle["size"][1]))
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


# ------------------------------------------------------------------------------ the type
class CropMask:
    """One object's mask: the COCO RLE of its tight crop of size ``crop_size`` ``(h, w)``
    (``counts``: the uncompressed run lengths, column-major, starting with background, as
    pycocotools' ``frPyObjects`` takes them; :attr:`rle` is the compressed form), placed with
    its top-left pixel at ``(x0, y0)`` of an image of ``image_size`` ``(H, W)``. An empty mask
    has a 0 x 0 crop at (0, 0). Immutable."""

    __slots__ = ("counts", "crop_size", "x0", "y0", "image_size")

    def __init__(self, counts: np.ndarray, crop_size: Sequence[int], x0: int, y0: int,
                 image_size: Sequence[int]):
        self.counts = np.asarray(counts, np.int64)
        self.crop_size: Size = (int(crop_size[0]), int(crop_size[1]))
        self.x0 = int(x0)
        self.y0 = int(y0)
        self.image_size: Size = (int(image_size[0]), int(image_size[1]))

    # -- construction
    @staticmethod
    def empty(image_size: Sequence[int]) -> "CropMask":
        return CropMask(np.zeros(0, np.int64), (0, 0), 0, 0, image_size)

    @staticmethod
    def from_crop(crop: np.ndarray, x0: int, y0: int, image_size: Sequence[int]) -> "CropMask":
        """The mask that is ``crop`` (``(h, w)`` bool/0-1) at ``(x0, y0)`` of an image of
        ``image_size`` and zero elsewhere; parts outside the image are clipped and the crop is
        trimmed to the object's pixels."""
        H, W = int(image_size[0]), int(image_size[1])
        crop = np.asarray(crop)
        h, w = crop.shape[:2]
        cx0, cy0 = max(0, -int(x0)), max(0, -int(y0))
        cx1, cy1 = min(w, W - int(x0)), min(h, H - int(y0))
        if cx1 <= cx0 or cy1 <= cy0:
            return CropMask.empty((H, W))
        crop = crop[cy0:cy1, cx0:cx1].astype(bool, copy=False)
        rows = np.flatnonzero(crop.any(1))
        if rows.size == 0:
            return CropMask.empty((H, W))
        cols = np.flatnonzero(crop.any(0))
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        tight = crop[r0:r1, c0:c1]
        flat = tight.T.ravel()  # column-major, as COCO
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        edges = np.concatenate(([0], change, [flat.size]))
        counts = np.diff(edges)
        if flat[0]:
            counts = np.concatenate(([0], counts))
        return CropMask(counts, (r1 - r0, c1 - c0), int(x0) + cx0 + c0, int(y0) + cy0 + r0,
                        (H, W))

    @staticmethod
    def from_full(mask: np.ndarray) -> "CropMask":
        """The mask of an image-sized ``(H, W)`` binary raster."""
        return CropMask.from_crop(mask, 0, 0, mask.shape[:2])

    @staticmethod
    def from_coco_rle(rle: Dict[str, Any]) -> "CropMask":
        """The mask of a full-image COCO RLE (``counts`` bytes, str or an uncompressed list),
        without decoding the image (also for images beyond pycocotools' 32-bit counts)."""
        H, W = int(rle["size"][0]), int(rle["size"][1])
        counts = _coco_counts(rle)
        pos = np.concatenate([[0], np.cumsum(counts)])
        n = (len(pos) - 1) // 2
        starts, ends = pos[1:2 * n:2], pos[2:2 * n + 1:2]
        nz = ends > starts
        starts, ends = starts[nz], ends[nz]
        if len(starts) == 0:
            return CropMask.empty((H, W))
        lengths = ends - starts
        idx = np.repeat(starts - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
        col, row = idx // H, idx % H
        x0, y0 = int(col.min()), int(row.min())
        crop = np.zeros((int(row.max()) - y0 + 1, int(col.max()) - x0 + 1), bool)
        crop[row - y0, col - x0] = True
        return CropMask.from_crop(crop, x0, y0, (H, W))

    # -- reading
    @property
    def is_empty(self) -> bool:
        return self.crop_size[0] == 0 or self.crop_size[1] == 0

    @property
    def rle(self) -> Dict[str, Any]:
        """The crop's compressed COCO RLE (``{"size": [h, w], "counts": bytes}``)."""
        h, w = self.crop_size
        if self.is_empty:
            return {"size": [h, w], "counts": b""}
        return mask_utils.frPyObjects({"size": [h, w], "counts": self.counts.tolist()}, h, w)

    def crop(self) -> np.ndarray:
        """The ``(h, w)`` bool crop (its top-left pixel is ``(x0, y0)``)."""
        h, w = self.crop_size
        if self.is_empty:
            return np.zeros((h, w), bool)
        n = len(self.counts)
        alt = _ALTERNATING[:n] if n <= len(_ALTERNATING) else np.arange(n) % 2 == 1
        flat = np.repeat(alt, self.counts)
        return flat.reshape(w, h).T

    def to_full(self) -> np.ndarray:
        """The ``(H, W)`` bool raster (for images that fit in memory)."""
        out = np.zeros(self.image_size, bool)
        if not self.is_empty:
            h, w = self.crop_size
            out[self.y0:self.y0 + h, self.x0:self.x0 + w] = self.crop()
        return out

    @property
    def area(self) -> int:
        """Pixel count."""
        return int(self.counts[1::2].sum())

    @property
    def bbox(self) -> Tuple[float, float, float, float]:
        """XYXY box at pixel edges (the crop is tight); zeros when empty."""
        if self.is_empty:
            return 0.0, 0.0, 0.0, 0.0
        h, w = self.crop_size
        return float(self.x0), float(self.y0), float(self.x0 + w), float(self.y0 + h)

    def centroid(self) -> Optional[Tuple[float, float]]:
        """``(x, y)`` mean of the pixel centres (pixel-edge coordinates, like boxes), or None
        when empty (:func:`mask_centroids`)."""
        if self.is_empty:
            return None
        x, y = mask_centroids([self])[0].tolist()
        return x, y

    def iou(self, other: "CropMask") -> float:
        """Intersection over union with ``other`` (same image), from the two crops' runs
        (:func:`mask_pair_ious`)."""
        return float(mask_pair_ious([self], [other])[0])

    # -- moving
    def translate(self, dx: int, dy: int, image_size: Optional[Sequence[int]] = None
                  ) -> "CropMask":
        """The mask moved by ``(dx, dy)`` px into an image of ``image_size`` (default: the
        same), e.g. from a tile onto the slide; parts outside the new image are clipped."""
        size = self.image_size if image_size is None else (int(image_size[0]), int(image_size[1]))
        if self.is_empty:
            return CropMask.empty(size)
        x0, y0 = self.x0 + int(dx), self.y0 + int(dy)
        h, w = self.crop_size
        if x0 >= 0 and y0 >= 0 and x0 + w <= size[1] and y0 + h <= size[0]:
            return CropMask(self.counts, self.crop_size, x0, y0, size)
        return CropMask.from_crop(self.crop(), x0, y0, size)

    def rescale(self, ratio: float, image_size: Sequence[int]) -> "CropMask":
        """The mask on a pixel grid ``ratio`` times finer (e.g. ``level0_per_analysis``: from
        the analysis grid of a resampled level to level 0), in an image of ``image_size``:
        the crop's corners map to ``round(corner * ratio)`` and its pixels are resized with
        nearest-neighbour."""
        if ratio == 1.0:
            return self.translate(0, 0, image_size)
        if self.is_empty:
            return CropMask.empty(image_size)
        h, w = self.crop_size
        sx0, sy0 = int(round(self.x0 * ratio)), int(round(self.y0 * ratio))
        sx1, sy1 = int(round((self.x0 + w) * ratio)), int(round((self.y0 + h) * ratio))
        crop = cv2.resize(self.crop().astype(np.uint8), (max(1, sx1 - sx0), max(1, sy1 - sy0)),
                          interpolation=cv2.INTER_NEAREST)
        return CropMask.from_crop(crop, sx0, sy0, image_size)

    # -- COCO and JSON
    def to_coco_rle(self) -> Dict[str, Any]:
        """The full-image COCO RLE (``counts`` bytes; ``.decode()`` it for JSON), built from the
        crop's runs without an image-sized raster (:func:`coco_counts_strings`)."""
        H, W = self.image_size
        return {"size": [H, W], "counts": coco_counts_strings([self])[0]}

    def to_json(self) -> Dict[str, Any]:
        """JSON-ready dict: ``{"x0", "y0", "image_size": [H, W], "size": [h, w], "counts"}``
        (``size``/``counts``: the crop's compressed COCO RLE); :func:`masks_to_json` for many."""
        return masks_to_json([self])[0]

    @staticmethod
    def from_json(d: Dict[str, Any]) -> "CropMask":
        """The inverse of :meth:`to_json`."""
        return CropMask(_coco_counts(d), d["size"], d["x0"], d["y0"], d["image_size"])

    # -- polygons
    def polygons(self) -> List[Polygon]:
        """The mask's outline as polygons through pixel corners, valid in the OGC / shapely
        sense: one polygon per 4-connected part (parts touching only at a corner are separate
        polygons, which may share that corner), each ``[exterior, hole, ...]`` with holes as
        interior rings; rings are closed ``[[x, y], ...]`` lists in image px. The polygons'
        area equals :attr:`area`. Empty mask: ``[]``."""
        if self.is_empty:
            return []
        return mask_outlines([self]).polygons(0)

    # -- python
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CropMask):
            return NotImplemented
        return ((self.x0, self.y0, self.image_size, self.crop_size)
                == (other.x0, other.y0, other.image_size, other.crop_size)
                and np.array_equal(self.counts, other.counts))

    def __repr__(self) -> str:
        return (f"CropMask(x0={self.x0}, y0={self.y0}, crop_size={self.crop_size}, "
                f"image_size={self.image_size})")


_ALTERNATING = np.arange(1 << 16) % 2 == 1  # runs alternate background, object, ...


# ------------------------------------------------------------------------ many masks at once
# Every per-object quantity of a slide's masks (areas, centroids, full-image COCO RLE strings,
# polygons) is computed for all masks at once from their concatenated run lengths, so that a
# slide's 10^6 nuclei cost numpy passes, not 10^6 Python calls; the methods of one CropMask
# call the same functions with one mask.
class _Runs(NamedTuple):
    """The object runs of many crops, each cut at its crop's column ends (one vertical segment
    per entry): mask index, crop column, first crop row, length."""

    obj: np.ndarray
    col: np.ndarray
    row: np.ndarray
    length: np.ndarray


def _crop_runs(masks: Sequence[CropMask]) -> _Runs:
    n = len(masks)
    counts = [m.counts for m in masks]
    lens = np.fromiter(map(len, counts), np.int64, n)
    if n == 0 or lens.sum() == 0:
        z = np.zeros(0, np.int64)
        return _Runs(z, z, z, z)
    c = np.concatenate(counts).astype(np.int64, copy=False)
    odd = np.flatnonzero(lens % 2)
    if len(odd):  # a 0 after each odd-length sequence: every mask's counts in (background,
        c = np.insert(c, np.cumsum(lens)[odd], 0)  # object) pairs, the pairs of all in a row
        lens = lens + lens % 2
    npairs = lens // 2
    pair_end = np.cumsum(c)[1::2]  # where each pair ends, counted from the first mask's start
    first = np.cumsum(npairs) - npairs
    base = np.r_[0, pair_end][first]  # run-length total before each mask
    length = c[1::2]
    fg = length > 0
    obj = np.repeat(np.arange(n), npairs)[fg]
    length = length[fg]
    e = pair_end[fg] - base[obj]
    s = e - length
    h = _ints_pair(masks)[0][obj]
    c0, c1 = s // h, (e - 1) // h
    if np.array_equal(c0, c1):
        return _Runs(obj, c0, s - c0 * h, length)
    pieces = c1 - c0 + 1  # a run that goes on into the next column(s): one piece per column
    rep = np.repeat(np.arange(len(s)), pieces)
    col = c0[rep] + np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    hr = h[rep]
    ps, pe = np.maximum(s[rep], col * hr), np.minimum(e[rep], (col + 1) * hr)
    return _Runs(obj[rep], col, ps - col * hr, pe - ps)


def masks_from_crops(stack: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                     x0: np.ndarray, y0: np.ndarray, image_size: Sequence[int]) -> List[CropMask]:
    """:meth:`CropMask.from_crop` for many crops in numpy passes: crop ``i`` is
    ``stack[i, :heights[i], :widths[i]]`` (``stack`` ``(N, h, w)`` bool, padded) placed at
    ``(x0[i], y0[i])`` of an image of ``image_size``; the same masks as ``N`` calls of
    ``from_crop`` (clipped to the image, trimmed to the object's pixels)."""
    H, W = int(image_size[0]), int(image_size[1])
    stack = np.asarray(stack, bool)
    n, lh, lw = stack.shape
    if n == 0:
        return []
    hs, ws = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    xs, ys = np.asarray(x0, np.int64), np.asarray(y0, np.int64)
    r, c = np.arange(lh), np.arange(lw)
    ry, cx = r[None] + ys[:, None], c[None] + xs[:, None]
    keep_r = (r[None] < hs[:, None]) & (ry >= 0) & (ry < H)  # inside the crop and the image
    keep_c = (c[None] < ws[:, None]) & (cx >= 0) & (cx < W)
    m: np.ndarray = stack & keep_r[:, :, None] & keep_c[:, None, :]
    rows = np.asarray(m.any(axis=2))
    cols = np.asarray(m.any(axis=1))
    full = np.asarray(rows.any(axis=1))
    r0, r1 = rows.argmax(1), lh - rows[:, ::-1].argmax(1)
    c0, c1 = cols.argmax(1), lw - cols[:, ::-1].argmax(1)
    # each tight crop column-major (as COCO), all crops one after the other
    win = (((c[None] >= c0[:, None]) & (c[None] < c1[:, None]))[:, :, None]
           & ((r[None] >= r0[:, None]) & (r[None] < r1[:, None]))[:, None, :] & full[:, None, None])
    flat = m.transpose(0, 2, 1)[win]
    sizes = np.where(full, (r1 - r0) * (c1 - c0), 0)
    starts = np.cumsum(sizes) - sizes
    edge = np.zeros(len(flat) + 1, bool)
    edge[1:-1] = flat[1:] != flat[:-1]
    edge[starts[full]] = True
    edge[-1] = True
    pos = np.flatnonzero(edge)
    counts = np.diff(pos)
    first_fg = pos[:-1][flat[pos[:-1]]]  # runs that open a crop with object pixels
    lead = first_fg[np.isin(first_fg, starts[full])]
    run_of = np.searchsorted(starts[full], pos[:-1], side="right") - 1  # index among non-empty
    nruns = np.bincount(run_of, minlength=int(full.sum()))
    if len(lead):  # COCO counts start with background: a 0 before those crops' first run
        at = np.searchsorted(pos[:-1], lead)
        counts = np.insert(counts, at, 0)
        nruns = nruns + np.isin(starts[full], lead)
    parts = np.split(counts, np.cumsum(nruns)[:-1]) if len(nruns) else []
    out: List[CropMask] = []
    it = iter(parts)
    for i in range(n):
        if not full[i]:
            out.append(CropMask.empty((H, W)))
            continue
        out.append(CropMask(next(it), (int(r1[i] - r0[i]), int(c1[i] - c0[i])),
                            int(xs[i] + c0[i]), int(ys[i] + r0[i]), (H, W)))
    return out


def _ints(masks: Sequence[CropMask], attr: str) -> np.ndarray:
    return np.fromiter(map(attrgetter(attr), masks), np.int64, len(masks))


def mask_areas(masks: Sequence[CropMask]) -> np.ndarray:
    """``(N,)`` float64 pixel areas."""
    n = len(masks)
    counts = [m.counts for m in masks]
    lens = np.fromiter(map(len, counts), np.int64, n)
    if n == 0 or lens.sum() == 0:
        return np.zeros(n, np.float64)
    c = np.concatenate(counts).astype(np.int64, copy=False)
    seg = np.repeat(np.arange(n), lens)
    odd = (np.arange(len(c)) - (np.cumsum(lens) - lens)[seg]) % 2 == 1
    return np.bincount(seg[odd], weights=c[odd], minlength=n).astype(np.float64)


def mask_boxes(masks: Sequence[CropMask]) -> np.ndarray:
    """``(N, 4)`` float64 XYXY boxes (pixel edges; zeros for empty masks)."""
    return np.asarray([m.bbox for m in masks], np.float64).reshape(-1, 4)


def mask_centroids(masks: Sequence[CropMask]) -> np.ndarray:
    """``(N, 2)`` float64 ``(x, y)`` means of the pixel centres (pixel-edge coordinates, like
    boxes; :meth:`CropMask.centroid`), NaN for empty masks; from the runs, no decoding."""
    return mask_centroids_and_areas(masks)[0]


def mask_centroids_and_areas(masks: Sequence[CropMask]) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`mask_centroids` and :func:`mask_areas` in one pass over the runs."""
    n = len(masks)
    r = _crop_runs(masks)
    area = np.bincount(r.obj, weights=r.length, minlength=n)
    sx = np.bincount(r.obj, weights=r.col * r.length, minlength=n)
    sy = np.bincount(r.obj, weights=(2 * r.row + r.length - 1) * r.length, minlength=n)
    out = np.full((n, 2), np.nan)
    ok = area > 0
    out[ok, 0] = (_ints(masks, "x0")[ok] + sx[ok] / area[ok]) + 0.5
    out[ok, 1] = (_ints(masks, "y0")[ok] + sy[ok] / (2 * area[ok])) + 0.5
    return out, area


def mask_pair_ious(a: Sequence[CropMask], b: Sequence[CropMask]) -> np.ndarray:
    """``(P,)`` float64 intersection over union of ``a[p]`` and ``b[p]`` (same image) for every
    pair ``p``, from the two masks' column runs only (no rasters); 0 where a mask is empty."""
    n = len(a)
    if n == 0:
        return np.zeros(0, np.float64)
    ra, rb = _crop_runs(a), _crop_runs(b)
    ax, bx = _ints(a, "x0")[ra.obj] + ra.col, _ints(b, "x0")[rb.obj] + rb.col
    ay, by = _ints(a, "y0")[ra.obj] + ra.row, _ints(b, "y0")[rb.obj] + rb.row
    area_a = np.bincount(ra.obj, weights=ra.length, minlength=n)
    area_b = np.bincount(rb.obj, weights=rb.length, minlength=n)
    # the runs of b[p] in the same image column as each run of a[p]
    span = int(max(ax.max(initial=0), bx.max(initial=0))) + 1
    kb = rb.obj * span + bx
    order = np.argsort(kb, kind="stable")
    kb = kb[order]
    ka = ra.obj * span + ax
    lo, hi = np.searchsorted(kb, ka, "left"), np.searchsorted(kb, ka, "right")
    cnt = hi - lo
    ia = np.repeat(np.arange(len(ka)), cnt)
    ib = order[np.repeat(lo - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))]
    overlap = np.minimum(ay[ia] + ra.length[ia], by[ib] + rb.length[ib]) - np.maximum(ay[ia], by[ib])
    inter = np.bincount(ra.obj[ia], weights=np.maximum(overlap, 0), minlength=n)
    union = area_a + area_b - inter
    out = np.zeros(n, np.float64)
    ok = union > 0
    out[ok] = inter[ok] / union[ok]
    return out


def coco_counts_strings(masks: Sequence[CropMask]) -> List[bytes]:
    """The compressed ``counts`` of each mask's full-image COCO RLE (what pycocotools'
    ``encode`` gives for the image-sized raster, also beyond its 32-bit run counts), from the
    crops' runs: no raster, one numpy pass over all masks."""
    n = len(masks)
    if n == 0:
        return []
    r = _crop_runs(masks)
    HW = np.asarray([m.image_size for m in masks], np.int64)
    H, W = HW[:, 0], HW[:, 1]
    starts = (_ints(masks, "x0")[r.obj] + r.col) * H[r.obj] + _ints(masks, "y0")[r.obj] + r.row
    ends = starts + r.length
    obj = r.obj
    # a run that goes on into the next image column is one run of the image
    join = (ends[:-1] == starts[1:]) & (obj[:-1] == obj[1:])
    if join.any():
        starts, obj = starts[np.r_[True, ~join]], obj[np.r_[True, ~join]]
        ends = ends[np.r_[~join, True]]
    nr = np.bincount(obj, minlength=n)
    prev = np.r_[0, ends[:-1]]
    prev[np.r_[True, obj[1:] != obj[:-1]]] = 0  # each mask's first run starts after 0
    last = np.cumsum(nr)
    counts = np.empty(2 * len(starts) + n, np.int64)
    bg = 2 * np.arange(len(starts)) + obj
    counts[bg], counts[bg + 1] = starts - prev, ends - starts
    tail_at = 2 * last + np.arange(n)
    ends_ext = np.r_[0, ends]
    tail = H * W - np.where(nr > 0, ends_ext[last], 0)
    counts[tail_at] = tail
    drop = (tail == 0) & (nr > 0)  # no background after the last run
    lengths = 2 * nr + 1 - drop
    if drop.any():
        counts = np.delete(counts, tail_at[drop])
    return _encode_counts(counts, lengths)


def masks_to_json(masks: Sequence[CropMask]) -> List[Dict[str, Any]]:
    """:meth:`CropMask.to_json` of each mask, the crops' compressed counts encoded in one numpy
    pass (:func:`_encode_counts`) instead of one pycocotools call per mask."""
    n = len(masks)
    if n == 0:
        return []
    counts = [m.counts for m in masks]
    lens = np.fromiter(map(len, counts), np.int64, n)
    strings = _encode_counts(np.concatenate(counts), lens)
    return [{"x0": m.x0, "y0": m.y0, "image_size": list(m.image_size),
             "size": list(m.crop_size), "counts": c.decode("ascii")}
            for m, c in zip(masks, strings)]


def _encode_counts(counts: np.ndarray, lengths: np.ndarray) -> List[bytes]:
    """pycocotools' ``rleToString`` (deltas against the run two before, 5-bit groups with a
    continuation bit, +48) of consecutive count sequences of ``lengths``, vectorised, for run
    lengths of any size."""
    c = np.asarray(counts, np.int64)
    lengths = np.asarray(lengths, np.int64)
    first = np.cumsum(lengths) - lengths
    x = c.copy()
    if len(c):
        local = np.arange(len(c)) - np.repeat(first, lengths)
        d = np.flatnonzero(local > 2)
        x[d] -= c[d - 2]
    groups: List[np.ndarray] = []
    nchar = np.ones(len(x), np.int64)
    active = np.ones(len(x), bool)
    v = x
    while True:
        ch = v & 0x1F
        v = v >> 5
        groups.append(ch)
        more = np.where((ch & 0x10) != 0, v != -1, v != 0) & active
        if not more.any():
            break
        nchar += more
        active = more
    pos = np.cumsum(nchar) - nchar
    out = np.empty(int(nchar.sum()), np.uint8)
    for k, ch in enumerate(groups):
        sel = np.flatnonzero(nchar > k)
        out[pos[sel] + k] = (ch[sel] | np.where(nchar[sel] > k + 1, 0x20, 0)) + 48
    buf = out.tobytes()
    bounds = np.r_[0, np.cumsum(nchar)][np.r_[first, len(c)]].tolist()
    return [buf[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# ------------------------------------------------------------------------------- polygons
class Outlines:
    """The pixel-corner polygons of many masks (:func:`mask_outlines`) as flat arrays:
    ``points`` ``(P, 2)`` int64 ring vertices in image px (each ring open: its first vertex is
    not repeated), rings ``ring_start[r]:ring_start[r + 1]`` of ``points``, polygons
    ``poly_start[q]:poly_start[q + 1]`` of the rings (exterior first, then holes), masks
    ``mask_start[i]:mask_start[i + 1]`` of the polygons."""

    def __init__(self, points: np.ndarray, ring_start: np.ndarray, poly_start: np.ndarray,
                 mask_start: np.ndarray):
        self.points = points
        self.ring_start = ring_start
        self.poly_start = poly_start
        self.mask_start = mask_start

    def __len__(self) -> int:
        return len(self.mask_start) - 1

    @staticmethod
    def cat(items: Sequence["Outlines"]) -> "Outlines":
        """The outlines of the masks of ``items`` one after the other."""
        if not items:
            z = np.zeros(1, np.int64)
            return Outlines(np.zeros((0, 2), np.int64), z, z, z)

        def starts(name: str) -> np.ndarray:
            # each item's starts shifted by the entries of the items before it (the last start
            # of an item is its count of the entries indexed)
            arrs = [getattr(o, name) for o in items]
            shift = np.cumsum([0] + [int(a[-1]) for a in arrs])
            return np.concatenate([a[:-1] + d for a, d in zip(arrs, shift)]
                                  + [shift[-1:]]).astype(np.int64)

        return Outlines(np.concatenate([o.points for o in items]), starts("ring_start"),
                        starts("poly_start"), starts("mask_start"))

    def polygons(self, i: int) -> List[Polygon]:
        """Mask ``i``'s polygons as closed ``[[x, y], ...]`` rings (:meth:`CropMask.polygons`)."""
        out: List[Polygon] = []
        for q in range(int(self.mask_start[i]), int(self.mask_start[i + 1])):
            poly = []
            for r in range(int(self.poly_start[q]), int(self.poly_start[q + 1])):
                ring = self.points[self.ring_start[r]:self.ring_start[r + 1]].tolist()
                ring.append(ring[0])
                poly.append(ring)
            out.append(poly)
        return out

    def closed_points(self) -> Tuple[np.ndarray, np.ndarray]:
        """``points`` with every ring closed (its first vertex repeated at its end) and the
        rings' starts in that array (``R + 1``)."""
        lens = np.diff(self.ring_start)
        idx = np.arange(len(self.points) + len(lens))
        start = self.ring_start[:-1] + np.arange(len(lens))
        last = start + lens  # where the first vertex is repeated
        src = idx - np.repeat(np.arange(len(lens)), lens + 1)
        src[last] = self.ring_start[:-1]
        return self.points[src], np.r_[start, len(idx)]


_CANVAS_PX = 1 << 22  # pixels of one tracing canvas (x 4 upsampled): ~4M, 16 MB of labels
_SHELF = 1024  # px along one shelf of crops on a canvas


def mask_outlines(masks: Sequence[CropMask]) -> Outlines:
    """The polygons of every mask (:meth:`CropMask.polygons`), traced together.

    Own code because no library traces pixel-*edge* outlines (OpenCV traces pixel centres,
    which shaves half a pixel off every side): the crops are laid out side by side, one zero
    pixel apart, on a few large canvases; each canvas is upsampled 2x so that
    ``cv2.findContours`` (8-connected foreground, 4-connected holes, ``RETR_CCOMP``) runs along
    the doubled pixels, and an upsampled boundary pixel ``u`` maps onto the corner
    ``ceil(u / 2)`` of its crop, exact for outer boundaries and holes alike. A mask with two
    pixels that touch only at a corner (and are not otherwise connected) is traced again one
    4-connected part at a time, which keeps every ring simple (a ring never passes a corner
    twice), so the polygons are valid. Rings lose repeated and collinear vertices; a ring left
    with fewer than three is dropped (with its holes)."""
    n = len(masks)
    t = _trace_entries(masks, np.arange(n), np.zeros(n, np.int64), find_diagonal=True)
    diagonal = t.pop("diagonal")
    if diagonal.any():  # trace those masks' 4-connected parts alone
        keep = ~diagonal[t["ring_obj"]]
        pts_keep = np.repeat(keep, t["ring_len"])
        t = {k: (v[pts_keep] if k == "points" else v[keep]) for k, v in t.items()}
        parts: List[CropMask] = []
        pobj, prank = [], []
        for i in np.flatnonzero(diagonal).tolist():
            m = masks[i]
            k_n, lab = cv2.connectedComponents(m.crop().astype(np.uint8), connectivity=4)
            for k in range(1, k_n):
                parts.append(CropMask.from_crop(lab == k, m.x0, m.y0, m.image_size))
                pobj.append(i)
                prank.append(k)
        t2 = _trace_entries(parts, np.asarray(pobj, np.int64), np.asarray(prank, np.int64),
                            find_diagonal=False, first_id=int(t["ring_id"].max(initial=-1)) + 1)
        t2.pop("diagonal")
        t = {k: np.concatenate([t[k], t2[k]]) for k in t}
    return _assemble(t, n)


def _trace_entries(entries: Sequence[CropMask], obj: np.ndarray, rank: np.ndarray,
                   find_diagonal: bool, first_id: int = 0) -> Dict[str, np.ndarray]:
    """Raw contours of ``entries`` (see :func:`mask_outlines`): per ring its mask ``obj``,
    ``rank``, contour id and parent id (-1 for an outer boundary), length and corner points
    (image px); ``diagonal``: the masks with a corner-only touch (when ``find_diagonal``)."""
    n = len(entries)
    runs = _crop_runs(entries)
    hs, ws = _ints_pair(entries)
    x0s, y0s = _ints(entries, "x0"), _ints(entries, "y0")
    # shelf layout, tallest first: crops side by side along shelves of _SHELF px (the last
    # crop of a shelf may run past it), shelves one under the other, canvases of ~_CANVAS_PX
    cx = np.zeros(n, np.int64)
    cy = np.zeros(n, np.int64)
    chunk = np.zeros(n, np.int64)
    width = _SHELF + int(ws.max(initial=0)) + 2
    max_h = max(int(_CANVAS_PX // width), int(hs.max(initial=0)) + 2)
    by_h = np.argsort(-hs, kind="stable")
    by_h = by_h[hs[by_h] > 0]  # empty masks have no pixels
    step = ws[by_h] + 1
    at = np.cumsum(step) - step
    shelf = at // _SHELF
    cx[by_h] = 1 + at - shelf * _SHELF
    first = np.r_[True, shelf[1:] != shelf[:-1]] if len(by_h) else np.zeros(0, bool)
    shelf_h = (hs[by_h][first] + 1).tolist()  # each shelf's tallest crop and a gap
    heights: List[int] = []
    shelf_y, shelf_k = [], []
    y, k = 1, 0
    for sh in shelf_h:
        if y + sh > max_h:  # next canvas
            heights.append(y)
            y, k = 1, k + 1
        shelf_y.append(y)
        shelf_k.append(k)
        y += sh
    heights.append(y)
    if len(by_h):
        row = np.cumsum(first) - 1  # shelves in order (a crop wider than a shelf skips one)
        cy[by_h] = np.asarray(shelf_y, np.int64)[row]
        chunk[by_h] = np.asarray(shelf_k, np.int64)[row]
    out: Dict[str, List[np.ndarray]] = {key: [] for key in
                                        ("ring_obj", "ring_rank", "ring_id", "ring_parent",
                                         "ring_len", "points")}
    diagonal = np.zeros(len(obj) and int(obj.max()) + 1, bool)
    next_id = first_id
    piece_chunk = chunk[runs.obj]
    for k, ch in enumerate(heights):
        sel = piece_chunk == k
        if not sel.any():
            continue
        e = runs.obj[sel]
        # paint entry ids along the column-major canvas: +id at each run's start, -id after
        start = (cx[e] + runs.col[sel]) * ch + cy[e] + runs.row[sel]
        d = np.zeros(width * ch + 1, np.int32)
        d[start] = e + 1
        d[start + runs.length[sel]] = -(e + 1)
        lab = np.cumsum(d[:-1], dtype=np.int32).reshape(width, ch).T  # (ch, width) view
        binary = np.ascontiguousarray(lab != 0).view(np.uint8)
        if find_diagonal:
            a, b, c, dd = binary[:-1, :-1], binary[:-1, 1:], binary[1:, :-1], binary[1:, 1:]
            ys, xs = np.nonzero((a & dd & ~(b | c)) | (b & c & ~(a | dd)))
            if len(ys):
                ids = np.maximum(lab[ys, xs], lab[ys, xs + 1]) - 1
                diagonal[obj[np.unique(ids)]] = True
        up = cv2.resize(binary, (2 * width, 2 * ch), interpolation=cv2.INTER_NEAREST)
        contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            continue
        lens = np.fromiter((len(cn) for cn in contours), np.int64, len(contours))
        pts = np.concatenate(contours).reshape(-1, 2).astype(np.int64)
        firsts = pts[np.cumsum(lens) - lens]
        ent = lab[firsts[:, 1] // 2, firsts[:, 0] // 2].astype(np.int64) - 1
        pe = np.repeat(ent, lens)
        # corner = ceil(u / 2) of the crop's upsampled px = (u + 1) // 2 - canvas origin
        pts = (pts + 1) // 2 - np.stack([cx[pe], cy[pe]], 1) + np.stack([x0s[pe], y0s[pe]], 1)
        parent = hierarchy[0][:, 3].astype(np.int64)
        out["ring_obj"].append(obj[ent])
        out["ring_rank"].append(rank[ent])
        out["ring_id"].append(next_id + np.arange(len(contours)))
        out["ring_parent"].append(np.where(parent >= 0, parent + next_id, -1))
        out["ring_len"].append(lens)
        out["points"].append(pts)
        next_id += len(contours)
    res = {key: (np.concatenate(v) if v else
                 np.zeros((0, 2) if key == "points" else 0, np.int64)) for key, v in out.items()}
    res["diagonal"] = diagonal
    return res


def _ints_pair(masks: Sequence[CropMask]) -> Tuple[np.ndarray, np.ndarray]:
    """``(N,)`` crop heights and widths."""
    hw = np.asarray([m.crop_size for m in masks], np.int64).reshape(-1, 2)
    return hw[:, 0], hw[:, 1]


def _cyclic_prev_next(lens: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Index of each point's predecessor and successor within its ring (rings of ``lens``
    points, one after another)."""
    total = int(lens.sum())
    idx = np.arange(total)
    start = np.cumsum(lens) - lens
    nz = lens > 0
    prev, nxt = idx - 1, idx + 1
    prev[start[nz]] = (start + lens - 1)[nz]
    nxt[(start + lens - 1)[nz]] = start[nz]
    return prev, nxt


def _assemble(t: Dict[str, np.ndarray], n: int) -> Outlines:
    """Clean the rings (no repeated or collinear vertices, at least 3 left), attach holes to
    their exteriors and order them: masks, then parts, then polygons in contour order."""
    pts, lens = t["points"], t["ring_len"]
    R = len(lens)
    rid = np.repeat(np.arange(R), lens)
    prev, _ = _cyclic_prev_next(lens)
    keep = (pts != pts[prev]).any(1)
    pts, rid = pts[keep], rid[keep]
    lens = np.bincount(rid, minlength=R)
    prev, nxt = _cyclic_prev_next(lens)
    p, q = pts[prev], pts[nxt]
    cross = (pts[:, 0] - p[:, 0]) * (q[:, 1] - pts[:, 1]) - (pts[:, 1] - p[:, 1]) * (q[:, 0] - pts[:, 0])
    keep = (cross != 0) & (lens >= 3)[rid]
    pts, rid = pts[keep], rid[keep]
    lens = np.bincount(rid, minlength=R)
    valid = lens >= 3
    parent = t["ring_parent"]
    ids = t["ring_id"]
    # a hole belongs to its exterior's polygon, when that exterior survived
    pos = np.full(int(ids.max(initial=-1)) + 2, -1, np.int64)
    pos[ids] = np.arange(R)
    outer = parent < 0
    par_row = np.where(outer, -1, pos[np.maximum(parent, 0)])
    valid &= outer | ((par_row >= 0) & valid[np.maximum(par_row, 0)] & outer[np.maximum(par_row, 0)])
    poly_key = np.where(outer, ids, parent)
    rings = np.flatnonzero(valid)
    order = rings[np.lexsort((ids[rings], ~outer[rings], poly_key[rings], t["ring_rank"][rings],
                              t["ring_obj"][rings]))]
    # the points of the rings in that order
    pstart = np.cumsum(lens) - lens
    olens = lens[order]
    src = np.repeat(pstart[order] - (np.cumsum(olens) - olens), olens) + np.arange(int(olens.sum()))
    robj, rkey, rrank = t["ring_obj"][order], poly_key[order], t["ring_rank"][order]
    new_poly = np.r_[True, (robj[1:] != robj[:-1]) | (rkey[1:] != rkey[:-1])
                     | (rrank[1:] != rrank[:-1])] if len(order) else np.zeros(0, bool)
    poly_first = np.flatnonzero(new_poly)
    mask_count = np.bincount(robj[poly_first], minlength=n)
    return Outlines(pts[src], np.r_[0, np.cumsum(olens)], np.r_[poly_first, len(order)],
                    np.r_[0, np.cumsum(mask_count)])


def trace_polygons(mask: np.ndarray, offset: Tuple[int, int] = (0, 0)) -> List[Polygon]:
    """Pixel-corner polygons of a binary ``(h, w)`` mask (:func:`mask_outlines`), in the mask's
    pixels plus ``offset`` ``(x, y)``."""
    m = np.asarray(mask)
    polys = CropMask.from_crop(m != 0, 0, 0, m.shape[:2]).polygons()
    ox, oy = int(offset[0]), int(offset[1])
    if ox or oy:
        polys = [[[[x + ox, y + oy] for x, y in ring] for ring in poly] for poly in polys]
    return polys
