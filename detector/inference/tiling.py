"""Tile geometry: small pure functions of sizes and overlaps (no I/O, no model).

All coordinates are pixels of the *analysis* grid (the slide level, resampled to the model's
training mpp, that tiles are cut from), origin top-left, x right, y down. A tile is an
``(x0, y0, x1, y1)`` tuple of ints, end-exclusive. Following SAHI's ``slicing.py``, the grid is
regular with stride ``tile_size - overlap``; the last row/column is shifted back so that it ends
at the image border (every tile has the full size when the image is at least one tile big), so an
object smaller than ``overlap`` always lies whole inside at least one tile.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

Tile = Tuple[int, int, int, int]


def tile_starts(length: int, tile_size: int, overlap: int) -> List[int]:
    """Start offsets along one axis of ``length`` px for tiles of ``tile_size`` overlapping by
    ``overlap`` px; the last tile ends exactly at ``length``. One start (0) when the axis is not
    longer than a tile."""
    if tile_size <= 0:
        raise ValueError(f"tile_size must be > 0, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size), got {overlap} for tile_size {tile_size}")
    if length <= tile_size:
        return [0]
    stride = tile_size - overlap
    starts = list(range(0, length - tile_size, stride))
    starts.append(length - tile_size)
    # the shifted last tile may coincide with a regular one
    return sorted(set(starts))


def tile_grid(width: int, height: int, tile_size: int, overlap: int) -> List[Tile]:
    """All tiles ``(x0, y0, x1, y1)`` covering a ``width`` x ``height`` image, row-major."""
    xs = tile_starts(width, tile_size, overlap)
    ys = tile_starts(height, tile_size, overlap)
    return [(x, y, min(x + tile_size, width), min(y + tile_size, height)) for y in ys for x in xs]


def grid_shape(width: int, height: int, tile_size: int, overlap: int) -> Tuple[int, int]:
    """``(rows, cols)`` of :func:`tile_grid`; tile ``i`` is at row ``i // cols``, col ``i % cols``."""
    return len(tile_starts(height, tile_size, overlap)), len(tile_starts(width, tile_size, overlap))


def interior_edges(index: int, rows: int, cols: int, selected: Sequence[bool] | None = None
                   ) -> Tuple[bool, bool, bool, bool]:
    """Which edges ``(left, top, right, bottom)`` of tile ``index`` of a ``rows`` x ``cols`` grid
    are interior: another analysed tile lies across them, so that an object cut by that edge is
    seen whole there. Edges on the image border are never interior; with ``selected`` (one bool
    per tile: analysed or skipped as background), an edge whose neighbour is skipped is not
    interior either."""
    r, c = divmod(index, cols)

    def has(rr: int, cc: int) -> bool:
        if not (0 <= rr < rows and 0 <= cc < cols):
            return False
        return True if selected is None else bool(selected[rr * cols + cc])

    return has(r, c - 1), has(r - 1, c), has(r, c + 1), has(r + 1, c)


def touches_edges(boxes: np.ndarray, tile_w: int, tile_h: int,
                  edges: Tuple[bool, bool, bool, bool], margin: float = 1.0) -> np.ndarray:
    """``(N,)`` bool: which boxes (``(N, 4)`` XYXY in tile pixels) come within ``margin`` px of
    one of the tile's interior ``edges`` ``(left, top, right, bottom)``: these objects may be cut
    by the tile edge and are taken from the neighbouring tile instead."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    left, top, right, bottom = edges
    hit = np.zeros(len(boxes), bool)
    if left:
        hit |= boxes[:, 0] <= margin
    if top:
        hit |= boxes[:, 1] <= margin
    if right:
        hit |= boxes[:, 2] >= tile_w - margin
    if bottom:
        hit |= boxes[:, 3] >= tile_h - margin
    return hit


def tiles_in_mask(tiles: Sequence[Tile], mask: np.ndarray, scale: float, min_fraction: float = 0.0
                  ) -> np.ndarray:
    """``(T,)`` bool: tiles whose region holds tissue in ``mask`` (a low-resolution bool image
    where one mask pixel is ``scale`` analysis pixels). A tile is kept when the fraction of tissue
    pixels under it is above ``min_fraction`` (0: any tissue at all)."""
    mh, mw = mask.shape[:2]
    # integral image: O(1) tissue sums per tile
    integral = np.pad(np.cumsum(np.cumsum(mask.astype(np.int64), 0), 1), ((1, 0), (1, 0)))
    keep = np.zeros(len(tiles), bool)
    for i, (x0, y0, x1, y1) in enumerate(tiles):
        a0 = min(int(np.floor(x0 / scale)), mw)
        b0 = min(int(np.floor(y0 / scale)), mh)
        a1 = min(max(int(np.ceil(x1 / scale)), a0 + 1), mw)
        b1 = min(max(int(np.ceil(y1 / scale)), b0 + 1), mh)
        if a1 <= a0 or b1 <= b0:
            continue
        s = integral[b1, a1] - integral[b0, a1] - integral[b1, a0] + integral[b0, a0]
        keep[i] = s > 0 and s / float((a1 - a0) * (b1 - b0)) > min_fraction
    return keep


def tile_cores(width: int, height: int, tile_size: int, overlap: int,
               selected: Sequence[bool] | None = None) -> List[Tile]:
    """The part of each tile of :func:`tile_grid` that it owns: ``(x0, y0, x1, y1)`` per tile,
    row-major. Neighbouring tiles split their overlap in the middle, so the cores of the
    analysed tiles partition the image; across an edge whose neighbour is not analysed (not in
    ``selected``) or the image border, the core reaches the tile's edge. A model that keeps
    only the objects anchored in a tile's core (the U-Net on slides: the centroid of each
    nucleus's seed) finds each object once, and whole while ``overlap`` exceeds the largest
    object."""
    xs = tile_starts(width, tile_size, overlap)
    ys = tile_starts(height, tile_size, overlap)

    def cuts(starts: List[int], length: int) -> List[int]:
        ends = [min(s + tile_size, length) for s in starts]
        return [0] + [(starts[k] + ends[k - 1]) // 2 for k in range(1, len(starts))] + [length]

    cx, cy = cuts(xs, width), cuts(ys, height)
    cols = len(xs)
    cores: List[Tile] = []
    for r, y in enumerate(ys):
        for c, x in enumerate(xs):
            left, top, right, bottom = interior_edges(r * cols + c, len(ys), cols, selected)
            cores.append((cx[c] if left else x, cy[r] if top else y,
                          cx[c + 1] if right else min(x + tile_size, width),
                          cy[r + 1] if bottom else min(y + tile_size, height)))
    return cores
