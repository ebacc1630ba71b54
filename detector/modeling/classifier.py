"""The patch classifier: stage 2 of the mitosis counter.

A detector trained on figure crops circles every dark nucleus of ordinary tissue; a classifier
that looks at a patch centred on each candidate, trained on the figures against the detector's
own false positives and on nuclei, tells figures from look-alikes (the two-stage design of the
MIDOG and TUPAC winners). The network is a torchvision classification model
(``MODEL.CLASSIFIER.NAME``), from scratch. Output index 0 is "look-alike", 1..K the data's categories (mitotic figure, or the
phases prophase-prometaphase / metaphase / anaphase-telophase / atypical, or normal/atypical).

Input: patches ``[N, 3, P, P]`` float in 0..1 (P = ``MODEL.CLASSIFIER.PATCH_SIZE``), as a tensor
or a list of ``[3, P, P]`` tensors. Training (``targets`` given, each ``{"labels": int64 []}``):
returns ``{"loss_cls": cross-entropy}``. Eval: returns ``[N, K + 1]`` class probabilities,
averaged over the 8 flips and 90-degree rotations of each patch with ``MODEL.CLASSIFIER.TTA``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from .layers import GroupNorm


def group_norm(num_channels: int, *args: Any, **kwargs: Any) -> GroupNorm:
    """GroupNorm for any torchvision model's ``norm_layer``: groups of at least 4 channels
    (at most 32 groups), BatchNorm-only arguments (momentum) ignored."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if num_channels % g == 0
                  and (num_channels // g >= 4 or g == 1))
    return GroupNorm(groups, num_channels, eps=float(kwargs.get("eps", 1e-5)))


class PatchClassifier(nn.Module):
    def __init__(self, cfg: Any, classes: Sequence[Dict[str, Any]]) -> None:
        super().__init__()
        self.classes = [dict(c) for c in classes]
        self.patch_size = int(cfg.MODEL.CLASSIFIER.PATCH_SIZE)
        self.tta = bool(cfg.MODEL.CLASSIFIER.TTA)
        self.border_value = int(cfg.MODEL.CLASSIFIER.BORDER_VALUE)
        name = str(cfg.MODEL.CLASSIFIER.NAME)
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"MODEL.CLASSIFIER.NAME {name!r} is not a torchvision classification "
                             "model (e.g. mobilenet_v3_small, resnet18)")
        norm = cfg.MODEL.BACKBONE.NORM
        if norm not in ("BN", "SyncBN", "GN"):
            raise ValueError(f"MODEL.BACKBONE.NORM {norm!r}: the patch classifier is trained from "
                             "scratch with GN (default) or BN")
        # GroupNorm by default: on 64 px patches the last feature maps are 2 x 2 px, where
        # BatchNorm's batch statistics let the network compare the patches of a batch, and its
        # eval-mode answers (running statistics) then say look-alike to everything
        norm_layer = group_norm if norm == "GN" else nn.BatchNorm2d
        self.net = torchvision.models.get_model(name, weights=None, norm_layer=norm_layer,
                                                num_classes=len(self.classes) + 1)
        self.register_buffer("pixel_mean", torch.tensor(list(cfg.MODEL.PIXEL_MEAN)).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(list(cfg.MODEL.PIXEL_STD)).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, images: Union[Tensor, List[Tensor]],
                targets: Optional[List[Dict[str, Any]]] = None) -> Any:
        x = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
        x = (x - self.pixel_mean) / self.pixel_std
        if not self.training and self.tta:
            # the 8 flips and 90-degree rotations of each patch, probabilities averaged
            views = [torch.rot90(v, k, dims=(2, 3)) for v in (x, x.flip(3)) for k in range(4)]
            logits = self.net(torch.cat(views).contiguous(memory_format=torch.channels_last))
            return logits.float().softmax(dim=1).view(8, x.shape[0], -1).mean(0)
        logits = self.net(x.contiguous(memory_format=torch.channels_last))
        if self.training:
            if targets is None:
                raise ValueError("PatchClassifier: training needs targets with 'labels'")
            labels = torch.stack([torch.as_tensor(t["labels"]).reshape(()) for t in targets])
            return {"loss_cls": F.cross_entropy(logits.float(), labels.to(logits.device))}
        return logits.float().softmax(dim=1)


def build_classifier(cfg: Any, classes: Sequence[Dict[str, Any]]) -> PatchClassifier:
    return PatchClassifier(cfg, classes).to(memory_format=torch.channels_last)
