"""Test-time augmentation (detector/inference/predictor.py): the views turn back exactly, the
merge votes, TTA on a real image agrees with the plain prediction without being it, and the
config switch and ``infer_tiles.py --tta`` reach the model."""
import json
import os

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from detector.inference.predictor import (TTA_TRANSFORMS, merge_views, predict_tta,
                                          transform_image, untransform_image,
                                          untransform_instances, untransform_points)
from detector.modeling.watershed import instances_from_label_map
from detector.structures.instances import Instances
from detector.structures.masks import CropMask
from tests.test_eval_metrics import build_dsb_subset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLUO = "0287e7ee5b007c91ae2bd7628d09735e70496bc6127ecb7f3dd043e04ce37426"


def _asymmetric_image(h=37, w=53):
    """A non-square image with asymmetric objects (an L, a bar, a dot at an odd place, one
    object touching the right edge): every flip or rotation of it is a different image."""
    img = np.zeros((h, w), np.float32)
    img[3:15, 4:7] = 1.0
    img[12:15, 4:13] = 1.0  # an L
    img[20:23, 30:47] = 0.8  # a bar
    img[30, 9] = 0.6  # one pixel
    img[5:11, 49:53] = 0.9  # at the right edge
    return torch.from_numpy(np.stack([img, img * 0.5, img * 0.25]))


class Components(torch.nn.Module):
    """A model whose detections are the 4-connected components of the first channel: exactly
    equivariant to flips and rotations."""

    def __init__(self):
        super().__init__()
        self.views = 0

    def forward(self, images, targets=None):
        out = []
        for im in images:
            self.views += 1
            lab, n = ndi.label(im[0].numpy() > 0)
            area = np.bincount(lab.ravel()).astype(np.float64)  # scores that do not depend
            out.append(instances_from_label_map(lab, 0.5 + area / (2 * area[1:].sum())))
        return out


def _as_set(inst):
    return {(tuple(np.round(b, 3)), m.x0, m.y0, m.crop().tobytes())
            for b, m in zip(inst.boxes, inst.masks)}


def test_views_turn_back_exactly():
    x = _asymmetric_image()
    h, w = x.shape[-2:]
    seen = set()
    for k in range(8):
        v = transform_image(x, k)
        seen.add(v.numpy().tobytes())
        assert torch.equal(untransform_image(v, k), x)
        assert tuple(v.shape[-2:]) == ((h, w) if k % 2 == 0 else (w, h))
    assert len(seen) == 8  # eight different images
    assert all(k % 2 == 0 for k in TTA_TRANSFORMS[4])  # the flips keep H x W
    # a pixel's corner points: view k's (0, 0) corner lands on a corner of the image
    for k in range(8):
        cx, cy = untransform_points(k, np.array([0.0]), np.array([0.0]), (h, w))
        assert (float(cx[0]), float(cy[0])) in {(0, 0), (w, 0), (0, h), (w, h)}


def test_instances_of_a_view_turn_back_to_those_of_the_image():
    x = _asymmetric_image()
    model = Components()
    plain = model([x])[0]
    assert len(plain) == 4
    for k in range(8):
        view = model([transform_image(x, k)])[0]
        back = untransform_instances(view, k, tuple(x.shape[-2:]))
        assert back.image_size == plain.image_size
        assert _as_set(back) == _as_set(plain), k
        full = sum(m.to_full().astype(int) for m in back.masks)
        assert np.array_equal(full > 0, x[0].numpy() > 0)


def test_merge_votes_and_scores():
    x = _asymmetric_image()
    model = Components()
    merged = predict_tta(model, [x], 8)[0]
    assert model.views == 8
    plain = model([x])[0]
    assert _as_set(merged) == _as_set(plain)  # the same objects in every view
    # found in all 8 views with the same score: the mean is that score
    assert np.allclose(np.sort(merged.scores), np.sort(plain.scores))
    # a detection in one view only scores 1/8 of its score; a mask voted by 2 of 3 views
    size = (20, 20)
    a = CropMask.from_crop(np.ones((4, 4), bool), 2, 2, size)
    b = CropMask.from_crop(np.ones((4, 5), bool), 2, 2, size)  # one column more
    lone = CropMask.from_crop(np.ones((3, 3), bool), 14, 14, size)
    views = [Instances(size, np.array([m.bbox], np.float32), np.array([0.9], np.float32),
                       np.ones(1, np.int64), [m]) for m in (a, a, b)]
    views.append(Instances(size, np.array([lone.bbox], np.float32), np.array([0.8], np.float32),
                           np.ones(1, np.int64), [lone]))
    views += [Instances(size, np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                        np.zeros(0, np.int64), []) for _ in range(4)]
    out = merge_views(views)
    assert len(out) == 2
    assert out.scores[0] == pytest.approx(0.9 * 3 / 8) and out.scores[1] == pytest.approx(0.1)
    assert out.masks[0] == a  # the extra column had 1 vote of 3
    assert tuple(out.boxes[0]) == a.bbox


def test_tta_of_an_equivariant_model_on_a_real_image_is_its_plain_prediction(tmp_path):
    """The classical baseline (Otsu + distance-transform watershed: no pooling grid, no
    learned filters) is equivariant to flips and rotations: on a real DSB2018 fluorescence
    image all 8 views find the same nuclei, so the merged prediction is the plain one (the
    learned U-Net, which differs between views, is tested in test_unet_slide.py)."""
    from detector.config.config import get_cfg
    from detector.data.coco import load_coco
    from detector.data.image_io import read_image
    from detector.modeling.build import build_model

    gt_path = build_dsb_subset(str(tmp_path / "gt.json"), [FLUO])
    gt = load_coco(gt_path)
    rgb = read_image(os.path.join(gt["info"]["image_root"], gt["images"][0]["file_name"]))
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255
    model = build_model(get_cfg(os.path.join(ROOT, "configs/nuclei/classical.yaml")),
                        [{"id": 1, "name": "nucleus"}]).eval()
    plain = model([x])[0]
    tta = predict_tta(model, [x], 8)[0]
    assert len(plain) > 40
    assert _as_set(tta) == _as_set(plain)
    assert np.allclose(np.sort(tta.scores), np.sort(plain.scores), atol=1e-6)


def test_config_switch_and_flag_reach_the_model(tmp_path, monkeypatch):
    """``infer_tiles.py --tta`` and a checkpoint whose config has TEST.AUG.ENABLED run 8 (or
    TEST.AUG.TRANSFORMS) views per tile; summary.json records it; --eval-only follows the
    TEST.AUG of the config given."""
    from detector.cli.infer_tiles import main as infer_main
    from detector.cli.train_net import main as train_main
    from detector.data.coco import load_coco
    from detector.modeling.classical import ClassicalModel

    calls = []
    original = ClassicalModel.predict

    def spy(self, images, score_thresh=0.0):
        calls.append(len(images))
        return original(self, images, score_thresh)

    monkeypatch.setattr(ClassicalModel, "predict", spy)
    gt_path = build_dsb_subset(str(tmp_path / "gt.json"), [FLUO])
    gt = load_coco(gt_path)
    image = os.path.join(gt["info"]["image_root"], gt["images"][0]["file_name"])
    cfg = os.path.join(ROOT, "configs/nuclei/classical.yaml")
    runs = {}
    for name, opts in (("plain", []), ("aug4", ["TEST.AUG.ENABLED", "true",
                                                "TEST.AUG.TRANSFORMS", "4"])):
        out = tmp_path / name
        assert train_main(["--config-file", cfg, "DATASETS.TRAIN", f"[{gt_path}]",
                           "DATASETS.TEST", "[]", "OUTPUT_DIR", str(out)] + opts) == 0
        runs[name] = str(out / "model_final.pth")

    def infer(weights, *flags):
        calls.clear()
        out = tmp_path / f"infer_{len(os.listdir(tmp_path))}"
        rc = infer_main(["--weights", weights, "--input", image, "--output", str(out),
                         "--mpp", "1", "--no-tissue-detection", "--num-workers", "0",
                         "--quiet", *flags])
        assert rc == 0
        s = json.loads((out / FLUO / "summary.json").read_text())
        return s, len(calls)

    s, n = infer(runs["plain"])
    assert s["analysis"]["tta"] == 0 and n == 1
    s, n = infer(runs["plain"], "--tta")
    assert s["analysis"]["tta"] == 8 and n == 8
    s, n = infer(runs["aug4"])  # the checkpoint's config switches it on
    assert s["analysis"]["tta"] == 4 and n == 4
    # --eval-only: the config given now decides
    calls.clear()
    assert train_main(["--config-file", cfg, "--eval-only", "MODEL.WEIGHTS", runs["plain"],
                       "DATASETS.TEST", f"[{gt_path}]", "OUTPUT_DIR", str(tmp_path / "ev"),
                       "TEST.AUG.ENABLED", "true"]) == 0
    assert len(calls) == 8
