"""The one mask type (CropMask): exact against pycocotools, crop arithmetic, slides beyond
32-bit run counts, and polygons that are valid GeoJSON on real DSB2018 masks."""
import glob
import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import shapely.geometry as sg

from detector.data.image_io import read_array
from detector.inference.export import write_geojson
from detector.structures import CropMask, Instances
from detector.structures.masks import (counts_from_string, counts_to_string, mask_areas, mask_boxes,
                                       trace_polygons)
from tests.conftest import shared_path


def _random_full(rng, max_side=40):
    H, W = (int(v) for v in rng.integers(1, max_side, 2))
    full = np.zeros((H, W), np.uint8)
    h, w = int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1))
    y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
    full[y0:y0 + h, x0:x0 + w] = rng.random((h, w)) < rng.random()
    return full


def test_round_trips_equal_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(300):
        full = _random_full(rng)
        ref = mask_utils.encode(np.asfortranarray(full))
        m = CropMask.from_full(full)
        assert m.to_coco_rle()["counts"] == ref["counts"]
        assert CropMask.from_coco_rle(ref) == m
        assert CropMask.from_json(json.loads(json.dumps(m.to_json()))) == m
        assert np.array_equal(m.to_full(), full.astype(bool))
        assert m.area == int(mask_utils.area(ref))
        x, y, w, h = mask_utils.toBbox(ref).tolist()
        assert m.bbox == ((x, y, x + w, y + h) if full.any() else (0.0, 0.0, 0.0, 0.0))
        if full.any():
            ys, xs = np.nonzero(full)
            assert m.centroid() == pytest.approx((xs.mean() + 0.5, ys.mean() + 0.5))
    counts = [5, 3, 1000000, 2, 7, 0, 2 ** 40]
    assert counts_from_string(counts_to_string(counts)).tolist() == counts


def test_iou_of_partly_overlapping_crops_equals_pycocotools():
    rng = np.random.default_rng(1)
    for _ in range(200):
        a, b = _random_full(rng, 30), None
        b = np.zeros_like(a)
        H, W = a.shape
        y0, x0 = int(rng.integers(0, H)), int(rng.integers(0, W))
        b[y0:, x0:] = rng.random((H - y0, W - x0)) < 0.7
        ra, rb = (mask_utils.encode(np.asfortranarray(m)) for m in (a, b))
        expect = float(mask_utils.iou([ra], [rb], [0])[0, 0])
        assert CropMask.from_full(a).iou(CropMask.from_full(b)) == pytest.approx(expect, abs=1e-12)


def test_translate_rescale_and_beyond_32_bits():
    crop = np.zeros((4, 6), bool)
    crop[1:, 2:] = True
    m = CropMask.from_crop(crop, 10, 20, (50, 60))
    assert m.bbox == (12, 21, 16, 24) and m.area == 12
    s = m.translate(100, 200, (1000, 800))
    full = np.zeros((1000, 800), np.uint8)
    full[221:224, 112:116] = 1
    assert s.to_coco_rle()["counts"] == mask_utils.encode(np.asfortranarray(full))["counts"]
    assert m.translate(45, 0).area == 3 * 3  # clipped at the image's right edge
    big = m.rescale(2.0, (100, 120))
    assert big.bbox == (24, 42, 32, 48) and big.area == 4 * 12
    # a 100k x 90k slide (9e9 px): pycocotools' 32-bit counts cannot hold it; the crop can
    H, W = 100000, 90000
    a = CropMask.from_crop(np.ones((10, 10), bool), 80000, 99000, (H, W))
    b = a.translate(5, 0)
    assert a.iou(b) == pytest.approx(50 / 150)
    back = CropMask.from_coco_rle(a.to_coco_rle())
    assert back == a and back.area == 100
    assert mask_areas([a, CropMask.empty((H, W)), b]).tolist() == [100, 0, 100]


def _valid_and_exact(m: CropMask) -> sg.MultiPolygon:
    g = sg.MultiPolygon([sg.Polygon(p[0], p[1:]) for p in m.polygons()])
    assert g.is_valid, m
    assert g.area == m.area
    return g


def test_polygons_corner_touching_holes_and_empty():
    # two pixels touching only at a corner: two polygons sharing that corner, not a figure 8
    m = CropMask.from_full(np.array([[1, 0], [0, 1]], np.uint8))
    assert len(m.polygons()) == 2
    _valid_and_exact(m)
    # a ring with a hole, and a hole touching the outline at a corner
    ring = np.ones((5, 5), np.uint8)
    ring[2, 2] = 0
    g = _valid_and_exact(CropMask.from_full(ring))
    assert len(g.geoms[0].interiors) == 1
    c = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0]], np.uint8)
    _valid_and_exact(CropMask.from_full(c))
    rng = np.random.default_rng(2)
    for _ in range(500):
        _valid_and_exact(CropMask.from_full(_random_full(rng, 16)))
    assert CropMask.empty((5, 5)).polygons() == [] and trace_polygons(np.zeros((3, 3))) == []


def test_geojson_of_real_dsb_masks_is_valid_with_holes_and_exact_areas(tmp_path):
    """QuPath reads what shapely accepts: every feature valid, holes kept, area_um2 = pixels."""
    root = shared_path("dsb2018", "stage1_train")
    masks, size = [], None
    for folder in sorted(glob.glob(os.path.join(str(root), "*")))[:15]:  # 636 masks (the issue found 5 invalid polygons among them)
        files = sorted(glob.glob(os.path.join(folder, "masks", "*.png")))
        ms = [read_array(f) for f in files]
        ms = [(m[..., 0] if m.ndim == 3 else m) > 0 for m in ms]
        # one slide-sized canvas: images side by side
        masks.append(ms)
    H = max(m[0].shape[0] for m in masks)
    offsets = np.cumsum([0] + [m[0].shape[1] for m in masks])
    size = (H, int(offsets[-1]))
    objs = [CropMask.from_full(m).translate(int(dx), 0, size)
            for ms, dx in zip(masks, offsets[:-1]) for m in ms if m.any()]
    assert len(objs) >= 600
    boxes = np.array([o.bbox for o in objs], np.float32)
    inst = Instances(size, boxes, np.ones(len(objs)), np.ones(len(objs), np.int64), objs)
    mpp = 0.5
    path = tmp_path / "d.geojson"
    write_geojson(str(path), inst, [{"id": 1, "name": "nucleus"}], mpp, inst.areas())
    feats = json.loads(path.read_text())["features"]
    assert len(feats) == len(objs)
    holes = 0
    for f, o in zip(feats, objs):
        g = sg.shape(f["geometry"])
        assert g.is_valid and not g.is_empty, f["id"]
        assert g.area * mpp * mpp == pytest.approx(f["properties"]["measurements"]["area_um2"],
                                                   abs=1e-3)
        assert g.area == o.area
        polys = g.geoms if g.geom_type == "MultiPolygon" else [g]
        holes += sum(len(p.interiors) for p in polys)
    assert holes >= 1  # DSB has nuclei with holes: kept as interior rings


def test_many_masks_at_once_equal_pycocotools_and_shapely(tmp_path):
    """The slide export handles all masks in one pass (COCO RLE strings, polygons traced on
    shared canvases, centroids, areas, IoUs): each mask's result must be what pycocotools and
    shapely say for that mask alone, holes and corner-only touches included."""
    from detector.inference.export import write_coco_results
    from detector.structures.masks import (mask_centroids_and_areas, mask_outlines,
                                           mask_pair_ious)

    rng = np.random.default_rng(3)
    H, W = 60, 70
    fulls = [_random_full(rng, 40) for _ in range(150)]
    fulls = [np.pad(f, ((0, H - f.shape[0]), (0, W - f.shape[1]))) for f in fulls]
    special = np.zeros((H, W), np.uint8)
    special[10:15, 10:15] = 1
    special[12, 12] = 0  # a hole
    special[15, 15] = 1  # touching the ring only at a corner
    special[20:23, 0] = 1  # a run that goes on into the next column
    special[0:H, 1] = 1
    fulls += [special, np.zeros((H, W), np.uint8), np.ones((H, W), np.uint8)]
    masks = [CropMask.from_full(f) for f in fulls]
    inst = Instances((H, W), mask_boxes(masks).astype(np.float32), rng.random(len(masks)).astype(np.float32),
                     np.ones(len(masks), np.int64), masks)
    path = tmp_path / "d.json"
    write_coco_results(str(path), inst)
    assert path.read_text() == json.dumps(inst.to_coco_results(1))
    for r, f in zip(json.loads(path.read_text()), fulls):
        ref = mask_utils.encode(np.asfortranarray(f))
        assert r["segmentation"]["counts"] == ref["counts"].decode()
    outlines = mask_outlines(masks)
    for i, (m, f) in enumerate(zip(masks, fulls)):
        polys = outlines.polygons(i)
        assert polys == m.polygons()
        g = sg.MultiPolygon([sg.Polygon(p[0], p[1:]) for p in polys])
        assert g.is_valid and g.area == f.sum()
    assert len(outlines.polygons(len(fulls) - 3)) == 3  # ring with its hole, corner pixel, line
    assert any(len(p) == 2 for p in outlines.polygons(len(fulls) - 3))
    cents, areas = mask_centroids_and_areas(masks)
    for c, a, f in zip(cents, areas, fulls):
        ys, xs = np.nonzero(f)
        assert a == f.sum()
        assert (np.isnan(c).all() if a == 0 else
                c.tolist() == pytest.approx([xs.mean() + 0.5, ys.mean() + 0.5]))
    pairs = rng.integers(0, len(masks), (300, 2))
    ious = mask_pair_ious([masks[i] for i in pairs[:, 0]], [masks[j] for j in pairs[:, 1]])
    for (i, j), iou in zip(pairs, ious):
        ra, rb = (mask_utils.encode(np.asfortranarray(fulls[k])) for k in (i, j))
        assert iou == pytest.approx(float(mask_utils.iou([ra], [rb], [0])[0, 0]), abs=1e-12)


def test_masks_from_padded_crops_equal_one_crop_at_a_time():
    """masks_from_crops (the batched constructor Mask R-CNN's paste uses) gives exactly the
    masks of from_crop, one per crop: crops clipped where they leave the image, trimmed to
    their pixels, empty where nothing is left, object pixels at the crop's first pixel."""
    from detector.structures.masks import masks_from_crops

    rng = np.random.default_rng(0)
    seen_empty = seen_clipped = 0
    for _ in range(150):
        n = int(rng.integers(1, 25))
        lh, lw = (int(v) for v in rng.integers(1, 20, 2))
        stack = rng.random((n, lh, lw)) < rng.random()
        hs, ws = rng.integers(1, lh + 1, n), rng.integers(1, lw + 1, n)
        H, W = (int(v) for v in rng.integers(5, 40, 2))
        x0, y0 = rng.integers(-10, W + 2, n), rng.integers(-10, H + 2, n)
        got = masks_from_crops(stack, hs, ws, x0, y0, (H, W))
        assert len(got) == n
        for i in range(n):
            ref = CropMask.from_crop(stack[i, :hs[i], :ws[i]], int(x0[i]), int(y0[i]), (H, W))
            assert got[i] == ref
            seen_empty += ref.is_empty
            seen_clipped += bool(x0[i] < 0 or y0[i] < 0 or x0[i] + ws[i] > W or y0[i] + hs[i] > H)
    assert seen_empty > 10 and seen_clipped > 100  # the cases above were all exercised


def test_many_masks_to_json_equal_pycocotools_and_round_trip():
    """The journal's batched JSON of crop masks: each crop's counts string is what
    pycocotools compresses the crop to, and from_json gives the mask back (empty included)."""
    from detector.structures.masks import masks_to_json

    rng = np.random.default_rng(3)
    masks = [CropMask.empty((50, 60))]
    for _ in range(300):
        full = _random_full(rng)
        masks.append(CropMask.from_full(full))
    out = masks_to_json(masks)
    for m, d in zip(masks, out):
        h, w = m.crop_size
        if not m.is_empty:
            ref = mask_utils.encode(np.asfortranarray(m.crop().astype(np.uint8)))
            assert d["counts"] == ref["counts"].decode("ascii") and d["size"] == [h, w]
        assert CropMask.from_json(json.loads(json.dumps(d))) == m
