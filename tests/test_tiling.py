"""Tile geometry and level choice: pure functions, no model, no I/O."""
import numpy as np
import pytest

from detector.inference.slide import choose_level
from detector.inference.tiling import (grid_shape, interior_edges, tile_grid, tile_starts,
                                       tiles_in_mask, touches_edges)


@pytest.mark.parametrize("length,tile,overlap", [(1000, 256, 64), (256, 256, 64), (100, 256, 64),
                                                 (257, 256, 0), (5000, 512, 96), (1001, 200, 199)])
def test_tiles_cover_axis_with_at_least_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0
    ends = [min(s + tile, length) for s in starts]
    assert ends[-1] == length  # the last tile ends at the border
    for s0, e0, s1 in zip(starts, ends, starts[1:]):
        assert s1 > s0
        assert e0 - s1 >= overlap  # consecutive tiles overlap by at least `overlap`
    if length >= tile:
        assert all(e - s == tile for s, e in zip(starts, ends))  # full-size tiles only


def test_every_object_smaller_than_overlap_lies_whole_in_a_tile():
    W, H, tile, overlap = 900, 700, 200, 50
    tiles = tile_grid(W, H, tile, overlap)
    rng = np.random.default_rng(0)
    for _ in range(500):
        w, h = rng.integers(1, overlap + 1, 2)
        x, y = rng.integers(0, W - w + 1), rng.integers(0, H - h + 1)
        assert any(t[0] <= x and t[1] <= y and x + w <= t[2] and y + h <= t[3] for t in tiles)


def test_grid_shape_and_row_major_order():
    tiles = tile_grid(1000, 600, 256, 64)
    rows, cols = grid_shape(1000, 600, 256, 64)
    assert len(tiles) == rows * cols
    assert tiles[1][1] == tiles[0][1] and tiles[cols][0] == tiles[0][0]


def test_interior_edges_border_and_skipped_neighbours():
    # 3 x 3 grid: the centre tile has four interior edges, a corner two
    assert interior_edges(4, 3, 3) == (True, True, True, True)
    assert interior_edges(0, 3, 3) == (False, False, True, True)
    assert interior_edges(8, 3, 3) == (True, True, False, False)
    # a skipped (background) right neighbour makes the right edge a border
    sel = [True] * 9
    sel[5] = False
    assert interior_edges(4, 3, 3, sel) == (True, True, False, True)
    assert interior_edges(0, 1, 1) == (False, False, False, False)


def test_touches_edges_only_interior_ones():
    boxes = np.array([[0, 50, 10, 60], [50, 50, 60, 60], [246, 10, 256, 20], [100, 250, 110, 256]],
                     np.float32)
    hit = touches_edges(boxes, 256, 256, (True, False, True, False), margin=1)
    assert hit.tolist() == [True, False, True, False]  # the bottom edge is not interior
    hit = touches_edges(boxes, 256, 256, (False, False, False, True), margin=1)
    assert hit.tolist() == [False, False, False, True]


def test_tiles_in_mask_skips_background():
    mask = np.zeros((10, 10), bool)
    mask[0:2, 0:2] = True  # tissue only in the top-left 20x20 px (scale 10)
    tiles = tile_grid(100, 100, 40, 10)
    keep = tiles_in_mask(tiles, mask, scale=10.0)
    assert keep[0] and keep.sum() == 1


def test_choose_level():
    mpps = [0.25, 0.5, 1.0, 2.0]
    assert choose_level(mpps, 0.5) == (1, 1.0)
    assert choose_level(mpps, 0.52) == (1, 1.0)  # within tolerance: no resampling
    lvl, s = choose_level(mpps, 0.8)  # between levels: the finer one, downsampled
    assert lvl == 1 and s == pytest.approx(0.5 / 0.8)
    lvl, s = choose_level(mpps, 0.125)  # finer than the slide: level 0, upsampled
    assert lvl == 0 and s == pytest.approx(2.0)
    assert choose_level(mpps, 5.0) == (3, 0.4)
