"""Training data for the mitosis counter: negatives, negative-only categories, crops placed on
objects or tissue, and windows read from big images without decoding them whole."""
import json
import os

import numpy as np
import pytest
import tifffile
from skimage.io import imsave

from detector.cli.convert_to_coco import main as convert_main
from detector.config.config import get_cfg
from detector.data import image_io
from detector.data.coco import box_annotation, image_entry, new_coco, save_coco
from detector.data.dataset import CocoInstanceDataset, DatasetError
from detector.engine.trainer import TrainingSampler
from tests.conftest import shared_path

FIGURE = {"id": 1, "name": "mitotic figure"}


def cfg_for(*opts):
    return get_cfg(None, ["MODEL.META_ARCHITECTURE", "FasterRCNN", "MODEL.BACKBONE.NAME", "resnet18",
                          "INPUT.CROP_SIZE", "64", "DATALOADER.NUM_WORKERS", "0",
                          "INPUT.AUG.SCALE_RANGE", "[1.0, 1.0]", *opts])


def big_field(folder, name="field.png", size=(1200, 1600), figures=((300, 200), (900, 1000)),
              nuclei=((600, 700),), categories=(FIGURE,), nucleus_cat=None, tiff=False):
    """A pink field with a few dark 'figures' (and grey 'nuclei'); COCO boxes of 40 px."""
    h, w = size
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 230, 170, 200
    rng = np.random.default_rng(0)
    img = (img + rng.integers(-8, 8, img.shape)).clip(0, 255).astype(np.uint8)
    coco = new_coco(list(categories) + ([nucleus_cat] if nucleus_cat else []), ".")
    coco["images"].append(image_entry(1, name, h, w, mpp=0.25))
    for (x, y) in figures:
        img[y - 12:y + 12, x - 12:x + 12] = 40
        coco["annotations"].append(box_annotation([x - 20, y - 20, x + 20, y + 20], 1, FIGURE["id"]))
    for (x, y) in nuclei:
        img[y - 10:y + 10, x - 10:x + 10] = 120
        if nucleus_cat:
            coco["annotations"].append(box_annotation([x - 20, y - 20, x + 20, y + 20], 1,
                                                      nucleus_cat["id"]))
    path = os.path.join(folder, name)
    if tiff:
        tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb")
    else:
        imsave(path, img, check_contrast=False)
    js = os.path.join(folder, os.path.splitext(name)[0] + ".json")
    save_coco(coco, js)
    return js, img


def test_images_format_makes_negatives_with_the_given_categories(tmp_path, capsys):
    d = tmp_path / "tiles"
    d.mkdir()
    for i in range(3):
        imsave(d / f"TCGA-AB-000{i}-01Z.png", np.full((32, 48, 3), 200, np.uint8),
               check_contrast=False)
    imsave(d / "TCGA-AB-0000-01Z_nuclei.png", np.zeros((32, 48), np.uint8), check_contrast=False)
    out = tmp_path / "neg.json"
    assert convert_main(["--format", "images", "--input", str(d), "--categories",
                         "mitotic figure", "--mpp", "0.25", "--output", str(out), "--quiet"]) == 0
    coco = json.loads(out.read_text())
    assert coco["categories"] == [{"id": 1, "name": "mitotic figure", "supercategory": "cell"}]
    assert len(coco["images"]) == 3 and coco["annotations"] == []  # the _nuclei mask is no image
    assert {im["slide"] for im in coco["images"]} == {"TCGA-AB-0000", "TCGA-AB-0001", "TCGA-AB-0002"}
    assert all(im["mpp"] == 0.25 and (im["height"], im["width"]) == (32, 48)
               for im in coco["images"])
    # without the category list the negatives could not be trained with any positive set
    assert convert_main(["--format", "images", "--input", str(d), "--output", str(out)]) == 2
    assert "--categories" in capsys.readouterr().err


def test_negative_only_categories_are_not_targets_and_may_differ(tmp_path):
    js, _ = big_field(str(tmp_path), nucleus_cat={"id": 2, "name": "nucleus"})
    # a file of nuclei only (other category list) joins as negatives
    nuc = new_coco([{"id": 1, "name": "nucleus"}], ".")
    nuc["images"].append(image_entry(1, "field.png", 1200, 1600, mpp=0.25))
    nuc["annotations"].append(box_annotation([100, 100, 140, 140], 1, 1))
    save_coco(nuc, str(tmp_path / "nuclei.json"))
    cfg = cfg_for("DATASETS.NEGATIVE_CATEGORIES", "[nucleus]")
    ds = CocoInstanceDataset([js, str(tmp_path / "nuclei.json")], cfg, train=True)
    assert ds.classes == [FIGURE]                       # "nucleus" is never predicted
    assert [len(r["anns"]) for r in ds.records] == [2, 0]
    assert [len(r["negatives"]) for r in ds.records] == [1, 1]
    _, t = ds.load(0)
    assert t["labels"].tolist() == [1, 1]              # only the figures are targets
    # without the declaration the same files are refused (categories differ)
    with pytest.raises(DatasetError, match="categories differ"):
        CocoInstanceDataset([js, str(tmp_path / "nuclei.json")], cfg_for(), train=True)


def test_crops_centred_on_objects_hold_one(tmp_path):
    js, _ = big_field(str(tmp_path))
    boxes = np.array([[280, 180, 320, 220], [880, 980, 920, 1020]], float)

    def hits(cfg):
        ds = CocoInstanceDataset([js], cfg, train=True)
        return sum(len(ds[(0, s)][1]["boxes"]) > 0 for s in range(40))

    assert hits(cfg_for("INPUT.CROP_OBJECT_FRACTION", "0.99")) >= 38
    assert hits(cfg_for()) <= 8  # uniform 64 px crops of a 1200 x 1600 field rarely hold one
    assert len(boxes) == 2


def test_random_crops_land_on_tissue(tmp_path):
    js, img = big_field(str(tmp_path), figures=((100, 100),), nuclei=())
    img[:, 800:] = 255  # half glass
    imsave(tmp_path / "field.png", img, check_contrast=False)
    cfg = cfg_for("INPUT.CROP_MIN_TISSUE", "0.9")
    ds_t = CocoInstanceDataset([js], cfg, train=True)
    white = [float((ds_t[(0, s)][0] > 0.99).all(0).float().mean()) for s in range(20)]
    assert np.mean([w < 0.1 for w in white]) >= 0.9
    plain = CocoInstanceDataset([js], cfg_for(), train=True)
    white0 = [float((plain[(0, s)][0] > 0.99).all(0).float().mean()) for s in range(20)]
    assert np.mean([w > 0.5 for w in white0]) >= 0.2  # the control: uniform crops hit glass


def test_window_reads_only_the_window_of_a_big_tiff(tmp_path, monkeypatch):
    js, img = big_field(str(tmp_path), name="field.tif", tiff=True)
    monkeypatch.setattr(image_io, "WINDOW_READ_MIN_PX", 1000 * 1000)
    calls = []
    real = image_io.read_image
    monkeypatch.setattr(image_io, "read_image", lambda p: calls.append(p) or real(p))
    ds = CocoInstanceDataset([js], cfg_for(), train=True)
    image, target = ds.load(0, (150, 250, 100))
    assert calls == []  # the whole field was never decoded
    assert np.array_equal(image.permute(1, 2, 0).numpy(), img[150:250, 250:350])
    assert target["boxes"].tolist() == [[30.0, 30.0, 70.0, 70.0]]
    # partly outside: zeros there, as for decoded images
    image, _ = ds.load(0, (-20, 1580, 64))
    assert image[:, :20].sum() == 0 and image[:, :, 20:].sum() == 0
    assert np.array_equal(image[:, 20:, :20].permute(1, 2, 0).numpy(), img[0:44, 1580:1600])


def test_negative_fraction_and_resume_stream(tmp_path):
    pos = [{"anns": [1]}] * 90
    neg = [{"anns": []}] * 10
    cfg = cfg_for("DATALOADER.NEGATIVE_FRACTION", "0.5")

    class Fake:
        records = pos + neg
        sample_weights = CocoInstanceDataset.sample_weights

    Fake.cfg = cfg
    w = Fake().sample_weights()
    it = iter(TrainingSampler(100, 3, weights=w))
    idx = [next(it)[0] for _ in range(4000)]
    assert abs(np.mean(np.array(idx) >= 90) - 0.5) < 0.03
    # a resumed stream (start = position) continues with the same samples
    it2 = iter(TrainingSampler(100, 3, start=1000, weights=w))
    assert [next(it2)[0] for _ in range(50)] == idx[1000:1050]
    Fake.cfg = cfg_for()
    assert Fake().sample_weights() is None  # 0: every image equally often, as before


def test_amibr_and_monuseg_negatives_train_together():
    amibr = shared_path("amibr")
    tiles = shared_path("monuseg_train", "unlabelled")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        assert convert_main(["--format", "amibr", "--input", str(amibr), "--categories",
                             "mitotic figure", "--output", f"{d}/a.json", "--quiet"]) == 0
        assert convert_main(["--format", "images", "--input", str(tiles), "--categories",
                             "mitotic figure", "--output", f"{d}/n.json", "--quiet"]) == 0
        cfg = cfg_for("DATALOADER.NEGATIVE_FRACTION", "0.25", "INPUT.CROP_SIZE", "128",
                      "INPUT.CROP_MIN_TISSUE", "0.5")
        ds = CocoInstanceDataset([f"{d}/a.json", f"{d}/n.json"], cfg, train=True)
        n_neg = sum(not r["anns"] for r in ds.records)
        assert n_neg == 17
        it = iter(TrainingSampler(len(ds), 0, weights=ds.sample_weights()))
        picks = [next(it) for _ in range(400)]
        assert 0.18 < np.mean([not ds.records[i]["anns"] for i, _ in picks]) < 0.32
        i, s = next(p for p in picks if not ds.records[p[0]]["anns"])
        image, target = ds[(i, s)]
        assert image.shape == (3, 128, 128) and len(target["boxes"]) == 0
        assert float((image > 0.84).all(0).float().mean()) < 0.5  # tissue, not glass
