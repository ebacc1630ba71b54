"""benchmarks/bench_cellpose.py: the conversions around Cellpose (COCO file -> RGB image and label
image; label image -> COCO results that the project's evaluation reads back), without cellpose."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.data.coco import (annotation_to_mask, box_annotation, image_entry, load_coco,
                                mask_annotation, new_coco, save_coco)
from detector.evaluation import evaluate, load_predictions

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_cellpose.py"


def load_bench():
    """The benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_cellpose_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return load_bench()


def disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def rect(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def coco_file(tmp_path):
    """Two images: A (40 x 50) with two separate discs, a large rectangle with a small one on top
    of it, a crowd region and a box-only annotation; B (30 x 30, in a subfolder) with one disc.
    Returns (path, {image_id: [(annotation index in file, mask), ...] of the objects expected
    in the label image}, {image_id: RGB array})."""
    rng = np.random.default_rng(0)
    coco = new_coco([{"id": 3, "name": "nucleus"}], str(tmp_path / "imgs"))
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    images = {}
    expected = {}
    for image_id, name, (h, w) in ((7, "a.png", (40, 50)), (9, "sub/b.png", (30, 30))):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / "imgs" / name)
        images[image_id] = rgb
        coco["images"].append(image_entry(image_id, name, h, w))
    h, w = 40, 50
    objs_a = [disc(h, w, 8, 8, 5), disc(h, w, 32, 40, 6), rect(h, w, 5, 20, 25, 45),
              rect(h, w, 10, 28, 16, 36)]  # the last lies on the rectangle
    for m in objs_a:
        coco["annotations"].append(mask_annotation(m, 7, 3))
    crowd = mask_annotation(rect(h, w, 32, 2, 38, 12), 7, 3)
    crowd["iscrowd"] = 1
    coco["annotations"].append(crowd)
    coco["annotations"].append(box_annotation([1, 30, 5, 35], 7, 3))
    m_b = disc(30, 30, 15, 15, 7)
    coco["annotations"].append(mask_annotation(m_b, 9, 3))
    big, small = objs_a[2], objs_a[3]
    expected[7] = [(1, objs_a[0]), (2, objs_a[1]), (3, big & ~small), (4, small)]
    expected[9] = [(1, m_b)]
    path = tmp_path / "set.json"
    save_coco(coco, str(path))
    return str(path), expected, images


def test_coco_to_label_images(bench, coco_file):
    path, expected, images = coco_file
    recs = bench.coco_to_label_images(path)
    assert [r["image_id"] for r in recs] == [7, 9]
    for r in recs:
        assert r["image"].dtype == np.uint8 and r["image"].shape[2] == 3
        np.testing.assert_array_equal(r["image"], images[r["image_id"]])
        lab = r["labels"]
        assert lab.shape == images[r["image_id"]].shape[:2]
        want = np.zeros_like(lab)
        for k, m in expected[r["image_id"]]:
            want[m] = k
        # every object painted as its number; the small one whole on top of the rectangle;
        # crowd and box-only annotations left out
        np.testing.assert_array_equal(lab, want)


def test_label_image_round_trip_through_evaluation(bench, coco_file, tmp_path):
    """GT file -> label image -> COCO results -> the project's evaluation: the results are
    the GT's objects again (F1 1.0, each mask equal to its label's pixels)."""
    path, expected, _ = coco_file
    gt = load_coco(path)
    preds = []
    for r in bench.coco_to_label_images(path):
        res = bench.label_to_results(r["labels"], r["image_id"], 3)
        assert len(res) == len(expected[r["image_id"]])
        h, w = r["labels"].shape
        for one, (k, _) in zip(res, expected[r["image_id"]]):
            assert set(one) == {"image_id", "category_id", "segmentation", "bbox", "score"}
            assert isinstance(one["segmentation"]["counts"], str)
            assert one["image_id"] == r["image_id"] and one["category_id"] == 3
            m = annotation_to_mask(one, h, w)
            np.testing.assert_array_equal(m, r["labels"] == k)
            ys, xs = np.nonzero(m)
            assert one["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(),
                                   ys.max() + 1 - ys.min()]
        preds.extend(res)
    out = tmp_path / "predictions_set.json"
    out.write_text(json.dumps(preds))
    preds = load_predictions(str(out))  # what tools/evaluate.py --pred reads
    # the GT without the crowd and box-only annotations, and the rectangle as painted
    gt["annotations"] = [a for a in gt["annotations"] if not a.get("iscrowd")
                         and "segmentation" in a]
    ev = evaluate(gt, preds, iou_thresh=0.5)
    assert ev.mode == "masks"
    assert ev.summary["f1"] == 1.0
    assert ev.summary["tp"] == 5 and ev.summary["fp"] == 0 and ev.summary["fn"] == 0
    # one object lost: no longer perfect
    ev = evaluate(gt, preds[1:], iou_thresh=0.5)
    assert ev.summary["fn"] == 1 and ev.summary["f1"] < 1.0


def test_label_to_results_scores_and_gaps(bench):
    lab = np.zeros((20, 20), np.int32)
    lab[2:5, 2:5] = 1
    lab[10:15, 12:18] = 3  # label 2 absent
    prob = np.zeros((20, 20))
    prob[2:5, 2:5] = 0.25
    prob[10:15, 12:18] = 0.8
    prob[10, 12] = 0.5
    scores = bench.mean_in_labels(prob, lab)
    np.testing.assert_allclose(scores, [0.25, 0.0, (0.8 * 29 + 0.5) / 30])
    res = bench.label_to_results(lab, 5, 1, scores)
    assert [r["score"] for r in res] == pytest.approx([0.25, (0.8 * 29 + 0.5) / 30])
    assert [r["bbox"] for r in res] == [[2.0, 2.0, 3.0, 3.0], [12.0, 10.0, 6.0, 5.0]]
    assert all(r["score"] == 1.0 for r in bench.label_to_results(lab, 5, 1))
    assert bench.label_to_results(np.zeros((4, 4), np.int32), 1, 1) == []
    assert len(bench.mean_in_labels(prob, np.zeros((20, 20), np.int32))) == 0


def test_object_diameters_and_names(bench, coco_file):
    lab = np.zeros((30, 30), np.int32)
    lab[0:10, 0:10] = 1      # 100 px
    lab[20:24, 20:29] = 4    # 36 px
    np.testing.assert_allclose(bench.object_diameters(lab),
                               [2 * np.sqrt(100 / np.pi), 2 * np.sqrt(36 / np.pi)])
    path = coco_file[0]
    assert bench.category_of(path) == 3
    assert bench.predictions_path("/o", "/d/dsb_test.json") == "/o/predictions_dsb_test.json"


def test_imports_without_cellpose(monkeypatch):
    monkeypatch.setitem(sys.modules, "cellpose", None)  # `import cellpose` raises ImportError
    mod = load_bench()
    assert callable(mod.label_to_results) and callable(mod.main)
    with pytest.raises(ImportError):
        mod.cellpose_input(np.zeros((8, 8, 3), np.uint8))


def test_draw_weights_are_per_image_of_each_file(bench):
    """`--train-weights 1 10` draws each image of the second file 10x as often as one of the
    first, whatever the files' sizes (the meaning of DATASETS.TRAIN_WEIGHTS)."""
    p = bench.draw_probabilities([514, 13], [1, 10])
    assert p.shape == (527,) and p.sum() == pytest.approx(1.0)
    assert p[-1] / p[0] == pytest.approx(10.0)
    assert p[:514].sum() == pytest.approx(514 / (514 + 130))
    assert bench.draw_probabilities([514, 13], None) is None
    with pytest.raises(SystemExit, match="one per file"):
        bench.draw_probabilities([514, 13], [1])


def test_epoch_plan_uses_the_whole_budget(bench):
    """Under 100 epochs train_seg's schedule does not depend on n_epochs, so the plan is 99 and
    the deadline ends training; from 100 on the estimate is kept (its end-of-schedule halvings
    depend on it)."""
    assert bench.epochs_that_fit(2614, 60.0, 6.0, 10) == 36
    assert bench.epochs_that_fit(0, 60.0, 6.0, 10) == 1
    assert bench.planned_epochs(36) == 99 and bench.planned_epochs(6) == 99
    assert bench.planned_epochs(150) == 150
