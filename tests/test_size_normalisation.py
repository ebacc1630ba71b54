"""Size normalisation (INPUT.NUCLEUS_DIAMETER): training crops show nuclei at the canonical
size, and inference finds an image's (or a slide's) scale from a first pass of the model and
returns its objects in the image's own px."""
import math

import cv2
import numpy as np
import pytest
import torch
from skimage.measure import label, regionprops

from detector.config.config import get_cfg
from detector.data.coco import image_entry, new_coco, save_coco
from detector.data.dataset import CocoInstanceDataset
from detector.inference.runner import InferenceOptions, infer_slide
from detector.inference.size import predict_normalised
from detector.structures.instances import Instances, median_diameter
from detector.structures.masks import CropMask

NUCLEUS = [{"id": 1, "name": "nucleus"}]


def disc_image(diameter, n=5, size=400, seed=0):
    """Dark discs of ``diameter`` px on a light background, on a jittered grid."""
    img = np.full((size, size, 3), 220, np.uint8)
    rng = np.random.default_rng(seed)
    step = size // n
    centres = []
    for i in range(n):
        for j in range(n):
            cx = int(step * (j + 0.5) + rng.integers(-3, 4))
            cy = int(step * (i + 0.5) + rng.integers(-3, 4))
            cv2.circle(img, (cx, cy), diameter // 2, (60, 40, 90), -1)
            centres.append((cx, cy))
    return img, centres


class Threshold(torch.nn.Module):
    """A stand-in segmentation model: dark connected components, score 0.9, and it records
    the sizes of the images it was given (its input scale)."""

    def __init__(self, nucleus_diameter=20.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.nucleus_diameter = nucleus_diameter
        self.seen = []

    def forward(self, images):
        out = []
        for im in images:
            a = im.float()
            a = a / 255.0 if im.dtype == torch.uint8 or a.max() > 1.5 else a
            self.seen.append(tuple(a.shape[-2:]))
            lab = label(a.mean(0).cpu().numpy() < 0.5)
            h, w = lab.shape
            boxes, masks = [], []
            for r in regionprops(lab):
                y0, x0, y1, x1 = r.bbox
                boxes.append([x0, y0, x1, y1])
                masks.append(CropMask.from_crop(r.image, x0, y0, (h, w)))
            out.append(Instances((h, w), np.array(boxes, np.float32).reshape(-1, 4),
                                 np.full(len(boxes), 0.9), np.ones(len(boxes), np.int64), masks))
        return out


def test_median_diameter_is_the_equivalent_diameter():
    assert median_diameter([math.pi * 100, math.pi * 100, math.pi * 400]) == pytest.approx(20.0)
    assert median_diameter([]) == 0.0 and median_diameter([0, -1, float("nan")]) == 0.0


def test_training_crops_show_nuclei_at_the_canonical_size(tmp_path):
    # big nuclei (40 px) and small ones (10 px): both come out about 20 px across
    coco = new_coco(NUCLEUS, str(tmp_path))
    for k, d in enumerate((40, 10)):
        img, centres = disc_image(d, n=4, size=400, seed=k)
        cv2.imwrite(str(tmp_path / f"i{k}.png"), img[..., ::-1])
        coco["images"].append(image_entry(k + 1, f"i{k}.png", 400, 400))
        for cx, cy in centres:
            r = d // 2
            poly = [float(v) for a in np.linspace(0, 2 * np.pi, 24, endpoint=False)
                    for v in (cx + r * np.cos(a), cy + r * np.sin(a))]
            coco["annotations"].append({"image_id": k + 1, "category_id": 1, "iscrowd": 0,
                                        "bbox": [cx - r, cy - r, 2 * r, 2 * r],
                                        "area": math.pi * r * r, "segmentation": [poly]})
    save_coco(coco, str(tmp_path / "t.json"))
    base = ["MODEL.META_ARCHITECTURE", "MaskRCNN", "INPUT.CROP_SIZE", "128",
            "INPUT.AUG.SCALE_RANGE", "[1.0, 1.0]", "INPUT.AUG.ELASTIC_PROB", "0.0",
            "INPUT.CROP_OBJECT_FRACTION", "0.9"]
    ds = CocoInstanceDataset([str(tmp_path / "t.json")],
                             get_cfg(None, base + ["INPUT.NUCLEUS_DIAMETER", "20"]))
    assert [round(r["size_scale"], 2) for r in ds.records] == [0.5, 2.0]
    for idx in (0, 1):
        diam = []
        for seed in range(6):
            img, target = ds[(idx, seed)]
            assert img.shape[-2:] == (128, 128)
            areas = target["masks"].flatten(1).sum(1).float().numpy()
            full = areas[areas > 0.6 * areas.max()] if len(areas) else areas  # uncut ones
            diam.extend(np.sqrt(4 * full / np.pi))
        assert np.median(diam) == pytest.approx(20, abs=2.5), idx
    # off (the default): the image's own scale
    ds0 = CocoInstanceDataset([str(tmp_path / "t.json")], get_cfg(None, base))
    assert all(r["size_scale"] == 1.0 for r in ds0.records)


def test_prediction_at_the_found_scale_comes_back_in_image_px():
    img, centres = disc_image(44, n=4, size=400)
    model = Threshold(nucleus_diameter=22.0)
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
    inst, scale = predict_normalised(lambda t: model([t])[0], x, 22.0)
    assert scale == pytest.approx(0.5, rel=0.05)
    assert model.seen[0] == (400, 400) and model.seen[-1] == (200, 200)  # the second pass
    assert len(inst) == len(centres) and inst.image_size == (400, 400)
    # areas and positions in the image's px: ~ pi * 22^2, centred on the discs
    assert np.median(inst.areas()) == pytest.approx(math.pi * 22 ** 2, rel=0.08)
    got = sorted(tuple(np.round(c / 4)) for c in inst.box_centres())
    want = sorted(tuple(np.round(np.array(c) / 4)) for c in centres)
    assert np.abs(np.array(got) - np.array(want)).max() <= 1
    # nuclei already at the canonical size: one pass
    model.seen.clear()
    small = torch.from_numpy(disc_image(22, n=4, size=400)[0]).permute(2, 0, 1).float() / 255
    _, scale = predict_normalised(lambda t: model([t])[0], small, 22.0)
    assert scale == 1.0 and len(model.seen) == 1


def test_a_slide_is_analysed_at_the_scale_of_its_nuclei(tmp_path, monkeypatch):
    from detector.inference.slide import SlideReader

    thumbs = []  # the second grid borrows the first one's thumbnail and tissue
    orig = SlideReader.thumbnail
    monkeypatch.setattr(SlideReader, "thumbnail",
                        lambda self, *a, **k: thumbs.append(1) or orig(self, *a, **k))
    img, centres = disc_image(40, n=6, size=900)
    path = str(tmp_path / "plain.png")
    cv2.imwrite(path, img[..., ::-1])
    model = Threshold(nucleus_diameter=20.0)
    opts = InferenceOptions(num_workers=0, progress=False, mpp=1.0, tile_size=256, overlap=64,
                            tissue_detection=False, score_thresh=0.5)
    s = infer_slide(model, NUCLEUS, None, path, str(tmp_path / "out"), opts)
    sn = s["size_normalisation"]
    assert sn["nucleus_diameter_px"] == pytest.approx(40, rel=0.05)
    assert sn["scale"] == pytest.approx(0.5, rel=0.05) and sn["canonical_diameter_px"] == 20.0
    assert s["total_detections"] == len(centres) and len(thumbs) == 1
    # tiles were cut from the slide resampled by 0.5 (256 px tiles of a 450 px grid)
    assert max(max(hw) for hw in model.seen[-3:]) <= 256 and s["slide_size"] == [900, 900]
    # a model without size normalisation analyses the slide as it is
    plain = Threshold(nucleus_diameter=0.0)
    s0 = infer_slide(plain, NUCLEUS, None, path, str(tmp_path / "out0"), opts)
    assert "size_normalisation" not in s0 and s0["total_detections"] == len(centres)


def _model_input(arch, model, image):
    """What the network of a built ``arch`` ("MaskRCNN" or "UNet") sees of ``image``."""
    if arch == "MaskRCNN":  # RCNN wraps torchvision's model and its transform
        return model.model.transform.normalize(image)
    return model._normalize(image)


def test_bright_background_images_are_inverted_before_both_models():
    """INPUT.INVERT_BRIGHT_BACKGROUND: brightfield/H&E look like fluorescence (bright nuclei
    on dark) to the R-CNN and the U-Net; fluorescence is left as it is."""
    from detector.modeling.build import build_model
    from detector.modeling.modality import normalise_modality

    bright = torch.full((3, 32, 32), 0.8)
    bright[:, 8:16, 8:16] = 0.2  # a dark nucleus
    dark = 1.0 - bright
    assert torch.allclose(normalise_modality(bright, invert_bright=True), dark)
    assert normalise_modality(dark, invert_bright=True) is dark
    for arch in ("MaskRCNN", "UNet"):
        opts = ["MODEL.META_ARCHITECTURE", arch, "MODEL.BACKBONE.NAME", "resnet18"]
        on = build_model(get_cfg(None, opts + ["INPUT.INVERT_BRIGHT_BACKGROUND", "true"]), NUCLEUS)
        off = build_model(get_cfg(None, opts), NUCLEUS)
        assert torch.allclose(_model_input(arch, on, bright), _model_input(arch, off, dark))
        assert torch.allclose(_model_input(arch, on, dark), _model_input(arch, off, dark))


def _on_and_off(arch: str, key: str):
    """The nuclei model ``arch`` with bright backgrounds inverted, built with the boolean
    config ``key`` on and off."""
    from detector.modeling.build import build_model

    opts = ["MODEL.META_ARCHITECTURE", arch, "MODEL.BACKBONE.NAME", "resnet18",
            "INPUT.INVERT_BRIGHT_BACKGROUND", "true"]
    return (build_model(get_cfg(None, opts + [key, "true"]), NUCLEUS),
            build_model(get_cfg(None, opts), NUCLEUS))


def test_grey_modality_normalisation_removes_colour_before_the_inversion():
    """INPUT.GREY: an H&E-coloured field and its grey version look the same to both models
    (colour no longer tells modalities apart); the bright background is inverted after."""
    from detector.modeling.modality import normalise_modality

    rgb = torch.empty((3, 32, 32))
    rgb[0], rgb[1], rgb[2] = 0.9, 0.7, 0.85  # pink eosin background, grey 0.8167
    rgb[:, 8:16, 8:16] = torch.tensor([0.3, 0.2, 0.55])[:, None, None]  # a purple nucleus
    grey = rgb.mean(0, keepdim=True).repeat(3, 1, 1)
    assert torch.allclose(normalise_modality(rgb, grey=True), grey)
    assert torch.allclose(normalise_modality(rgb, invert_bright=True, grey=True), 1.0 - grey)
    assert normalise_modality(rgb) is rgb
    for arch in ("MaskRCNN", "UNet"):
        on, off = _on_and_off(arch, "INPUT.GREY")
        assert torch.allclose(_model_input(arch, on, rgb), _model_input(arch, off, grey))
        assert not torch.allclose(_model_input(arch, off, rgb), _model_input(arch, off, grey))


def test_fluorescence_in_colour_looks_grey_to_both_models():
    """INPUT.GREY_FLUORESCENCE: a DAPI field shown as blue (as slide scanners write it) looks
    to both models like the same field in grey, the fluorescence they were trained on; grey
    fluorescence and bright-background images are left as they were (so a model trained
    without the key sees its training images unchanged), and the key is a test-time key."""
    from detector.modeling.build import TEST_TIME_KEYS
    from detector.modeling.modality import normalise_modality

    grey = torch.full((3, 32, 32), 0.05)
    grey[:, 8:16, 8:16] = 0.7  # a bright nucleus on a dark background
    blue = torch.zeros_like(grey)
    blue[2] = grey[0]
    assert torch.equal(normalise_modality(blue, grey_fluorescence=True), grey)
    assert torch.equal(normalise_modality(grey, grey_fluorescence=True), grey)
    bright = torch.empty((3, 32, 32))
    bright[0], bright[1], bright[2] = 0.9, 0.7, 0.85  # H&E: left to the inversion
    assert torch.equal(normalise_modality(bright, grey_fluorescence=True), bright)
    assert torch.equal(normalise_modality(bright, invert_bright=True, grey_fluorescence=True),
                       1.0 - bright)
    assert "INPUT.GREY_FLUORESCENCE" in TEST_TIME_KEYS
    for arch in ("MaskRCNN", "UNet"):
        on, off = _on_and_off(arch, "INPUT.GREY_FLUORESCENCE")
        assert torch.allclose(_model_input(arch, on, blue), _model_input(arch, off, grey))
        assert torch.allclose(_model_input(arch, on, grey), _model_input(arch, off, grey))
        assert not torch.allclose(_model_input(arch, off, blue), _model_input(arch, off, grey))
