"""Where the time of a training step and of a slide batch goes on a GPU (torch.profiler).

    python benchmarks/gpu_profile.py --coco SYNTHETIC.json --weights model_final.pth
    GPU_CHECK_OUT=/tmp/gc bash benchmarks/gpu_check.sh && \
        python benchmarks/gpu_profile.py --coco /tmp/gc/synthetic.json \
            --weights /tmp/gc/train/model_final.pth           # after the GPU check, its files

``gpu_check.sh`` says how fast; this says why. Three parts, each a few seconds of device time:

1. **Training step** of ``--config`` (the R50 Mask R-CNN, bf16, ``--batch`` images), built by
   the project's ``Trainer`` on ``--coco``: wall time per step (synchronised) after a warm-up,
   then a few steps under ``torch.profiler``: the device's busy time per step (the kernels'
   own time), so busy / wall says whether the GPU or the host sets the pace, and the operators
   by own device time and by own host time. Then the same steps with
   ``torch.backends.cudnn.benchmark`` on, timed only.
2. **Slide batch**: ``predict_batch`` (what ``infer_tiles.py`` calls) on ``--tiles`` tiles of
   512 px of synthetic H&E, per batch: the model's forward alone, the whole call, and the
   profiler's busy / wall; then with channels-last weights and inputs, timed only.
3. **DataLoader end**: how long the loop over a 4-worker DataLoader takes to end after its last
   batch (worker shutdown), with and without ``pin_memory``.

On a CPU (``--device cpu``) it runs at small sizes as a dry run; its figures say nothing about
a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def log(msg: str) -> None:
    print(f"[gpu_profile {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], n: int, dev: torch.device) -> List[float]:
    """Wall seconds of ``n`` calls of ``fn``, each synchronised with the device."""
    out = []
    for _ in range(n):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t)
    return out


def profiled(fn: Callable[[], Any], n: int, dev: torch.device, title: str, rows: int) -> None:
    """``n`` calls of ``fn`` under torch.profiler: wall and device-busy ms per call, and the
    operators by own device time and by own host time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync(dev)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync(dev)
        wall = (time.perf_counter() - t) / n
    ka = prof.key_averages()

    def own_device_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)))

    # the kernels' own time (an operator's own device time is that of its kernels, which are
    # rows of their own: summing every row counts the device time twice)
    on_device = [e for e in ka if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
                 and not getattr(e, "is_user_annotation", False)]
    busy = sum(own_device_us(e) for e in on_device) / 1e6 / n
    print(f"\n### {title}: {wall * 1e3:.1f} ms per call (wall, under the profiler), device "
          f"busy {busy * 1e3:.1f} ms ({100 * busy / max(wall, 1e-9):.0f} % of the wall time)")
    if dev.type == "cuda":
        for key in ("self_device_time_total", "self_cuda_time_total"):
            try:
                print(f"by own device time ({n} calls):")
                print(ka.table(sort_by=key, row_limit=rows, max_name_column_width=60))
                break
            except (AttributeError, KeyError, ValueError):
                continue
    print(f"by own host time ({n} calls):")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def stats(ts: List[float]) -> str:
    a = np.asarray(ts) * 1e3
    return f"median {np.median(a):.1f} ms (min {a.min():.1f}, max {a.max():.1f}, n {len(a)})"


# ---------------------------------------------------------------------------------- parts
def part_training(args: argparse.Namespace, dev: torch.device) -> None:
    from detector.config.config import get_cfg
    from detector.engine.trainer import Trainer, _to_device

    out = tempfile.mkdtemp(prefix="gpu_profile_train_")
    opts = ["DATASETS.TRAIN", f"[{args.coco}]", "DATASETS.TEST", "[]", "MODEL.DEVICE", str(dev),
            "SOLVER.IMS_PER_BATCH", str(args.batch), "SOLVER.AMP.ENABLED", "true",
            "SOLVER.AMP.DTYPE", "bf16", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", out]
    if args.tiny:
        opts += ["INPUT.CROP_SIZE", "96", "DATALOADER.NUM_WORKERS", "0"]
    tr = Trainer(get_cfg(args.config, opts))
    it = iter(tr.build_loader())
    tr.model.train()
    wait: List[float] = []

    def step() -> None:
        t = time.perf_counter()
        images, targets = _to_device(*next(it), dev)
        wait.append(time.perf_counter() - t)
        with tr.autocast():
            losses = sum(tr.model(images, targets).values())
        tr.optimizer.zero_grad(set_to_none=True)
        losses.backward()
        tr.optimizer.step()

    timed(step, args.warmup, dev)
    wait.clear()
    ts = timed(step, args.steps, dev)
    log(f"training step ({args.batch} images, bf16 autocast): {stats(ts)}; "
        f"{args.batch / float(np.median(ts)):.1f} images/s; waiting for data "
        f"{1e3 * float(np.median(wait)):.1f} ms median")
    profiled(step, args.prof_steps, dev, f"training step, {args.batch} images", args.rows)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        timed(step, args.warmup, dev)
        ts2 = timed(step, args.steps, dev)
        torch.backends.cudnn.benchmark = False
        log(f"training step with cudnn.benchmark: {stats(ts2)} "
            f"({float(np.median(ts)) / float(np.median(ts2)):.2f}x)")


def part_inference(args: argparse.Namespace, dev: torch.device) -> None:
    from detector.data.synthetic import render_field
    from detector.inference import predictor
    from detector.inference.runner import predict_batch
    from detector.modeling.build import load_model

    model, _cfg, _classes, _mpp = load_model(args.weights, str(dev))
    size = 128 if args.tiny else 512
    rng = np.random.default_rng(0)
    field = render_field(rng, size=(2 * size, 2 * size), kind="he").image
    tiles = []
    for k in range(args.tiles):
        y, x = (k * 37) % size, (k * 91) % size
        tiles.append(torch.from_numpy(np.ascontiguousarray(field[y:y + size, x:x + size]))
                     .permute(2, 0, 1).contiguous())
    predictor.prepare_model(model)
    x = [t.to(dev).float().div_(255.0) for t in tiles]

    def forward() -> None:
        with torch.inference_mode(), predictor.autocast(dev, True):
            model.predict(x, 0.3)

    def whole() -> None:
        predict_batch(model, tiles, True, score_thresh=0.3)

    n_det = sum(len(p) for p in predict_batch(model, tiles, True, score_thresh=0.3))
    timed(whole, 2, dev)
    tf, tw = timed(forward, args.steps, dev), timed(whole, args.steps, dev)
    mpx = args.tiles * size * size / 1e6
    log(f"slide batch of {args.tiles} tiles of {size} px ({n_det} detections): model.predict "
        f"{stats(tf)}; predict_batch {stats(tw)} = {mpx / float(np.median(tw)):.2f} Mpx/s")
    profiled(whole, args.prof_steps, dev, f"predict_batch, {args.tiles} tiles", args.rows)
    if dev.type == "cuda" and hasattr(model, "channels_last"):
        model.to(memory_format=torch.channels_last)
        setattr(model, "channels_last", True)
        timed(whole, 2, dev)
        tc = timed(whole, args.steps, dev)
        log(f"predict_batch with channels-last: {stats(tc)} "
            f"({float(np.median(tw)) / float(np.median(tc)):.2f}x)")


class _Tiles(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {"image": torch.full((3, self.size, self.size), i % 255, dtype=torch.uint8)}


def part_loader(args: argparse.Namespace, dev: torch.device) -> None:
    for pin in ((False, True) if dev.type == "cuda" else (False,)):
        loader = torch.utils.data.DataLoader(_Tiles(64, 512), batch_size=8, num_workers=4,
                                             collate_fn=list, pin_memory=pin, prefetch_factor=2)
        t0 = time.perf_counter()
        last = t0
        for _batch in loader:
            last = time.perf_counter()
        end = time.perf_counter()
        log(f"DataLoader, 4 workers, pin_memory={pin}: 8 batches in {last - t0:.2f} s, then "
            f"{end - last:.2f} s until the loop ended (worker shutdown)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coco", help="training COCO file (gpu_check's synthetic.json)")
    p.add_argument("--weights", help="a trained checkpoint (gpu_check's model_final.pth)")
    p.add_argument("--config", default=os.path.join(ROOT, "configs/nuclei/mask_rcnn_R_50_FPN.yaml"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=8, help="training images per step")
    p.add_argument("--tiles", type=int, default=8, help="tiles per slide batch")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=15, help="timed steps / batches")
    p.add_argument("--prof-steps", type=int, default=5, help="profiled steps / batches")
    p.add_argument("--rows", type=int, default=18, help="rows of each operator table")
    p.add_argument("--parts", default="train,infer,loader")
    p.add_argument("--tiny", action="store_true", help="small crops and tiles (CPU dry run)")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu --tiny for a dry run)")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (dry run)"
    log(f"{name}; torch {torch.__version__}")
    parts = set(args.parts.split(","))
    if "loader" in parts:
        part_loader(args, dev)
    if "train" in parts:
        if not args.coco:
            raise SystemExit("--coco is needed for the training part")
        part_training(args, dev)
    if "infer" in parts:
        if not args.weights:
            raise SystemExit("--weights is needed for the inference part")
        part_inference(args, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
