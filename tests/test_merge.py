"""Slide-coordinate RLE and merging tile detections (synthetic, exact)."""
import numpy as np
import pycocotools.mask as mask_utils
import pytest

from detector.inference.merge import drop_cut, merge_detections, tile_to_slide
from detector.structures import CropMask, Instances
from detector.structures.masks import counts_from_string, counts_to_string


def encode_crop(crop, x0, y0, H, W):
    return CropMask.from_crop(crop, x0, y0, (H, W))


def decode_crop(m):
    return m.crop(), m.x0, m.y0


def rle_area(m):
    return m.area


def rle_bbox(m):
    return m.bbox


def mask_iou(a, b):
    return a.iou(b)


def test_encode_crop_equals_pycocotools_encode_of_full_raster():
    rng = np.random.default_rng(0)
    for _ in range(300):
        H, W = (int(v) for v in rng.integers(1, 40, 2))
        h, w = int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1))
        x0, y0 = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
        crop = rng.random((h, w)) < rng.random()
        full = np.zeros((H, W), np.uint8)
        full[y0:y0 + h, x0:x0 + w] = crop
        ref = mask_utils.encode(np.asfortranarray(full))
        got = encode_crop(crop, x0, y0, H, W)
        assert got.to_coco_rle()["counts"] == ref["counts"] and list(got.image_size) == [H, W]
        back, bx, by = decode_crop(got)
        rec = np.zeros((H, W), bool)
        rec[by:by + back.shape[0], bx:bx + back.shape[1]] = back
        assert np.array_equal(rec, full.astype(bool))
        assert rle_area(got) == int(full.sum()) == int(mask_utils.area(ref))


def test_counts_string_roundtrip_and_clipping():
    counts = [5, 3, 1000000, 2, 7]
    assert counts_from_string(counts_to_string(counts)).tolist() == counts
    # a crop hanging over the image border is clipped, as the raster would be
    crop = np.ones((4, 4), bool)
    full = np.zeros((6, 6), np.uint8)
    full[4:, 4:] = 1
    assert encode_crop(crop, 4, 4, 6, 6).to_coco_rle()["counts"] == mask_utils.encode(np.asfortranarray(full))["counts"]


def test_large_slide_rle_without_raster():
    H, W = 40000, 40000
    disk = np.zeros((21, 21), bool)
    yy, xx = np.mgrid[:21, :21]
    disk[(yy - 10) ** 2 + (xx - 10) ** 2 <= 100] = True
    a = encode_crop(disk, 30000, 12000, H, W)
    b = encode_crop(disk, 30005, 12000, H, W)
    assert len(a.to_coco_rle()["counts"]) < 200  # a few runs, not a slide
    assert rle_bbox(a) == (30000.0, 12000.0, 30021.0, 12021.0)
    assert rle_area(a) == disk.sum()
    # pycocotools reads our slide-sized RLE directly: area, box and IoU agree
    assert int(mask_utils.area(a.to_coco_rle())) == disk.sum()
    assert mask_utils.toBbox(a.to_coco_rle()).tolist() == [30000, 12000, 21, 21]
    inter = np.logical_and(disk[:, 5:], disk[:, :-5]).sum()
    expected = inter / (2 * disk.sum() - inter)
    assert mask_iou(a, b) == pytest.approx(expected, abs=1e-6)


def test_mask_iou_crop_fallback_beyond_32_bits():
    H, W = 100000, 90000  # 9e9 px: more than pycocotools' 32-bit counts
    m = np.ones((10, 10), bool)
    a = encode_crop(m, 80000, 99000, H, W)
    b = encode_crop(m, 80005, 99000, H, W)
    crop, x0, y0 = decode_crop(a)
    assert (x0, y0) == (80000, 99000) and crop.all()
    assert mask_iou(a, b) == pytest.approx(50 / 150)


def _tile_inst(size, objects, label=1):
    """Instances of a tile from (x0, y0, w, h, score) rectangles (masks = the rectangles)."""
    h, w = size
    boxes, scores, masks = [], [], []
    for x0, y0, bw, bh, s in objects:
        m = np.zeros((h, w), np.uint8)
        m[y0:y0 + bh, x0:x0 + bw] = 1
        boxes.append([x0, y0, x0 + bw, y0 + bh])
        scores.append(s)
        masks.append(CropMask.from_full(m))
    return Instances(size, np.array(boxes, np.float32).reshape(-1, 4), scores, [label] * len(boxes), masks)


def test_drop_cut_removes_objects_at_interior_edges_only():
    inst = _tile_inst((100, 100), [(0, 10, 5, 5, .9), (40, 40, 10, 10, .9), (95, 0, 5, 5, .9)])
    kept = drop_cut(inst, (True, False, False, False))  # left edge interior
    assert len(kept) == 2 and kept.boxes[:, 0].min() == 40
    kept = drop_cut(inst, (True, True, True, True))
    assert len(kept) == 1
    assert len(drop_cut(inst, (False, False, False, False))) == 3


def test_tile_to_slide_offsets_and_scales_masks():
    inst = _tile_inst((50, 60), [(10, 20, 6, 4, 0.8)])
    s = tile_to_slide(inst, (100, 200), 1.0, (1000, 800))
    assert s.image_size == (1000, 800)
    assert s.boxes[0].tolist() == [110, 220, 116, 224]
    full = np.zeros((1000, 800), np.uint8)
    full[220:224, 110:116] = 1
    assert s.masks[0].to_coco_rle()["counts"] == mask_utils.encode(np.asfortranarray(full))["counts"]
    # analysed at half resolution: level-0 coordinates double, the mask is scaled with them
    s2 = tile_to_slide(inst, (100, 200), 2.0, (2000, 1600))
    assert s2.boxes[0].tolist() == [220, 440, 232, 448]
    assert rle_bbox(s2.masks[0]) == (220.0, 440.0, 232.0, 448.0)
    assert rle_area(s2.masks[0]) == 4 * 24


def _slide_inst(size, rects, labels=None):
    H, W = size
    masks = [encode_crop(np.ones((h, w), bool), x, y, H, W) for x, y, w, h, _ in rects]
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h, _ in rects], np.float32)
    labels = labels or [1] * len(rects)
    return Instances(size, boxes, [r[4] for r in rects], labels, masks)


def test_merge_removes_duplicates_keeps_neighbours():
    rects = [(100, 100, 20, 20, 0.9), (100, 101, 20, 20, 0.8),  # a duplicate from two tiles
             (300, 300, 20, 20, 0.7), (118, 100, 20, 20, 0.6)]  # separate objects
    merged = merge_detections(_slide_inst((1000, 1000), rects))
    assert len(merged) == 3
    assert merged.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])


def test_merge_is_per_class_and_confirmed_by_masks():
    H = W = 500
    # same box, different classes: both kept
    two = _slide_inst((H, W), [(10, 10, 20, 20, .9), (10, 10, 20, 20, .8)], labels=[1, 2])
    assert len(merge_detections(two)) == 2
    # boxes overlap (IoU > 0.5) but the masks are two thin disjoint bars: both kept
    a = np.zeros((20, 20), bool)
    a[:, :8] = True
    b = np.zeros((20, 20), bool)
    b[:, 12:] = True
    inst = Instances((H, W), np.array([[50, 50, 70, 70], [50, 50, 70, 70]], np.float32), [.9, .8],
                     [1, 1], [encode_crop(a, 50, 50, H, W), encode_crop(b, 50, 50, H, W)])
    assert len(merge_detections(inst)) == 2
    # box-only detections: box NMS alone decides
    inst.masks = None
    assert len(merge_detections(inst)) == 1


def _greedy_nms(boxes, scores, labels, thresh):
    """Brute-force greedy NMS per class: visit by descending score, keep a box unless an
    already kept box of its class overlaps it with IoU > thresh. Returns kept indices."""
    kept = []
    for i in sorted(range(len(boxes)), key=lambda k: (-scores[k], k)):
        x0, y0, x1, y1 = boxes[i]
        ok = True
        for j in kept:
            if labels[j] != labels[i]:
                continue
            a0, b0, a1, b1 = boxes[j]
            inter = max(0.0, min(x1, a1) - max(x0, a0)) * max(0.0, min(y1, b1) - max(y0, b0))
            union = (x1 - x0) * (y1 - y0) + (a1 - a0) * (b1 - b0) - inter
            if inter / union > thresh:
                ok = False
                break
        if ok:
            kept.append(i)
    return kept


def test_merge_across_spatial_cells_equals_global_nms():
    rng = np.random.default_rng(1)
    rects, labels = [], []
    for _ in range(300):
        x, y = (int(v) for v in rng.integers(0, 4000, 2))
        lab = int(rng.integers(1, 3))
        rects.append((x, y, 15, 15, float(rng.random())))
        rects.append((x + 1, y + 1, 15, 15, float(rng.random())))  # its duplicate
        labels += [lab, lab]
    # chains across the borders of 300 px cells: A suppresses B, so C (which B would have
    # suppressed) stays; wrong when a cell sees B without A
    for k in range(1, 13):
        edge = 300 * k
        for dx, sc in ((-10, 0.95), (-6, 0.9), (-2, 0.85)):  # centres edge-2.5, +1.5, +5.5
            rects.append((edge + dx, 150 + 300 * (k % 5), 15, 15, sc))
            labels.append(1)
    inst = _slide_inst((4100, 4100), rects, labels)
    boxes = inst.boxes.astype(np.float64).tolist()
    want = _greedy_nms(boxes, inst.scores.tolist(), inst.labels.tolist(), 0.5)
    # the brute force agrees with torchvision's batched NMS over the whole slide
    import torch
    from torchvision.ops import batched_nms

    tv = batched_nms(torch.tensor(boxes), torch.tensor(inst.scores), torch.tensor(inst.labels),
                     0.5).tolist()
    assert sorted(tv) == sorted(want)
    expect = sorted(tuple(boxes[i]) + (int(inst.labels[i]),) for i in want)
    for cell in (300, 10000, None):  # many cells (duplicates and chains straddle them), one, the default
        merged = merge_detections(inst, cell=cell)
        got = sorted(tuple(b) + (int(c),) for b, c in zip(merged.boxes.astype(np.float64).tolist(),
                                                          merged.labels))
        assert got == expect, cell
    assert 300 <= len(want) < len(rects) - 250
