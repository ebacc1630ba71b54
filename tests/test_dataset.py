"""COCO training dataset: items, label mapping, negatives, and the checks made before training."""
import os

import numpy as np
import pytest
import torch
from skimage.draw import disk
from skimage.io import imsave

from detector.config.config import get_cfg
from detector.data.coco import (box_annotation, image_entry, mask_annotation,
                                new_coco, save_coco)
from detector.data.dataset import CocoInstanceDataset, DatasetError, collate_list
from detector.data.transforms import masks_to_boxes_xyxy
from tests.conftest import shared_path


def make_disc_coco(folder, n_images=4, size=64, discs=3, seed=0, category=None, masks=True,
                   empty_images=0, name="train.json", mpp=0.5):
    """Write ``n_images`` PNGs of bright discs on a dark background (plus ``empty_images``
    without any) and their COCO file (image_root "img", relative); returns the JSON path."""
    category = category or {"id": 7, "name": "nucleus"}
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    coco = new_coco([category], "img")
    for i in range(n_images + empty_images):
        img = np.full((size, size, 3), 30, np.uint8)
        if i < n_images:
            for _ in range(discs):
                cy, cx = rng.integers(10, size - 10, 2)
                r = int(rng.integers(4, 8))
                m = np.zeros((size, size), bool)
                m[disk((cy, cx), r, shape=(size, size))] = True
                img[m] = 200
                if masks:
                    coco["annotations"].append(mask_annotation(m, i + 1, category["id"]))
                else:
                    coco["annotations"].append(
                        box_annotation([cx - r, cy - r, cx + r + 1, cy + r + 1], i + 1, category["id"]))
        fname = f"{os.path.splitext(name)[0]}_{i}.png"
        imsave(os.path.join(folder, "img", fname), img, check_contrast=False)
        coco["images"].append(image_entry(i + 1, fname, size, size, mpp=mpp))
    path = os.path.join(folder, name)
    save_coco(coco, path)
    return path


def small_cfg(*opts):
    return get_cfg(None, ["MODEL.BACKBONE.NAME", "resnet18", "INPUT.CROP_SIZE", "48",
                          "DATALOADER.NUM_WORKERS", "0", *opts])


def test_items_have_the_documented_types_and_contiguous_labels(tmp_path):
    path = make_disc_coco(str(tmp_path), n_images=2, empty_images=1)
    ds = CocoInstanceDataset([path], small_cfg())
    assert ds.classes == [{"id": 7, "name": "nucleus"}]
    assert ds.mpp == 0.5 and len(ds) == 3
    image, t = ds[(0, 1)]
    assert image.dtype == torch.float32 and image.shape == (3, 48, 48)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert t["labels"].dtype == torch.int64 and set(t["labels"].tolist()) <= {1}
    assert t["masks"].shape[1:] == (48, 48) and t["masks"].dtype == torch.uint8
    assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
    # boxes are the tight pixel-edge boxes of the (cropped) masks
    assert torch.equal(t["boxes"].as_subclass(torch.Tensor), masks_to_boxes_xyxy(t["masks"]))
    # the image without instances is a negative with well-formed empty targets
    _, neg = ds[(2, 1)]
    assert neg["boxes"].shape == (0, 4) and neg["masks"].shape == (0, 48, 48)
    images, targets = collate_list([ds[(0, 1)], ds[(2, 1)]])
    assert len(images) == 2 and targets[1]["image_id"] == 3


def test_seeded_items_are_reproducible_and_leave_global_rng_alone(tmp_path):
    path = make_disc_coco(str(tmp_path), n_images=2)
    ds = CocoInstanceDataset([path], small_cfg("INPUT.AUG.ELASTIC_PROB", "1.0"))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, ta = ds[(1, 99)]
    assert torch.equal(torch.get_rng_state(), before)
    b, tb = ds[(1, 99)]
    c, _ = ds[(1, 100)]
    assert torch.equal(a, b) and torch.equal(ta["masks"], tb["masks"])
    assert not torch.equal(a, c)


def test_box_only_data_trains_faster_rcnn_and_is_refused_by_mask_rcnn(tmp_path):
    path = make_disc_coco(str(tmp_path), masks=False)
    ds = CocoInstanceDataset([path], small_cfg("MODEL.META_ARCHITECTURE", "FasterRCNN"))
    assert not ds.has_masks
    _, t = ds[(0, 3)]
    assert "masks" not in t and t["boxes"].shape[1] == 4
    with pytest.raises(DatasetError, match="FasterRCNN"):
        CocoInstanceDataset([path], small_cfg())


def test_missing_image_file_is_named_with_the_image_root(tmp_path):
    path = make_disc_coco(str(tmp_path))
    os.unlink(os.path.join(str(tmp_path), "img", "train_2.png"))
    with pytest.raises(DatasetError) as e:
        CocoInstanceDataset([path], small_cfg())
    msg = str(e.value)
    assert "train_2.png" in msg and "1 of 4" in msg and os.path.join(str(tmp_path), "img") in msg


def test_categories_that_differ_between_files_or_from_the_config_are_refused(tmp_path):
    a = make_disc_coco(str(tmp_path), name="a.json")
    b = make_disc_coco(str(tmp_path), name="b.json", category={"id": 7, "name": "mitosis"})
    with pytest.raises(DatasetError, match="7:mitosis"):
        CocoInstanceDataset([a, b], small_cfg())
    with pytest.raises(DatasetError, match="NUM_CLASSES"):
        CocoInstanceDataset([a], small_cfg("MODEL.NUM_CLASSES", "3"))
    # test data checked against the training classes
    with pytest.raises(DatasetError, match="b.json"):
        CocoInstanceDataset([b], small_cfg(), train=False, classes=[{"id": 7, "name": "nucleus"}])


def test_empty_data_sets_are_refused(tmp_path):
    empty = new_coco([{"id": 1, "name": "nucleus"}], ".")
    save_coco(empty, str(tmp_path / "empty.json"))
    with pytest.raises(DatasetError, match="empty"):
        CocoInstanceDataset([str(tmp_path / "empty.json")], small_cfg())
    with pytest.raises(DatasetError, match="DATASETS.TRAIN is empty"):
        CocoInstanceDataset([], small_cfg())
    unannotated = make_disc_coco(str(tmp_path), n_images=0, empty_images=2, name="neg.json")
    with pytest.raises(DatasetError, match="no annotations"):
        CocoInstanceDataset([unannotated], small_cfg())


def test_real_dsb2018_image_loads_with_all_its_nuclei(tmp_path):
    """A DSB2018 image with its per-nucleus PNG masks, through COCO, gives one mask per nucleus
    at native resolution (no augmentation)."""
    root = shared_path("dsb2018", "stage1_train")
    sample = sorted(os.listdir(root))[0]
    from detector.data.image_io import read_array, read_image

    img = read_image(str(root / sample / "images" / f"{sample}.png"))
    h, w = img.shape[:2]
    coco = new_coco([{"id": 1, "name": "nucleus"}], str(root))
    coco["images"].append(image_entry(1, f"{sample}/images/{sample}.png", h, w))
    mask_files = sorted(os.listdir(root / sample / "masks"))
    for f in mask_files:
        m = read_array(str(root / sample / "masks" / f)) > 0
        m = m if m.ndim == 2 else m[..., 0]
        coco["annotations"].append(mask_annotation(m, 1, 1))
    save_coco(coco, str(tmp_path / "dsb.json"))
    ds = CocoInstanceDataset([str(tmp_path / "dsb.json")], small_cfg(), train=False)
    image, t = ds[0]
    assert image.shape == (3, h, w)
    assert len(t["masks"]) == len(mask_files) > 0
    assert int(t["masks"].sum()) == sum(a["area"] for a in coco["annotations"])


def test_filter_empty_drops_negatives_only_when_asked(tmp_path):
    path = make_disc_coco(str(tmp_path), n_images=2, empty_images=2)
    assert len(CocoInstanceDataset([path], small_cfg())) == 4
    assert len(CocoInstanceDataset([path], small_cfg("DATALOADER.FILTER_EMPTY", "true"))) == 2


def test_train_weights_draw_a_small_file_as_often_as_asked(tmp_path):
    """DATASETS.TRAIN_WEIGHTS: 2 images of a small file weighted 10x beside 8 of a large one
    are drawn 20/28 of the time; a wrong number of weights is a clear error."""
    big = make_disc_coco(str(tmp_path), n_images=8, name="big.json")
    small = make_disc_coco(str(tmp_path), n_images=2, name="small.json", seed=1)
    ds = CocoInstanceDataset([big, small], small_cfg("DATASETS.TRAIN_WEIGHTS", "[1, 10]"))
    w = ds.sample_weights()
    assert w.sum() == pytest.approx(1.0)
    assert w[[r["source"] == small for r in ds.records]].sum() == pytest.approx(20 / 28)
    assert CocoInstanceDataset([big, small], small_cfg()).sample_weights() is None
    with pytest.raises(DatasetError, match="one weight > 0 per"):
        CocoInstanceDataset([big, small], small_cfg("DATASETS.TRAIN_WEIGHTS", "[1]")).sample_weights()
