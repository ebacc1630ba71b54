"""Training logs: console (``logging``), ``metrics.json`` (one JSON object per line) and
TensorBoard event files, all in ``OUTPUT_DIR``."""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
from typing import Any, Dict, Optional

import torch

METRICS_FILE = "metrics.json"


def setup_logging(output_dir: Optional[str] = None, rank: int = 0) -> logging.Logger:
    """Console logging for the ``detector`` package (rank 0 only; other ranks warn), plus
    ``OUTPUT_DIR/log.txt``."""
    log = logging.getLogger("detector")
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    log.addHandler(console)
    if output_dir and rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(output_dir, "log.txt"))
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return log


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors (CUDA), else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class MetricsWriter:
    """Appends to ``metrics.json`` and TensorBoard. On resume from iteration ``start_iter``,
    lines of later iterations (written after the checkpoint by the killed run) are dropped, so
    that the file reads like one uninterrupted run."""

    def __init__(self, output_dir: str, start_iter: int = 0, tensorboard: bool = True) -> None:
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, METRICS_FILE)
        if os.path.isfile(self.path):
            kept = []
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        if json.loads(line).get("iter", 0) <= start_iter:
                            kept.append(line)
                    except json.JSONDecodeError:
                        continue
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=output_dir, purge_step=start_iter + 1 if start_iter else None)

    def write(self, record: Dict[str, Any], prefix: str = "train") -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            it = int(record.get("iter", 0))
            for k, v in record.items():
                if k != "iter" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, it)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
