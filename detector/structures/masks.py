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

from typing import Any, Dict, List, Optional, Sequence, Tuple

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
    only reachable through ``frPyObjects``, used instead when the image fits it)."""
    c = np.asarray(counts, np.int64)
    if len(c) == 0:
        return b""
    x = c.copy()
    x[3:] -= c[1:-2]
    # emit 5-bit groups until the rest is the sign extension of the last group
    out: List[int] = []
    for v in x.tolist():
        more = True
        while more:
            ch = v & 0x1F
            v >>= 5
            more = (v != -1) if (ch & 0x10) else (v != 0)
            if more:
                ch |= 0x20
            out.append(ch + 48)
    return bytes(out)


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

    def _column_runs(self) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(column, first row, length)`` of each object run of the crop when no run goes on
        into the next column (then None)."""
        h = self.crop_size[0]
        cum = np.cumsum(self.counts)
        starts, ends = cum[0:len(cum) - 1:2], cum[1::2]
        col = starts // h
        if len(starts) and not np.array_equal(col, (ends - 1) // h):
            return None
        return col, starts - col * h, ends - starts

    def centroid(self) -> Optional[Tuple[float, float]]:
        """``(x, y)`` mean of the pixel centres (pixel-edge coordinates, like boxes), or None
        when empty."""
        if self.is_empty:
            return None
        n = float(self.area)
        runs = self._column_runs()
        if runs is not None:  # from the runs: no decoding
            col, row, length = runs
            cx = float(col @ length) / n
            cy = float(((2 * row + length - 1) * length).sum()) / (2 * n)
        else:
            h, w = self.crop_size
            m = self.crop()
            cy = float(m.sum(1) @ np.arange(h)) / n
            cx = float(m.sum(0) @ np.arange(w)) / n
        return self.x0 + cx + 0.5, self.y0 + cy + 0.5

    def iou(self, other: "CropMask") -> float:
        """Intersection over union with ``other`` (same image), from the overlap of the two
        crops only."""
        if self.is_empty or other.is_empty:
            return 0.0
        (ah, aw), (bh, bw) = self.crop_size, other.crop_size
        ix0, iy0 = max(self.x0, other.x0), max(self.y0, other.y0)
        ix1, iy1 = min(self.x0 + aw, other.x0 + bw), min(self.y0 + ah, other.y0 + bh)
        if ix1 <= ix0 or iy1 <= iy0:
            return 0.0
        a = self.crop()[iy0 - self.y0:iy1 - self.y0, ix0 - self.x0:ix1 - self.x0]
        b = other.crop()[iy0 - other.y0:iy1 - other.y0, ix0 - other.x0:ix1 - other.x0]
        inter = int(np.count_nonzero(a & b))
        union = self.area + other.area - inter
        return inter / union if union else 0.0

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
        crop's runs without an image-sized raster."""
        H, W = self.image_size
        if self.is_empty:
            return _full_rle(np.asarray([H * W], np.int64), H, W)
        runs = self._column_runs()
        if runs is not None:  # each crop run lies in one column: offset it into the image
            col, row, length = runs
            starts = (self.x0 + col) * H + self.y0 + row
            ends = starts + length
        else:
            starts, ends = self._image_runs_decoded()
        join = np.flatnonzero(ends[:-1] == starts[1:])  # a run continues into the next column
        if len(join):
            starts = np.delete(starts, join + 1)
            ends = np.delete(ends, join)
        edges = np.empty(2 * len(starts), np.int64)
        edges[0::2], edges[1::2] = starts, ends
        counts = np.diff(np.concatenate([[0], edges, [H * W]]))
        if counts[-1] == 0:
            counts = counts[:-1]
        return _full_rle(counts, H, W)

    def _image_runs_decoded(self) -> Tuple[np.ndarray, np.ndarray]:
        H = self.image_size[0]
        h, w = self.crop_size
        crop = self.crop()
        padded = np.zeros((w, h + 2), np.int8)  # column-major runs: one row per column
        padded[:, 1:-1] = crop.T
        d = np.diff(padded, axis=1)
        sc, sr = np.nonzero(d == 1)
        ec, er = np.nonzero(d == -1)
        starts = (self.x0 + sc).astype(np.int64) * H + self.y0 + sr
        ends = (self.x0 + ec).astype(np.int64) * H + self.y0 + er
        return starts, ends

    def to_json(self) -> Dict[str, Any]:
        """JSON-ready dict: ``{"x0", "y0", "image_size": [H, W], "size": [h, w], "counts"}``
        (``size``/``counts``: the crop's compressed COCO RLE)."""
        return {"x0": self.x0, "y0": self.y0, "image_size": list(self.image_size),
                "size": list(self.crop_size), "counts": self.rle["counts"].decode("ascii")}

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
        return trace_polygons(self.crop(), (self.x0, self.y0))

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


def trace_polygons(mask: np.ndarray, offset: Tuple[int, int] = (0, 0)) -> List[Polygon]:
    """Pixel-corner outlines of a binary ``(h, w)`` mask (see :meth:`CropMask.polygons`), in
    the mask's pixels plus ``offset`` ``(x, y)``.

    Own code because no library traces pixel-*edge* outlines (OpenCV traces pixel centres,
    which shaves half a pixel off every side): the mask is upsampled 2x so that
    ``cv2.findContours`` (8-connected foreground, 4-connected holes) runs along the doubled
    pixels, and an upsampled boundary pixel ``u`` maps onto the corner ``ceil(u / 2)``, exact
    for outer boundaries and holes alike. Where two pixels touch only at a corner (and are not
    otherwise connected) each 4-connected part is traced alone, which keeps every ring simple
    (a ring never passes a corner twice), so the polygons are valid.
    """
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if not m.any():
        return []
    a, b, c, d = m[:-1, :-1], m[:-1, 1:], m[1:, :-1], m[1:, 1:]
    diagonal = ((a & d & ~(b | c)) | (b & c & ~(a | d))).any()
    if not diagonal:  # 8-connected parts are 4-connected: trace them all at once
        return _trace(m, offset)
    n, parts = cv2.connectedComponents(m, connectivity=4)
    out: List[Polygon] = []
    for k in range(1, n):
        ys, xs = np.nonzero(parts == k)
        y0, x0 = int(ys.min()), int(xs.min())
        sub = (parts[y0:int(ys.max()) + 1, x0:int(xs.max()) + 1] == k).astype(np.uint8)
        out += _trace(sub, (offset[0] + x0, offset[1] + y0))
    return out


def _trace(m: np.ndarray, offset: Tuple[int, int]) -> List[Polygon]:
    """Polygons of a 0/1 uint8 mask whose 8-connected parts are 4-connected."""
    h, w = m.shape
    up = cv2.copyMakeBorder(cv2.resize(m, (2 * w, 2 * h), interpolation=cv2.INTER_NEAREST),
                            1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    polys: Dict[int, Polygon] = {}
    holes: List[Tuple[int, Ring]] = []
    shift = np.array([offset[0] * 2, offset[1] * 2], np.int64)
    for k, (cnt, hier) in enumerate(zip(contours, hierarchy[0])):
        # corner = ceil((u - 1) / 2) = u // 2 (u: padded upsampled px), plus the offset
        pts = (cnt.reshape(-1, 2).astype(np.int64) + shift) // 2
        ring = _clean_ring(pts)
        if ring is None:
            continue
        if hier[3] < 0:  # no parent: an outer boundary
            polys[k] = [ring]
        else:
            holes.append((int(hier[3]), ring))
    for parent, ring in holes:
        if parent in polys:
            polys[parent].append(ring)
    return list(polys.values())


def _clean_ring(pts: np.ndarray) -> Optional[Ring]:
    """Closed ring without repeated or collinear vertices, or None when degenerate."""
    prev = np.concatenate((pts[-1:], pts[:-1]))
    pts = pts[(pts != prev).any(axis=1)]
    if len(pts) < 3:
        return None
    prev = np.concatenate((pts[-1:], pts[:-1]))
    nxt = np.concatenate((pts[1:], pts[:1]))
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - \
        (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
    pts = pts[cross != 0]
    if len(pts) < 3:
        return None
    ring = pts.tolist()  # integer pixel corners
    ring.append(ring[0])
    return ring


# ------------------------------------------------------------------------ many masks at once
def mask_areas(masks: Sequence[CropMask]) -> np.ndarray:
    """``(N,)`` float64 pixel areas."""
    return np.asarray([m.area for m in masks], np.float64).reshape(-1)


def mask_boxes(masks: Sequence[CropMask]) -> np.ndarray:
    """``(N, 4)`` float64 XYXY boxes (pixel edges; zeros for empty masks)."""
    return np.asarray([m.bbox for m in masks], np.float64).reshape(-1, 4)

