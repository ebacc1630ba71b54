"""``tools/mitosis_stage2.py``: the steps of the two-stage mitosis counter between training runs.

    # hard-negative mining: the detector's detections on tissue without figures (and away from
    # the annotated figures of fully annotated images) become "look-alike" objects
    python tools/mitosis_stage2.py mine --weights out/detector/model_final.pth \\
        --input data/monuseg_unlabelled.json --output data/mined_unlabelled.json
    # thresholds chosen on validation, and one checkpoint holding both stages
    python tools/mitosis_stage2.py bundle --detector out/detector/model_final.pth \\
        --classifier out/classifier/model_final.pth --val-positives data/amibr_mitosis_val.json \\
        --val-negatives data/monuseg_tiles_val.json --output out/mitosis.pth

The bundle is what ``infer_tiles.py --weights`` and ``train_net.py --eval-only MODEL.WEIGHTS``
take. Exit status 0 on success, 2 on bad input (one line naming the file and the fix).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

import torch

from ..engine.checkpoint import load_checkpoint
from ..engine.trainer import resolve_device
from ..engine.two_stage import (best_f1_threshold, choose_fusion, collect_candidates,
                                mine_negatives, operating_point, write_bundle)
from ..errors import DetectorError, report
from ..inference.second_stage import FUSIONS, second_stage_from_checkpoint
from ..modeling.build import load_model

NEGATIVE_CATEGORIES = ("nucleus", "not mitotic figure", "look-alike")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mitosis_stage2.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")
    p.add_argument("--mpp", type=float, default=0.25,
                   help="microns per pixel of images whose COCO entry has none (default 0.25)")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mine", help="write the detector's false positives as look-alikes")
    m.add_argument("--weights", required=True, help="the detector checkpoint")
    m.add_argument("--input", required=True, nargs="+",
                   help="COCO file(s) whose figures are all annotated (or that hold none)")
    m.add_argument("--output", required=True, nargs="+",
                   help="one output COCO file per input")
    m.add_argument("--score-thresh", type=float, default=0.3,
                   help="detections at or above this score are mined (default 0.3)")
    m.add_argument("--category", default="look-alike",
                   help="category of the mined objects (default look-alike: the detector's "
                        "false positives; 'nucleus' with a nucleus model as --weights harvests "
                        "the ordinary nuclei of the figures' own images)")
    m.add_argument("--exclude-um", type=float, default=7.5,
                   help="detections within this distance of an annotated figure are not mined "
                        "(default 7.5 um, the matching radius; widen it for --category nucleus "
                        "so that the far half of an anaphase is not taught as a nucleus)")
    b = sub.add_parser("bundle", help="choose thresholds on validation; write both stages as "
                                      "one checkpoint")
    b.add_argument("--detector", required=True)
    b.add_argument("--classifier", required=True)
    b.add_argument("--val-positives", required=True, nargs="+",
                   help="COCO file(s) of validation images with annotated figures")
    b.add_argument("--val-negatives", required=True, nargs="+",
                   help="COCO file(s) of validation tissue without figures")
    b.add_argument("--max-fp-per-mm2", type=float, default=2.0,
                   help="false positives per mm^2 allowed on the validation negatives "
                        "(default 2.0)")
    b.add_argument("--fusion", choices=("auto",) + FUSIONS, default="auto",
                   help="the candidate's score: p(figure) of the classifier, or the geometric "
                        "mean of p(figure) and the detector's score; auto (default) takes the "
                        "rule of higher validation recall within --max-fp-per-mm2")
    b.add_argument("--output", required=True, help="the bundle checkpoint to write")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s",
                        datefmt="%H:%M:%S")
    try:
        # no gradients for this call only (a caller's own grad mode, e.g. a test's, is kept)
        with torch.no_grad():
            return _run(args)
    except DetectorError as e:  # bad checkpoint, COCO file, image, config or device
        return report(e)


def _run(args: argparse.Namespace) -> int:
    device = str(resolve_device(args.device))
    if args.command == "mine":
        if len(args.input) != len(args.output):
            print("error: mine takes one --output per --input", file=sys.stderr)
            return 2
        detector, _, _, _ = load_model(args.weights, device)
        for inp, out in zip(args.input, args.output):
            stats = mine_negatives(detector, inp, out, args.score_thresh, args.mpp,
                                   NEGATIVE_CATEGORIES, category=args.category,
                                   exclude_um=args.exclude_um)
            print(f"{out}: {stats['look_alikes']} {args.category} objects from {stats['images']} images "
                  f"({stats['per_mm2']:.1f} per mm^2 at score >= {args.score_thresh})")
        return 0
    detector, _, _, _ = load_model(args.detector, device)
    cls_ckpt = load_checkpoint(args.classifier)
    second = second_stage_from_checkpoint(
        {"second_stage": {"model": cls_ckpt["model"], "config": cls_ckpt["config"],
                          "classes": cls_ckpt["classes"], "mpp": cls_ckpt.get("mpp"),
                          "threshold": 0.5, "candidate_threshold": 0.0}}, device)
    pos = [c for f in args.val_positives for c in
           collect_candidates(detector, second, f, args.mpp, NEGATIVE_CATEGORIES)]
    neg = [c for f in args.val_negatives for c in
           collect_candidates(detector, second, f, args.mpp, NEGATIVE_CATEGORIES)]
    fusion, p_op, n_op, tried = choose_fusion(
        pos, neg, args.max_fp_per_mm2, FUSIONS if args.fusion == "auto" else (args.fusion,))
    s1 = best_f1_threshold(pos)
    info = {"stage1_best_f1": s1, "fusion": fusion, "fusions_tried": tried,
            "stage1_best_f1_negatives": operating_point(neg, s1["threshold"], 0.0),
            "validation_positives": list(args.val_positives),
            "validation_negatives": list(args.val_negatives),
            "max_fp_per_mm2": args.max_fp_per_mm2, "positives": p_op, "negatives": n_op,
            "stage1_only": {"positives": operating_point(pos, p_op["t_det"], 0.0),
                            "negatives": operating_point(neg, p_op["t_det"], 0.0)}}
    write_bundle(args.detector, args.classifier, args.output, p_op["t_det"], p_op["t_fig"],
                 info, fusion)
    print(json.dumps({"candidate_threshold": p_op["t_det"], "threshold": p_op["t_fig"],
                      "fusion": fusion, "validation": info}, indent=1))
    print(f"wrote {args.output}", file=sys.stderr)  # stdout stays one JSON document
    return 0


if __name__ == "__main__":
    sys.exit(main())
