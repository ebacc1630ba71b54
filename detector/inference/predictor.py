"""How a model runs on the slide path: numeric precision, memory layout, threads.

- **bf16 autocast** where the hardware computes in bf16: CUDA, and CPUs with native bf16
  instructions (``avx512_bf16`` or AMX, as torch reports them; elsewhere bf16 is emulated and
  many times slower than fp32, e.g. 70x for a ResNet-18 on an AVX2-only EPYC). ``amp=False``
  (``infer_tiles.py --no-amp``) keeps fp32 everywhere.
- **channels-last** convolutions for the R-CNN backbone on CPU (oneDNN's native layout).
- **threads**: DataLoader workers only read and resample tiles (torch gives each one intra-op
  thread); the model's intra-op threads stay torch's default (one per core). OpenCV's thread
  count is left alone in the workers: changing it in a forked worker after the parent used
  OpenCV's pool deadlocks.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import torch


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as torch sees it; the
    ``/proc/cpuinfo`` flags when torch does not say."""
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, name, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except RuntimeError:
                pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, amp: bool = True) -> Optional[torch.dtype]:
    """The autocast dtype for inference on ``device``: bf16 on CUDA and on CPUs with native
    bf16, None (fp32) otherwise or when ``amp`` is False."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


@contextlib.contextmanager
def autocast(device: torch.device, amp: bool = True) -> Iterator[None]:
    """``torch.autocast`` with :func:`autocast_dtype`, or nothing when that is fp32."""
    dtype = autocast_dtype(device, amp)
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, and channels-last weights for a model that supports it on CPU (the R-CNN:
    ``channels_last`` attribute); returns the model."""
    model.eval()
    dev = next(iter(model.parameters()), torch.empty(0)).device
    if hasattr(model, "channels_last") and dev.type == "cpu" and not model.channels_last:
        model.to(memory_format=torch.channels_last)
        setattr(model, "channels_last", True)  # a plain flag of the R-CNN wrapper
    return model
