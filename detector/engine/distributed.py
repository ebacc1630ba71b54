"""Several processes (GPUs, or CPU processes on gloo for testing) with DistributedDataParallel.

``launch(fn, num_procs, args)`` runs ``fn(*args)`` in ``num_procs`` processes
(``torch.multiprocessing``); under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the
environment) it runs ``fn`` once in the current process, which joins the group.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable, Dict, Sequence

import torch
import torch.distributed as dist


from ..device import get_local_rank, get_rank, get_world_size, is_main_process
import torch.multiprocessing as mp

__all__ = ["get_local_rank", "get_rank", "get_world_size", "is_main_process", "synchronize",
           "init_process_group", "launch", "all_reduce_mean"]


def synchronize() -> None:
    if get_world_size() > 1:
        dist.barrier()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: str) -> str:
    """NCCL on CUDA, gloo on CPU."""
    return "nccl" if device.startswith("cuda") else "gloo"


def init_process_group(device: str) -> None:
    """Join the process group described by the environment (``torchrun`` or :func:`launch`)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or dist.is_initialized():
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(get_local_rank())
    dist.init_process_group(backend=backend_for(device), init_method="env://")


def _worker(local_rank: int, fn: Callable, num_procs: int, port: int, args: Sequence[Any]) -> None:
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank),
                       "WORLD_SIZE": str(num_procs), "LOCAL_WORLD_SIZE": str(num_procs),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        fn(*args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable, num_procs: int, args: Sequence[Any] = ()) -> None:
    """Run ``fn(*args)`` in ``num_procs`` local processes (one per GPU, or CPU processes), or
    once when launched by ``torchrun`` or when ``num_procs <= 1``."""
    if num_procs <= 1 or "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        fn(*args)
        return
    mp.start_processes(_worker, args=(fn, num_procs, _free_port(), tuple(args)), nprocs=num_procs,
                       join=True, start_method="spawn")


def all_reduce_mean(values: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Average a dict of scalar tensors over the processes (one collective)."""
    keys = sorted(values)
    if not keys:
        return {}
    t = torch.stack([values[k].detach().float() for k in keys])
    if get_world_size() > 1:
        dist.all_reduce(t)
        t /= get_world_size()
    return {k: float(v) for k, v in zip(keys, t.cpu())}
