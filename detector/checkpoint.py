"""Reading checkpoints: the one loader under both :mod:`detector.modeling` (``load_model``)
and :mod:`detector.engine` (resume), so that neither imports the other for it.

A checkpoint is a dict of tensors and plain types read with ``torch.load(weights_only=True)``
(no code runs): ``model`` (state dict), ``config`` (resolved YAML string), ``classes`` (list of
``{"id", "name"}``), ``mpp`` (float or None), ``iteration``, and for resuming ``optimizer``,
``scheduler``, ``scaler``, ``rng`` states, plus ``extra``. Writing is
:func:`detector.engine.checkpoint.save_checkpoint`.
"""
from __future__ import annotations

import os
from typing import Any, Dict

import torch

from .errors import DetectorError


class CheckpointError(RuntimeError, DetectorError):
    """A file that is not one of our checkpoints, or a missing one; the message names it."""


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read one of our checkpoints (``weights_only=True``: no code is executed)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a checkpoint that loads safely "
                              f"({load_error_reason(e)})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "classes"} <= set(ckpt):
        raise CheckpointError(f"{path}: not a detector checkpoint (needs 'model', 'config' and "
                              "'classes'; a plain state dict goes in MODEL.WEIGHTS for "
                              "fine-tuning instead)")
    return ckpt


def load_error_reason(e: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` refused, in one line, without torch's advice to
    retry with ``weights_only=False`` (which would run whatever code the file carries)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if "weights_only" not in ln and "Weights only load failed" not in ln
            and not ln.startswith("Check the documentation")]
    return f"{type(e).__name__}: {keep[0] if keep else 'unreadable file'}"
