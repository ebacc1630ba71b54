"""Training augmentation with ``torchvision.transforms.v2``, acting jointly on the image
(``tv_tensors.Image``), boxes (``tv_tensors.BoundingBoxes``, XYXY px) and instance masks
(``tv_tensors.Mask``, ``(N, H, W)``).

torchvision has flips and colour jitter; what it lacks for cells is written here, each as a
``v2.Transform`` usable on its own: 90-degree rotations, scale jitter fused with a random crop
(crop first, then resize only the crop: a large image with hundreds of masks is never resized
whole), the U-Net paper's coarse-grid elastic deformation, and H&E stain jitter.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF


def masks_to_boxes_xyxy(masks: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` masks -> ``(N, 4)`` float XYXY boxes on pixel edges (x1 = last column + 1);
    empty masks give ``[0, 0, 0, 0]``."""
    n = masks.shape[0]
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    h, w = masks.shape[-2:]
    if h == 0 or w == 0:
        return torch.zeros((n, 4), dtype=torch.float32)
    # max over uint8, not any() over bool: on CPU (the data workers) 17-60x faster here
    m = masks.as_subclass(torch.Tensor).bool().view(torch.uint8)
    rows = m.amax(dim=2) > 0
    cols = m.amax(dim=1) > 0
    ar_h = torch.arange(h, device=m.device)
    ar_w = torch.arange(w, device=m.device)
    big = max(h, w) + 1
    y0 = torch.where(rows, ar_h, big).min(dim=1).values
    y1 = torch.where(rows, ar_h, -1).max(dim=1).values + 1
    x0 = torch.where(cols, ar_w, big).min(dim=1).values
    x1 = torch.where(cols, ar_w, -1).max(dim=1).values + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    boxes[~rows.any(dim=1)] = 0
    return boxes


def _canvas(flat: List[Any]) -> tuple:
    for x in flat:
        if isinstance(x, (tv_tensors.Image, tv_tensors.Mask)) or (
                isinstance(x, torch.Tensor) and not isinstance(x, tv_tensors.TVTensor)
                and x.ndim >= 2):
            return tuple(x.shape[-2:])
    for x in flat:
        if isinstance(x, tv_tensors.BoundingBoxes):
            return tuple(x.canvas_size)
    raise TypeError("these transforms need an image, a mask or boxes in their input")


class RandomRot90(v2.Transform):
    """Rotate by a random multiple of 90 degrees (counter-clockwise k times, k in 0..3)."""

    def __init__(self, p: float = 1.0) -> None:
        super().__init__()
        self.p = p

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        k = int(torch.randint(0, 4, ()).item()) if torch.rand(()) < self.p else 0
        return {"k": k}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        k = params["k"]
        if k == 0:
            return inpt
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            fmt = inpt.format
            b = TF.convert_bounding_box_format(inpt, new_format=tv_tensors.BoundingBoxFormat.XYXY)
            b = b.as_subclass(torch.Tensor).clone()
            h, w = inpt.canvas_size
            for _ in range(k):  # one CCW turn: x' = y, y' = W - x; canvas (H, W) -> (W, H)
                x0, y0, x1, y1 = b.unbind(-1)
                b = torch.stack([y0, w - x1, y1, w - x0], dim=-1)
                h, w = w, h
            out = tv_tensors.BoundingBoxes(b, format=tv_tensors.BoundingBoxFormat.XYXY,
                                           canvas_size=(h, w))
            return TF.convert_bounding_box_format(out, new_format=fmt)
        if isinstance(inpt, torch.Tensor) and inpt.ndim >= 2:
            out = torch.rot90(inpt.as_subclass(torch.Tensor), k, dims=(-2, -1))
            return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out
        return inpt


class RandomScaleCrop(v2.Transform):
    """Scale jitter and a random ``size`` x ``size`` crop in one step: draw a scale ``s`` in
    ``scale_range``, cut a random window of ``size / s`` px (padding with ``fill`` where the
    image is smaller), then resize only that window to ``size``. Images are never resized
    whole; with ``scale_range == (1, 1)`` it is a plain random crop at native resolution."""

    def __init__(self, size: int, scale_range: Sequence[float] = (1.0, 1.0), fill: float = 0) -> None:
        super().__init__()
        self.size = int(size)
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale range must be 0 < lo <= hi, got {scale_range}")
        self.scale_range = (lo, hi)
        self.fill = fill

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = _canvas(flat_inputs)
        lo, hi = self.scale_range
        # log-uniform, so that 0.8 and 1.25 are equally likely
        s = math.exp(float(torch.empty(()).uniform_(math.log(lo), math.log(hi)))) if hi > lo else lo
        win = max(1, int(round(self.size / s)))
        top = int(torch.randint(0, h - win + 1, ()).item()) if h > win else -int(
            torch.randint(0, win - h + 1, ()).item())
        left = int(torch.randint(0, w - win + 1, ()).item()) if w > win else -int(
            torch.randint(0, win - w + 1, ()).item())
        return {"top": top, "left": left, "win": win}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or (inpt.ndim < 2 and not isinstance(
                inpt, tv_tensors.BoundingBoxes)):
            return inpt
        top, left, win = params["top"], params["left"], params["win"]
        out = TF.crop(inpt, top, left, win, win)  # pads with zeros outside the image
        if win != self.size:
            if isinstance(out, tv_tensors.Mask):
                out = TF.resize(out, [self.size, self.size],
                                interpolation=v2.InterpolationMode.NEAREST_EXACT)
            else:
                out = TF.resize(out, [self.size, self.size], antialias=True)
        return out


class ElasticGrid(v2.Transform):
    """Elastic deformation of the U-Net paper (Ronneberger et al., 2015): random displacement
    vectors on a coarse ``grid`` x ``grid`` lattice, drawn from a Gaussian with ``std`` px,
    upsampled to a per-pixel displacement field by bicubic interpolation. The image is warped
    bilinearly and masks with nearest neighbour; boxes are recomputed from the warped masks
    when the sample has masks (same N), otherwise (box-only data, e.g. mitosis points) each box
    is moved by the displacement at its centre and keeps its size.

    ``output(p) = input(p + d(p))`` with ``d`` the displacement field (px, x then y).
    """

    def __init__(self, grid: int = 3, std: float = 10.0, p: float = 1.0) -> None:
        super().__init__()
        if grid < 2:
            raise ValueError(f"ElasticGrid needs a grid of at least 2x2, got {grid}")
        self.grid, self.std, self.p = int(grid), float(std), float(p)

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        if torch.rand(()) >= self.p:
            return {"disp": None}
        h, w = _canvas(flat_inputs)
        coarse = torch.randn(1, 2, self.grid, self.grid) * self.std
        disp = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0]
        return {"disp": disp}  # (2, H, W): dx, dy in px

    @staticmethod
    def _sampling_grid(disp: torch.Tensor) -> torch.Tensor:
        _, h, w = disp.shape
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                                torch.arange(w, dtype=torch.float32), indexing="ij")
        sx = xs + disp[0]
        sy = ys + disp[1]
        # normalised to [-1, 1] for grid_sample with align_corners=True (pixel centres)
        gx = 2 * sx / max(w - 1, 1) - 1
        gy = 2 * sy / max(h - 1, 1) - 1
        return torch.stack([gx, gy], dim=-1)[None]

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        disp = params["disp"]
        if disp is None:
            return inpt
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            fmt = inpt.format
            b = TF.convert_bounding_box_format(inpt, new_format=tv_tensors.BoundingBoxFormat.XYXY)
            b = b.as_subclass(torch.Tensor).float().clone()
            h, w = inpt.canvas_size
            if len(b):
                cx = ((b[:, 0] + b[:, 2]) / 2).clamp(0, w - 1).round().long()
                cy = ((b[:, 1] + b[:, 3]) / 2).clamp(0, h - 1).round().long()
                # forward motion of a point is minus the backward-sampling displacement
                dx, dy = -disp[0, cy, cx], -disp[1, cy, cx]
                b = b + torch.stack([dx, dy, dx, dy], dim=1)
                b[:, 0::2] = b[:, 0::2].clamp(0, w)
                b[:, 1::2] = b[:, 1::2].clamp(0, h)
            out = tv_tensors.BoundingBoxes(b, format=tv_tensors.BoundingBoxFormat.XYXY,
                                           canvas_size=(h, w))
            return TF.convert_bounding_box_format(out, new_format=fmt)
        if not isinstance(inpt, torch.Tensor) or inpt.ndim < 2:
            return inpt
        x = inpt.as_subclass(torch.Tensor)
        grid = self._sampling_grid(disp)
        shape = x.shape
        flat = x.reshape(-1, shape[-2], shape[-1])
        if flat.shape[0] == 0:
            return inpt
        is_mask = isinstance(inpt, tv_tensors.Mask)
        src = flat[None].float()
        out = F.grid_sample(src, grid, mode="nearest" if is_mask else "bilinear",
                            padding_mode="zeros", align_corners=True)[0]
        if x.dtype == torch.uint8:
            out = out.round().clamp(0, 255)
        out = out.to(x.dtype).reshape(shape)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out

    def forward(self, *inputs: Any) -> Any:
        out = super().forward(*inputs)
        flat, spec = tree_flatten(out)
        masks = [i for i, x in enumerate(flat) if isinstance(x, tv_tensors.Mask) and x.ndim == 3]
        boxes = [i for i, x in enumerate(flat) if isinstance(x, tv_tensors.BoundingBoxes)]
        if len(masks) == 1 and len(boxes) == 1 and flat[masks[0]].shape[0] == flat[boxes[0]].shape[0]:
            b = flat[boxes[0]]
            new = masks_to_boxes_xyxy(flat[masks[0]])
            new = tv_tensors.BoundingBoxes(new, format=tv_tensors.BoundingBoxFormat.XYXY,
                                           canvas_size=b.canvas_size)
            flat[boxes[0]] = TF.convert_bounding_box_format(new, new_format=b.format)
            return tree_unflatten(flat, spec)
        return out


class HEDJitter(v2.Transform):
    """H&E stain jitter in optical-density space (Tellez et al., 2018): the image is separated
    into haematoxylin, eosin and DAB densities with ``skimage.color.rgb2hed``, each channel is
    scaled by ``U(1 - sigma, 1 + sigma)`` and shifted by ``U(-sigma, sigma)`` (times that
    channel's spread), then recombined with ``hed2rgb``. Acts on the image only."""

    def __init__(self, sigma: float = 0.05, p: float = 1.0) -> None:
        super().__init__()
        self.sigma, self.p = float(sigma), float(p)

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        if self.sigma <= 0 or torch.rand(()) >= self.p:
            return {"alpha": None}
        alpha = torch.empty(3).uniform_(1 - self.sigma, 1 + self.sigma)
        beta = torch.empty(3).uniform_(-self.sigma, self.sigma)
        return {"alpha": alpha.numpy(), "beta": beta.numpy()}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if params["alpha"] is None or isinstance(inpt, (tv_tensors.Mask, tv_tensors.BoundingBoxes)):
            return inpt
        if not isinstance(inpt, torch.Tensor) or inpt.ndim != 3 or inpt.shape[0] != 3:
            return inpt
        from skimage.color import hed2rgb, rgb2hed

        x = inpt.as_subclass(torch.Tensor)
        rgb = x.permute(1, 2, 0).numpy()
        rgb = rgb.astype(np.float32) / 255.0 if x.dtype == torch.uint8 else rgb.astype(np.float32)
        hed = rgb2hed(rgb)
        spread = hed.reshape(-1, 3).std(axis=0) + 1e-6
        hed = hed * params["alpha"] + params["beta"] * spread
        out = np.clip(hed2rgb(hed), 0, 1)
        t = torch.from_numpy(out).permute(2, 0, 1).contiguous()
        t = (t * 255).round().to(torch.uint8) if x.dtype == torch.uint8 else t.to(x.dtype)
        return tv_tensors.wrap(t, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else t


def build_train_transforms(cfg: Any, crop: bool = True) -> v2.Compose:
    """The training augmentation of ``cfg.INPUT``: scale jitter + crop to ``INPUT.CROP_SIZE``
    (unless ``crop`` is False: the patch classifier cuts its own patches), flips, 90-degree
    rotations, elastic deformation, colour and stain jitter. Inputs are uint8 images; the
    dataset converts to float afterwards."""
    aug = cfg.INPUT.AUG
    ts: List[v2.Transform] = []
    lo, hi = (float(aug.SCALE_RANGE[0]), float(aug.SCALE_RANGE[1]))
    if crop and cfg.INPUT.CROP_SIZE and cfg.INPUT.CROP_SIZE > 0:
        # the model applies INPUT.SCALE itself, so crops are cut at native resolution
        ts.append(RandomScaleCrop(int(cfg.INPUT.CROP_SIZE), (lo, hi)))
    if aug.FLIP:
        ts += [v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5)]
    if aug.ROT90:
        ts.append(RandomRot90())
    if aug.ELASTIC_PROB > 0:
        ts.append(ElasticGrid(int(aug.ELASTIC_GRID), float(aug.ELASTIC_STD), float(aug.ELASTIC_PROB)))
    cj = [float(v) for v in aug.COLOR_JITTER]
    if any(v > 0 for v in cj):
        if len(cj) != 4:
            raise ValueError("INPUT.AUG.COLOR_JITTER needs 4 numbers: brightness, contrast, "
                             f"saturation, hue; got {cj}")
        ts.append(v2.ColorJitter(*cj))
    if aug.STAIN_JITTER > 0:
        ts.append(HEDJitter(float(aug.STAIN_JITTER)))
    return v2.Compose(ts)
