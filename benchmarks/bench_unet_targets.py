"""Time of the U-Net's on-the-fly targets (3-class map + the paper's weight map) on real
MoNuSeg tiles (1000 x 1000 px, ~250-575 nuclei), against the naive weight map (one full-image
distance transform per nucleus) measured in the same run.

    .venv/bin/python benchmarks/bench_unet_targets.py [--tiles 1] [--repeat 3]

Prints one row per tile: nuclei, time of each step (median of ``--repeat``; the naive
baseline runs once), the speed-up and the largest difference between the two weight maps.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from typing import Callable, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from detector.data.unet_targets import (  # noqa: E402
    labels_from_masks,
    three_class_map,
    weight_map,
    weight_map_naive,
)

DATA = os.environ.get("DETECTOR_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))


def monuseg_masks(xml_path: str, height: int, width: int) -> np.ndarray:
    """``(N, H, W)`` uint8 masks of the ImageScope XML polygons (degenerate ones skipped)."""
    from defusedxml import ElementTree
    from skimage.draw import polygon

    masks: List[np.ndarray] = []
    for region in ElementTree.parse(xml_path).getroot().iter("Region"):
        pts = np.array([[float(v.get("X")), float(v.get("Y"))] for v in region.iter("Vertex")])
        if len(np.unique(pts, axis=0)) < 3:
            continue
        rr, cc = polygon(pts[:, 1], pts[:, 0], shape=(height, width))
        if rr.size == 0:
            continue
        m = np.zeros((height, width), np.uint8)
        m[rr, cc] = 1
        masks.append(m)
    return np.stack(masks)


def boxes_of(masks: np.ndarray) -> np.ndarray:
    """``(N, 4)`` XYXY px boxes (pixel edges) of ``(N, H, W)`` masks, as the dataset gives."""
    out = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        out[i] = [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]
    return out


def timed(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=2,
                    help="how many MoNuSeg tiles (max 4; the naive baseline takes ~20 s each)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per step (median)")
    ap.add_argument("--width", type=float, default=2, help="boundary width (px)")
    ap.add_argument("--w0", type=float, default=10.0)
    ap.add_argument("--sigma", type=float, default=5.0)
    args = ap.parse_args(argv)
    xmls = sorted(glob.glob(os.path.join(DATA, "monuseg", "*.xml")))[: args.tiles]
    if not xmls:
        print(f"MoNuSeg not found under {DATA}/monuseg (see ../shared/data/README.md)")
        return 1
    header = (f"{'tile':<26} {'nuclei':>6} {'labels':>8} {'3-class':>8} {'weights':>8} "
              f"{'total':>8} {'naive wts':>10} {'speed-up':>9} {'max |diff|':>10}")
    print("U-Net targets on real MoNuSeg tiles, 1000x1000 px; times in s (median of "
          f"{args.repeat}); width {args.width} px, w0 {args.w0}, sigma {args.sigma} px")
    print(header)
    print("-" * len(header))
    for xml in xmls:
        masks = monuseg_masks(xml, 1000, 1000)
        boxes = boxes_of(masks)
        t_lab = timed(lambda: labels_from_masks(masks, boxes), args.repeat)  # noqa: F821 (del below)
        labels = labels_from_masks(masks, boxes)
        del masks
        t_cls = timed(lambda: three_class_map(labels, args.width), args.repeat)
        classes = three_class_map(labels, args.width)
        t_w = timed(lambda: weight_map(labels, classes, args.w0, args.sigma), args.repeat)
        t = time.perf_counter()
        naive = weight_map_naive(labels, classes, args.w0, args.sigma)
        t_naive = time.perf_counter() - t
        diff = np.abs(weight_map(labels, classes, args.w0, args.sigma) - naive).max()
        total = t_lab + t_cls + t_w
        name = os.path.basename(xml)[:23]
        print(f"{name:<26} {int(labels.max()):>6} {t_lab:>8.3f} {t_cls:>8.3f} {t_w:>8.3f} "
              f"{total:>8.3f} {t_naive:>10.2f} {t_naive / t_w:>8.0f}x {diff:>10.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
