"""Peak memory per tile pixel inside the model: the figures behind
``detector.inference.tiling.MODEL_BYTES_PER_PX`` (the slide run's memory check).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tile_memory.py [--size 1024] [--detections 10]

Each config runs in its own process (peak RSS is per process): a randomly initialised model
on CPU, one warm-up on a 256-px tile, then one ``--size`` tile; the growth of the peak RSS is
divided by the tile's pixels. ``--detections`` caps Mask R-CNN's detections per tile (each
pasted full-tile mask adds about 7 bytes per px).
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import subprocess
import sys

CONFIGS = ("configs/nuclei/mask_rcnn_R_18_FPN_cpu.yaml", "configs/nuclei/mask_rcnn_R_50_FPN.yaml",
           "configs/nuclei/unet_cpu.yaml")


def measure(config: str, size: int, detections: int) -> None:
    import torch

    from detector.config.config import get_cfg
    from detector.modeling.build import build_model

    opts = ["MODEL.DEVICE", "cpu"]
    if "unet" not in config:
        opts += ["MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", str(detections)]
    model = build_model(get_cfg(config, opts), [{"id": 1, "name": "nucleus"}]).eval()
    with torch.inference_mode():
        model([torch.rand(3, 256, 256)])
    gc.collect()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        out = model([torch.rand(3, size, size)])
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024  # KiB on Linux
    print(f"| {os.path.basename(config)} | {size} | {len(out[0].scores)} | "
          f"{grown / 2 ** 20:.0f} | {grown / size ** 2:.0f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--detections", type=int, default=10)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.config:
        measure(a.config, a.size, a.detections)
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print("| config | tile px | detections | peak growth MiB | bytes per px |\n|---|---|---|---|---|")
    for c in CONFIGS:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--config", c, "--size",
                        str(a.size), "--detections", str(a.detections)], cwd=root, check=True,
                       env=dict(os.environ, PYTHONPATH=root))


if __name__ == "__main__":
    main()
