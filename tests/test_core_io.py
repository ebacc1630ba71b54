"""Shared building blocks: Instances, COCO mask helpers and image reading with clear errors."""
import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from detector.data.coco import (
    CocoFormatError, annotation_to_mask, bbox_of_mask, image_entry, load_coco,
    mask_annotation, new_coco, save_coco, to_pycocotools)
from detector.data.image_io import ImageReadError, image_size, read_image
from detector.structures import CropMask, Instances, rle_from_json


def disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_mask_annotation_rle_exact_and_polygon_close():
    m = disc(40, 50, 20, 25, 9)
    a = mask_annotation(m, image_id=1, category_id=1)
    assert a["bbox"] == [16.0, 11.0, 19.0, 19.0] and a["area"] == m.sum()
    assert (annotation_to_mask(a, 40, 50) == m).all()
    p = mask_annotation(m, 1, 1, mask_format="polygon")
    back = annotation_to_mask(p, 40, 50)
    iou = (back & m).sum() / (back | m).sum()
    assert iou == 1.0  # pixel-corner polygons rasterise back exactly
    assert mask_annotation(np.zeros((4, 4), bool), 1, 1) is None
    assert bbox_of_mask(np.zeros((3, 3), bool)) is None


def test_instances_select_cat_and_coco_results():
    masks = [CropMask.from_full(disc(30, 30, 10, 10, 4)), CropMask.from_full(disc(30, 30, 20, 20, 5))]
    inst = Instances((30, 30), [[6, 6, 15, 15], [15, 15, 26, 26]], [0.9, 0.4], [1, 2], masks)
    assert len(inst[inst.scores > 0.5]) == 1 and inst[inst.scores > 0.5].labels[0] == 1
    both = Instances.cat([inst, inst[[1]]])
    assert len(both) == 3 and both.masks[2] == masks[1]
    res = inst.to_coco_results(image_id=7)
    json.dumps(res)  # JSON-serialisable
    assert res[1]["bbox"] == [15.0, 15.0, 11.0, 11.0] and res[1]["category_id"] == 2
    assert (mask_utils.decode(rle_from_json(res[0]["segmentation"])) == disc(30, 30, 10, 10, 4)).all()
    assert np.allclose(inst.areas(), [disc(30, 30, 10, 10, 4).sum(), disc(30, 30, 20, 20, 5).sum()])
    with pytest.raises(ValueError):
        Instances((3, 3), [[0, 0, 1, 1]], [0.5, 0.6], [1])


def test_coco_round_trip_and_self_ap(tmp_path):
    data = new_coco([{"id": 1, "name": "nucleus"}], image_root=str(tmp_path))
    data["images"].append(image_entry(1, "a.png", 40, 50, mpp=0.25, slide="s1"))
    for cy, cx in [(10, 10), (25, 30)]:
        data["annotations"].append(mask_annotation(disc(40, 50, cy, cx, 6), 1, 1))
    path = tmp_path / "gt.json"
    save_coco(data, str(path))
    loaded = load_coco(str(path))
    assert loaded["_image_root"] == str(tmp_path)
    assert [a["id"] for a in loaded["annotations"]] == [1, 2]
    from pycocotools.cocoeval import COCOeval

    gt = to_pycocotools(loaded)
    res = [dict(a, score=1.0) for a in loaded["annotations"]]
    dt = gt.loadRes(res)
    ev = COCOeval(gt, dt, "segm")
    ev.evaluate(); ev.accumulate(); ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_load_coco_errors_name_the_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(CocoFormatError, match="broken.json"):
        load_coco(str(p))
    p.write_text(json.dumps([{"image_id": 1}]))
    with pytest.raises(CocoFormatError, match="results list"):
        load_coco(str(p))
    p.write_text(json.dumps({"images": [{"id": 1}], "categories": [{"id": 1, "name": "n"}],
                             "annotations": [{"id": 1, "image_id": 2, "category_id": 1}]}))
    with pytest.raises(CocoFormatError, match="image 2"):
        load_coco(str(p))


def test_read_image_kinds_and_bad_files(tmp_path):
    rgba = np.zeros((8, 9, 4), np.uint8); rgba[..., 0] = 200; rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert read_image(str(tmp_path / "rgba.png")).shape == (8, 9, 3)
    g16 = (np.arange(72).reshape(8, 9) * 900).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    im = read_image(str(tmp_path / "g16.png"))
    assert im.dtype == np.uint8 and im.shape == (8, 9, 3) and im.max() == 255 and im.min() == 0
    import tifffile
    tifffile.imwrite(tmp_path / "t.tif", g16)
    assert read_image(str(tmp_path / "t.tif")).shape == (8, 9, 3)
    assert image_size(str(tmp_path / "t.tif")) == (8, 9)
    # truncated PNG
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    raw = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageReadError, match="trunc.png"):
        read_image(str(tmp_path / "trunc.png"))
    with pytest.raises(ImageReadError, match="not found"):
        read_image(str(tmp_path / "missing.png"))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        read_image(str(tmp_path / "empty.png"))


def test_atomic_write_keeps_old_file_on_error_and_usual_mode(tmp_path):
    import os

    from detector.fileio import atomic_write

    p = tmp_path / "out.json"
    with atomic_write(str(p)) as f:
        f.write("one")
    umask = os.umask(0); os.umask(umask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)
    with pytest.raises(RuntimeError):
        with atomic_write(str(p)) as f:
            f.write("half")
            raise RuntimeError("killed")
    assert p.read_text() == "one"
    assert [x.name for x in tmp_path.iterdir()] == ["out.json"]  # no temporary left behind
