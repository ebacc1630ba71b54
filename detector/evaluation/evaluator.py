"""Evaluate a COCO results list against a COCO ground-truth dict: the library entry points.

:func:`evaluate_coco` is what the training engine and ``train_net.py --eval-only`` call (a flat
``Dict[str, float]``); :func:`evaluate` returns everything the CLI and the report need
(per image, per class, curves).
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from ..config.defaults import TestConfig
from .coco_eval import run_cocoeval
from .inputs import (EvaluationInputError, check_compatible, check_mpp, choose_mode,
                     normalize_results, objects_of)
from .metrics import (ImageEval, evaluate_image_instances, iou_curve, prf, score_curve,
                      summarize_counts, summarize_instances)
from .points import MIDOG_RADIUS_UM, evaluate_image_points


#: Evaluation defaults are the config's ``TEST.*`` (config/defaults.py), set in one place.
DEFAULTS = TestConfig()

@dataclass
class Evaluation:
    """Everything one evaluation produced.

    Attributes:
        mode: "masks", "boxes" or "points".
        summary: flat metrics (see :func:`evaluate_coco`).
        per_class: one dict per category (id, name, tp, fp, fn, precision, recall, f1, AP).
        per_image: one dict per GT image (image_id, file_name, counts and per-image metrics).
        iou_curve: precision/recall/F1 at IoU 0.50:0.05:0.95 (instance modes).
        score_curve: precision/recall/F1 against score threshold, and the best threshold.
        images: the GT image entries, in the order of ``image_evals``.
        image_evals: the per-image counts and matches (for bootstrap and overlays).
        gt, results: the inputs (results normalised), for the report's overlays.
    """

    mode: str
    summary: Dict[str, float]
    per_class: List[Dict[str, Any]]
    per_image: List[Dict[str, Any]]
    iou_curve: Optional[Dict[str, list]]
    score_curve: Optional[Dict[str, list]]
    params: Dict[str, Any]
    images: List[Dict[str, Any]]
    image_evals: List[ImageEval]
    gt: Dict[str, Any] = field(repr=False, default_factory=dict)
    results: List[Dict[str, Any]] = field(repr=False, default_factory=list)
    cocoeval: Any = field(repr=False, default=None)
    warnings: List[str] = field(default_factory=list)


def _agnostic(gt: Dict[str, Any], results: List[Dict[str, Any]]):
    """Copies with every category folded into the GT's first category."""
    cat = dict(sorted(gt["categories"], key=lambda c: c["id"])[0]) if gt["categories"] else \
        {"id": 1, "name": "object"}
    g = dict(gt)
    g["categories"] = [cat]
    g["annotations"] = [dict(a, category_id=cat["id"]) for a in gt["annotations"]]
    return g, [dict(r, category_id=cat["id"]) for r in results]


def evaluate(gt: Dict[str, Any], results: Sequence[Dict[str, Any]],
             iou_thresh: float = DEFAULTS.IOU_THRESH, score_thresh: float = DEFAULTS.SCORE_THRESH,
             max_dets: int = DEFAULTS.MAX_DETS, mode: str = "auto",
             radius_um: float = MIDOG_RADIUS_UM, mpp: Optional[float] = None,
             class_agnostic: bool = False, sweep: bool = True, source: str = "predictions",
             progress: bool = False) -> Evaluation:
    """Evaluate predictions against ground truth.

    Args:
        gt: a loaded COCO dict (``detector.data.coco.load_coco``).
        results: COCO results (bbox XYWH px, score, category_id, optional RLE segmentation);
            mapped to GT images as :mod:`detector.evaluation.inputs` documents.
        iou_thresh: IoU above which a match counts for precision/recall/F1 (instance modes).
        score_thresh: predictions below it are dropped before matching (AP uses all of them).
        max_dets: COCOeval maxDets (per image) for AP/AR.
        mode: "auto" | "masks" | "boxes" | "points" (see ``inputs.choose_mode``).
        radius_um, mpp: points mode: matching radius in micrometres; mpp overrides the GT
            images' ``mpp``.
        class_agnostic: fold all categories into one (labels ignored).
        sweep: also compute the score-threshold curve.
        source: the predictions' name (a file path) for messages.

    Raises:
        EvaluationInputError: results that do not fit the GT (unknown image ids, mask sizes...).
    """
    if not 0.0 <= iou_thresh < 1.0:
        raise EvaluationInputError(f"iou_thresh must be in [0, 1), got {iou_thresh}")
    if max_dets < 1:
        raise EvaluationInputError(f"max_dets must be >= 1, got {max_dets}")
    res = normalize_results(results, gt, source)
    warns = check_compatible(gt, res, source) if not class_agnostic else []
    if class_agnostic:
        gt, res = _agnostic(gt, res)
    mode = choose_mode(gt, res, mode, mpp, source)
    use_masks = mode == "masks"
    if mode == "points":
        check_mpp(gt, mpp)

    gt_by_img: Dict[int, list] = defaultdict(list)
    for a in gt["annotations"]:
        gt_by_img[int(a["image_id"])].append(a)
    res_by_img: Dict[int, list] = defaultdict(list)
    for r in res:
        res_by_img[r["image_id"]].append(r)

    images = sorted(gt["images"], key=lambda im: im["id"])
    evals: List[ImageEval] = []
    per_image: List[Dict[str, Any]] = []
    for im in tqdm(images, desc="evaluate", unit="img", disable=not progress, leave=False):
        g = objects_of(gt_by_img[im["id"]], im, use_masks, is_gt=True)
        # COCOeval keeps the max_dets best-scoring detections; matching uses them all
        p = objects_of(res_by_img[im["id"]], im, use_masks, is_gt=False)
        if mode == "points":
            radius_px = radius_um / float(mpp if mpp is not None else im["mpp"])
            e = evaluate_image_points(p, g, radius_px, score_thresh, sweep)
        else:
            e = evaluate_image_instances(p, g, iou_thresh, score_thresh, sweep)
        evals.append(e)
        row: Dict[str, Any] = {"image_id": im["id"], "file_name": im.get("file_name", ""),
                               "n_gt": e.n_gt, "n_pred": e.n_pred, "tp": e.tp, "fp": e.fp,
                               "fn": e.fn}
        row.update(prf(e.tp, e.fp, e.fn))
        row["f1"] = e.f1()
        if mode != "points":
            row["dsb_score"] = e.dsb()
            row["AJI"] = e.aji()
            row.update({k.upper(): v for k, v in e.pq().items()})
        per_image.append(row)

    if mode == "points":
        summary = summarize_counts(evals)
        # instance scores of the boxes, so that every mode has the same keys
        box = evaluate(gt, res, iou_thresh, score_thresh, max_dets, "boxes", sweep=False,
                       source=source)
        for k in ("dsb_score", "AJI", "PQ", "SQ", "DQ"):
            summary[f"box_{k}"] = box.summary[k]
        summary["dsb_score"] = box.summary["dsb_score"]
        curve_iou = None
    else:
        summary = summarize_instances(evals)
        curve_iou = iou_curve(evals)
        for t, f in zip(curve_iou["iou_thresholds"], curve_iou["f1"]):
            summary[f"f1@{t:.2f}"] = f

    if mode == "points":  # the box evaluation above already ran COCOeval on the boxes
        ap = {k: v for k, v in box.summary.items() if k in ("AP", "AP50", "AP75", "AR")}
        ap.update({f"AP/{c['id']}": c["AP"] for c in box.per_class if c.get("AP") is not None})
        ev = box.cocoeval
    else:
        ap, ev = run_cocoeval(gt, res, "segm" if use_masks else "bbox", max_dets)
    summary.update({k: v for k, v in ap.items() if "/" not in k})
    curve_score = score_curve(evals) if sweep else None
    if curve_score is not None:
        summary["best_score_thresh"] = curve_score["best_score_thresh"]
        summary["best_f1"] = curve_score["best_f1"]

    names = {int(c["id"]): c.get("name", str(c["id"])) for c in gt["categories"]}
    counts: Dict[int, np.ndarray] = defaultdict(lambda: np.zeros(3, np.int64))
    for e in evals:
        for c, v in e.per_class.items():
            counts[c] += v
    per_class = []
    for c in sorted(set(names) | set(counts)):
        tp, n_pred, n_gt = (int(v) for v in counts[c])
        d = {"id": c, "name": names.get(c, f"(unknown {c})"), "n_gt": n_gt, "n_pred": n_pred,
             "tp": tp, "fp": n_pred - tp, "fn": n_gt - tp}
        d.update(prf(tp, n_pred - tp, n_gt - tp))
        d["AP"] = ap.get(f"AP/{c}")
        per_class.append(d)
        if len(names) > 1 and (n_gt or n_pred):
            summary[f"f1/{d['name']}"] = d["f1"]
    for w in warns:
        warnings.warn(w)
    return Evaluation(
        mode=mode, summary=summary, per_class=per_class, per_image=per_image,
        iou_curve=curve_iou, score_curve=curve_score,
        params={"iou_thresh": iou_thresh, "score_thresh": score_thresh, "max_dets": max_dets,
                "mode": mode, "radius_um": radius_um if mode == "points" else None,
                "mpp": mpp, "class_agnostic": class_agnostic, "source": source},
        images=images, image_evals=evals, gt=gt, results=res, cocoeval=ev, warnings=warns)


def evaluate_coco(gt: Dict[str, Any], results: List[Dict[str, Any]],
                  iou_thresh: float = DEFAULTS.IOU_THRESH,
                  score_thresh: float = DEFAULTS.SCORE_THRESH, max_dets: int = DEFAULTS.MAX_DETS, mode: str = "auto",
                  **kwargs: Any) -> Dict[str, float]:
    """Object-level and COCO metrics of a results list against a COCO ground truth.

    Args:
        gt: a loaded COCO dict (``detector.data.coco.load_coco``).
        results: a COCO results list (as ``Instances.to_coco_results`` gives).
        iou_thresh: IoU (strictly above) for the one-to-one matching of precision/recall/F1.
        score_thresh: results below it are dropped before matching (AP uses all of them).
        max_dets: COCOeval maxDets.
        mode: "auto" (masks when both sides have them; points for box-only GT whose images all
            have ``mpp``, as mitosis annotations; else boxes), "masks", "boxes" or "points".
        **kwargs: passed to :func:`evaluate` (``radius_um``, ``mpp``, ``class_agnostic``).

    Returns:
        ``precision``, ``recall``, ``f1``, ``tp``, ``fp``, ``fn``, ``n_gt``, ``n_pred``
        (overall, at ``iou_thresh``; in points mode within the radius), ``dsb_score``, ``AJI``,
        ``PQ``, ``SQ``, ``DQ`` (instance modes), ``AP``, ``AP50``, ``AP75``, ``AR`` (COCOeval,
        segm with masks else bbox), ``f1@0.50`` ... ``f1@0.95``, ``best_score_thresh`` and
        ``best_f1`` (the score threshold maximising F1), ``f1/<class name>`` with several
        classes.

    Raises:
        EvaluationInputError: results that do not fit the GT, with the reason.
    """
    kwargs.setdefault("sweep", True)
    return evaluate(gt, results, iou_thresh, score_thresh, max_dets, mode, **kwargs).summary
