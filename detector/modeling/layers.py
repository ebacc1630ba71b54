"""Layers shared by the models."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state dict) with a faster CPU path for the case
    torch's own CPU kernel handles slowly: channels-last float32 input with groups of at most
    2 channels on small maps, as in the R-CNN heads (1,000 RoIs x 64 channels x 7 x 7 px:
    8 ms a call in torch's kernel, 2-6 ms here on 2 cores; an NCHW copy costs more than it
    saves).
    There one pass over the map sums each channel and its squares, and one multiply-add makes
    the output, in the input's layout (as accurate as torch's channels-last kernel: both take
    the variance as E[x^2] - E[x]^2). Elsewhere, and with ``fast = False`` (what
    a plain torchvision model does, for baselines), torch's kernel."""

    max_group_channels = 2
    max_map_px = 1024
    min_px = 512

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True) -> None:
        super().__init__(num_groups, num_channels, eps, affine)
        self.fast = True

    def forward(self, x: Tensor) -> Tensor:
        if (self.fast and x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32
                and self.num_channels // self.num_groups <= self.max_group_channels
                and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)):
            n, c, h, w = x.shape
            if h * w <= self.max_map_px and n * h * w >= self.min_px:
                return _group_norm_channels_last(x, self.num_groups, self.weight, self.bias,
                                                 self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _group_norm_channels_last(x: Tensor, groups: int, weight: Tensor | None,
                              bias: Tensor | None, eps: float) -> Tensor:
    n, c, h, w = x.shape
    cg = c // groups
    y = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view: the memory is NHWC
    # one pass over the map, as torch's channels-last kernel: E[x^2] - E[x]^2 (a second,
    # centred pass cost more than torch's kernel: every big temporary is a fresh allocation);
    # float32 sums per (image, channel), the rest in float64
    count = h * w * cg
    mean = y.sum(1).double().view(n, groups, cg).sum(-1) / count
    sq = y.square().sum(1).double().view(n, groups, cg).sum(-1) / count
    rstd = (sq - mean * mean).clamp_min(0).add(eps).rsqrt()
    scale = rstd.repeat_interleave(cg, 1)  # (n, c)
    if weight is not None:
        scale = scale * weight.double()
    shift = -mean.repeat_interleave(cg, 1) * scale
    if bias is not None:
        shift = shift + bias.double()
    out = torch.addcmul(shift.float().unsqueeze(1), y, scale.float().unsqueeze(1))
    return out.view(n, h, w, c).permute(0, 3, 1, 2)
