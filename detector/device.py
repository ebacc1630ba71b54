"""The one source of this process's device and distributed rank.

Ranks come from the initialised process group when there is one, else from the environment
``torchrun`` (or :func:`detector.engine.distributed.launch`) sets: ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``. Training (``MODEL.DEVICE``), slide inference (``--device``) and the Python API
(:mod:`detector.api`) all resolve devices here.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import DetectorError


class DeviceError(ValueError, DetectorError):
    """A device that this machine does not have (e.g. ``cuda`` without a GPU)."""


def _group() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank: the process group's, else ``RANK`` (0 outside a distributed run)."""
    return dist.get_rank() if _group() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    """Number of processes: the process group's, else ``WORLD_SIZE`` (1)."""
    return dist.get_world_size() if _group() else int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    """Rank on this machine (``LOCAL_RANK``): the GPU index of this process."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def resolve_device(name: str | None = "auto") -> torch.device:
    """``"auto"`` (or empty): this process's GPU (``cuda:<LOCAL_RANK>``) when CUDA is
    available, else the CPU; ``"cuda"``: ``cuda:<LOCAL_RANK>``; anything else as torch reads
    it. Raises :class:`DeviceError` for CUDA on a machine without it."""
    name = (name or "auto").strip()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name}: CUDA is not available on this machine; use cpu "
                              "(or auto)")
        if name == "cuda":
            name = f"cuda:{get_local_rank()}"
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"device {name!r}: {e}") from None
