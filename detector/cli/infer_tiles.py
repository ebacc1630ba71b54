"""Whole-slide inference: ``detector-infer`` / ``tools/infer_tiles.py``.

    infer_tiles.py --weights model_final.pth --input slides/*.svs --output results/
                   [--tile-size 512 --overlap 96 --batch-size 4 --mpp 0.25 --device cuda
                    --resume --roi 1000,2000,9000,8000 --hpf-area 0.237 --hotspot-area 2
                    --mitotic-classes "mitotic figure" --score-thresh 0.5 --num-workers 2
                    --nuclei-weights nuclei.pth --tta]

The model's config, classes and training mpp come from the checkpoint. One folder per slide
``OUTPUT/<slide stem>/`` with summary.json, detections.geojson (QuPath), detections.json (COCO
results), detections.csv, overlay.png and density.png. A two-stage mitosis bundle
(``tools/mitosis_stage2.py bundle``) runs both stages from the one ``--weights``. Under ``torchrun`` the slides are shared
among the processes (each writes its own slides' folders).
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
from typing import List, Optional, Tuple

from ..checkpoint import load_checkpoint
from ..config.config import cfg_to_yaml
from ..device import resolve_device
from ..errors import DetectorError
from ..inference.journal import weights_identity
from ..inference.runner import InferenceOptions, checkpoint_defaults, run_slides, shard
from ..inference.second_stage import second_stage_from_checkpoint
from ..inference.slide import SLIDE_EXTS
from ..inference.counting import resolve_class_ids
from ..inference.tissue import parse_roi
from ..modeling.build import load_model

log = logging.getLogger("detector.infer")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer_tiles.py",
        description="Detect and count cells on whole slides with a trained checkpoint "
                    "(tiles merged across overlaps, mitotic counts per mm² and per 10 HPF, "
                    "hotspot, QuPath GeoJSON).")
    p.add_argument("--weights", required=True, help="checkpoint written by train_net.py")
    p.add_argument("--input", required=True, nargs="+",
                   help="slides: files, globs ('slides/*.svs'), folders, or .txt lists (one path "
                        "per line, relative to the list)")
    p.add_argument("--output", required=True, help="output folder (one sub-folder per slide)")
    d = InferenceOptions()
    p.add_argument("--tile-size", type=int, default=d.tile_size,
                   help="tile side in px at the model's training mpp (default %(default)s)")
    p.add_argument("--overlap", type=int, default=d.overlap,
                   help="tile overlap in px; at least the largest object (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="tiles per model call (default: 4 on CUDA, 1 on a CPU)")
    p.add_argument("--num-workers", type=int, default=d.num_workers,
                   help="DataLoader workers reading tiles ahead (0: none; default: 2 on CUDA, "
                        "0 on a CPU, where the model's threads use every core)")
    p.add_argument("--streams", type=int, default=d.streams,
                   help="batches predicted at once on a CPU, each in a thread with its share of "
                        "the torch threads (default: 2 with 2 or more threads; 1 on CUDA)")
    p.add_argument("--export-workers", type=int, default=d.export_workers,
                   help="processes writing the detection files of a slide with 4,000 or more "
                        "detections (default: the CPUs, at most 8; 1: this process alone)")
    p.add_argument("--mpp", type=float, default=None,
                   help="slide microns per pixel when the file has none (overrides the file)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda:0'")
    p.add_argument("--resume", action="store_true",
                   help="skip finished slides and, inside an interrupted slide, finished tiles")
    p.add_argument("--roi", default=None,
                   help="region of interest: 'x0,y0,x1,y1' in level-0 px or a GeoJSON file")
    p.add_argument("--hpf-area", type=float, default=d.hpf_area,
                   help="area of one high-power field in mm² (default %(default)s)")
    p.add_argument("--hotspot-shape", choices=("square", "circle"), default=d.hotspot_shape,
                   help="shape of the hotspot window (default %(default)s)")
    p.add_argument("--hotspot-area", type=float, default=None,
                   help="area of the hotspot window in mm² (default: 10 HPF = 10 x --hpf-area; "
                        "2 for the 2 mm² of current guidelines)")
    p.add_argument("--mitotic-classes", default=None,
                   help="classes counted as mitotic figures (names or ids, comma-separated); "
                        "default: classes whose name says mitosis")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="drop detections below this score (default: the threshold a two-stage "
                        "bundle was built with, else the checkpoint's TEST.SCORE_THRESH, the "
                        "threshold it was validated at: 0.5 unless train_net.py --export set it)")
    p.add_argument("--nuclei-weights", default=None,
                   help="a nuclei model run over the same slides and tissue (results in "
                        "<slide>/nuclei/): the mitotic index becomes mitotic figures / nuclei")
    p.add_argument("--nms-thresh", type=float, default=d.nms_thresh,
                   help="box IoU for duplicate removal across tiles (default %(default)s)")
    p.add_argument("--no-tissue-detection", action="store_true",
                   help="analyse every tile, background included")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: the model on flipped and 90-degree rotated views "
                        "of every tile, merged (TEST.AUG.TRANSFORMS of the checkpoint's config: "
                        "8 views by default, 8x the model time); on by default when the "
                        "checkpoint's config has TEST.AUG.ENABLED")
    p.add_argument("--no-tta", action="store_true",
                   help="no test-time augmentation, even when the checkpoint's config has it "
                        "(8x faster, slightly different detections)")
    p.add_argument("--no-amp", action="store_true", help="fp32 everywhere (default: bf16 autocast on CUDA and on CPUs with native bf16)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def expand_inputs(items: List[str]) -> Tuple[List[str], List[str]]:
    """Slide paths from files, globs, folders and .txt lists; and the items that matched
    nothing (reported, not fatal)."""
    out: List[str] = []
    missing: List[str] = []
    for it in items:
        if any(ch in it for ch in "*?["):
            hits = sorted(glob.glob(it, recursive=True))
            if not hits:
                missing.append(it)
            out.extend(h for h in hits if os.path.isfile(h))
        elif os.path.isdir(it):
            hits = sorted(os.path.join(it, f) for f in os.listdir(it)
                          if f.lower().endswith(SLIDE_EXTS))
            if not hits:
                missing.append(it)
            out.extend(hits)
        elif it.lower().endswith(".txt") and os.path.isfile(it):
            base = os.path.dirname(os.path.abspath(it))
            with open(it, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        out.append(line if os.path.isabs(line) else os.path.join(base, line))
        else:
            out.append(it)  # a missing file is reported by the slide run
    seen = set()
    uniq = [p for p in out if not (p in seen or seen.add(p))]
    return uniq, missing


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    slides, missing = expand_inputs(args.input)
    for m in missing:
        log.error("--input %s matched no slide", m)
    if not slides:
        log.error("no slides to analyse")
        return 2
    for name, v in (("--tile-size", args.tile_size), ("--batch-size", args.batch_size),
                    ("--streams", args.streams)):
        if v is not None and v <= 0:
            log.error("%s must be > 0, got %s", name, v)
            return 2
    for name, v in (("--mpp", args.mpp), ("--hpf-area", args.hpf_area),
                    ("--hotspot-area", args.hotspot_area)):
        if v is not None and not v > 0:
            log.error("%s must be > 0, got %s", name, v)
            return 2
    if not 0 <= args.overlap < args.tile_size:
        log.error("--overlap must be >= 0 and < --tile-size (%d), got %d", args.tile_size,
                  args.overlap)
        return 2
    try:
        device = resolve_device(args.device)
    except (RuntimeError, DetectorError) as e:  # torch.device("gpu"), CUDA absent
        log.error("--device %s: %s; use 'auto', 'cpu' or 'cuda:N'", args.device,
                  str(e).splitlines()[0])
        return 2
    try:
        model, _cfg, classes, model_mpp = load_model(args.weights, str(device))
        second = second_stage_from_checkpoint(load_checkpoint(args.weights), str(device))
        nuclei = load_model(args.nuclei_weights, str(device)) if args.nuclei_weights else None
    except (DetectorError, OSError, ValueError, KeyError) as e:
        log.error("%s", e)
        return 2
    ckpt_opts = checkpoint_defaults(_cfg)
    if args.score_thresh is None:
        args.score_thresh = second.threshold if second is not None else ckpt_opts["score_thresh"]
    if args.tta and args.no_tta:
        log.error("--tta and --no-tta: choose one")
        return 2
    tta = 0 if args.no_tta else int(_cfg.TEST.AUG.TRANSFORMS) if args.tta else ckpt_opts["tta"]
    if second is not None:
        log.info("two-stage bundle: candidates at detector score >= %.2f re-scored by the patch "
                 "classifier (classes %s), kept at >= %.3f", second.candidate_threshold,
                 ", ".join(c["name"] for c in second.classes), args.score_thresh)
    opts = InferenceOptions(
        tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size,
        num_workers=args.num_workers, streams=args.streams, mpp=args.mpp, roi=args.roi,
        hpf_area=args.hpf_area,
        hotspot_shape=args.hotspot_shape, hotspot_area=args.hotspot_area,
        mitotic_classes=args.mitotic_classes, score_thresh=args.score_thresh,
        nms_thresh=args.nms_thresh, tissue_detection=not args.no_tissue_detection,
        amp=not args.no_amp, resume=args.resume, progress=not args.quiet,
        tta=tta, export_workers=args.export_workers)
    # fail early on flags that would fail every slide
    try:
        resolve_class_ids(opts.mitotic_classes, classes)
        if opts.roi:
            parse_roi(opts.roi)
    except ValueError as e:
        log.error("%s", e)
        return 2
    mine = shard(slides)
    log.info("%d slide(s) for this process (of %d), model %s at %s um/px, classes %s, on %s",
             len(mine), len(slides), os.path.basename(args.weights), model_mpp,
             ", ".join(c["name"] for c in classes), device)
    weights_id = weights_identity(model, classes, model_mpp, cfg_to_yaml(_cfg))
    if second is not None:  # a bundle: both stages and their thresholds decide the counts
        weights_id = weights_identity(second.model, second.classes, second.mpp,
                                      f"{weights_id} {second.candidate_threshold} "
                                      f"{second.threshold}")
    res = run_slides(model, classes, model_mpp, mine, args.output, opts,
                     os.path.abspath(args.weights), second_stage=second,
                     nuclei=(nuclei[0], nuclei[2], nuclei[3]) if nuclei else None,
                     weights_id=weights_id)
    print(f"slides: {len(res['done'])} analysed, {len(res['skipped'])} already finished, "
          f"{len(res['failed'])} failed; results in {args.output}")
    for path, msg in res["failed"].items():
        print(f"  FAILED {path}: {msg}")
    return 1 if res["failed"] or missing else 0


if __name__ == "__main__":
    sys.exit(main())
