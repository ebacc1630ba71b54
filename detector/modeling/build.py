"""Build a model from a config, load initial weights, and load a trained checkpoint.

``build_model(cfg, classes)`` dispatches on ``cfg.MODEL.META_ARCHITECTURE``; ``classes`` is the
training data's COCO categories sorted by id. ``load_model(path)`` rebuilds a trained model
from one of our checkpoints alone (its config, classes and mpp are stored in it).
"""
from __future__ import annotations

import logging
import os
import re
import socket
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf
from torch import nn

from ..checkpoint import load_checkpoint, load_error_reason
from ..config.config import cfg_from_string
from ..errors import DetectorError
from .rcnn import build_rcnn

logger = logging.getLogger(__name__)


class WeightsError(RuntimeError, DetectorError):
    """``MODEL.WEIGHTS`` cannot be used; the message says what to do."""


def build_model(cfg: Any, classes: List[Dict[str, Any]]) -> nn.Module:
    """The model of ``cfg.MODEL.META_ARCHITECTURE`` for ``classes`` (``[{"id", "name"}]``
    sorted by id), with random initialisation (see :func:`load_weights`)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    classes = sorted(({"id": int(c["id"]), "name": str(c["name"])} for c in classes),
                     key=lambda c: c["id"])
    if cfg.MODEL.NUM_CLASSES and int(cfg.MODEL.NUM_CLASSES) != len(classes):
        raise ValueError(f"MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES} but the data has "
                         f"{len(classes)} categories {[c['name'] for c in classes]}; set "
                         "MODEL.NUM_CLASSES 0 to take them from the data")
    if arch in ("MaskRCNN", "FasterRCNN"):
        return build_rcnn(cfg, classes)
    if arch == "UNet":
        try:
            from .unet import build_unet
        except ImportError as e:
            raise ImportError(f"MODEL.META_ARCHITECTURE UNet needs detector.modeling.unet ({e})") from e
        return build_unet(cfg, classes)
    if arch == "PatchClassifier":
        from .classifier import build_classifier

        return build_classifier(cfg, classes)
    if arch == "Classical":
        from .classical import build_classical

        return build_classical(cfg, classes)
    raise ValueError(f"MODEL.META_ARCHITECTURE {arch!r} is not one of MaskRCNN, FasterRCNN, UNet, "
                     "PatchClassifier, Classical")


# ----------------------------------------------------------------------------- initial weights
_WEIGHTS_NAME = re.compile(r"^[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+$")


def _torchvision_state_dict(name: str) -> Dict[str, torch.Tensor]:
    """State dict of a torchvision weights enum (e.g. ``MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1``)
    from the torch hub cache, downloading it only when the network allows."""
    try:
        from torchvision.models import get_weight

        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError) as e:
        raise WeightsError(f"MODEL.WEIGHTS {name!r} is not a torchvision weights name ({e})") from None
    url = weights.url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.isfile(path):
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(15)
        try:
            logger.info("downloading %s to %s", url, path)
            torch.hub.load_state_dict_from_url(url, progress=True, check_hash=False)
        except Exception as e:  # offline, proxy, DNS: all mean "place the file yourself"
            if os.path.exists(path):
                os.unlink(path)
            raise WeightsError(
                f"MODEL.WEIGHTS {name}: cannot download {url} ({type(e).__name__}: {e}). "
                f"Without network access, download that file elsewhere and place it at {path} "
                "(or set TORCH_HOME), or train from scratch with MODEL.WEIGHTS ''."
            ) from None
        finally:
            socket.setdefaulttimeout(old)
    return torch.load(path, map_location="cpu", weights_only=True)


def _match_prefix(model_keys: List[str], state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Re-key a foreign state dict onto the model: torchvision detection keys get the wrapper's
    ``model.`` prefix; an ImageNet classifier's keys (``conv1.weight``, ...) go to the backbone
    body."""
    keys = set(model_keys)
    if any(k in keys for k in state):
        return state
    for prefix in ("model.", "model.backbone.body.", "backbone.body."):
        moved = {prefix + k: v for k, v in state.items()}
        if any(k in keys for k in moved):
            return moved
    return state


def load_state_dict_loose(model: nn.Module, state: Dict[str, torch.Tensor], source: str
                          ) -> Tuple[List[str], List[str], List[str]]:
    """Load the tensors of ``state`` whose names and shapes fit ``model``; returns
    ``(missing, unexpected, shape_mismatched)`` key lists and logs them."""
    own = model.state_dict()
    state = _match_prefix(list(own), state)
    skipped = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    usable = {k: v for k, v in state.items() if k in own and k not in skipped}
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in usable]
    model.load_state_dict(usable, strict=False)
    if not usable:
        raise WeightsError(f"MODEL.WEIGHTS {source}: none of its {len(state)} tensors fits this "
                           "model (is it a checkpoint of another architecture?)")
    logger.info("loaded %d/%d tensors from %s", len(usable), len(own), source)
    if skipped:
        logger.info("skipped (shape differs, e.g. class heads): %s", ", ".join(skipped[:10]))
    if missing:
        logger.info("not in the weights (initialised randomly): %d tensors, e.g. %s",
                    len(missing), ", ".join(missing[:5]))
    if unexpected:
        logger.info("in the weights but not in the model: %d tensors, e.g. %s",
                    len(unexpected), ", ".join(unexpected[:5]))
    return missing, unexpected, skipped


def load_weights(model: nn.Module, weights: str) -> None:
    """Initialise ``model`` from ``MODEL.WEIGHTS``: one of our checkpoints, a plain state dict
    file (loaded loosely: shape mismatches such as class heads are skipped and reported), or
    a torchvision weights name. ``""`` does nothing (training from scratch)."""
    if not weights:
        return
    if os.path.isfile(weights):
        try:
            obj = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"MODEL.WEIGHTS {weights}: not a PyTorch weights file that loads "
                               f"safely ({load_error_reason(e)})") from None
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            state = obj["model"]
        elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            state = obj["state_dict"]
        elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = obj
        else:
            raise WeightsError(f"MODEL.WEIGHTS {weights}: expected a state dict or a checkpoint "
                               "with a 'model' entry")
        load_state_dict_loose(model, state, weights)
        return
    if _WEIGHTS_NAME.match(weights):
        load_state_dict_loose(model, _torchvision_state_dict(weights), weights)
        return
    raise WeightsError(f"MODEL.WEIGHTS {weights!r}: no such file, and not a torchvision weights "
                       "name such as MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1")


# ------------------------------------------------------------------------------- trained models
# Keys that change only how a trained model predicts, not its weights: a config given at test
# time (``--eval-only``) may override the checkpoint's values of these.
TEST_TIME_KEYS = (
    "INPUT.SCALE",
    "INPUT.GREY_FLUORESCENCE",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    "MODEL.ROI_HEADS.NMS_THRESH_TEST",
    "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE",
    "MODEL.ROI_HEADS.MASK_THRESHOLD",
    "MODEL.UNET.TILE_SIZE",
    "MODEL.UNET.SEED_THRESH",
    "MODEL.UNET.FOREGROUND_THRESH",
    "MODEL.UNET.MIN_SIZE",
    "MODEL.UNET.SMOOTH_SIGMA",
    "MODEL.CLASSICAL.MODALITY",
    "MODEL.CLASSICAL.SMOOTH_SIGMA",
    "MODEL.CLASSICAL.THRESHOLD_CORRECTION",
    "MODEL.CLASSICAL.THRESHOLD",
    "MODEL.CLASSICAL.PEAK_FOOTPRINT",
    "MODEL.CLASSICAL.FILL_HOLES",
    "MODEL.CLASSICAL.MIN_SIZE",
    "TEST.SCORE_THRESH",
    "TEST.AUG.ENABLED",
    "TEST.AUG.TRANSFORMS",
)


def test_time_overrides(cfg: Any) -> Dict[str, Any]:
    """The :data:`TEST_TIME_KEYS` values of ``cfg`` (for ``load_model(..., overrides=)``)."""
    return {k: OmegaConf.select(cfg, k) for k in TEST_TIME_KEYS}


def load_model(path: str, device: str = "cpu", overrides: Optional[Dict[str, Any]] = None
               ) -> Tuple[nn.Module, Any, List[Dict[str, Any]], Optional[float]]:
    """Rebuild a trained model from one of our checkpoints.

    Returns ``(model in eval mode on device, cfg, classes, mpp)``; ``classes`` is the list of
    ``{"id", "name"}`` the model predicts and ``mpp`` the microns per pixel it was trained at
    (or None). ``overrides`` maps keys of :data:`TEST_TIME_KEYS` to values that replace the
    checkpoint's (e.g. ``{"INPUT.SCALE": 0.5}`` for images at twice the training resolution);
    other keys are refused, since they would not fit the trained weights.
    """
    ckpt = load_checkpoint(path)
    cfg = cfg_from_string(ckpt["config"])
    for key, value in (overrides or {}).items():
        if key not in TEST_TIME_KEYS:
            raise ValueError(f"load_model: '{key}' is not a test-time key ({', '.join(TEST_TIME_KEYS)})")
        OmegaConf.update(cfg, key, value)
    classes = list(ckpt["classes"])
    model = build_model(cfg, classes)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path}: the weights do not fit the model its config describes: "
                           f"{str(e).splitlines()[0]}") from None
    model.to(device).eval()
    return model, cfg, classes, ckpt.get("mpp")
