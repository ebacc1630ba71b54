"""tools/evaluate.py end to end: outputs, the comparison report, mitosis threshold tuning and
bad input (exit 2 with one line naming the file)."""
import csv
import json
import os

import cv2
import numpy as np
import pytest

from detector.cli.evaluate import main
from detector.data.coco import image_entry, load_coco, new_coco, save_coco
from tests.conftest import shared_path
from tests.test_eval_metrics import _perturbed_predictions, build_dsb_subset, gt_as_results


@pytest.fixture(scope="module")
def dsb_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dsbcli")
    gt_path = build_dsb_subset(str(d / "gt.json"))
    gt = load_coco(gt_path)
    a = _perturbed_predictions(gt, seed=0)
    b = _perturbed_predictions(gt, seed=5)
    (d / "maskrcnn.json").write_text(json.dumps(a))
    (d / "unet.json").write_text(json.dumps(b))
    return gt_path, str(d / "maskrcnn.json"), str(d / "unet.json")


def test_comparison_report_of_two_models(dsb_files, tmp_path, capsys):
    gt_path, a, b = dsb_files
    out = tmp_path / "report"
    rc = main(["--gt", gt_path, "--pred", a, b, "--names", "Mask R-CNN", "U-Net",
               "--out", str(out), "--bootstrap", "200"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Mask R-CNN" in printed and "U-Net" in printed and "DSB2018 score" in printed

    m = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in m["models"]] == ["Mask R-CNN", "U-Net"]
    for rec in m["models"]:
        s = rec["summary"]
        for key in ("precision", "recall", "f1", "dsb_score", "AP", "AJI", "PQ"):
            assert 0.0 < s[key] < 1.0, key
            lo, hi = rec["ci95"][key]
            assert lo <= s[key] + 1e-9 and s[key] - 1e-9 <= hi and lo < hi, key
        assert len(rec["iou_curve"]["f1"]) == 10
        assert rec["iou_curve"]["f1"][0] == pytest.approx(s["f1"])
        assert rec["iou_curve"]["f1"] == sorted(rec["iou_curve"]["f1"], reverse=True)

    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    gt = load_coco(gt_path)
    assert len(rows) == 2 * len(gt["images"])
    first = [r for r in rows if r["model"] == "Mask R-CNN"]
    assert sum(int(r["tp"]) for r in first) == m["models"][0]["summary"]["tp"]

    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "| Mask R-CNN | U-Net |" in md and "<table>" in html
    pictures = [p.split(")")[0] for p in md.split("](")[1:]]
    assert {"f1_vs_iou.png", "pr_curve.png"} <= set(pictures)
    # 2 worst + 2 best per model, without repeats: all 3 images of the subset
    assert sum(p.startswith("overlays/") for p in pictures) == 2 * min(4, len(gt["images"]))
    for p in pictures:
        img = cv2.imread(str(out / p))
        assert img is not None and min(img.shape[:2]) >= 300, p
        assert f"src='{p}'" in html
    # the overlays show the three colours (TP green, FP red, FN yellow) on the worst image
    worst = cv2.imread(str(out / [p for p in pictures if "_worst_" in p][0]))[:, :, ::-1]
    for rgb in ((0, 200, 0), (255, 0, 0), (255, 215, 0)):
        assert np.any(np.all(worst == rgb, axis=2)), rgb


def test_gt_file_as_predictions_scores_one(dsb_files, tmp_path):
    gt_path, _, _ = dsb_files
    rc = main(["--gt", gt_path, "--pred", gt_path, "--out", str(tmp_path), "--bootstrap", "0",
               "--no-report"])
    assert rc == 0
    s = json.loads((tmp_path / "metrics.json").read_text())["summary"]
    for key in ("precision", "recall", "f1", "dsb_score", "AP", "AJI", "PQ"):
        assert s[key] == pytest.approx(1.0), key
    assert not (tmp_path / "report.md").exists()


def test_empty_prediction_file_scores_recall_zero(dsb_files, tmp_path, capsys):
    gt_path, _, _ = dsb_files
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    rc = main(["--gt", gt_path, "--pred", str(empty), "--out", str(tmp_path / "o"),
               "--bootstrap", "20"])
    assert rc == 0
    assert "no predictions" in capsys.readouterr().err
    s = json.loads((tmp_path / "o" / "metrics.json").read_text())["summary"]
    assert s["recall"] == 0 and s["f1"] == 0 and s["AP"] == 0


@pytest.mark.parametrize("case", ["unknown_image", "not_json", "missing_gt", "names",
                                  "mask_size", "mixed_modes"])
def test_bad_input_exits_2_with_one_line(dsb_files, tmp_path, capsys, case):
    gt_path, a, _ = dsb_files
    gt = load_coco(gt_path)
    res = gt_as_results(gt)
    pred = tmp_path / "pred.json"
    args = ["--gt", gt_path, "--pred", str(pred), "--bootstrap", "0"]
    if case == "unknown_image":
        pred.write_text(json.dumps([dict(res[0], image_id=12345)]))
        expect = "12345"
    elif case == "not_json":
        pred.write_text("{not json")
        expect = "not valid JSON"
    elif case == "missing_gt":
        pred.write_text("[]")
        args[1] = str(tmp_path / "nope.json")
        expect = "not found"
    elif case == "names":
        pred.write_text(json.dumps(res))
        args += ["--names", "a", "b"]
        expect = "--names"
    elif case == "mask_size":
        r = dict(res[0])
        r["segmentation"] = {"size": [3, 3], "counts": "09"}
        pred.write_text(json.dumps([r]))
        expect = "size"
    else:  # one model with masks, one box-only
        pred.write_text(json.dumps([{k: v for k, v in r.items() if k != "segmentation"}
                                    for r in res]))
        args = ["--gt", gt_path, "--pred", a, str(pred), "--bootstrap", "0"]
        expect = "--mode boxes"
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and expect in lines[0], err
    assert "Traceback" not in err


# ----------------------------------------------------------------------- mitosis (AMi-Br)
def amibr_point_gt(path, crops, mpp=0.23):
    """Point GT of real AMi-Br crops: the figure at the crop centre, as a box-only annotation
    (the converter's representation of a point)."""
    root = shared_path("amibr")
    coco = new_coco([{"id": 1, "name": "mitosis"}], str(root))
    for k, fn in enumerate(crops, start=1):
        coco["images"].append(image_entry(k, fn, 128, 128, mpp=mpp))
        coco["annotations"].append({"image_id": k, "category_id": 1, "bbox": [44, 44, 40, 40],
                                    "area": 1600.0, "iscrowd": 0})
    save_coco(coco, path)
    return path


def test_mitosis_threshold_tuned_on_val_and_applied_to_test(tmp_path, capsys):
    root = shared_path("amibr", "patches", "normal")
    crops = sorted(os.listdir(root))[:12]
    crops = [f"patches/normal/{c}" for c in crops]
    val_gt = amibr_point_gt(str(tmp_path / "val.json"), crops[:6])
    test_gt = amibr_point_gt(str(tmp_path / "test.json"), crops[6:])
    rng = np.random.default_rng(0)

    def preds(n, fp_scores):
        out = []
        for i in range(1, n + 1):
            # a true figure found 3 px off centre (7.5 um at 0.23 um/px = 32.6 px radius)
            out.append({"image_id": i, "category_id": 1, "bbox": [59, 67, 10, 0],
                        "score": float(rng.uniform(0.6, 0.9))})
        for i, s in enumerate(fp_scores, start=1):  # false alarms in a corner
            out.append({"image_id": i, "category_id": 1, "bbox": [2, 2, 8, 8], "score": s})
        return out

    (tmp_path / "val_pred.json").write_text(json.dumps(preds(6, [0.2, 0.3, 0.4])))
    # test: one figure per image found, plus false alarms at 0.35 and 0.55 (the default 0.5
    # threshold would keep the 0.55 one; the tuned 0.41 keeps it too; the 0.35 one is dropped)
    test_pred = preds(6, [0.35, 0.55])
    test_pred[0]["score"] = 0.45  # between 0.41 and 0.5: kept only with the tuned threshold
    (tmp_path / "test_pred.json").write_text(json.dumps(test_pred))
    out = tmp_path / "mit"
    rc = main(["--gt", test_gt, "--pred", str(tmp_path / "test_pred.json"), "--names", "FRCNN",
               "--val-gt", val_gt, "--val-pred", str(tmp_path / "val_pred.json"),
               "--out", str(out), "--bootstrap", "100"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mode points" in printed and "chosen on validation" in printed
    rec = json.loads((out / "metrics.json").read_text())["models"][0]
    assert rec["mode"] == "points"
    # on validation every TP scores >= 0.6 and every FP <= 0.4: F1 = 1 from 0.41 up
    assert rec["threshold_tuning"]["score_thresh"] == pytest.approx(0.41)
    assert rec["threshold_tuning"]["val_f1"] == pytest.approx(1.0)
    assert rec["params"]["score_thresh"] == pytest.approx(0.41)
    s = rec["summary"]
    # test at 0.41: 6 TP (incl. the 0.45 one), FP = the 0.55 alarm, FN 0
    assert (s["tp"], s["fp"], s["fn"]) == (6, 1, 0)
    assert s["f1"] == pytest.approx(12 / 13)
    assert rec["counts"]["mae"] == pytest.approx(1 / 6)
    md = (out / "report.md").read_text()
    assert "Counts per image" in md and "counts.png" in md
    assert cv2.imread(str(out / "counts.png")) is not None
    overlays = [p for p in os.listdir(out / "overlays") if p.endswith(".png")]
    assert overlays


def test_metrics_per_modality_with_confidence_intervals(tmp_path, capsys):
    """Real DSB2018 images of three modalities (modality detected as convert_to_coco.py
    --experiments does): each modality's F1 / DSB / AJI / PQ equals that of an evaluation of
    its images alone, inside its own bootstrap interval, in the table, metrics.json and the
    report."""
    from detector.data.experiments import annotate_images
    from detector.evaluation.evaluator import evaluate

    ids = ["00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552",
           "003cee89357d9fe13516167fd67b609a164651b21934585648c740d2c3d86dc1",
           "1e488c42eb1a54a3e8412b1f12cde530f950f238d71078f2ede6a85a02168e1f",
           "08275a5b1c2dfcd739e8c4888a5ee2d29f83eccfa75185404ced1dc0866ea992"]
    gt_path = build_dsb_subset(str(tmp_path / "gt.json"), ids)
    gt = load_coco(gt_path)
    annotate_images(gt, modality="auto", workers=1, progress=False)
    assert [im["modality"] for im in gt["images"]] == ["fluorescence", "fluorescence", "he",
                                                        "brightfield"]
    save_coco(gt, gt_path)
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps(_perturbed_predictions(load_coco(gt_path), seed=3)))
    out = tmp_path / "eval"
    rc = main(["--gt", gt_path, "--pred", str(pred), "--out", str(out), "--bootstrap", "200"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "per modality" in printed
    for mod in ("fluorescence", "he", "brightfield"):
        assert any(line.split()[1:2] == [mod] for line in printed.splitlines()), mod
    rec = json.loads((out / "metrics.json").read_text())["models"][0]
    by = rec["by_modality"]
    assert sorted(by) == ["brightfield", "fluorescence", "he"]
    assert by["fluorescence"]["n_images"] == 2 and by["he"]["n_images"] == 1
    full = load_coco(gt_path)
    results = json.loads(pred.read_text())
    for mod, r in by.items():
        keep = {im["id"] for im in full["images"] if im["modality"] == mod}
        sub = dict(full, images=[im for im in full["images"] if im["id"] in keep],
                   annotations=[a for a in full["annotations"] if a["image_id"] in keep])
        alone = evaluate(sub, [p for p in results if p["image_id"] in keep]).summary
        assert r["n_gt"] == len(sub["annotations"])
        for key in ("f1", "dsb_score", "AJI", "PQ"):
            assert r[key] == pytest.approx(alone[key]), (mod, key)
            lo, hi = r["ci95"][key]
            assert lo - 1e-9 <= r[key] <= hi + 1e-9, (mod, key)
        if r["n_images"] > 1:  # one image: the resamples are all that image
            assert r["ci95"]["f1"][0] < r["ci95"]["f1"][1]
    md = (out / "report.md").read_text()
    assert "## Per modality" in md and "| fluorescence |" in md
    # off without the field
    rc = main(["--gt", gt_path, "--pred", str(pred), "--bootstrap", "0", "--group-by", ""])
    assert rc == 0 and "per modality" not in capsys.readouterr().out
