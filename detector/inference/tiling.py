"""Tile geometry: small pure functions of sizes and overlaps (no I/O, no model).

All coordinates are pixels of the *analysis* grid (the slide level, resampled to the model's
training mpp, that tiles are cut from), origin top-left, x right, y down. A tile is an
``(x0, y0, x1, y1)`` tuple of ints, end-exclusive. Following SAHI's ``slicing.py``, the grid is
regular with stride ``tile_size - overlap``; the last row/column is shifted back so that it ends
at the image border (every tile has the full size when the image is at least one tile big), so an
object smaller than ``overlap`` always lies whole inside at least one tile.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

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


# ------------------------------------------------------------------------------ memory bounds
# Peak bytes per analysis px of one tile inside the model (float input, normalised copy,
# backbone and FPN activations at stride 2-4): an upper estimate for the models run at native
# resolution. Measured (peak RSS growth, CPU, one 1024-px tile, 10 detections): R18-FPN Mask
# R-CNN 121-153, R50-FPN 208-266, U-Net (unet_cpu) 264-307 (two runs). Masks pasted into full-tile rasters add about
# 7 bytes per px per detection; they are not counted (masks are to be kept as crops).
# benchmarks/bench_tile_memory.py measures these.
MODEL_BYTES_PER_PX = 400
# Fraction of the available memory a slide run may plan to use.
MEMORY_FRACTION = 0.8


def bounded_tile_size(tile_size: int, region_size: Tuple[int, int]) -> int:
    """The tile side actually used: ``tile_size``, but no larger than the region analysed
    (``(height, width)`` in analysis px: the ROI's bounding box, or the slide), since a
    larger tile only adds blank pixels and memory."""
    return max(1, min(int(tile_size), max(int(region_size[0]), int(region_size[1]))))


def tile_memory_bytes(tile_size: int, batch_size: int, num_workers: int = 0,
                      level_per_analysis: float = 1.0, streams: int = 1) -> Tuple[int, int]:
    """Estimated peak memory of a slide run's tiles in flight, ``(model, reading)`` bytes: one
    batch inside the model per CPU stream (:data:`MODEL_BYTES_PER_PX`; on the GPU when the
    model is there), and the batches the DataLoader reads ahead (two per worker, plus those
    in use), each tile read at its pyramid level (``level_per_analysis`` level px per
    analysis px) as RGB and converted (host memory)."""
    px = float(tile_size) ** 2
    read_px = 3.0 * max(1.0, level_per_analysis) ** 2 + 6.0
    streams = max(1, int(streams))
    queued = (2 * max(0, num_workers) + streams) * batch_size
    return int(streams * batch_size * px * MODEL_BYTES_PER_PX), int(queued * px * read_px)


def available_memory_bytes() -> Optional[int]:
    """Memory this machine can still give (``MemAvailable`` of /proc/meminfo), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_tile_memory(tile_size: int, batch_size: int, num_workers: int = 0,
                      level_per_analysis: float = 1.0, available: Optional[int] = None,
                      gpu_available: Optional[int] = None, streams: int = 1) -> int:
    """Raise ValueError, naming the flags to change, when the :func:`tile_memory_bytes`
    estimate exceeds :data:`MEMORY_FRACTION` of the available host memory (or, with
    ``gpu_available``, the free GPU memory for the model's part). Checked before any tile is
    read, so that a run stops with a message instead of being killed by the kernel. Returns
    the estimate in bytes."""
    model, reading = tile_memory_bytes(tile_size, batch_size, num_workers, level_per_analysis,
                                       streams)
    host = reading if gpu_available is not None else model + reading
    avail = available_memory_bytes() if available is None else available
    for need, free, where in ((host, avail, "memory"), (model if gpu_available is not None
                                                       else 0, gpu_available, "GPU memory")):
        if free is not None and need > MEMORY_FRACTION * free:
            fits = int(tile_size * math.sqrt(MEMORY_FRACTION * free / need))
            raise ValueError(
                f"tiles of {tile_size} px (--tile-size, at most the region analysed) with "
                f"--batch-size {batch_size}, --num-workers {num_workers} and --streams "
                f"{max(1, int(streams))} need about "
                f"{need / 2 ** 30:.1f} GiB of {where}, but {free / 2 ** 30:.1f} GiB is "
                f"available; use a smaller --tile-size (at most about {max(64, fits // 64 * 64)}"
                " here; 512-2048 is usual), --batch-size or --streams")
    return model + reading


def region_size(grid_size: Tuple[int, int], polygons: Optional[Sequence[np.ndarray]] = None,
                level0_per_analysis: float = 1.0) -> Tuple[int, int]:
    """``(height, width)`` in analysis px of the region a run analyses: the bounding box of the
    ROI ``polygons`` (``(K, 2)`` x, y level-0 px each), within the analysis grid of
    ``grid_size`` ``(height, width)``; the whole grid without polygons."""
    gh, gw = int(grid_size[0]), int(grid_size[1])
    if not polygons:
        return gh, gw
    pts = np.concatenate([np.asarray(p, np.float64).reshape(-1, 2) for p in polygons])
    w, h = (pts.max(axis=0) - pts.min(axis=0)) / float(level0_per_analysis)
    return min(gh, int(math.ceil(h)) + 2), min(gw, int(math.ceil(w)) + 2)


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
