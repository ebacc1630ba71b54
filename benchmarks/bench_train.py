"""Training throughput (images/s) and peak memory of every shipped R-CNN config, against stock
torchvision measured in the same run.

    python benchmarks/bench_train.py                    # all configs, synthetic nuclei fields
    python benchmarks/bench_train.py --iters 20 --device cuda
    python benchmarks/bench_train.py --configs configs/nuclei/mask_rcnn_R_18_FPN_cpu.yaml --no-baseline

Each row trains the config's model through the project's Trainer (its data pipeline,
augmentation, AMP on CUDA, pinned memory) for ``--warmup`` + ``--iters`` iterations on
synthetic images (512 x 512 nuclei fields with ~150 discs, or 128 px mitosis crops with box-only
annotations), and reports the mean time of the timed iterations. The baseline is torchvision's
stock ``maskrcnn_resnet50_fpn_v2`` / ``fasterrcnn_resnet50_fpn_v2`` (COCO settings: images
resized to 800-1333 px, 100 detections) trained on the same batches of crops with SGD; the
ratio is ours / stock images per second. Each measurement runs in its own process, so that
peak memory (CUDA: ``max_memory_allocated``; CPU: peak resident set) is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["configs/Base-RCNN-FPN.yaml", "configs/nuclei/mask_rcnn_R_50_FPN.yaml",
           "configs/nuclei/mask_rcnn_R_18_FPN_cpu.yaml", "configs/mitosis/faster_rcnn_R_50_FPN.yaml"]


def make_data(folder: str, boxes_only: bool, n: int = 8) -> str:
    """Synthetic COCO data: nuclei fields (masks) or mitosis crops (boxes only)."""
    import numpy as np
    from skimage.draw import disk
    from skimage.io import imsave

    sys.path.insert(0, ROOT)
    from detector.data.coco import (box_annotation, image_entry, mask_annotation, new_coco,
                                    save_coco)

    rng = np.random.default_rng(0)
    size, count, rad = (128, 2, (12, 20)) if boxes_only else (512, 150, (4, 14))
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    coco = new_coco([{"id": 1, "name": "mitosis" if boxes_only else "nucleus"}], "img")
    for i in range(n):
        img = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
        for _ in range(count):
            cy, cx = rng.integers(rad[1], size - rad[1], 2)
            r = int(rng.integers(*rad))
            m = np.zeros((size, size), bool)
            m[disk((cy, cx), r, shape=(size, size))] = True
            img[m] = rng.integers(120, 255, 3)
            if boxes_only:
                coco["annotations"].append(box_annotation([cx - r, cy - r, cx + r, cy + r], i + 1, 1))
            else:
                coco["annotations"].append(mask_annotation(m, i + 1, 1))
        imsave(os.path.join(folder, "img", f"{i}.png"), img, check_contrast=False)
        coco["images"].append(image_entry(i + 1, f"{i}.png", size, size, mpp=0.25))
    path = os.path.join(folder, "train.json")
    save_coco(coco, path)
    return path


def measure(config: str, device: str, warmup: int, iters: int, baseline: bool,
            ims_per_batch: int = 0) -> Dict[str, Any]:
    """One measurement in this process (called in a subprocess by :func:`main`)."""
    import numpy as np
    import torch

    sys.path.insert(0, ROOT)
    from detector.config.config import get_cfg
    from detector.engine.logger import peak_memory_mb

    cfg0 = get_cfg(os.path.join(ROOT, config))
    boxes_only = cfg0.MODEL.META_ARCHITECTURE == "FasterRCNN"
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    data = make_data(tmp, boxes_only)
    opts = ["DATASETS.TRAIN", f"[{data}]", "DATASETS.TEST", "[]", "OUTPUT_DIR", tmp,
            "MODEL.DEVICE", device, "SOLVER.MAX_ITER", str(warmup + iters),
            "SOLVER.CHECKPOINT_PERIOD", "0", "SOLVER.LOG_PERIOD", "1", "TEST.EVAL_PERIOD", "0",
            "SOLVER.TIME_LIMIT_MINUTES", "0"]
    if ims_per_batch:
        opts += ["SOLVER.IMS_PER_BATCH", str(ims_per_batch)]
    cfg = get_cfg(os.path.join(ROOT, config), opts)
    batch = int(cfg.SOLVER.IMS_PER_BATCH)
    if not baseline:
        from detector.engine.logger import setup_logging
        from detector.engine.trainer import Trainer

        setup_logging(None, rank=1)  # quiet
        trainer = Trainer(cfg)
        trainer.train()
        lines = [json.loads(l) for l in open(os.path.join(tmp, "metrics.json"))]
        times = [l["time"] for l in lines if "total_loss" in l][warmup:]
        dev = trainer.device
        return {"config": config, "model": "ours", "batch": batch,
                "crop": int(cfg.INPUT.CROP_SIZE), "images_per_s": batch / float(np.mean(times)),
                "peak_memory_mb": peak_memory_mb(dev), "device": str(dev)}
    # stock torchvision, same batches (our dataset, same crops), COCO defaults otherwise
    import torchvision
    from torch.utils.data import DataLoader

    from detector.data.dataset import CocoInstanceDataset, collate_list
    from detector.engine.trainer import resolve_device

    dev = resolve_device(device)
    ds = CocoInstanceDataset([data], cfg)
    ctor = (torchvision.models.detection.fasterrcnn_resnet50_fpn_v2 if boxes_only
            else torchvision.models.detection.maskrcnn_resnet50_fpn_v2)
    model = ctor(weights=None, weights_backbone=None, num_classes=2).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, collate_fn=collate_list,
                        num_workers=int(cfg.DATALOADER.NUM_WORKERS),
                        pin_memory=dev.type == "cuda")
    amp = dev.type == "cuda" and cfg.SOLVER.AMP.ENABLED
    times: List[float] = []
    it = iter(loader)
    for i in range(warmup + iters):
        try:
            images, targets = next(it)
        except StopIteration:
            it = iter(loader)
            images, targets = next(it)
        t0 = time.perf_counter()
        images = [im.to(dev, non_blocking=True) for im in images]
        targets = [{k: (v.as_subclass(torch.Tensor).to(dev) if isinstance(v, torch.Tensor) else v)
                    for k, v in t.items()} for t in targets]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"config": config, "model": "torchvision stock (800 px)", "batch": batch,
            "crop": int(cfg.INPUT.CROP_SIZE), "images_per_s": batch / float(np.mean(times)),
            "peak_memory_mb": peak_memory_mb(dev), "device": str(dev)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=CONFIGS)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: 10 on "
                   "CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default "
                   "3 on CUDA, 1 on CPU)")
    p.add_argument("--ims-per-batch", type=int, default=None, help="override SOLVER.IMS_PER_BATCH "
                   "of every config (default: the configs' own on CUDA, 2 on CPU)")
    p.add_argument("--no-baseline", action="store_true", help="skip stock torchvision")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--baseline-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    iters = args.iters or (10 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    batch = args.ims_per_batch if args.ims_per_batch is not None else (0 if cuda else 2)
    if args.one:
        print(json.dumps(measure(args.configs[0], args.device, warmup, iters, args.baseline_only,
                                 batch)))
        return 0
    rows = []
    cache: Dict[Any, Dict[str, Any]] = {}
    for config in args.configs:
        for baseline in ([False] if args.no_baseline else [False, True]):
            cmd = [sys.executable, os.path.abspath(__file__), "--one", "--configs", config,
                   "--device", args.device, "--iters", str(iters), "--warmup", str(warmup),
                   "--ims-per-batch", str(batch)]
            if baseline:
                from detector.config.config import get_cfg

                c = get_cfg(os.path.join(ROOT, config))
                # stock torchvision resizes every crop to 800 px: one baseline per model and batch
                key = (c.MODEL.META_ARCHITECTURE, batch or int(c.SOLVER.IMS_PER_BATCH))
                if key in cache:
                    rows.append(dict(cache[key], config=config))
                    continue
                cmd.append("--baseline-only")
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0:
                print(f"{config}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            if baseline:
                cache[key] = row
            print(f"  measured {config} ({row['model']}): {row['images_per_s']:.2f} images/s",
                  file=sys.stderr)
    ours = {r["config"]: r for r in rows if r["model"] == "ours"}
    base = {r["config"]: r for r in rows if r["model"] != "ours"}
    dev = rows[0]["device"] if rows else args.device
    print(f"\nTraining throughput on {dev} ({os.cpu_count()} CPUs visible, torch threads "
          f"{torch.get_num_threads()}), {iters} timed iterations after {warmup} warm-up, "
          "synthetic data" + (f", IMS_PER_BATCH {batch} for all" if batch else ""))
    print(f"{'config':<44}{'batch':>6}{'crop':>6}{'images/s':>10}{'peak MB':>10}"
          f"{'stock im/s':>12}{'stock MB':>10}{'ratio':>8}")
    for config in args.configs:
        if config not in ours:
            continue
        o, b = ours[config], base.get(config)
        tail = (f"{b['images_per_s']:>12.2f}{b['peak_memory_mb']:>10.0f}"
                f"{o['images_per_s'] / b['images_per_s']:>8.2f}") if b else f"{'-':>12}{'-':>10}{'-':>8}"
        print(f"{config:<44}{o['batch']:>6}{o['crop']:>6}{o['images_per_s']:>10.2f}"
              f"{o['peak_memory_mb']:>10.0f}{tail}")
    print("ratio = ours / stock torchvision images per second (stock resizes every crop to "
          "800 px, as for COCO)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
