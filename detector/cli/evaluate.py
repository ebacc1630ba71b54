"""``tools/evaluate.py``: object-level metrics of predictions against a COCO ground truth, and the
side-by-side comparison report of several models.

Examples::

    python tools/evaluate.py --gt output/data/dsb_test.json --pred maskrcnn.json --out eval/
    python tools/evaluate.py --gt output/data/dsb_test.json --pred maskrcnn.json unet.json \\
        --names "Mask R-CNN" "U-Net" --out report/
    # mitosis: points within 7.5 um; the score threshold maximising F1 on validation is applied
    # unchanged to test
    python tools/evaluate.py --gt amibr_test.json --pred test_dets.json \\
        --val-gt amibr_val.json --val-pred val_dets.json --out mitosis_report/

PRED is a COCO results list (``Instances.to_coco_results``), the ``detections.json`` of
``infer_tiles.py`` (a string image_id is matched to the GT image's file name, stem or slide;
results without image_id go to the GT's only image), or a COCO instance file.

When the GT images carry ``modality`` (``convert_to_coco.py --experiments`` / ``--modality``),
F1@0.5, DSB score, AJI and PQ are also reported per modality with bootstrap CIs
(``--group-by`` another image field, e.g. ``group``: per experiment).

Writes into ``--out``: ``metrics.json``, ``per_image.csv``, ``report.md``, ``report.html`` and
the pictures (curves, overlays of TP/FP/FN on the worst and best images). Without ``--out``
only the table is printed.

Exit status: 0 on success, 2 on bad input (one line naming the file and the fix).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence

from ..errors import DetectorError, report
from ..evaluation.evaluator import DEFAULTS, Evaluation, evaluate
from ..evaluation.inputs import (MODES, EvaluationInputError, choose_mode, load_gt,
                                 load_predictions)
from ..evaluation.points import MIDOG_RADIUS_UM
from ..evaluation.report import (PER_CLASS_HEADER, bootstrap_ci, comparison_table, group_table,
                                 metrics_by, model_record, per_class_rows, text_table,
                                 write_metrics_json, write_per_image_csv, write_report)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Object-level precision/recall/F1 (one-to-one matching), DSB2018 score, "
                    "COCO AP, AJI, PQ, and mitosis point F1; comparison report of models.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gt", required=True, metavar="GT.json", help="ground-truth COCO file")
    p.add_argument("--pred", required=True, nargs="+", metavar="PRED.json",
                   help="predictions: COCO results list(s) or infer_tiles detections.json; "
                        "several files are compared side by side")
    p.add_argument("--names", nargs="+", metavar="NAME",
                   help="model names for --pred (default: the file names)")
    p.add_argument("--out", metavar="DIR",
                   help="write metrics.json, per_image.csv and the report here")
    p.add_argument("--mode", default="auto", choices=MODES,
                   help="auto: masks when both sides have them; points when the GT has no "
                        "segmentation and every image has mpp (or --mpp); else boxes")
    p.add_argument("--iou-thresh", type=float, default=DEFAULTS.IOU_THRESH,
                   help="IoU above which a match is a true positive (default: TEST.IOU_THRESH, "
                        f"{DEFAULTS.IOU_THRESH})")
    p.add_argument("--score-thresh", type=float, default=DEFAULTS.SCORE_THRESH,
                   help="predictions below this score are dropped before matching (AP uses all)")
    p.add_argument("--max-dets", type=int, default=DEFAULTS.MAX_DETS,
                   help="COCOeval maxDets per image (dense nuclei need more than COCO's 100)")
    p.add_argument("--radius-um", type=float, default=MIDOG_RADIUS_UM,
                   help="points mode: matching radius in micrometres (MIDOG: 7.5)")
    p.add_argument("--mpp", type=float,
                   help="microns per pixel for points mode (default: each GT image's mpp)")
    p.add_argument("--class-agnostic", action="store_true",
                   help="ignore category ids (every object one class)")
    p.add_argument("--val-gt", metavar="VAL_GT.json",
                   help="validation ground truth: choose the score threshold maximising F1 there")
    p.add_argument("--val-pred", nargs="+", metavar="VAL_PRED.json",
                   help="validation predictions, one per --pred (same order)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples of the images for 95%% CIs (0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--group-by", default="modality", metavar="FIELD",
                   help="also report F1, DSB score, AJI and PQ (with bootstrap CIs) per value of "
                        "this field of the GT images: 'modality' (default; written by "
                        "convert_to_coco.py --experiments/--modality), 'group' (the "
                        "experiment), 'slide'...; skipped when no image has it; '' = off")
    p.add_argument("--examples", type=int, default=2, metavar="K",
                   help="overlays of the K worst and K best images per model")
    p.add_argument("--no-report", action="store_true",
                   help="with --out: only metrics.json and per_image.csv")
    return p


def default_names(paths: Sequence[str]) -> List[str]:
    names = []
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        if stem in ("detections", "results", "predictions"):  # infer_tiles/<slide>/detections
            stem = os.path.basename(os.path.dirname(os.path.abspath(p))) or stem
        names.append(stem)
    seen: Dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n} ({seen[n]})")
    return out


def _print_warnings(caught: list) -> None:
    """Our own messages (UserWarning), not libraries' deprecation notices."""
    for w in caught:
        if w.category is UserWarning:
            print(f"warning: {w.message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    preds = list(args.pred)
    names = list(args.names) if args.names else default_names(preds)
    if len(names) != len(preds):
        raise EvaluationInputError(f"--names gives {len(names)} names for {len(preds)} "
                                   "--pred files; give one name per file")
    if (args.val_gt is None) != (args.val_pred is None):
        raise EvaluationInputError("--val-gt and --val-pred go together")
    if args.val_pred is not None and len(args.val_pred) != len(preds):
        raise EvaluationInputError(f"--val-pred gives {len(args.val_pred)} files for "
                                   f"{len(preds)} --pred files; give one per model")
    if not 0 <= args.score_thresh <= 1:
        raise EvaluationInputError(f"--score-thresh must be in [0, 1], got {args.score_thresh}")
    gt = load_gt(args.gt)
    common = dict(iou_thresh=args.iou_thresh, max_dets=args.max_dets, mode=args.mode,
                  radius_um=args.radius_um, mpp=args.mpp, class_agnostic=args.class_agnostic)

    tuning: List[Optional[Dict[str, Any]]] = [None] * len(preds)
    if args.val_gt:
        val_gt = load_gt(args.val_gt)
        for k, vp in enumerate(args.val_pred):
            vev = evaluate(val_gt, load_predictions(vp), score_thresh=args.score_thresh,
                           source=vp, **common)
            c = vev.score_curve
            tuning[k] = {"score_thresh": c["best_score_thresh"], "val_f1": c["best_f1"],
                         "val_gt": os.path.abspath(args.val_gt), "val_pred": os.path.abspath(vp)}

    loaded = [load_predictions(path) for path in preds]
    if args.mode == "auto" and len(preds) > 1:
        modes = {choose_mode(gt, r, "auto", args.mpp, p) for r, p in zip(loaded, preds) if r}
        if len(modes) > 1:
            raise EvaluationInputError(
                f"the prediction files would be evaluated in different modes ({sorted(modes)}): "
                "some have masks and some not; pass --mode boxes to compare them on boxes")
    evs: List[Evaluation] = []
    for k, (path, results) in enumerate(zip(preds, loaded)):
        st = tuning[k]["score_thresh"] if tuning[k] else args.score_thresh
        if not results:
            print(f"warning: {path}: no predictions; every ground-truth object is a false "
                  "negative (recall 0)", file=sys.stderr)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ev = evaluate(gt, results, score_thresh=st, source=path, progress=True, **common)
        _print_warnings(caught)
        evs.append(ev)
    if len({ev.mode for ev in evs}) > 1:  # e.g. an empty file among mask results
        common["mode"] = "boxes"
        evs = [evaluate(gt, r, score_thresh=ev.params["score_thresh"], source=p, **common)
               for r, p, ev in zip(loaded, preds, evs)]

    cis = [bootstrap_ci(ev, args.bootstrap, args.seed) for ev in evs]
    header, rows = comparison_table(names, evs, cis if args.bootstrap > 0 else None)
    print(f"{args.gt}: {len(gt['images'])} images, {len(gt['annotations'])} objects; mode "
          f"{evs[0].mode}" + (f", 95% bootstrap CI over images ({args.bootstrap} resamples)"
                              if args.bootstrap > 0 else ""))
    print(text_table(header, rows))
    by_group = [metrics_by(ev, args.group_by, args.bootstrap, args.seed) for ev in evs] \
        if args.group_by else []
    if any(by_group):
        print()
        print(f"per {args.group_by}" + (" (95% bootstrap CI over the group's images)"
                                         if args.bootstrap > 0 else "") + ":")
        print(text_table(*group_table(names, by_group, args.group_by, evs[0].mode)))
    if len(evs[0].per_class) > 1:
        print()
        print(text_table(PER_CLASS_HEADER, per_class_rows(names, evs)))
    for name, t in zip(names, tuning):
        if t:
            print(f"{name}: score threshold {t['score_thresh']:.2f} chosen on validation "
                  f"(F1 {t['val_f1']:.3f})")

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        records = [model_record(n, p, ev, ci, {"threshold_tuning": t} if t else None)
                   for n, p, ev, ci, t in zip(names, preds, evs, cis, tuning)]
        for rec, by in zip(records, by_group):
            if by:
                rec[f"by_{args.group_by}"] = by
        write_metrics_json(os.path.join(args.out, "metrics.json"), args.gt, records)
        write_per_image_csv(os.path.join(args.out, "per_image.csv"), names, evs)
        if not args.no_report:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                write_report(args.out, args.gt, names, evs, cis, args.examples, tuning,
                             by_group, args.group_by)
            _print_warnings(caught)
        print(f"wrote {os.path.join(args.out, 'metrics.json')}, per_image.csv"
              + ("" if args.no_report else ", report.md, report.html"))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DetectorError as e:  # EvaluationInputError, CocoFormatError, ...
        return report(e)
    except OSError as e:  # unwritable --out, disk full
        print(f"error: {getattr(e, 'filename', '') or ''}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
