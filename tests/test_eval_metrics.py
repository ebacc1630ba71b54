"""Object-level metrics checked against references: pycocotools COCOeval, the DSB2018 Kaggle
formula, hand-worked AJI / PQ / point-matching cases, and exact counts on perturbed real data."""
import contextlib
import copy
import io
import json
import os
import warnings

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from skimage.segmentation import relabel_sequential

from detector.data.coco import encode_mask, image_entry, load_coco, mask_annotation, new_coco, \
    save_coco
from detector.data.image_io import read_array
from detector.evaluation import EvaluationInputError, evaluate, evaluate_coco
from detector.evaluation import matching
from detector.evaluation.coco_eval import APResampler, run_cocoeval
from detector.structures import CropMask, rle_from_json
from detector.structures.masks import mask_areas
from tests.conftest import shared_path

DSB_IDS = [
    "00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552",
    "003cee89357d9fe13516167fd67b609a164651b21934585648c740d2c3d86dc1",
    "0280fa8f60f6bcae0f97d93c28f60be194f9309ff610dc5845e60455b0f87c21",
]


def build_dsb_subset(out_path: str, ids=DSB_IDS) -> str:
    """A COCO file (RLE masks) of a few real DSB2018 stage 1 images, written to out_path."""
    root = shared_path("dsb2018", "stage1_train")
    coco = new_coco([{"id": 1, "name": "nucleus"}], str(root))
    for k, i in enumerate(ids, start=1):
        folder = root / i
        img = read_array(str(folder / "images" / f"{i}.png"))
        h, w = img.shape[:2]
        coco["images"].append(image_entry(k, f"{i}/images/{i}.png", h, w, slide=i))
        for mf in sorted(os.listdir(folder / "masks")):
            m = read_array(str(folder / "masks" / mf))
            m = (m[..., 0] if m.ndim == 3 else m) > 0
            ann = mask_annotation(m, k, 1)
            if ann is not None:
                coco["annotations"].append(ann)
    save_coco(coco, out_path)
    return out_path


@pytest.fixture(scope="session")
def dsb_gt_path(tmp_path_factory):
    return build_dsb_subset(str(tmp_path_factory.mktemp("dsb") / "gt.json"))


def gt_as_results(gt, score=1.0):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": score, "segmentation": a["segmentation"]} for a in gt["annotations"]]


def shifted(ann, h, w, dx, dy):
    """The annotation's mask moved by (dx, dy) px, as a results entry."""
    from detector.data.coco import annotation_to_mask
    m = annotation_to_mask(ann, h, w)
    m2 = np.zeros_like(m)
    ys, xs = np.nonzero(m)
    ys, xs = ys + dy, xs + dx
    ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    m2[ys[ok], xs[ok]] = True
    a = mask_annotation(m2, ann["image_id"], ann["category_id"])
    if a is None:  # moved out of the image
        return None
    a["score"] = 0.9
    return a


# ---------------------------------------------------------------------- real data: identity
def test_gt_against_itself_scores_one_everywhere(dsb_gt_path):
    gt = load_coco(dsb_gt_path)
    m = evaluate_coco(gt, gt_as_results(gt))
    for key in ("precision", "recall", "f1", "dsb_score", "AJI", "PQ", "SQ", "DQ", "AP", "AP50",
                "AP75", "AR", "f1@0.95"):
        assert m[key] == pytest.approx(1.0), key
    assert m["fp"] == 0 and m["fn"] == 0 and m["tp"] == len(gt["annotations"])
    # boxes mode too
    mb = evaluate_coco(gt, gt_as_results(gt), mode="boxes")
    assert mb["f1"] == pytest.approx(1.0) and mb["AP"] == pytest.approx(1.0)


def test_deleted_duplicated_shifted_give_exact_counts(dsb_gt_path):
    gt = load_coco(dsb_gt_path)
    im = gt["images"][0]
    anns = [a for a in gt["annotations"] if a["image_id"] == im["id"]]
    others = [a for a in gt["annotations"] if a["image_id"] != im["id"]]
    res = gt_as_results({"annotations": anns[3:] + others})  # delete anns[0]
    res += gt_as_results({"annotations": [anns[1], anns[1]]})  # anns[1] twice: one duplicate
    w_box = int(anns[2]["bbox"][2])
    moved = shifted(anns[2], im["height"], im["width"], dx=w_box, dy=0)  # anns[2] shifted away
    res.append(moved)
    # the shifted copy must not hit any GT object at IoU > 0.5 (else the case is ill-made)
    xyxy = lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]  # noqa: E731
    _, _, ious = matching.iou_pairs(
        np.array([xyxy(moved["bbox"])]), np.array([xyxy(a["bbox"]) for a in anns]),
        [CropMask.from_coco_rle(rle_from_json(moved["segmentation"]))],
        [CropMask.from_coco_rle(rle_from_json(a["segmentation"])) for a in anns])
    assert ious.max(initial=0) <= 0.5
    ev = evaluate(gt, res)
    n = len(gt["annotations"])
    assert ev.summary["tp"] == n - 2
    assert ev.summary["fp"] == 2  # the duplicate and the shifted copy
    assert ev.summary["fn"] == 2  # the deleted and the shifted object
    row = ev.per_image[0]
    assert (row["tp"], row["fp"], row["fn"]) == (len(anns) - 2, 2, 2)
    assert all(r["f1"] == pytest.approx(1.0) for r in ev.per_image[1:])
    assert ev.summary["precision"] == pytest.approx((n - 2) / n)


# ------------------------------------------------------------------- COCOeval reference
def _perturbed_predictions(gt, seed=0):
    rng = np.random.default_rng(seed)
    res = []
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    for a in gt["annotations"]:
        u = rng.random()
        if u < 0.1:
            continue  # dropped
        if u < 0.3:
            h, w = sizes[a["image_id"]]
            r = shifted(a, h, w, int(rng.integers(1, 5)), int(rng.integers(-3, 3)))
            if r is None:
                continue
        else:
            r = dict(gt_as_results({"annotations": [a]})[0])
        r["score"] = float(rng.random())
        res.append(r)
    return res


def test_ap_equals_pycocotools_cocoeval_on_the_same_files(dsb_gt_path, tmp_path):
    gt = load_coco(dsb_gt_path)
    res = _perturbed_predictions(gt)
    pred_path = tmp_path / "pred.json"
    pred_path.write_text(json.dumps(res))
    ours = evaluate_coco(gt, json.loads(pred_path.read_text()), max_dets=1000)
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO(dsb_gt_path)
        cd = cg.loadRes(str(pred_path))
        ev = COCOeval(cg, cd, "segm")
        ev.params.maxDets = [1, 10, 1000]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    p = ev.eval["precision"][:, :, :, 0, -1]
    assert ours["AP"] == pytest.approx(p[p > -1].mean(), abs=1e-12)
    assert ours["AP50"] == pytest.approx(ev.stats[1], abs=1e-12)
    assert ours["AP75"] == pytest.approx(ev.stats[2], abs=1e-12)
    assert ours["AR"] == pytest.approx(ev.stats[8], abs=1e-12)
    assert 0.3 < ours["AP"] < 0.95  # a non-trivial case
    # with < 100 objects per image, COCOeval's out-of-the-box headline AP (stats[0], taken at
    # maxDets=100) is the same number
    assert max(sum(a["image_id"] == i["id"] for a in gt["annotations"])
               for i in gt["images"]) < 100
    with contextlib.redirect_stdout(io.StringIO()):
        ev0 = COCOeval(cg, cd, "segm")
        ev0.evaluate()
        ev0.accumulate()
        ev0.summarize()
    assert ours["AP"] == pytest.approx(ev0.stats[0], abs=1e-12)
    # the bbox path as well
    ours_b = evaluate_coco(gt, res, mode="boxes")
    with contextlib.redirect_stdout(io.StringIO()):
        cdb = cg.loadRes([{k: v for k, v in r.items() if k != "segmentation"} for r in res])
        evb = COCOeval(cg, cdb, "bbox")
        evb.params.maxDets = [1, 10, 1000]
        evb.evaluate()
        evb.accumulate()
        evb.summarize()
    assert ours_b["AP50"] == pytest.approx(evb.stats[1], abs=1e-12)


def test_ap_resampler_reproduces_cocoeval_ap(dsb_gt_path):
    gt = load_coco(dsb_gt_path)
    res = _perturbed_predictions(gt, seed=1)
    ap, ev = run_cocoeval(gt, res, "segm", 1000)
    ids = [im["id"] for im in gt["images"]]
    rs = APResampler(ev, ids)
    assert rs.ap() == pytest.approx(ap["AP"], abs=1e-12)
    # one image alone equals COCOeval on that image alone
    one = {**gt, "images": gt["images"][:1],
           "annotations": [a for a in gt["annotations"] if a["image_id"] == ids[0]]}
    ap1, _ = run_cocoeval(one, [r for r in res if r["image_id"] == ids[0]], "segm", 1000)
    assert rs.ap([0]) == pytest.approx(ap1["AP"], abs=1e-12)


# ------------------------------------------------------------------- DSB2018 Kaggle formula
def kaggle_dsb_score(gt_labels: np.ndarray, pred_labels: np.ndarray) -> float:
    """The competition's published formula (Kaggle 'Data Science Bowl 2018' evaluation page and
    its reference kernel): IoU matrix from a label-image histogram, a hit is IoU > t."""
    true_objects = len(np.unique(gt_labels))
    pred_objects = len(np.unique(pred_labels))
    inter = np.histogram2d(gt_labels.ravel(), pred_labels.ravel(),
                           bins=(true_objects, pred_objects))[0]
    area_true = np.histogram(gt_labels, bins=true_objects)[0][:, None]
    area_pred = np.histogram(pred_labels, bins=pred_objects)[0][None, :]
    union = area_true + area_pred - inter
    iou = (inter / union)[1:, 1:]  # drop background
    scores = []
    for t in np.arange(0.5, 1.0, 0.05):
        matches = iou > t
        tp = np.sum(np.sum(matches, axis=1) == 1)
        fp = np.sum(np.sum(matches, axis=0) == 0)
        fn = np.sum(np.sum(matches, axis=1) == 0)
        scores.append(tp / (tp + fp + fn))
    return float(np.mean(scores))


def coco_from_label_images(gt_lab, pred_lab, scores=None):
    """GT dict and results list from two label images (0 = background)."""
    h, w = gt_lab.shape
    gt = new_coco([{"id": 1, "name": "nucleus"}], ".")
    gt["images"].append(image_entry(1, "x.png", h, w))
    for k in np.unique(gt_lab)[1:]:
        gt["annotations"].append(mask_annotation(gt_lab == k, 1, 1, ann_id=int(k)))
    res = []
    for n, k in enumerate(np.unique(pred_lab)[1:]):
        a = mask_annotation(pred_lab == k, 1, 1)
        a["score"] = 1.0 if scores is None else scores[n]
        res.append(a)
    return gt, res


def test_dsb_score_hand_made_case():
    # GT: object 1 = 2x5 block (10 px), object 2 = 2x5 block (10 px).
    # Prediction: an exact copy of object 1 (IoU 1), 6 px of object 2 (IoU 6/10 = 0.6), and a
    # 4 px false positive elsewhere.
    gt_lab = np.zeros((12, 12), np.int32)
    gt_lab[0:2, 0:5] = 1
    gt_lab[5:7, 0:5] = 2
    pred = np.zeros_like(gt_lab)
    pred[0:2, 0:5] = 1
    pred[5:7, 0:3] = 2
    pred[10:12, 10:12] = 3
    # t = 0.50, 0.55: TP 2, FP 1, FN 0 -> 2/3. t = 0.60 ... 0.95 (IoU 0.6 is not > 0.6):
    # TP 1, FP 2, FN 1 -> 1/4.  Mean over 10 thresholds: (2 * 2/3 + 8 * 1/4) / 10 = 1/3.
    expected = (2 * (2 / 3) + 8 * (1 / 4)) / 10
    assert expected == pytest.approx(1 / 3)
    assert kaggle_dsb_score(gt_lab, pred) == pytest.approx(expected)
    gt, res = coco_from_label_images(gt_lab, pred)
    m = evaluate_coco(gt, res)
    assert m["dsb_score"] == pytest.approx(expected)
    assert m["f1@0.55"] == pytest.approx(2 * 2 / (2 * 2 + 1))
    assert m["f1@0.60"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 1))


def test_dsb_score_matches_kaggle_formula_on_real_labels(dsb_gt_path):
    gt = load_coco(dsb_gt_path)
    from detector.data.coco import annotation_to_mask
    rng = np.random.default_rng(3)
    for im in gt["images"]:
        h, w = im["height"], im["width"]
        anns = [a for a in gt["annotations"] if a["image_id"] == im["id"]]
        gt_lab = np.zeros((h, w), np.int32)
        pred_lab = np.zeros((h, w), np.int32)
        for k, a in enumerate(anns, start=1):
            m = annotation_to_mask(a, h, w)
            gt_lab[m] = k
            if rng.random() < 0.15:
                continue  # missed
            # erode/dilate-like perturbation: drop a random share of the object's rows
            ys, xs = np.nonzero(m)
            cut = ys <= ys.min() + (ys.max() - ys.min()) * rng.uniform(0.3, 1.0)
            pred_lab[ys[cut], xs[cut]] = k
        gt_lab = relabel_sequential(gt_lab)[0]  # the kernel's histogram wants labels 0..n
        pred_lab = relabel_sequential(pred_lab)[0]
        one, res = coco_from_label_images(gt_lab, pred_lab)
        m = evaluate_coco(one, res)
        assert m["dsb_score"] == pytest.approx(kaggle_dsb_score(gt_lab, pred_lab), abs=1e-12)
        assert 0.05 < m["dsb_score"] < 0.95


# ---------------------------------------------------------------------------- AJI and PQ
def test_aji_and_pq_hand_made_cases():
    # image 1 (20 x 20):
    #  GT A rows 0-1, cols 0-4 (10 px); P1 rows 0-1, cols 2-6 (10 px): I = 6, U = 14, IoU 0.43
    #  GT B rows 5-6, cols 0-3 (8 px);  P2 identical: I = 8, U = 8, IoU 1
    #  GT C row 10, cols 0-4 (5 px): no prediction overlaps it
    #  P3 rows 15-16, cols 15-16 (4 px): overlaps nothing
    #  AJI = (6 + 8) / (14 + 8 + 5 + 4) = 14/31
    #  PQ: only B-P2 has IoU > 0.5: TP 1, FP 2, FN 2 -> DQ = 1/(1 + 1 + 1) = 1/3, SQ = 1
    g1 = np.zeros((20, 20), np.int32)
    g1[0:2, 0:5] = 1
    g1[5:7, 0:4] = 2
    g1[10, 0:5] = 3
    p1 = np.zeros_like(g1)
    p1[0:2, 2:7] = 1
    p1[5:7, 0:4] = 2
    p1[15:17, 15:17] = 3
    gt, res = coco_from_label_images(g1, p1)
    m = evaluate_coco(gt, res)
    assert m["AJI"] == pytest.approx(14 / 31)
    assert m["DQ"] == pytest.approx(1 / 3)
    assert m["SQ"] == pytest.approx(1.0)
    assert m["PQ"] == pytest.approx(1 / 3)

    # image 2: GT D row 0, cols 0-9 (10 px), prediction cols 0-7 (8 px): IoU 0.8
    #  AJI = 8/10, DQ = 1, SQ = 0.8, PQ = 0.8
    g2 = np.zeros((20, 20), np.int32)
    g2[0, 0:10] = 1
    p2 = np.zeros_like(g2)
    p2[0, 0:8] = 1
    gt, res = coco_from_label_images(g2, p2)
    m = evaluate_coco(gt, res)
    assert (m["AJI"], m["DQ"], m["SQ"], m["PQ"]) == pytest.approx((0.8, 1.0, 0.8, 0.8))

    # image 3: one prediction Q (8 px) covers two GT objects E, F (4 px each): IoU 0.5 with each.
    #  AJI (Kumar: each GT takes its best prediction, not one-to-one): I = 4 + 4,
    #  U = 8 + 8 (Q's pixels counted for both) -> 0.5.  PQ: 0.5 is not > 0.5 -> 0; DSB 0.
    g3 = np.zeros((20, 20), np.int32)
    g3[0, 0:4] = 1
    g3[0, 4:8] = 2
    p3 = np.zeros_like(g3)
    p3[0, 0:8] = 1
    gt, res = coco_from_label_images(g3, p3)
    m = evaluate_coco(gt, res)
    assert m["AJI"] == pytest.approx(0.5)
    assert m["PQ"] == 0.0 and m["dsb_score"] == 0.0 and m["tp"] == 0


def test_per_image_means_of_aji_and_pq():
    g = np.zeros((20, 40), np.int32)
    gt = new_coco([{"id": 1, "name": "nucleus"}], ".")
    res = []
    # image 1: perfect (AJI 1, PQ 1); image 2: the 0.8 case above
    for img_id, (gl, pl) in enumerate([((0, 10), (0, 10)), ((0, 10), (0, 8))], start=1):
        gt["images"].append(image_entry(img_id, f"{img_id}.png", 20, 40))
        gm = np.zeros_like(g, bool)
        gm[0, gl[0]:gl[1]] = True
        pm = np.zeros_like(g, bool)
        pm[0, pl[0]:pl[1]] = True
        gt["annotations"].append(mask_annotation(gm, img_id, 1, ann_id=img_id))
        r = mask_annotation(pm, img_id, 1)
        r["score"] = 0.9
        res.append(r)
    m = evaluate_coco(gt, res)
    assert m["AJI"] == pytest.approx((1 + 0.8) / 2)
    assert m["PQ"] == pytest.approx((1 + 0.8) / 2)


# ------------------------------------------------------------------------------- matching
def test_hungarian_maximises_matches_where_greedy_would_not():
    # pred 0 - gt 0 IoU 0.9, pred 0 - gt 1 IoU 0.6, pred 1 - gt 0 IoU 0.6: greedy by IoU takes
    # (0, 0) and leaves one of each unmatched; one-to-one maximum is (0, 1) + (1, 0).
    rows, cols, w = np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([0.9, 0.6, 0.6])
    m = matching.match_pairs(rows, cols, w, valid=w > 0.5)
    assert sorted(zip(rows[m], cols[m])) == [(0, 1), (1, 0)]
    # without a count difference, the larger total IoU wins
    rows, cols, w = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), np.array([.9, .6, .6, .8])
    m = matching.match_pairs(rows, cols, w, valid=w > 0.5)
    assert sorted(zip(rows[m], cols[m])) == [(0, 0), (1, 1)]


def test_sparse_box_overlaps_equal_dense(monkeypatch):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, (300, 2))
    a = np.c_[xy, xy + rng.uniform(1, 20, (300, 2))]
    xy = rng.uniform(0, 500, (250, 2))
    b = np.c_[xy, xy + rng.uniform(1, 20, (250, 2))]
    b[0] = a[0]  # coincident centres
    dense = set(zip(*matching.box_overlap_candidates(a, b)))
    monkeypatch.setattr(matching, "_DENSE_LIMIT", 0)
    tree = set(zip(*matching.box_overlap_candidates(a, b)))
    assert dense == tree and (0, 0) in dense and len(dense) > 20


# --------------------------------------------------------------------------------- points
def point_gt(points_per_image, mpp=0.25):
    gt = new_coco([{"id": 1, "name": "mitotic figure"}], ".")
    for img_id, pts in enumerate(points_per_image, start=1):
        gt["images"].append(image_entry(img_id, f"{img_id}.png", 512, 512, mpp=mpp))
        for x, y in pts:
            gt["annotations"].append({"image_id": img_id, "category_id": 1,
                                      "bbox": [x - 25, y - 25, 50, 50], "area": 2500,
                                      "iscrowd": 0, "id": len(gt["annotations"]) + 1})
    return gt


def test_points_midog_f1_and_threshold_sweep():
    # mpp 0.25 -> 7.5 um = 30 px.  Image 1: GT (100,100), (200,200); image 2: GT (300,300).
    gt = point_gt([[(100, 100), (200, 200)], [(300, 300)]])
    res = [
        {"image_id": 1, "category_id": 1, "bbox": [110, 100, 0, 0], "score": 0.9},  # 10 px: TP
        {"image_id": 1, "category_id": 1, "bbox": [200, 235, 0, 0], "score": 0.8},  # 35 px: FP
        {"image_id": 2, "category_id": 1, "bbox": [300, 330, 0, 0], "score": 0.7},  # 30 px: TP
        {"image_id": 2, "category_id": 1, "bbox": [300, 300, 0, 0], "score": 0.3},  # dup: FP@.3
    ]
    ev = evaluate(gt, res, score_thresh=0.0)
    assert ev.mode == "points"
    # at score >= 0: TP: (110,100) and one of image 2's -> the closer (300,300) wins the tie
    # break; (300,330) becomes FP.  TP 2, FP 2, FN 1 -> F1 = 4/7 (counts summed over images)
    assert (ev.summary["tp"], ev.summary["fp"], ev.summary["fn"]) == (2, 2, 1)
    assert ev.summary["f1"] == pytest.approx(4 / 7)
    assert ev.per_image[1]["tp"] == 1
    curve = ev.score_curve
    f1 = dict(zip(curve["score_thresholds"], curve["f1"]))
    assert f1[0.3] == pytest.approx(4 / 7)
    assert f1[0.5] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # .9 .8 .7: TP 2, FP 1, FN 1
    assert f1[0.85] == pytest.approx(2 / 4)  # .9 only: TP 1, FP 0, FN 2
    assert curve["best_score_thresh"] == pytest.approx(0.31)  # lowest threshold of F1 = 2/3
    assert curve["best_f1"] == pytest.approx(2 / 3)
    # --mpp overrides the images' mpp: at 0.1 um/px the radius is 75 px, so (200,235) matches
    ev2 = evaluate(gt, res, score_thresh=0.5, mpp=0.1)
    assert ev2.summary["tp"] == 3 and ev2.summary["fn"] == 0


def test_points_mode_needs_mpp():
    gt = point_gt([[(100, 100)]])
    del gt["images"][0]["mpp"]
    res = [{"image_id": 1, "category_id": 1, "bbox": [100, 100, 0, 0], "score": 0.9}]
    assert evaluate(gt, res).mode == "boxes"  # auto: no mpp -> boxes
    with pytest.raises(EvaluationInputError, match="mpp"):
        evaluate(gt, res, mode="points")
    assert evaluate(gt, res, mode="points", mpp=0.25).summary["tp"] == 1


# ------------------------------------------------------------------------------ bad input
def test_empty_prediction_scores_recall_zero(dsb_gt_path):
    gt = load_coco(dsb_gt_path)
    m = evaluate_coco(gt, [])
    assert m["recall"] == 0 and m["precision"] == 0 and m["f1"] == 0 and m["AP"] == 0
    assert m["fn"] == len(gt["annotations"])


def test_unknown_image_and_wrong_size_are_clear_errors(dsb_gt_path):
    gt = load_coco(dsb_gt_path)
    res = gt_as_results(gt)[:2]
    bad = [dict(res[0], image_id=999)]
    with pytest.raises(EvaluationInputError, match="image_id 999"):
        evaluate_coco(gt, bad)
    im = gt["images"][0]
    m = np.zeros((im["height"] + 1, im["width"]), bool)
    m[:3, :3] = True
    wrong = [dict(res[0], segmentation=encode_mask(m))]
    with pytest.raises(EvaluationInputError, match="size"):
        evaluate_coco(gt, wrong)
    # boxes (no masks) beyond the image: scored, with a warning naming the likely cause
    far = [{k: v for k, v in dict(res[0], bbox=[im["width"] + 5.0, 0.0, 10.0, 10.0]).items()
            if k != "segmentation"}]
    with pytest.warns(UserWarning, match="different image size"):
        m = evaluate_coco(gt, far, mode="boxes")
    assert m["fp"] == 1


def test_class_missing_from_one_side_is_defined(dsb_gt_path):
    gt = load_coco(dsb_gt_path)
    res = gt_as_results(gt)
    res[0] = dict(res[0], category_id=7)  # a class the GT does not have
    with pytest.warns(UserWarning, match="not in the ground truth"):
        ev = evaluate(gt, res)
    assert ev.summary["fp"] == 1 and ev.summary["fn"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ev2 = evaluate(gt, res, class_agnostic=True)
    assert ev2.summary["f1"] == pytest.approx(1.0)
    # a GT class without predictions: recall 0 for that class, others unaffected
    gt2 = copy.deepcopy(gt)
    gt2["categories"].append({"id": 2, "name": "other"})
    gt2["annotations"][0]["category_id"] = 2
    ev3 = evaluate(gt2, gt_as_results(gt))
    per = {c["name"]: c for c in ev3.per_class}
    assert per["other"]["recall"] == 0 and per["other"]["fn"] == 1
    assert per["nucleus"]["fp"] == 1 and per["nucleus"]["recall"] == 1.0


def test_results_without_image_id_map_to_a_single_image(dsb_gt_path):
    gt = load_coco(dsb_gt_path)
    one = {**gt, "images": gt["images"][:1],
           "annotations": [a for a in gt["annotations"] if a["image_id"] == 1]}
    res = [{k: v for k, v in r.items() if k != "image_id"} for r in gt_as_results(one)]
    assert evaluate_coco(one, res)["f1"] == pytest.approx(1.0)
    with pytest.raises(EvaluationInputError, match="no image_id"):
        evaluate_coco(gt, res)
    # an image name (a slide name) maps by file stem / slide
    named = [dict(r, image_id=DSB_IDS[0]) for r in res]
    assert evaluate_coco(one, named)["f1"] == pytest.approx(1.0)
    # infer_tiles' detections.json calls every slide image 1: with a one-image GT whose id
    # differs, all-one-unknown-id results go to that image, with a warning
    third = {**gt, "images": gt["images"][2:],
             "annotations": [a for a in gt["annotations"] if a["image_id"] == 3]}
    as_one = [dict(r, image_id=1) for r in gt_as_results(third)]
    with pytest.warns(UserWarning, match="mapped to its only image"):
        assert evaluate_coco(third, as_one)["f1"] == pytest.approx(1.0)
    with pytest.raises(EvaluationInputError, match="image_id 1"):
        evaluate_coco({**gt, "images": gt["images"][1:]}, as_one)


def test_score_sweep_shortcut_equals_matching_per_threshold():
    from detector.evaluation.metrics import SCORE_GRID, sweep_scores
    rng = np.random.default_rng(4)
    for conflict in (0, 3, 10, 30, 30, 30):
        n = 40
        rows = np.arange(n)
        cols = rng.permutation(n)
        if conflict:  # some predictions compete for the same GT object
            rows = np.r_[rows, rng.integers(0, n, conflict)]
            cols = np.r_[cols, rng.integers(0, n, conflict)]
            key = np.unique(rows * n + cols)
            rows, cols = key // n, key % n
        w = rng.uniform(0.3, 1.0, len(rows))
        scores = np.round(rng.random(n + 5), 2)  # ties with the grid too
        valid = w > 0.5
        tp, npred = sweep_scores(rows, cols, w, scores, valid)
        for k, s in enumerate(SCORE_GRID):
            m = matching.match_pairs(rows, cols, w, valid=valid & (scores[rows] >= s))
            assert tp[k] == len(m)
            assert npred[k] == int(np.sum(scores >= s))


def test_per_class_and_overall_counts_with_two_classes():
    # two boxes of class 1 and one of class 2 (box mode, no mpp); predictions: both class-1
    # boxes found, the class-2 box predicted with class 1 (a wrong label is FP + FN)
    gt = new_coco([{"id": 1, "name": "normal"}, {"id": 2, "name": "atypical"}], ".")
    gt["images"].append(image_entry(1, "a.png", 100, 100))
    for k, (box, cat) in enumerate([([0, 0, 10, 10], 1), ([20, 0, 10, 10], 1),
                                    ([50, 50, 10, 10], 2)], start=1):
        gt["annotations"].append({"id": k, "image_id": 1, "category_id": cat, "bbox": box,
                                  "area": 100.0, "iscrowd": 0})
    res = [{"image_id": 1, "category_id": 1, "bbox": b, "score": 0.9}
           for b in ([0, 0, 10, 10], [21, 0, 10, 10], [50, 50, 10, 10])]
    ev = evaluate(gt, res)
    assert ev.mode == "boxes"
    per = {c["name"]: c for c in ev.per_class}
    assert (per["normal"]["tp"], per["normal"]["fp"], per["normal"]["fn"]) == (2, 1, 0)
    assert (per["atypical"]["tp"], per["atypical"]["fp"], per["atypical"]["fn"]) == (0, 0, 1)
    assert per["atypical"]["recall"] == 0.0 and per["normal"]["precision"] == pytest.approx(2 / 3)
    assert (ev.summary["tp"], ev.summary["fp"], ev.summary["fn"]) == (2, 1, 1)
    assert ev.summary["f1/normal"] == pytest.approx(0.8)
    assert ev.summary["f1/atypical"] == 0.0
    # class-agnostic: all three match
    assert evaluate(gt, res, class_agnostic=True).summary["tp"] == 3


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_fast_cocoeval_matches_pycocotools_image_by_image(dsb_gt_path, iou_type):
    from detector.data.coco import to_pycocotools
    from detector.evaluation.coco_eval import FastCOCOeval, _gt_for_cocoeval
    gt = load_coco(dsb_gt_path)
    res = _perturbed_predictions(gt, seed=2)
    res += [dict(r, score=r["score"] / 2) for r in res[::7]]  # duplicates: greedy conflicts
    g = _gt_for_cocoeval(gt)
    g["annotations"][3]["iscrowd"] = 1  # a crowd region and the default 4 area ranges
    g["annotations"][3]["segmentation"] = rle_from_json(g["annotations"][3]["segmentation"])
    g["annotations"][3]["segmentation"]["counts"] = \
        g["annotations"][3]["segmentation"]["counts"].decode()
    out = []
    for cls in (COCOeval, FastCOCOeval):
        cg = to_pycocotools(g)
        with contextlib.redirect_stdout(io.StringIO()):
            cd = cg.loadRes([dict(r) for r in res])
            ev = cls(cg, cd, iou_type)
            ev.evaluate()
            ev.accumulate()
        out.append(ev)
    ref, fast = out
    assert len(ref.evalImgs) == len(fast.evalImgs)
    n = 0
    for a, b in zip(ref.evalImgs, fast.evalImgs):
        assert (a is None) == (b is None)
        if a is None:
            continue
        for key in ("dtIds", "gtIds", "dtScores"):
            assert a[key] == b[key]
        for key in ("dtMatches", "gtMatches", "gtIgnore", "dtIgnore"):
            np.testing.assert_array_equal(a[key], b[key])
        n += 1
    assert n >= 3 * 4  # images x area ranges
    np.testing.assert_array_equal(ref.eval["precision"], fast.eval["precision"])


def test_match_pairs_is_one_to_one_and_of_maximum_size():
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching
    rng = np.random.default_rng(7)
    for _ in range(20):
        n_p, n_g, n_pairs = 30, 25, 60
        key = np.unique(rng.integers(0, n_p, n_pairs) * n_g + rng.integers(0, n_g, n_pairs))
        rows, cols = key // n_g, key % n_g
        w = rng.uniform(0.3, 1.0, len(rows))
        valid = w > 0.5
        m = matching.match_pairs(rows, cols, w, valid=valid)
        assert valid[m].all()
        assert len(set(rows[m])) == len(m) and len(set(cols[m])) == len(m)
        g = csr_matrix((np.ones(valid.sum()), (rows[valid], cols[valid])), shape=(n_p, n_g))
        best = int(np.sum(maximum_bipartite_matching(g, perm_type="column") >= 0))
        assert len(m) == best


def test_rle_areas_of_more_than_255_masks():
    # pycocotools 2.0.11's mask.area overflows on lists longer than 255 (dense tiles have more)
    m = np.zeros((30, 30), bool)
    rles = []
    for k in range(600):
        m[:] = False
        m[: 1 + k % 30, : 1 + (k // 30) % 30] = True
        rles.append(rle_from_json(encode_mask(m)))
    expect = [(1 + k % 30) * (1 + (k // 30) % 30) for k in range(600)]
    np.testing.assert_array_equal(mask_areas([CropMask.from_coco_rle(r) for r in rles]), expect)
