"""The mitosis counter's figures on real tissue: before and after the second stage.

    .venv/bin/python benchmarks/bench_mitosis.py --weights output/mitosis/mitosis.pth \\
        --test output/mitosis/data/amibr_mitosis_test.json \\
        --phase-test output/mitosis/data/amibr_phase_test.json \\
        --monuseg ../shared/data/monuseg --out output/mitosis/results

(``docs/results/reproduce_mitosis.sh`` runs it last.) Rows: the detector alone at the threshold
of best F1 on validation (how a one-stage model is used), the detector's candidates (the
bundle's candidate threshold, chosen on validation for recall), and both stages (the bundle's
stage-2 threshold, chosen on validation). Columns:
- AMi-Br test crops (MIDOG 2021 slides never seen in training): recall and precision of the
  figures, a detection within 7.5 um of a figure's centre finding it (MIDOG's rule), with 95%
  bootstrap intervals over crops. Crops are 128 px around a figure: precision here counts only
  the few false positives that fit in a crop.
- The 4 MoNuSeg test tiles (TCGA H&E of other organs and slides, 0.25 mm² in all, no figure
  annotated): detections per mm² and per 10 HPF (0.237 mm² each). Nearly all are false
  positives; a real figure found there is a true positive (look at the overlays).
- Phase: the classifier on patches centred on the AMi-Br test figures: phase accuracy and
  confusion matrix (4 classes: prophase-prometaphase, metaphase, anaphase-telophase, atypical),
  and balanced accuracy of atypical vs normal.
The MoNuSeg tiles are also run through ``tools/infer_tiles.py`` (the slide path, both stages
from one --weights); their summary.json counts and overlays are copied to OUT.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from detector.config.config import cfg_from_string  # noqa: E402
from detector.data.coco import new_coco, save_coco  # noqa: E402
from detector.data.image_io import image_size  # noqa: E402
from detector.data.patches import CocoPatchDataset  # noqa: E402
from detector.engine.checkpoint import load_checkpoint  # noqa: E402
from detector.engine.evaluator import predict_patches  # noqa: E402
from detector.engine.trainer import resolve_device  # noqa: E402
from detector.engine.two_stage import (ImageCandidates, collect_candidates,  # noqa: E402
                                       operating_point)
from detector.evaluation.classification import (classification_metrics,  # noqa: E402
                                                format_confusion)
from detector.inference.counting import DEFAULT_HPF_AREA_MM2  # noqa: E402
from detector.inference.second_stage import second_stage_from_checkpoint  # noqa: E402
from detector.modeling.build import load_model  # noqa: E402

NEG = ("nucleus", "not mitotic figure", "look-alike")


def bootstrap_recall(images: Sequence[ImageCandidates], t_det: float, t_fig: float,
                     n: int = 1000, seed: int = 0) -> List[float]:
    """95% interval of recall and precision, resampling images."""
    per = [operating_point([im], t_det, t_fig) for im in images]
    found = np.array([p["found"] for p in per], float)
    figs = np.array([p["figures"] for p in per], float)
    fps = np.array([p["false_positives"] for p in per], float)
    rng = np.random.default_rng(seed)
    rec, prec = [], []
    for _ in range(n):
        i = rng.integers(0, len(per), len(per))
        rec.append(found[i].sum() / max(figs[i].sum(), 1))
        prec.append(found[i].sum() / max(found[i].sum() + fps[i].sum(), 1))
    return [float(np.percentile(rec, 2.5)), float(np.percentile(rec, 97.5)),
            float(np.percentile(prec, 2.5)), float(np.percentile(prec, 97.5))]


def monuseg_coco(folder: str, mpp: float, path: str) -> List[str]:
    tiles = sorted(glob.glob(os.path.join(folder, "*.tif")))
    coco = new_coco([{"id": 1, "name": "mitotic figure"}], os.path.abspath(folder),
                    "MoNuSeg test tiles (no figure annotated)")
    for i, t in enumerate(tiles, 1):
        h, w = image_size(t)
        coco["images"].append({"id": i, "file_name": os.path.basename(t), "height": h,
                               "width": w, "mpp": mpp})
    save_coco(coco, path)
    return tiles


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="two-stage bundle (mitosis.pth)")
    ap.add_argument("--test", required=True, help="AMi-Br test crops, one class")
    ap.add_argument("--phase-test", required=True, help="the same crops with phase labels")
    ap.add_argument("--monuseg", required=True, help="folder of the 4 MoNuSeg test tiles")
    ap.add_argument("--monuseg-mpp", type=float, default=0.25)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--train-seconds", type=int, nargs=2, default=None,
                    help="training wall time of the detector and the classifier (for the table)")
    args = ap.parse_args()
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    device = str(resolve_device(args.device))
    detector, _, _, _ = load_model(args.weights, device)
    ckpt = load_checkpoint(args.weights)
    second = second_stage_from_checkpoint(ckpt, device)
    if second is None:
        print(f"error: {args.weights} is not a two-stage bundle", file=sys.stderr)
        return 2
    info = ckpt["second_stage"]["info"]
    t_s1 = float(info["stage1_best_f1"]["threshold"])
    t_det, t_fig = second.candidate_threshold, second.threshold
    test = collect_candidates(detector, second, args.test, 0.25, NEG)
    mon_json = os.path.join(args.out, "monuseg_tiles.json")
    tiles = monuseg_coco(args.monuseg, args.monuseg_mpp, mon_json)
    mon = collect_candidates(detector, second, mon_json, args.monuseg_mpp, NEG)

    rows: List[Dict[str, Any]] = []
    for name, td, tf in (("stage 1 alone (threshold of best val F1)", t_s1, 0.0),
                         ("stage 1 candidates (bundle's candidate threshold)", t_det, 0.0),
                         ("stage 1 + stage 2 (bundle)", t_det, t_fig)):
        op_t, op_m = operating_point(test, td, tf), operating_point(mon, td, tf)
        ci = bootstrap_recall(test, td, tf)
        prec = op_t["found"] / max(op_t["found"] + op_t["false_positives"], 1)
        rows.append({"row": name, "t_det": td, "t_fig": tf, "test": op_t, "recall_ci": ci[:2],
                     "precision": prec, "precision_ci": ci[2:], "monuseg": op_m,
                     "monuseg_per_10hpf": op_m["fp_per_mm2"] * 10 * DEFAULT_HPF_AREA_MM2})

    # the slide path on the MoNuSeg tiles: both stages from one --weights
    slide_out = os.path.join(args.out, "monuseg_slides")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "infer_tiles.py"), "--weights",
           args.weights, "--input", *tiles, "--output", slide_out, "--mpp",
           str(args.monuseg_mpp), "--quiet", "--device", device, "--num-workers", "0"]
    subprocess.run(cmd, check=True)
    slides = []
    os.makedirs(os.path.join(args.out, "overlays"), exist_ok=True)
    for t in tiles:
        stem = os.path.splitext(os.path.basename(t))[0]
        with open(os.path.join(slide_out, stem, "summary.json")) as f:
            s = json.load(f)
        slides.append({"tile": stem, "tissue_mm2": s["tissue_area_mm2"],
                       "candidates": s["second_stage"]["candidates"],
                       "figures": s["mitotic_figures"]["total"],
                       "per_mm2": s["mitotic_figures"]["per_mm2"],
                       "by_class": s["mitotic_figures"].get("by_class", {})})
        shutil.copy(os.path.join(slide_out, stem, "overlay.png"),
                    os.path.join(args.out, "overlays", f"{stem}.png"))

    # phases: the classifier on the annotated figures of the test slides
    cls_cfg = cfg_from_string(ckpt["second_stage"]["config"])
    pds = CocoPatchDataset([args.phase_test], cls_cfg, train=False, classes=second.classes)
    probs = predict_patches(second.model, pds, second.device).numpy()
    phase = classification_metrics(pds.labels(), probs, pds.label_names)

    tissue = sum(x["tissue_mm2"] for x in slides)
    figs = sum(x["figures"] for x in slides)
    result = {"weights": os.path.abspath(args.weights), "thresholds": {
        "stage1_best_val_f1": t_s1, "candidate": t_det, "stage2": t_fig},
        "validation": info, "rows": rows, "infer_tiles_monuseg": slides,
        "infer_tiles_monuseg_per_mm2": figs / tissue if tissue else None, "phase": phase,
        "train_seconds": args.train_seconds, "seconds": round(time.time() - t_start, 1)}
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)

    score_name = ("p(figure)" if second.fusion == "classifier"
                  else f"score ({second.fusion} fusion)")
    L = ["| | recall (test crops) | precision (test crops) | MoNuSeg detections | per mm² | "
         "per 10 HPF |", "|---|---|---|---|---|---|"]
    for r in rows:
        t, m = r["test"], r["monuseg"]
        L.append(f"| {r['row']} (det >= {r['t_det']:.2f}"
                 + (f", {score_name} >= {r['t_fig']:.3f}" if r["t_fig"] else "") + ") | "
                 f"{t['recall']:.3f} [{r['recall_ci'][0]:.3f}, {r['recall_ci'][1]:.3f}] "
                 f"({t['found']}/{t['figures']}) | {r['precision']:.3f} "
                 f"[{r['precision_ci'][0]:.3f}, {r['precision_ci'][1]:.3f}] | "
                 f"{m['false_positives']} | {m['fp_per_mm2']:.1f} | {r['monuseg_per_10hpf']:.1f} |")
    L += ["", f"`infer_tiles.py` on the 4 MoNuSeg tiles (both stages, {tissue:.3f} mm² of tissue "
          f"found): {figs} figures, {figs / tissue if tissue else 0:.1f} per mm² "
          f"(per tile: " + ", ".join(f"{x['tile'][:12]} {x['figures']} of {x['candidates']} "
                                      "candidates" for x in slides) + ").", "",
          f"Phase on the AMi-Br test figures ({int((pds.labels() > 0).sum())} patches): "
          f"accuracy {phase.get('figure_class_accuracy', float('nan')):.3f}, balanced accuracy "
          f"{phase.get('figure_class_balanced_accuracy', float('nan')):.3f}; atypical vs normal "
          f"balanced accuracy {phase.get('atypical_balanced_accuracy', float('nan')):.3f}.", "",
          format_confusion(phase)]
    if args.train_seconds:
        L += ["", f"Training: detector {args.train_seconds[0] / 60:.1f} min, classifier "
                  f"{args.train_seconds[1] / 60:.1f} min (0 = reused from an earlier run)."]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    print("\n".join(L))
    r = rows[-1]
    print(f"two-stage: recall {r['test']['recall']:.3f} on the test crops, "
          f"{r['monuseg']['fp_per_mm2']:.1f} detections per mm² on MoNuSeg "
          f"(stage 1 alone: {rows[0]['monuseg']['fp_per_mm2']:.1f}); {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
