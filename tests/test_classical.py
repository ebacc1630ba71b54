"""The classical baseline (Otsu + distance-transform watershed) as a model: its checkpoint is
written by train_net.py, and infer_tiles.py, train_net.py --eval-only and evaluate.py take it
like a trained one. On a real DSB2018 fluorescence image and a real MoNuSeg H&E tile."""
import json
import os

import numpy as np
import pytest
import torch

from detector.checkpoint import load_checkpoint
from detector.data.coco import load_coco, save_coco
from detector.data.converters.imagescope import convert_xml
from detector.modeling.build import load_model
from tests.conftest import shared_path
from tests.test_eval_metrics import build_dsb_subset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 62 nuclei, several touching: the baseline scores F1@0.5 0.73 on it (measured)
FLUO = "0287e7ee5b007c91ae2bd7628d09735e70496bc6127ecb7f3dd043e04ce37426"
TILE = "TCGA-2Z-A9J9-01A-01-TS1"


def _train_net(*argv):
    from detector.cli.train_net import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def fluo_gt(tmp_path_factory):
    return build_dsb_subset(str(tmp_path_factory.mktemp("fluo") / "gt.json"), [FLUO])


@pytest.fixture(scope="module")
def classical_ckpt(fluo_gt, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = _train_net("--config-file", os.path.join(ROOT, "configs/nuclei/classical.yaml"),
                    "DATASETS.TRAIN", f"[{fluo_gt}]", "DATASETS.TEST", f"[{fluo_gt}]",
                    "OUTPUT_DIR", out)
    assert rc == 0
    return out


def test_train_net_writes_a_checkpoint_and_evaluates(classical_ckpt):
    out = classical_ckpt
    ckpt = load_checkpoint(str(out / "model_final.pth"))  # weights_only=True
    assert ckpt["model"] == {} and ckpt["iteration"] == 0 and ckpt["mpp"] is None
    assert ckpt["classes"] == [{"id": 1, "name": "nucleus"}]
    assert "META_ARCHITECTURE: Classical" in ckpt["config"]
    assert (out / "config.yaml").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    metrics = json.loads((out / "eval_0000000.json").read_text())["metrics"]["gt"]
    assert metrics["f1"] > 0.6, metrics["f1"]  # measured 0.73
    assert (out / "predictions_gt.json").is_file()
    # writing again into the same folder is refused, as for a trained run
    assert _train_net("--config-file", os.path.join(ROOT, "configs/nuclei/classical.yaml"),
                      "DATASETS.TRAIN", "[]", "DATASETS.TEST", "[]", "OUTPUT_DIR", out) == 2


def test_infer_tiles_and_evaluate_take_the_checkpoint(classical_ckpt, fluo_gt, tmp_path, capsys):
    from detector.cli.evaluate import main as evaluate_main
    from detector.cli.infer_tiles import main as infer_main

    gt = load_coco(fluo_gt)
    image = os.path.join(gt["info"]["image_root"], gt["images"][0]["file_name"])
    out = tmp_path / "infer"
    # tiles smaller than the image (256 px): the tile merge runs too
    rc = infer_main(["--weights", str(classical_ckpt / "model_final.pth"), "--input", image,
                     "--output", str(out), "--mpp", "1", "--tile-size", "160", "--overlap", "48",
                     "--no-tissue-detection", "--num-workers", "0", "--quiet"])
    assert rc == 0
    dets = out / FLUO / "detections.json"
    summary = json.loads((out / FLUO / "summary.json").read_text())
    assert summary["total_detections"] > 40
    capsys.readouterr()
    rc = evaluate_main(["--gt", fluo_gt, "--pred", str(dets), "--out", str(tmp_path / "ev"),
                        "--bootstrap", "0", "--no-report"])
    assert rc == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["summary"]
    assert m["f1"] > 0.6, m["f1"]  # the one-piece run gives 0.73


@pytest.fixture(scope="module")
def monuseg_gt(tmp_path_factory):
    src = shared_path("monuseg")
    d = tmp_path_factory.mktemp("monuseg")
    for ext in (".tif", ".xml"):
        os.symlink(src / f"{TILE}{ext}", d / f"{TILE}{ext}")
    coco = convert_xml(str(d), progress=False).coco
    for i, a in enumerate(coco["annotations"], 1):
        a["id"] = i
    path = str(d / "gt.json")
    save_coco(coco, path)
    return path


def test_he_config_through_eval_only_on_a_monuseg_tile(monuseg_gt, tmp_path, capsys):
    cfg = os.path.join(ROOT, "configs/nuclei/classical_he.yaml")
    run = tmp_path / "run"
    assert _train_net("--config-file", cfg, "DATASETS.TRAIN", f"[{monuseg_gt}]",
                      "DATASETS.TEST", "[]", "OUTPUT_DIR", run) == 0
    ckpt = load_checkpoint(str(run / "model_final.pth"))
    assert ckpt["mpp"] == pytest.approx(0.25)  # INPUT.MPP of the config
    ev = tmp_path / "eval"
    capsys.readouterr()
    assert _train_net("--config-file", cfg, "--eval-only", "MODEL.WEIGHTS",
                      run / "model_final.pth", "DATASETS.TEST", f"[{monuseg_gt}]",
                      "OUTPUT_DIR", ev) == 0
    metrics = json.loads((ev / "eval_final.json").read_text())["metrics"]["gt"]
    assert metrics["f1"] > 0.55, metrics["f1"]  # measured 0.64 (PQ 0.44)
    assert metrics["PQ"] > 0.35, metrics["PQ"]


def test_modalities_and_parameters(fluo_gt):
    """Per-image modality choice, a fixed threshold, min size, and an empty image."""
    from detector.config.config import get_cfg
    from detector.data.image_io import read_image
    from detector.modeling.build import build_model
    from detector.modeling.classical import nucleus_signal, segment_nuclei

    gt = load_coco(fluo_gt)
    rgb = read_image(os.path.join(gt["info"]["image_root"], gt["images"][0]["file_name"]))
    labels, scores, mod = segment_nuclei(rgb)
    assert mod == "fluorescence" and labels.max() > 40
    assert np.all(scores[1:] >= 0.5) and np.all(scores[1:] <= 1.0)
    sizes = np.bincount(labels.ravel())[1:]
    assert sizes.min() >= 20  # MIN_SIZE
    # a fixed threshold far above the nuclei finds nothing; the inverted image read as
    # brightfield finds the same nuclei dark on light
    none, _, _ = segment_nuclei(rgb, threshold=0.99)
    assert none.max() == 0
    inverted = 255 - rgb
    assert np.allclose(nucleus_signal(inverted, "brightfield"), rgb.mean(2) / 255.0, atol=1e-6)
    inv_labels, _, inv_mod = segment_nuclei(inverted)
    assert inv_mod == "brightfield" and inv_labels.max() == labels.max()
    # an empty (flat) image: no instance, no error
    cfg = get_cfg(os.path.join(ROOT, "configs/nuclei/classical.yaml"))
    model = build_model(cfg, [{"id": 7, "name": "nucleus"}]).eval()
    assert len(model([torch.zeros(3, 64, 64)])[0]) == 0
    inst = model([torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255])[0]
    assert len(inst) == labels.max() and set(inst.labels.tolist()) == {7}
    assert not list(model.parameters())
    with pytest.raises(ValueError, match="one class"):
        build_model(cfg, [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])


def test_load_model_rebuilds_it_from_the_checkpoint_alone(classical_ckpt):
    model, cfg, classes, mpp = load_model(str(classical_ckpt / "model_final.pth"),
                                          overrides={"MODEL.CLASSICAL.PEAK_FOOTPRINT": 5})
    assert type(model).__name__ == "ClassicalModel" and model.peak_footprint == 5
    assert classes == [{"id": 1, "name": "nucleus"}] and mpp is None
