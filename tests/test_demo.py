"""``make demo`` (``python -m detector.demo``): the whole pipeline at test size, so the demo
cannot silently break. Generates, converts (two classes), trains Mask R-CNN and U-Net for 2
iterations, evaluates, runs the slide, and checks every output users are pointed to."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from detector.data.coco import load_coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """``python -m detector.demo --quick`` as users run it, in its own process (its torch
    threads then never meet a fork in this one)."""
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "detector.demo", "--quick", "--out", str(out),
                        "--seed", "3"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    return p, out


@pytest.mark.slow
def test_quick_demo_runs_every_step_and_writes_its_outputs(quick_demo):
    p, out = quick_demo
    assert p.returncode == 0, p.stderr[-3000:]
    # what it prints: each step's command line, the predicted-vs-true table, the paths
    assert "$ python tools/convert_to_coco.py --format labels" in p.stdout
    assert "$ python tools/infer_tiles.py --weights" in p.stdout
    for line in ("mitotic count per 10 HPF", "mitotic index", "report:", "overlay:",
                 "GeoJSON:"):
        assert line in p.stdout, line
    with open(out / "summary.json", encoding="utf-8") as f:
        s = json.load(f)
    # every step ran and was timed, with a copyable command line for the tools
    for step in ("generate", "convert", "convert_one_class", "train_maskrcnn", "predict_maskrcnn",
                 "train_unet", "predict_unet", "evaluate", "evaluate_classes", "infer"):
        assert step in s["seconds"], step
    assert s["commands"]["train_maskrcnn"].startswith(
        "python tools/train_net.py --config-file ")
    assert "configs/demo/mask_rcnn_R_18_FPN.yaml" in s["commands"]["train_maskrcnn"]
    assert "--classes" in s["commands"]["convert"]
    # predicted vs true: the truth is the generator's, the prediction the slide summary's
    truth = json.load(open(out / "data" / "synthetic_slide.tif.truth.json"))
    slide = json.load(open(out / "slides" / "synthetic_slide" / "summary.json"))
    assert s["slide"]["true"]["mitotic_figures"] == truth["mitotic_figures"] > 0
    assert s["slide"]["true"]["per_10_hpf"] == pytest.approx(truth["mitoses_per_10hpf_0.237"])
    assert s["slide"]["predicted"]["per_10_hpf"] == slide["mitotic_figures"]["per_10_hpf"]
    assert s["slide"]["predicted"]["mitotic_figures"] == slide["mitotic_figures"]["total"]
    assert "mitotic figure" in slide["mitotic_classes"]
    # the comparison report of the two models
    for key in ("report", "report_html", "overlay", "geojson", "slide_summary"):
        assert os.path.isfile(s["paths"][key]), key
    metrics = json.load(open(out / "report" / "metrics.json"))
    assert [m["name"] for m in metrics["models"]] == ["Mask R-CNN", "U-Net"]
    report = open(s["paths"]["report"], encoding="utf-8").read()
    assert "Mask R-CNN" in report and "U-Net" in report
    assert set(s["evaluation"]) == {"Mask R-CNN", "U-Net", "Mask R-CNN per class"}
    assert set(s["evaluation"]["Mask R-CNN per class"]) == {"nucleus", "mitotic figure"}
    # the GeoJSON QuPath imports: one feature per detection of the slide
    gj = json.load(open(s["paths"]["geojson"]))
    assert gj["type"] == "FeatureCollection"
    assert len(gj["features"]) == slide["total_detections"]
    _assert_valid_features(gj["features"])
    # the checkpoints carry both classes / one class and the training mpp of the data
    import torch

    ck = {k: torch.load(s["paths"][k], map_location="cpu", weights_only=True)
          for k in ("maskrcnn", "unet")}
    assert ck["maskrcnn"]["classes"] == [{"id": 1, "name": "nucleus"},
                                         {"id": 2, "name": "mitotic figure"}]
    assert ck["unet"]["classes"] == [{"id": 1, "name": "nucleus"}]
    assert ck["maskrcnn"]["mpp"] == ck["unet"]["mpp"] == 0.5


def _assert_valid_features(features):
    """Each feature a closed, non-empty Polygon or MultiPolygon, valid for shapely."""
    from shapely.geometry import shape  # a dev dependency (setup.py extra "dev")

    invalid = []
    for feat in features:
        g = feat["geometry"]
        polys = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
        assert g["type"] in ("Polygon", "MultiPolygon") and polys, feat
        for poly in polys:
            for ring in poly:
                assert len(ring) >= 4 and ring[0] == ring[-1], feat
        if not shape(g).is_valid or shape(g).is_empty:
            invalid.append(feat["id"])
    assert not invalid, f"{len(invalid)} of {len(features)} GeoJSON features are invalid for shapely"


@pytest.mark.slow
def test_the_demo_checkpoint_on_the_demo_slide_gives_one_valid_feature_per_detection(
        quick_demo, tmp_path):
    """The quick demo's 2-iteration Mask R-CNN finds nothing on the slide, even at score 0; its
    U-Net at score 0 finds a few objects: each becomes one valid GeoJSON feature."""
    from detector.cli.infer_tiles import main

    p, out = quick_demo
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.load(open(out / "summary.json"))
    rc = main(["--weights", s["paths"]["unet"], "--input",
               str(out / "data" / "synthetic_slide.tif"), "--output", str(tmp_path),
               "--score-thresh", "0.0", "--device", "cpu", "--num-workers", "0", "--quiet"])
    assert rc == 0
    slide = json.load(open(tmp_path / "synthetic_slide" / "summary.json"))
    gj = json.load(open(tmp_path / "synthetic_slide" / "detections.geojson"))
    assert len(gj["features"]) == slide["total_detections"] > 0
    _assert_valid_features(gj["features"])


@pytest.mark.slow
def test_quick_demo_coco_files_have_two_classes_and_matching_splits(quick_demo):
    p, out = quick_demo
    assert p.returncode == 0, p.stderr[-3000:]
    two_train = load_coco(str(out / "data" / "synthetic_train.json"))
    two_test = load_coco(str(out / "data" / "synthetic_test.json"))
    one_test = load_coco(str(out / "data" / "nuclei_test.json"))
    assert [c["name"] for c in two_train["categories"]] == ["nucleus", "mitotic figure"]
    assert [c["name"] for c in one_test["categories"]] == ["nucleus"]
    # the one-class test set is the same images, ids and objects: the two models are compared
    # on the same ground truth
    assert {(i["id"], i["file_name"]) for i in two_test["images"]} == \
        {(i["id"], i["file_name"]) for i in one_test["images"]}
    assert len(two_test["annotations"]) == len(one_test["annotations"])
    train_names = {i["file_name"] for i in two_train["images"]}
    assert not train_names & {i["file_name"] for i in two_test["images"]}
    assert {a["category_id"] for a in two_train["annotations"]} == {1, 2}
    assert all(i["mpp"] == 0.5 for i in two_train["images"])


def test_demo_help_shows_the_options(capsys):
    import detector.demo as demo

    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--out", "--quick", "--seed", "--device"):
        assert opt in text


def test_a_failing_step_names_the_step_and_its_command(tmp_path, monkeypatch, capsys):
    import detector.api as api
    import detector.demo as demo
    from detector.errors import DetectorError

    monkeypatch.setattr(demo, "QUICK", demo.DemoSize(train_images=3, image_size=96,
                                                      slide_size=256, slide_levels=1,
                                                      maskrcnn_iters=1, unet_iters=1))
    def fail(*args, **kwargs):
        raise DetectorError("DATASETS.TRAIN: no such file")

    monkeypatch.setattr(api, "train", fail)
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "train the Mask R-CNN" in err and "failed with exit status 2" in err
    assert "python tools/train_net.py --config-file" in err
