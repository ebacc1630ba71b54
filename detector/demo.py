"""``make demo`` (interim): convert a data set to COCO and print its statistics.

Converts ``../shared/data/monuseg`` (relative to the repository root) to
``output/demo/monuseg.json``; when that folder is absent, generates a tiny instance-label data
set (synthetic discs) in a temporary folder and converts that, copying the images next to the
JSON (``output/demo/synthetic_images/``) so the result stays usable. It will be replaced by the
end-to-end demo.
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import List, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_synthetic_labels(folder: str, n_images: int = 4, size: int = 128,
                          seed: int = 0) -> str:
    """Write ``images/`` (gray-ish RGB PNG) and ``labels/`` (16-bit instance PNGs of random
    discs, the last image empty as a negative) under ``folder``; returns ``folder``."""
    import cv2
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labels"), exist_ok=True)
    for i in range(n_images):
        image = np.full((size, size, 3), 230, np.uint8)
        label = np.zeros((size, size), np.uint16)
        n = 0 if i == n_images - 1 else int(rng.integers(3, 9))
        for k in range(1, n + 1):
            c = rng.integers(10, size - 10, 2)
            rr, cc = disk((int(c[0]), int(c[1])), int(rng.integers(4, 9)), shape=label.shape)
            label[rr, cc] = k
            image[rr, cc] = (90, 60, 150)
        cv2.imwrite(os.path.join(folder, "images", f"tile{i}.png"), image[:, :, ::-1])
        cv2.imwrite(os.path.join(folder, "labels", f"tile{i}.png"), label)
    return folder


def main(argv: Optional[Sequence[str]] = None) -> int:
    from detector.cli.convert_to_coco import main as convert_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv:  # explicit converter arguments: behave like tools/convert_to_coco.py
        return convert_main(argv)
    monuseg = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "monuseg"))
    out = os.path.join(ROOT, "output", "demo")
    if os.path.isdir(monuseg):
        print(f"demo: converting MoNuSeg from {monuseg}")
        args: List[str] = ["--format", "xml", "--input", monuseg,
                           "--output", os.path.join(out, "monuseg.json")]
        return convert_main(args)
    with tempfile.TemporaryDirectory(prefix="detector-demo-") as tmp:
        print(f"demo: {monuseg} is absent; converting a synthetic label data set in {tmp}")
        make_synthetic_labels(tmp)
        return convert_main(["--format", "labels", "--input", tmp,
                             "--output", os.path.join(out, "synthetic.json"), "--mpp", "0.5",
                             "--copy-images"])


if __name__ == "__main__":
    sys.exit(main())
