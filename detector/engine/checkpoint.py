"""Checkpoints: a dict of tensors and plain types, written atomically, read with
``torch.load(weights_only=True)``.

Keys: ``model`` (state dict), ``config`` (resolved YAML string), ``classes`` (list of
``{"id", "name"}``), ``mpp`` (float or None), ``iteration`` (iterations done), and for resuming
``optimizer``, ``scheduler``, ``scaler``, ``rng`` states, plus ``extra`` (a plain dict).
"""
from __future__ import annotations

import glob
import logging
import os
import random
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..checkpoint import (CheckpointError, load_checkpoint,  # noqa: F401 (re-exported)
                          load_error_reason)
from ..config.config import cfg_to_yaml
from ..fileio import atomic_write

LAST_CHECKPOINT = "last_checkpoint"
# Periodic checkpoints: model_<iteration, 7 digits>.pth (model_final / model_best are not).
PERIODIC = re.compile(r"^model_(\d{7,})\.pth$")

logger = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _config_text(cfg: Any) -> str:
    if isinstance(cfg, str):
        return cfg
    return cfg_to_yaml(cfg)


def get_rng_state() -> Dict[str, Any]:
    """Python, numpy, torch (and CUDA) random states as tensors and plain types."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: str, model: nn.Module, cfg: Any, classes: List[Dict[str, Any]],
                    mpp: Optional[float], iteration: int, optimizer: Any = None,
                    scheduler: Any = None, scaler: Any = None,
                    extra: Optional[Dict[str, Any]] = None, rng: bool = True) -> None:
    """Write a checkpoint atomically (temporary file in the same folder, then ``os.replace``),
    so that a run killed while writing leaves the previous checkpoint intact. Without
    ``optimizer``, ``scheduler``, ``scaler`` and ``rng`` it holds only what inference needs
    (weights, config, classes, mpp, iteration): ``model_final.pth``."""
    ckpt: Dict[str, Any] = {
        "model": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
        "config": _config_text(cfg),
        "classes": [{"id": int(c["id"]), "name": str(c["name"])} for c in classes],
        "mpp": None if mpp is None else float(mpp),
        "iteration": int(iteration),
    }
    if rng:
        ckpt["rng"] = get_rng_state()
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        ckpt["scaler"] = scaler.state_dict()
    if extra:
        ckpt["extra"] = dict(extra)
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)


def export_checkpoint(src: str, dst: str, settings: Dict[str, Any]) -> None:
    """``train_net.py --export``: the inference part of checkpoint ``src`` (weights, config,
    classes, mpp, iteration, extra; no optimizer state) written atomically to ``dst`` with the
    test-time keys ``settings`` (keys of ``TEST_TIME_KEYS``: e.g. the score threshold chosen
    on validation, test-time augmentation) set in its config, so that ``infer_tiles.py`` and
    ``--eval-only`` use them without flags."""
    from omegaconf import OmegaConf

    from ..config.config import cfg_from_string
    from ..modeling.build import TEST_TIME_KEYS

    other = [k for k in settings if k not in TEST_TIME_KEYS]
    if other:
        raise CheckpointError(f"--export sets test-time keys only, not {', '.join(other)}: a "
                              "checkpoint keeps the config it was trained with, except "
                              f"{', '.join(TEST_TIME_KEYS)}")
    ckpt = load_checkpoint(src)
    cfg = cfg_from_string(ckpt["config"])
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value)
    out = {k: ckpt[k] for k in ("model", "classes", "mpp", "iteration", "extra") if k in ckpt}
    out["config"] = _config_text(cfg)
    with atomic_write(dst, "wb") as f:
        torch.save(out, f)


def write_last_checkpoint(output_dir: str, name: str) -> None:
    """Record ``name`` (a file in ``output_dir``) as the newest checkpoint, atomically."""
    with atomic_write(os.path.join(output_dir, LAST_CHECKPOINT), "w") as f:
        f.write(name + "\n")


def last_checkpoint(output_dir: str) -> Optional[str]:
    """Path of the newest checkpoint in ``output_dir`` (from ``last_checkpoint``), or None."""
    marker = os.path.join(output_dir, LAST_CHECKPOINT)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        name = f.read().strip()
    path = os.path.join(output_dir, name)
    return path if os.path.isfile(path) else None


def periodic_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """``(iteration, path)`` of the ``model_<iteration>.pth`` files in ``output_dir``, oldest
    first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, n))
             for n in os.listdir(output_dir) for m in [PERIODIC.match(n)] if m]
    return sorted(found)


def resume_candidates(output_dir: str) -> List[str]:
    """Checkpoints to resume from, best first: the periodic checkpoints from the newest down
    (a run killed between writing ``model_<iter>.pth`` and ``last_checkpoint`` resumes from the
    newer file instead of overwriting it later), preceded by the file ``last_checkpoint`` names
    when that is not a periodic one (``model_final.pth`` of older versions)."""
    named = last_checkpoint(output_dir)
    periodic = [p for _, p in reversed(periodic_checkpoints(output_dir))]
    return ([named] if named and named not in periodic else []) + periodic


def prune_checkpoints(output_dir: str, keep: int) -> List[str]:
    """Delete all but the newest ``keep`` periodic checkpoints (``keep`` <= 0: keep all).
    ``model_final.pth``, ``model_best.pth`` and the file ``last_checkpoint`` names are never
    deleted. Returns the deleted paths."""
    if keep <= 0:
        return []
    named = last_checkpoint(output_dir)
    found = periodic_checkpoints(output_dir)
    gone = []
    for _, path in found[:max(0, len(found) - keep)]:
        if named and os.path.abspath(path) == os.path.abspath(named):
            continue
        try:
            os.unlink(path)
            gone.append(path)
        except FileNotFoundError:
            pass
    return gone


def remove_orphan_temp_files(output_dir: str) -> List[str]:
    """Delete the ``.tmp-*`` files a kill during an atomic write left in ``output_dir``."""
    gone = []
    for path in glob.glob(os.path.join(glob.escape(output_dir), ".tmp-*")):
        try:
            os.unlink(path)
            gone.append(path)
        except OSError:
            pass
    if gone:
        logger.info("removed %d unfinished temporary file(s) of a killed run: %s", len(gone),
                    ", ".join(os.path.basename(p) for p in gone))
    return gone
