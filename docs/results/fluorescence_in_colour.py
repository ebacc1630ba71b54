"""Fluorescence shown in colour (DAPI as blue, as slide scanners write it) with and without
``INPUT.GREY_FLUORESCENCE``, on annotated images and on a real fluorescence slide.

DSB2018's 541 fluorescence images are all grey, so a nuclei model trained on them has never seen
a stain in one colour channel. This script measures what that costs and what the modality
normalisation gives back, with a trained nuclei checkpoint (``reproduce_nuclei.sh OUT`` leaves
``OUT/maskrcnn.pth``):

1. the validation fluorescence images of the experiment-wise split (``OUT/data/val.json``),
   as they are (grey) and with their grey put in the blue channel alone (what a DAPI image
   looks like), predicted by the checkpoint as it was trained and with
   ``INPUT.GREY_FLUORESCENCE`` on (``load(..., overrides=)``); evaluated by ``evaluate.py``
   (F1@0.5, DSB score, AJI, PQ) at the checkpoint's own score threshold;
2. ``../shared/data/slides/test3-DAPI-2-387.ndpi`` (a Hamamatsu DAPI slide, no annotation) run
   through ``infer_tiles`` both ways: detections, the size found by the first pass, and the
   detections whose mask lies for more than half inside another's (a nucleus found twice,
   whole and in part): on DSB2018 test images the checkpoint gives 3.9 % of such pairs.

    python docs/results/fluorescence_in_colour.py --weights output/nuclei14/maskrcnn.pth \\
        --data output/nuclei14/data --out output/fluorescence_colour

Everything lands in ``--out``; ``results.md`` holds the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
KEY = "INPUT.GREY_FLUORESCENCE"
SLIDE = os.path.join(ROOT, "..", "shared", "data", "slides", "test3-DAPI-2-387.ndpi")


def blue_copies(val_json: str, out: str) -> tuple:
    """COCO files of the fluorescence images of ``val_json``: as they are, and as blue-only
    PNGs written under ``out/blue/``."""
    import cv2

    from detector.data.image_io import read_image

    d = json.load(open(val_json))
    root = d["info"]["image_root"]
    images = [im for im in d["images"] if im.get("modality") == "fluorescence"]
    ids = {im["id"] for im in images}
    anns = [a for a in d["annotations"] if a["image_id"] in ids]
    grey = dict(d, images=images, annotations=anns)
    blue_root = os.path.join(out, "blue")
    for im in images:
        rgb = read_image(os.path.join(root, im["file_name"]))[..., :3]
        if not (rgb == rgb[..., :1]).all():
            raise SystemExit(f"{im['file_name']}: not grey; this measurement needs grey images")
        b = np.zeros_like(rgb)
        b[..., 2] = rgb[..., 0]
        path = os.path.join(blue_root, im["file_name"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cv2.imwrite(path, cv2.cvtColor(b, cv2.COLOR_RGB2BGR))
    blue = dict(grey, info=dict(grey["info"], image_root=os.path.abspath(blue_root)))
    paths = os.path.join(out, "val_fluo_grey.json"), os.path.join(out, "val_fluo_blue.json")
    for p, c in zip(paths, (grey, blue)):
        with open(p, "w") as f:
            json.dump(c, f)
    return paths, len(images), len(anns)


def predict(det, coco_path: str, dst: str) -> None:
    from detector.data.image_io import read_image

    d = json.load(open(coco_path))
    root = d["info"]["image_root"]
    res = []
    for im in d["images"]:
        inst = det.predict(read_image(os.path.join(root, im["file_name"]))[..., :3], amp=False)
        res += inst.to_coco_results(im["id"])
    with open(dst, "w") as f:
        json.dump(res, f)


def nested_pairs(detections_json: str) -> int:
    """Pairs of detections whose intersection is more than half of the smaller mask."""
    import pycocotools.mask as mu

    d = json.load(open(detections_json))
    rles = [r["segmentation"] for r in d]
    if len(rles) < 2:
        return 0
    b = np.array([r["bbox"] for r in d], np.float64)
    x1, y1 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    n = 0
    areas = np.array([mu.area(r) for r in rles], np.float64)
    for i in range(len(rles)):  # only boxes that overlap can share pixels
        j = np.flatnonzero((b[i + 1:, 0] < x1[i]) & (x1[i + 1:] > b[i, 0])
                           & (b[i + 1:, 1] < y1[i]) & (y1[i + 1:] > b[i, 1])) + i + 1
        if len(j) == 0:
            continue
        iou = mu.iou([rles[i]], [rles[k] for k in j], [0] * len(j))[0]
        inter = iou * (areas[i] + areas[j]) / (1 + iou)
        n += int((inter > 0.5 * np.minimum(areas[i], areas[j])).sum())
    return n


def side_by_side(slide: str, geojsons: list, dst: str, x0: int = 600, y0: int = 1000,
                 size: int = 700) -> None:
    """One field of ``slide`` (level 0, brightened 2.5x) with the outlines of each GeoJSON,
    side by side."""
    import cv2
    import openslide

    s = openslide.OpenSlide(slide)
    base = np.asarray(s.read_region((x0, y0), 0, (size, size)).convert("RGB")).astype(np.float32)
    base = np.clip(base * 2.5, 0, 255).astype(np.uint8)
    panels = []
    for path in geojsons:
        img = base.copy()
        for f in json.load(open(path))["features"]:
            g = f["geometry"]
            for poly in (g["coordinates"] if g["type"] == "MultiPolygon" else [g["coordinates"]]):
                ring = np.round(np.asarray(poly[0], np.float64) - [x0, y0]).astype(np.int32)
                cv2.polylines(img, [ring.reshape(-1, 1, 2)], True, (255, 255, 0), 1)
        panels.append(img)
    gap = np.full((size, 8, 3), 255, np.uint8)
    cv2.imwrite(dst, cv2.cvtColor(np.hstack([panels[0], gap, panels[1]]), cv2.COLOR_RGB2BGR))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="a nuclei checkpoint (OUT/maskrcnn.pth)")
    p.add_argument("--data", required=True, help="reproduce_nuclei.sh's OUT/data (val.json)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from detector.api import load
    from detector.engine.checkpoint import export_checkpoint

    t0 = time.time()
    (grey_json, blue_json), n_img, n_obj = blue_copies(os.path.join(args.data, "val.json"), args.out)
    on_ckpt = os.path.join(args.out, "weights_grey_fluorescence.pth")
    export_checkpoint(args.weights, on_ckpt, {KEY: True})
    weights = {"as trained": args.weights, f"{KEY} on": on_ckpt}
    preds, thresh = [], {}
    for label, w in weights.items():
        det = load(w, device="cpu")
        thresh[label] = float(det.cfg.TEST.SCORE_THRESH)  # chosen on validation
        for kind, coco in (("grey", grey_json), ("blue", blue_json)):
            dst = os.path.join(args.out, f"pred_{kind}_{'on' if 'on' in label else 'off'}.json")
            if not os.path.isfile(dst):  # kept from an earlier run
                predict(det, coco, dst)
            preds.append((kind, label, dst))
    lines = ["# Fluorescence shown in colour", "",
             f"Checkpoint `{args.weights}`; {n_img} validation fluorescence images "
             f"({n_obj} nuclei) of `{args.data}/val.json`; score threshold: the checkpoint's "
             "own (TEST.SCORE_THRESH, chosen on validation).", "",
             "| images | model | F1@0.5 | DSB score | AJI | PQ | detections |", "|---|---|---|---|---|---|---|"]
    for kind, label, dst in preds:
        gt = grey_json if kind == "grey" else blue_json
        ev = os.path.join(args.out, "eval_" + os.path.basename(dst)[5:-5])
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--gt", gt,
                        "--pred", dst, "--out", ev, "--no-report",
                        "--score-thresh", str(thresh[label])],
                       check=True, capture_output=True)
        s = json.load(open(os.path.join(ev, "metrics.json")))["models"][0]["summary"]
        lines.append(f"| {kind} | {label} | {s['f1']:.3f} | {s['dsb_score']:.3f} | "
                     f"{s['AJI']:.3f} | {s['PQ']:.3f} | {int(s['tp'] + s['fp'])} |")
    lines += ["", f"Slide `{os.path.basename(SLIDE)}` (DAPI, no annotation), `infer_tiles.py` "
              "defaults:", "",
              "| model | detections | median nucleus found (px) | nested pairs (> half of the "
              "smaller mask shared) |", "|---|---|---|---|"]
    if os.path.isfile(SLIDE):
        for label, w in weights.items():
            o = os.path.join(args.out, "slide_" + ("on" if "on" in label else "off"))
            subprocess.run([sys.executable, os.path.join(ROOT, "tools", "infer_tiles.py"),
                            "--weights", w, "--input", SLIDE, "--output", o, "--quiet",
                            "--resume"],
                           check=True, capture_output=True)
            folder = os.path.join(o, os.path.splitext(os.path.basename(SLIDE))[0])
            summ = json.load(open(os.path.join(folder, "summary.json")))
            lines.append(f"| {label} | {summ['total_detections']} | "
                         f"{summ['size_normalisation']['nucleus_diameter_px']:.1f} | "
                         f"{nested_pairs(os.path.join(folder, 'detections.json'))} |")
        side_by_side(SLIDE, [os.path.join(args.out, "slide_" + k, "test3-DAPI-2-387",
                                          "detections.geojson") for k in ("off", "on")],
                     os.path.join(args.out, "slide_crop.png"))
        lines += ["", "`slide_crop.png`: a 700 x 700 px field of the slide (level 0, brightened), "
                  "the model as trained (left) and with the key (right)."]
    else:
        lines.append(f"| (slide not found: {SLIDE}) | | | |")
    lines += ["", f"{time.time() - t0:.0f} s on {os.cpu_count()} CPUs."]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
