"""Pseudo-instances for the 17 semantic-only MoNuSeg training tiles (issue 12, item 4: "may
serve as extra supervision if that helps").

    python docs/results/monuseg_pseudo_instances.py ../shared/data/monuseg_train/unlabelled OUT_DIR

Each ``<tile>_nuclei.png`` holds one binary nucleus/background mask (touching nuclei merged).
It is split into instances by the classical baseline's distance-transform watershed
(:func:`detector.modeling.classical.split_foreground`, with ``configs/nuclei/classical_he.yaml``'s
peak footprint and minimum size for 40x H&E), and written as ``OUT_DIR/labels/<tile>.tif``
beside a link to the image in ``OUT_DIR/images/``: the layout of ``convert_to_coco.py --format
labels``. The instances are a guess where nuclei touch; the masks' union is the annotators'.
"""
from __future__ import annotations

import os
import sys

import cv2
import numpy as np
import tifffile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from detector.config.config import get_cfg  # noqa: E402
from detector.modeling.classical import split_foreground  # noqa: E402


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = sys.argv[1:]
    he = get_cfg(os.path.join(ROOT, "configs/nuclei/classical_he.yaml"), []).MODEL.CLASSICAL
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "labels"), exist_ok=True)
    masks = sorted(f for f in os.listdir(src) if f.endswith("_nuclei.png"))
    if not masks:
        sys.exit(f"{src}: no <tile>_nuclei.png masks (see ../shared/data/README.md)")
    total = 0
    for name in masks:
        stem = name[: -len("_nuclei.png")]
        image = os.path.join(src, stem + ".png")
        fg = cv2.imread(os.path.join(src, name), cv2.IMREAD_GRAYSCALE)
        if fg is None or not os.path.exists(image):
            sys.exit(f"{os.path.join(src, name)}: unreadable, or {image} missing")
        labels = split_foreground(fg > 0, int(he.PEAK_FOOTPRINT), int(he.MIN_SIZE))
        tifffile.imwrite(os.path.join(out, "labels", stem + ".tif"), labels.astype(np.uint16))
        link = os.path.join(out, "images", stem + ".png")
        if not os.path.exists(link):
            os.symlink(os.path.abspath(image), link)
        total += int(labels.max())
        print(f"{stem}: {int(labels.max())} instances", flush=True)
    print(f"wrote {len(masks)} label images, {total} instances, to {out}")


if __name__ == "__main__":
    main()
