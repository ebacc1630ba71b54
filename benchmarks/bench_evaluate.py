"""Time of ``detector.evaluation.evaluate`` on DSB2018 "stage 1 test size" data (65 real images,
~4,150 nuclei) against baselines measured in the same run.

    .venv/bin/python benchmarks/bench_evaluate.py [--gt GT.json] [--images 65] [--repeat 3]

Takes about 3 minutes on a 2-core CPU, almost all of it the dense baseline (last run: ours
1.10 s for evaluate() on 65 images / 4,120 nuclei; matching 0.48 s vs 174 s dense; COCO AP
0.25 s vs 12.2 s).

Ground truth: 65 images of ../shared/data/dsb2018/stage1_train converted to COCO RLE (the
seeded sample whose nucleus count is closest to the 4,152 of the stage 1 test set), or
``--gt`` (e.g. output/data/dsb_test.json). Predictions: a perturbed copy of the GT (8% dropped,
20% shifted by 1-4 px, 4% duplicated, 6% spurious copies moved 15 px, scores uniform).

Rows:
- matching: IoU of every image + one-to-one matching at the 10 IoU thresholds. Ours: IoU only
  between overlapping boxes (sparse), Hungarian only on conflicting pairs. Baseline: the dense
  all-pairs approach: decode every mask, IoU matrix by a product of the flattened masks,
  ``linear_sum_assignment`` on the full matrix per threshold. The TP counts must agree.
- COCO AP: ours runs ``FastCOCOeval`` (pycocotools' greedy matching visiting only pairs above
  the lowest IoU threshold) on the 'all' area range only; baseline: pycocotools ``COCOeval`` as
  configured out of the box (4 area ranges); maxDets 1000 in both. The AP must agree.
- evaluate(): the whole call (matching, AJI, PQ, score sweep, COCOeval): the 10 s target.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pycocotools.mask as mask_utils  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402
from tqdm import tqdm  # noqa: E402

from detector.data.coco import (annotation_to_mask, annotation_to_rle, image_entry,  # noqa: E402
                                load_coco, mask_annotation, new_coco, to_pycocotools)
from detector.data.image_io import read_array  # noqa: E402
from detector.evaluation import evaluate  # noqa: E402
from detector.evaluation.coco_eval import max_dets_list, run_cocoeval  # noqa: E402
from detector.evaluation.inputs import normalize_results, objects_of  # noqa: E402
from detector.evaluation.metrics import IOU_THRESHOLDS, evaluate_image_instances  # noqa: E402

DATA = os.environ.get("DETECTOR_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))
STAGE1_TEST_NUCLEI = 4152


def dsb_subset(n_images: int, target: int = STAGE1_TEST_NUCLEI, seed: int = 0) -> Dict:
    """COCO dict of ``n_images`` stage1_train images, the seeded sample (of 200 tried) whose
    nucleus count is closest to ``target``."""
    root = os.path.join(DATA, "dsb2018", "stage1_train")
    if not os.path.isdir(root):
        sys.exit(f"error: {root} is absent (see ../shared/data/README.md); or pass --gt")
    ids = sorted(os.listdir(root))
    counts = np.array([len(os.listdir(os.path.join(root, i, "masks"))) for i in ids])
    rng = np.random.default_rng(seed)
    best = min((rng.choice(len(ids), n_images, replace=False) for _ in range(200)),
               key=lambda s: abs(int(counts[s].sum()) - target))
    coco = new_coco([{"id": 1, "name": "nucleus"}], root)
    for k, j in enumerate(tqdm(sorted(best), desc="convert DSB2018 subset", unit="img"), 1):
        i = ids[j]
        img = read_array(os.path.join(root, i, "images", f"{i}.png"))
        h, w = img.shape[:2]
        coco["images"].append(image_entry(k, f"{i}/images/{i}.png", h, w))
        for mf in sorted(os.listdir(os.path.join(root, i, "masks"))):
            m = read_array(os.path.join(root, i, "masks", mf))
            ann = mask_annotation((m[..., 0] if m.ndim == 3 else m) > 0, k, 1,
                                  ann_id=len(coco["annotations"]) + 1)
            if ann is not None:
                coco["annotations"].append(ann)
    coco["_image_root"] = root
    return coco


def perturbed(gt: Dict, seed: int = 0) -> List[Dict]:
    rng = np.random.default_rng(seed)
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    out = []

    def moved(a, dx, dy):
        h, w = sizes[a["image_id"]]
        m = annotation_to_mask(a, h, w)
        m = np.roll(np.roll(m, dy, 0), dx, 1)
        r = mask_annotation(m, a["image_id"], 1)
        return r

    for a in gt["annotations"]:
        u = rng.random()
        if u < 0.08:
            continue
        r = moved(a, int(rng.integers(1, 5)), int(rng.integers(-3, 4))) if u < 0.28 else \
            {k: a[k] for k in ("image_id", "category_id", "bbox", "segmentation")}
        if r is None:
            continue
        r["score"] = float(rng.random())
        out.append(r)
        if rng.random() < 0.04:
            out.append(dict(r, score=float(rng.random())))
        if rng.random() < 0.06:
            f = moved(a, 15, 15)
            if f is not None:
                f["score"] = float(rng.random()) * 0.6
                out.append(f)
    return out


def dense_matching(gt: Dict, res: List[Dict]) -> np.ndarray:
    """TP at each IoU threshold by the dense all-pairs approach (baseline)."""
    tps = np.zeros(len(IOU_THRESHOLDS), np.int64)
    by_gt: Dict[int, list] = {}
    by_res: Dict[int, list] = {}
    for a in gt["annotations"]:
        by_gt.setdefault(a["image_id"], []).append(a)
    for r in res:
        by_res.setdefault(r["image_id"], []).append(r)
    for im in gt["images"]:
        h, w = im["height"], im["width"]
        g = by_gt.get(im["id"], [])
        p = [r for r in by_res.get(im["id"], []) if r["score"] >= 0.5]
        if not g or not p:
            continue
        G = np.stack([mask_utils.decode(annotation_to_rle(a, h, w)).reshape(-1) for a in g])
        P = np.stack([mask_utils.decode(annotation_to_rle(a, h, w)).reshape(-1) for a in p])
        G, P = G.astype(np.float32), P.astype(np.float32)
        inter = P @ G.T
        union = P.sum(1)[:, None] + G.sum(1)[None, :] - inter
        iou = inter / np.maximum(union, 1)
        for k, t in enumerate(IOU_THRESHOLDS):
            valid = iou > t
            cost = -(valid + iou / (2 * max(1, min(iou.shape))))
            a, b = linear_sum_assignment(np.where(valid, cost, 0.0))
            tps[k] += int(valid[a, b].sum())
    return tps


def sparse_matching(gt: Dict, res: List[Dict]) -> np.ndarray:
    tps = np.zeros(len(IOU_THRESHOLDS), np.int64)
    by_gt: Dict[int, list] = {}
    by_res: Dict[int, list] = {}
    for a in gt["annotations"]:
        by_gt.setdefault(a["image_id"], []).append(a)
    for r in res:
        by_res.setdefault(r["image_id"], []).append(r)
    for im in gt["images"]:
        g = objects_of(by_gt.get(im["id"], []), im, True, True)
        p = objects_of(by_res.get(im["id"], []), im, True, False)
        tps += evaluate_image_instances(p, g, 0.5, 0.5, sweep=False).tp_iou
    return tps


def cocoeval_default(gt: Dict, res: List[Dict], max_dets: int) -> float:
    from pycocotools.cocoeval import COCOeval

    from detector.evaluation.coco_eval import _gt_for_cocoeval

    cg = to_pycocotools(_gt_for_cocoeval(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        cd = cg.loadRes([dict(r) for r in res])
        ev = COCOeval(cg, cd, "segm")
        ev.params.maxDets = max_dets_list(max_dets)
        ev.evaluate()
        ev.accumulate()
    p = ev.eval["precision"][:, :, :, 0, -1]
    return float(p[p > -1].mean())


def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gt", help="COCO GT with masks (default: convert a DSB2018 subset)")
    ap.add_argument("--images", type=int, default=65)
    ap.add_argument("--repeat", type=int, default=3, help="runs of ours (median)")
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass
    if args.gt:
        gt = load_coco(args.gt)
        keep = {im["id"] for im in sorted(gt["images"], key=lambda i: i["id"])[:args.images]}
        gt["images"] = [im for im in gt["images"] if im["id"] in keep]
        gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    else:
        gt = dsb_subset(args.images)
    res = normalize_results(perturbed(gt), gt)
    n_img, n_obj = len(gt["images"]), len(gt["annotations"])
    print(f"{n_img} images, {n_obj} GT nuclei, {len(res)} predictions (2-core CPU run)")

    t_sparse, tp_sparse = timed(lambda: sparse_matching(gt, res), args.repeat)
    t_dense, tp_dense = timed(lambda: dense_matching(gt, res), 1)
    t_coco, ap_ours = timed(lambda: run_cocoeval(gt, res, "segm", 1000)[0]["AP"], args.repeat)
    t_coco_def, ap_def = timed(lambda: cocoeval_default(gt, res, 1000), 1)
    t_full, ev = timed(lambda: evaluate(gt, res), args.repeat)

    rows = [
        ("matching, 10 IoU thresholds", t_sparse, "dense all-pairs", t_dense,
         "TP agree" if np.array_equal(tp_sparse, tp_dense) else f"TP DIFFER {tp_sparse} "
                                                                 f"{tp_dense}"),
        ("COCO AP (maxDets 1000)", t_coco, "COCOeval, 4 area ranges", t_coco_def,
         "AP agree" if abs(ap_ours - ap_def) < 1e-12 else f"AP DIFFER {ap_ours} {ap_def}"),
        ("evaluate() total", t_full, "dense matching + default COCOeval", t_dense + t_coco_def,
         f"F1 {ev.summary['f1']:.3f}, DSB {ev.summary['dsb_score']:.3f}, "
         f"AP {ev.summary['AP']:.3f}"),
    ]
    print(f"{'step':30s} {'ours s':>8s}  {'baseline':34s} {'base s':>8s} {'speed-up':>8s}  check")
    for name, t, bname, tb, check in rows:
        print(f"{name:30s} {t:8.2f}  {bname:34s} {tb:8.2f} {tb / t:7.1f}x  {check}")
    target = "under" if t_full < 10 else "OVER"
    print(f"evaluate() on {n_img} images / {n_obj} nuclei: {t_full:.2f} s ({target} the 10 s "
          "target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
