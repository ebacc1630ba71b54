"""Load YAML configs with ``_BASE_`` inheritance and ``KEY VALUE`` overrides (OmegaConf).

>>> cfg = get_cfg("configs/nuclei/mask_rcnn_R_18_FPN_cpu.yaml", ["SOLVER.MAX_ITER", "100"])
>>> cfg.SOLVER.MAX_ITER
100

The defaults are the structured schema in :mod:`detector.config.defaults`; OmegaConf rejects an
unknown key or a value of the wrong type, and we re-raise that as :class:`ConfigError` naming
the key and the file (or "command line").
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import DetectorError
from .defaults import Config

BASE_KEY = "_BASE_"

# Keys whose value must be one of a few words; checked after every merge.
CHOICES: Dict[str, Sequence[str]] = {
    "MODEL.META_ARCHITECTURE": ("MaskRCNN", "FasterRCNN", "UNet", "PatchClassifier", "Classical"),
    "MODEL.CLASSICAL.MODALITY": ("auto", "fluorescence", "brightfield", "he"),
    "TEST.AUG.TRANSFORMS": (4, 8),
    "MODEL.BACKBONE.NAME": ("resnet18", "resnet34", "resnet50"),
    "MODEL.BACKBONE.NORM": ("FrozenBN", "BN", "SyncBN", "GN"),
    "MODEL.UNET.PADDING": ("valid", "same"),
    "MODEL.UNET.TARGET": ("boundary", "contact"),
    "SOLVER.OPTIMIZER": ("SGD", "AdamW"),
    "SOLVER.LR_SCHEDULER": ("step", "cosine"),
    "SOLVER.AMP.DTYPE": ("bf16", "fp16"),
}


class ConfigError(ValueError, DetectorError):
    """A config file or override that does not fit the schema."""


def default_cfg() -> DictConfig:
    """A fresh config holding every default; struct mode rejects unknown keys."""
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _read_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of KEY: value")
    return data


def _merge(cfg: DictConfig, data: Dict[str, Any], source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        if "Key" in type(e).__name__ or "not in struct" in str(e):
            raise ConfigError(f"{source}: unknown config key '{key}' ({msg})") from None
        raise ConfigError(f"{source}: bad value for config key '{key}': {msg}") from None


def merge_from_file(cfg: DictConfig, path: str, _seen: Optional[List[str]] = None) -> DictConfig:
    """Merge a YAML file into ``cfg``, following its ``_BASE_`` (relative to the file) first."""
    seen = list(_seen or [])
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(f"{path}: _BASE_ chain loops back to itself")
    data = _read_yaml(path)
    base = data.pop(BASE_KEY, None)
    if base:
        bases = [base] if isinstance(base, str) else list(base)
        for b in bases:
            bpath = b if os.path.isabs(b) else os.path.join(os.path.dirname(path), b)
            cfg = merge_from_file(cfg, bpath, seen + [real])
    return _merge(cfg, data, path)


def _parse_value(text: Any, key: str = "?") -> Any:
    if not isinstance(text, str):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError:
        # e.g. '!!python/object/apply:os.system [...]': never constructed, and not kept as a
        # string either (it would reach torch.device, paths, ...)
        raise ConfigError(f"command line: the value of '{key}' is a YAML tag that is not "
                          f"allowed ({text.split()[0]}); give a plain value") from None
    except yaml.YAMLError:
        return text


def merge_from_list(cfg: DictConfig, opts: Iterable[Any]) -> DictConfig:
    """Merge ``[KEY, VALUE, KEY, VALUE, ...]``; values are parsed as YAML."""
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(
            f"command line: overrides come in KEY VALUE pairs, got an odd number: {opts}"
        )
    for key, value in zip(opts[0::2], opts[1::2]):
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"command line: unknown config key '{key}'")
        nested: Dict[str, Any] = {}
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_value(value, key)
        cfg = _merge(cfg, nested, "command line")
    return cfg


def check_choices(cfg: DictConfig, source: str = "config") -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(
                f"{source}: config key '{key}' is '{value}', expected one of {list(allowed)}"
            )


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# Numeric keys and the smallest value each may take (exclusive when the bool is True).
LOWER_BOUNDS: Dict[str, Any] = {
    "SOLVER.BASE_LR": (0.0, True),
    "SOLVER.WEIGHT_DECAY": (0.0, False),
    "SOLVER.MOMENTUM": (0.0, False),
    "SOLVER.IMS_PER_BATCH": (1, False),
    "SOLVER.CHECKPOINT_PERIOD": (0, False),
    "SOLVER.CHECKPOINTS_KEPT": (0, False),
    "DATALOADER.NUM_WORKERS": (0, False),
}


def check_values(cfg: DictConfig, source: str = "config") -> None:
    """Values that fit the schema's types but not the training: a negative learning rate, a
    device torch does not know, ... (ConfigError naming the key, the value and what fits)."""
    device = str(OmegaConf.select(cfg, "MODEL.DEVICE"))
    if not _DEVICE.match(device):
        raise ConfigError(f"{source}: MODEL.DEVICE is '{device}', expected 'auto', 'cpu', "
                          "'cuda', 'cuda:N' (N = GPU index) or 'mps'")
    for key, (low, strict) in LOWER_BOUNDS.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        bad = not math.isfinite(float(value)) or (value <= low if strict else value < low)
        if bad:
            raise ConfigError(f"{source}: config key '{key}' is {value}, expected a number "
                              f"{'>' if strict else '>='} {low}")


def get_cfg(config_file: Optional[str] = None, opts: Optional[Iterable[Any]] = None) -> DictConfig:
    """Defaults, then ``config_file`` (with its bases), then ``opts`` overrides."""
    cfg = default_cfg()
    if config_file:
        cfg = merge_from_file(cfg, config_file)
    if opts:
        cfg = merge_from_list(cfg, opts)
    check_choices(cfg, config_file or "config")
    check_values(cfg, config_file or "config")
    OmegaConf.set_struct(cfg, True)
    return cfg


def cfg_from_string(text: str) -> DictConfig:
    """Rebuild a config from the resolved YAML stored in a checkpoint."""
    cfg = default_cfg()
    data = yaml.safe_load(text) or {}
    data.pop(BASE_KEY, None)
    cfg = _merge(cfg, data, "checkpoint config")
    return cfg


def cfg_to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
