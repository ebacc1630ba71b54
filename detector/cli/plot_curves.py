"""``tools/plot_curves.py``: training curves of one or several runs (TensorBoard scalars) as a PNG."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from detector.errors import DetectorError
from detector.engine.curves import plot_training_curves


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description="Export the TensorBoard scalars of training runs (loss, lr, validation F1 "
        "and AP) as one PNG.",
        epilog="example: python tools/plot_curves.py --run 'Mask R-CNN=out/maskrcnn' "
        "--run 'U-Net=out/unet' --out docs/results/curves.png")
    p.add_argument("--run", action="append", required=True, metavar="[NAME=]DIR",
                   help="a training OUTPUT_DIR (repeat for several runs)")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.run:
        name, _, folder = spec.rpartition("=")
        folder = folder or spec
        if not os.path.isdir(folder):
            print(f"error: {folder}: no such run folder (give a training OUTPUT_DIR)", file=sys.stderr)
            return 2
        runs[name or os.path.basename(os.path.normpath(folder))] = folder
    try:
        drawn = plot_training_curves(runs, args.out)
    except (DetectorError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({', '.join(drawn)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
