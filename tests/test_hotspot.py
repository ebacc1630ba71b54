"""The hotspot is the number a grade is read from: it must be the densest window over every
position, checked here against brute force (every integer origin for integer points, every
point-anchored origin for float points, every two-point disc for circles)."""
import itertools
import math

import numpy as np
import pytest

from detector.inference import counting
from detector.structures.instances import Instances


def brute_square_integer(pts, size, win):
    """Most points in any window [x0, x0 + w) x [y0, y0 + h) over every integer origin inside
    the slide (for integer points and sizes an optimum is at an integer origin)."""
    H, W = size
    w, h = win
    xs = np.arange(0, W - w + 1)[:, None]
    ys = np.arange(0, H - h + 1)[:, None]
    inx = ((pts[:, 0] >= xs) & (pts[:, 0] < xs + w)).astype(np.int64)  # (origins x, points)
    iny = ((pts[:, 1] >= ys) & (pts[:, 1] < ys + h)).astype(np.int64)
    return int((inx @ iny.T).max())


def count_in(pts, hs):
    return int(((pts[:, 0] >= hs["x0"]) & (pts[:, 0] < hs["x1"]) & (pts[:, 1] >= hs["y0"])
                & (pts[:, 1] < hs["y1"])).sum())


def test_square_hotspot_is_the_maximum_over_every_integer_origin():
    """200 random point sets (the old 1/16-window grid missed the maximum in more than half of
    them, by up to 5 figures)."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        pts = rng.integers(0, 300, (n, 2)).astype(np.float64)
        hs = counting.hotspot(pts, (300, 300), (50, 70))
        assert hs["count"] == brute_square_integer(pts, (300, 300), (50, 70))
        assert count_in(pts, hs) == hs["count"]  # the window reported holds that many
        assert (hs["x1"] - hs["x0"], hs["y1"] - hs["y0"]) == (50, 70)
        assert 0 <= hs["x0"] and hs["x1"] <= 300 and 0 <= hs["y0"] and hs["y1"] <= 300


def test_square_hotspot_on_float_points_matches_point_anchored_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(40):
        pts = rng.uniform(0, 1000, (int(rng.integers(2, 40)), 2))
        w, h = 180.0, 130.0
        hs = counting.hotspot(pts, (1000, 1000), (w, h))
        # an optimum has its left edge on a point's x (or at the slide's end), top edge likewise
        cx = np.append(np.minimum(pts[:, 0], 1000 - w), 1000 - w)
        cy = np.append(np.minimum(pts[:, 1], 1000 - h), 1000 - h)
        best = max(count_in(pts, {"x0": x, "y0": y, "x1": x + w, "y1": y + h})
                   for x in cx for y in cy)
        assert hs["count"] == best == count_in(pts, hs)


def test_hotspot_finds_a_planted_cluster_and_its_exact_count():
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 10000, (200, 2))
    cluster = rng.uniform(0, 500, (40, 2)) + [6200, 3100]  # 40 figures in a 500 px square
    allp = np.concatenate([pts, cluster])
    hs = counting.hotspot(allp, (10000, 10000), (1000, 1000))
    assert 6200 + 500 - 1000 <= hs["x0"] <= 6200 and 3100 + 500 - 1000 <= hs["y0"] <= 3100
    assert hs["x1"] - hs["x0"] == 1000 and hs["count"] >= 40 and hs["count"] == count_in(allp, hs)
    assert counting.hotspot(np.zeros((0, 2)), (50, 80), (10, 10))["count"] == 0


def test_window_stays_in_the_analysed_region_and_is_cut_to_a_smaller_one():
    # a slide smaller than the window: the whole slide
    hs = counting.hotspot(np.array([[5.0, 5.0]]), (50, 80), (1000, 1000))
    assert (hs["x0"], hs["y0"], hs["x1"], hs["y1"], hs["count"]) == (0, 0, 80, 50, 1)
    # tissue in the right half of the slide only (mask: one pixel = 10 slide px): the window
    # lies in the tissue's bounding box, not on glass, and says how much tissue it holds
    mask = np.zeros((100, 100), bool)
    mask[20:80, 50:90] = True  # x 500..900, y 200..800 slide px
    pts = np.array([[510.0, 210.0], [520.0, 230.0], [880.0, 790.0]])
    hs = counting.hotspot(pts, (1000, 1000), (300, 300), region_mask=mask, mask_scale=10.0)
    assert hs["count"] == 2 and hs["x0"] >= 500 and hs["y0"] >= 200
    assert hs["x1"] <= 900 and hs["y1"] <= 800 and hs["tissue_px2"] == pytest.approx(300 * 300)
    # a tissue narrower than the window: the window is cut to it
    hs = counting.hotspot(pts, (1000, 1000), (500, 500), region_mask=mask, mask_scale=10.0)
    assert (hs["x0"], hs["x1"]) == (500, 900) and hs["y1"] - hs["y0"] == 500
    assert hs["count"] == 2


def brute_disc(pts, r):
    """Most points in a closed disc of radius r: an optimal disc has two points on its rim
    (or holds one point), so try every disc through two points."""
    best = 1
    for a, b in itertools.combinations(range(len(pts)), 2):
        p, q = pts[a], pts[b]
        d = math.dist(p, q)
        if d > 2 * r:
            continue
        mid = (p + q) / 2
        off = math.sqrt(max(r * r - d * d / 4, 0.0))
        n = np.array([-(q - p)[1], (q - p)[0]]) / d
        for c in (mid + off * n, mid - off * n):
            best = max(best, int((np.hypot(*(pts - c).T) <= r + 1e-7).sum()))
    return best


def test_circle_hotspot_matches_every_two_point_disc():
    rng = np.random.default_rng(2)
    for _ in range(25):
        pts = rng.uniform(0, 200, (int(rng.integers(2, 30)), 2))
        hs = counting.hotspot(pts, (200, 200), (60.0, 60.0), shape="circle")
        assert hs["radius"] == 30.0 and hs["count"] == brute_disc(pts, 30.0)
        inside = np.hypot(pts[:, 0] - hs["cx"], pts[:, 1] - hs["cy"]) <= 30.0 + 1e-6
        assert int(inside.sum()) == hs["count"]


def test_window_sizes_and_shapes():
    # 10 HPF of 0.237 mm2 = 2.37 mm2: a 1539.5 um square, a 1737 um circle
    assert counting.window_size_px(2.37, 0.25) == pytest.approx(math.sqrt(2.37) * 4000)
    assert counting.window_size_px(2.0, 0.5, "circle") == pytest.approx(
        2 * math.sqrt(2.0 / math.pi) * 2000)
    with pytest.raises(ValueError, match="hotspot shape"):
        counting.window_size_px(2.0, 0.5, "hexagon")


def test_summary_says_when_the_tissue_is_smaller_than_one_window():
    classes = [{"id": 1, "name": "mitotic figure"}]
    boxes = np.array([[10, 10, 20, 20], [100, 100, 110, 110], [900, 900, 910, 910]], np.float32)
    inst = Instances((1000, 1000), boxes, np.ones(3), [1, 1, 1])
    tissue = np.ones((100, 100), bool)  # 1000 x 1000 px at 0.25 um/px: 0.0625 mm2
    s = counting.summarize(inst, classes, 0.25, 0.0625, [1], region_mask=tissue, mask_scale=10.0)
    hs = s["mitotic_figures"]["hotspot"]
    assert hs["count"] == 3 and hs["tissue_smaller_than_window"] is True
    assert hs["window"] == {"shape": "square", "area_mm2": pytest.approx(2.37), "label": "10 HPF"}
    assert hs["area_mm2"] == pytest.approx(0.0625) and hs["tissue_area_mm2"] == pytest.approx(0.0625)
    assert "smaller than one 10 HPF window" in hs["note"]
    # a window of 0.01 mm2 (400 px) fits: a full window, no note
    s = counting.summarize(inst, classes, 0.25, 0.0625, [1], region_mask=tissue, mask_scale=10.0,
                           hotspot_area_mm2=0.01)
    hs = s["mitotic_figures"]["hotspot"]
    assert hs["tissue_smaller_than_window"] is False and "note" not in hs
    assert hs["window"]["label"] == "0.01 mm²" and hs["area_mm2"] == pytest.approx(0.01)
    assert hs["count"] == 2  # (15, 15) and (105, 105) share a 400 px window; (905, 905) not
    s = counting.summarize(inst, classes, 0.25, 0.0625, [1], hotspot_shape="circle",
                           hotspot_area_mm2=0.01)
    hs = s["mitotic_figures"]["hotspot"]
    assert hs["window"]["shape"] == "circle" and hs["area_mm2"] == pytest.approx(0.01)
    assert hs["count"] == 2


def test_overlay_caption_is_written_once_on_its_own_label(tmp_path):
    """The caption is drawn once, on an opaque label, at a size that grows with the image
    (it was drawn twice over itself, unreadable on a 1000-px tile)."""
    import cv2

    from detector.inference.export import hotspot_caption, write_overlay

    classes = [{"id": 1, "name": "mitotic figure"}]
    inst = Instances((1000, 1000), np.array([[100, 100, 120, 120]], np.float32), [1.0], [1])
    hs = {"x0": 400.0, "y0": 300.0, "x1": 800.0, "y1": 700.0, "count": 64,
          "window": {"label": "10 HPF"}}
    assert hotspot_caption(hs) == "hotspot: 64 MF / 10 HPF"
    small = dict(hs, tissue_smaller_than_window=True, tissue_area_mm2=0.0625)
    assert hotspot_caption(small) == "hotspot: 64 MF in 0.0625 mm² of tissue (< 10 HPF)"
    heights = []
    for side in (256, 1000, 2048):
        thumb = np.full((side, side, 3), 235, np.uint8)
        path = str(tmp_path / f"o{side}.png")
        write_overlay(path, thumb, 1000 / side, inst, classes, [1], hs)
        img = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
        # the label: the dark box above the hotspot rectangle
        dark = (img.max(2) < 40)
        rows = np.flatnonzero(dark.any(1))
        assert len(rows) and rows.max() < 300 * side / 1000  # above the rectangle
        heights.append(rows.max() - rows.min() + 1)
        # the text on it is one colour (no black outline drawn over thin yellow letters)
        box = img[rows.min():rows.max() + 1][:, dark.any(0)]
        yellow = (box[..., 0] > 150) & (box[..., 1] > 100) & (box[..., 2] < 100)
        assert yellow.mean() > 0.05
    assert heights[0] >= 15 and heights[1] >= 25 and heights[2] >= 2 * heights[1] * 0.9


def test_hotspot_options_through_the_slide_pipeline(tmp_path):
    """--hotspot-shape / --hotspot-area reach summary.json; a 1000 px tile (0.0625 mm²) is
    smaller than 10 HPF, and the summary says so."""
    import torch

    from detector.inference.runner import InferenceOptions, infer_slide
    from tests.conftest import shared_path

    boxes = np.array([[100, 100, 110, 110], [150, 120, 160, 130], [700, 700, 710, 710]],
                     np.float32)

    class Fixed(torch.nn.Module):
        def forward(self, images, targets=None):
            return [Instances(tuple(im.shape[-2:]), boxes, np.ones(3, np.float32),
                              np.ones(3, np.int64)) for im in images]

    classes = [{"id": 1, "name": "mitotic figure"}]
    path = str(shared_path("monuseg", "TCGA-2Z-A9J9-01A-01-TS1.tif"))
    opts = dict(mpp=0.25, num_workers=0, progress=False, tile_size=1024, overlap=0)
    s = infer_slide(Fixed(), classes, 0.25, path, str(tmp_path / "a"), InferenceOptions(**opts))
    hs = s["mitotic_figures"]["hotspot"]
    assert hs["count"] == 3 and hs["tissue_smaller_than_window"] and "note" in hs
    assert hs["tissue_area_mm2"] == pytest.approx(s["tissue_area_mm2"], rel=0.01)
    s = infer_slide(Fixed(), classes, 0.25, path, str(tmp_path / "b"),
                    InferenceOptions(hotspot_shape="circle", hotspot_area=0.01, **opts))
    hs = s["mitotic_figures"]["hotspot"]
    assert hs["window"] == {"shape": "circle", "area_mm2": 0.01, "label": "0.01 mm²"}
    assert hs["count"] == 2 and not hs["tissue_smaller_than_window"]
    assert hs["area_mm2"] == pytest.approx(0.01)
