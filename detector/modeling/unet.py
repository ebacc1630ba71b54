"""The U-Net of Ronneberger, Fischer and Brox (MICCAI 2015), as the paper builds it.

- Contracting path: per level two unpadded ("valid") 3x3 convolutions + ReLU, then 2x2 max
  pooling (stride 2); channels double at every level from ``MODEL.UNET.BASE_CHANNELS`` (64).
- Expansive path: 2x2 up-convolution (transposed, stride 2) halving the channels, concatenation
  with the centre-cropped encoder map of that level, two valid 3x3 convolutions + ReLU.
- 1x1 output convolution to 3 classes (background, nucleus interior, nucleus boundary).
- ``MODEL.UNET.DEPTH`` levels (the paper: 5, i.e. 4 poolings); weights drawn from a normal
  distribution with std sqrt(2/N), N = fan-in (kernel area x input channels), biases 0.
- ``MODEL.UNET.PADDING: same`` is a modern variant beside it (padded convolutions with batch
  normalisation, output as large as the input); ``valid`` (the paper) is the default.

**Geometry** (valid convolutions). With D levels, an input of side ``i`` gives an output of side
``o = i - border(D)``, ``border(D) = 4 (2^D - 1) + 4 (2^(D-1) - 1)`` (184 for D = 5: 572 -> 388).
Only some sizes are valid: every 2x2 pooling must see an even size, which holds exactly for
``o = 2^(D-1) (b - 4) + 4`` with an integer bottom-level size ``b >= 4``
(:func:`valid_output_size` picks the smallest valid output >= a wanted size).

**Overlap-tile prediction** (:meth:`UNetModel.predict_probabilities`): the image is mirrored at
its edges by the border (missing context is mirrored, as in the paper's Fig. 2) and cut into
tiles whose outputs tile the image. Max pooling makes the network equivariant only to shifts
that are multiples of ``2^(D-1)``, so tiles are placed at a stride ``s`` that is such a
multiple (``MODEL.UNET.TILE_SIZE`` rounded), each tile's input is ``s + 4 + border`` px (a
valid size) and the first ``s`` output px of each tile are kept: the tiled prediction then
equals the prediction of the whole image in one piece up to floating-point noise.

**On slides** (:meth:`UNetModel.predict_slide_tiles`) the slide runner reads each tile with
:attr:`UNetModel.slide_context` px of the *real* neighbouring pixels (mirrored only beyond the
slide's edge, at the same positions as in one-piece prediction), and the prediction windows are
aligned to the slide's pooling grid: probabilities equal those of the whole slide in one piece.
Each tile keeps the instances whose seed's centroid lies in its core (the tiles' cores
partition the slide), so every nucleus is found once, as in one piece.

Instances come from the 3-class probabilities by the watershed of
:mod:`detector.modeling.watershed`; each instance's score is the mean interior probability
over its seed (see there). A 3-class U-Net separates nuclei from background and has no class
head: :func:`build_unet` accepts training data with exactly one category, and every instance
gets that category's id.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.unet_targets import UNetTargets
from ..structures.instances import Instances
from .modality import normalise_modality
from .watershed import instances_from_probabilities

NUM_UNET_CLASSES = 3  # background, nucleus interior, nucleus boundary


# ------------------------------------------------------------------------------- geometry
def unet_border(depth: int, padding: str = "valid") -> int:
    """Input side minus output side (px) of a U-Net with ``depth`` levels (0 for ``same``)."""
    if padding == "same":
        return 0
    return 4 * (2**depth - 1) + 4 * (2 ** (depth - 1) - 1)


def valid_output_size(wanted: int, depth: int) -> int:
    """Smallest output side >= ``wanted`` (and >= 4) reachable by a valid U-Net of ``depth``
    levels: ``2^(D-1) (b - 4) + 4`` for an integer bottom size ``b >= 4``."""
    f = 2 ** (depth - 1)
    k = max(0, math.ceil((int(wanted) - 4) / f))
    return f * k + 4


def valid_input_size(wanted_output: int, depth: int) -> Tuple[int, int]:
    """``(input side, output side)`` for the smallest valid output >= ``wanted_output``."""
    out = valid_output_size(wanted_output, depth)
    return out + unet_border(depth), out


def is_valid_input_size(size: int, depth: int) -> bool:
    """Whether a valid U-Net accepts an input side of ``size`` (every pooling sees an even
    size and every map stays >= 1 px)."""
    out = size - unet_border(depth)
    return out >= 4 and (out - 4) % (2 ** (depth - 1)) == 0


def mirror_indices(n: int, start: int, stop: int) -> np.ndarray:
    """Indices into ``range(n)`` of positions ``start..stop-1`` of the image mirrored without
    repeating the edge pixel (numpy's ``reflect``), repeated as often as needed; the index of
    a position does not depend on how much padding is asked for (tiles and the whole image
    see the same mirrored context)."""
    pos = np.arange(start, stop, dtype=np.int64)
    if n == 1:
        return np.zeros_like(pos)
    period = 2 * (n - 1)
    p = np.mod(pos, period)
    return np.where(p >= n, period - p, p)


def mirror_pad(x: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """Mirror-pad the last two dims of ``x`` (``(..., H, W)``) by any amounts (repeated
    reflection when the padding exceeds the image; ``F.pad`` allows less than one side)."""
    h, w = x.shape[-2], x.shape[-1]
    iy = torch.from_numpy(mirror_indices(h, -top, h + bottom)).to(x.device)
    ix = torch.from_numpy(mirror_indices(w, -left, w + right)).to(x.device)
    return x.index_select(-2, iy).index_select(-1, ix)


def _center_crop(x: Tensor, h: int, w: int) -> Tensor:
    dy = (x.shape[-2] - h) // 2
    dx = (x.shape[-1] - w) // 2
    return x[..., dy:dy + h, dx:dx + w]


# -------------------------------------------------------------------------------- network
class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, padding: str):
        pad = 1 if padding == "same" else 0
        layers: List[nn.Module] = []
        for c in (cin, cout):
            layers.append(nn.Conv2d(c, cout, 3, padding=pad, bias=padding != "same"))
            if padding == "same":
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UNet(nn.Module):
    """The bare network: ``(B, C_in, H_in, W_in)`` normalised images -> ``(B, num_classes,
    H_out, W_out)`` logits, ``H_out = H_in - border`` (valid) or ``H_in`` (same). In valid mode
    ``H_in`` must be a valid size (:func:`is_valid_input_size`); in same mode a multiple of
    ``2^(depth-1)``."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = NUM_UNET_CLASSES,
        depth: int = 5,
        base_channels: int = 64,
        padding: str = "valid",
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"U-Net depth must be >= 1, got {depth}")
        if base_channels < 1:
            raise ValueError(f"U-Net base channels must be >= 1, got {base_channels}")
        if padding not in ("valid", "same"):
            raise ValueError(f"U-Net padding must be 'valid' or 'same', got {padding!r}")
        self.depth = depth
        self.padding = padding
        chans = [base_channels * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.down.append(_DoubleConv(cin, c, padding))
            cin = c
        self.upconv = nn.ModuleList()
        self.up = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.upconv.append(nn.ConvTranspose2d(c * 2, c, 2, stride=2))
            self.up.append(_DoubleConv(c * 2, c, padding))
        self.head = nn.Conv2d(chans[0], num_classes, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: normal with std sqrt(2 / N), N = fan-in; zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                # fan-in of a transposed conv is in_channels * k * k as well: weight is
                # (in, out, k, k), so compute it explicitly instead of torch's fan_in (dim 1)
                k = m.kernel_size[0] * m.kernel_size[1]
                n = (m.in_channels // m.groups) * k
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        skips: List[Tensor] = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth - 1:
                skips.append(x)
                if x.shape[-2] % 2 or x.shape[-1] % 2:
                    raise ValueError(
                        f"U-Net: a 2x2 pooling at level {i} sees an odd size "
                        f"{tuple(x.shape[-2:])}; use valid_input_size() for the input size"
                    )
                x = F.max_pool2d(x, 2)
        for upconv, block, skip in zip(self.upconv, self.up, reversed(skips)):
            x = upconv(x)
            x = torch.cat([_center_crop(skip, x.shape[-2], x.shape[-1]), x], dim=1)
            x = block(x)
        return self.head(x)


# -------------------------------------------------------------------------- full model
class UNetModel(nn.Module):
    """U-Net with the project's model interface (see DESIGN.md / ``build_model``).

    ``forward(images, targets=None)``: ``images`` is a list of ``Tensor[3, H, W]`` float in
    0..1. In training mode all images share one size (the dataset's crops) and every target
    holds ``"unet_target"`` int64 ``(H, W)`` and ``"unet_weight"`` float32 ``(H, W)``
    (from :class:`detector.data.unet_targets.UNetTargets`; computed here from ``"masks"`` when
    absent); returns ``{"loss_unet": weighted pixel-wise cross-entropy}``, the mean over
    pixels of ``w(x) * -log p_{l(x)}(x)`` (the paper's energy, eq. 1, per pixel). In eval mode
    returns one :class:`Instances` per image (any size; overlap-tile prediction + watershed).
    ``INPUT.SCALE`` != 1 resizes images (and, in training, the target maps, nearest) inside
    the model; predicted probabilities are resized back to the image's size.
    """

    def __init__(self, cfg: Any, classes: Sequence[Dict[str, Any]]):
        super().__init__()
        u = cfg.MODEL.UNET
        self.depth = int(u.DEPTH)
        self.padding = str(u.PADDING)
        self.net = UNet(3, NUM_UNET_CLASSES, self.depth, int(u.BASE_CHANNELS), self.padding)
        self.register_buffer("pixel_mean", torch.tensor(list(cfg.MODEL.PIXEL_MEAN)).view(3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(list(cfg.MODEL.PIXEL_STD)).view(3, 1, 1),
                             persistent=False)
        self.classes = [dict(c) for c in classes]
        self.category_id = int(self.classes[0]["id"])
        self.tile_size = int(u.TILE_SIZE)
        self.seed_thresh = float(u.SEED_THRESH)
        self.fg_thresh = float(u.FOREGROUND_THRESH)
        self.min_size = int(u.MIN_SIZE)
        self.smooth_sigma = float(u.SMOOTH_SIGMA)
        self.tile_batch = 4
        # INPUT.SCALE: images are resized by this factor inside the model (as for R-CNN)
        self.scale = float(cfg.INPUT.SCALE)
        # INPUT.NUCLEUS_DIAMETER: the size normalisation of detector/inference/size.py
        self.nucleus_diameter = float(cfg.INPUT.NUCLEUS_DIAMETER)
        self.invert_bright = bool(cfg.INPUT.INVERT_BRIGHT_BACKGROUND)
        self.grey = bool(cfg.INPUT.GREY)
        self.grey_fluorescence = bool(cfg.INPUT.GREY_FLUORESCENCE)
        if self.scale <= 0:
            raise ValueError(f"INPUT.SCALE must be > 0, got {cfg.INPUT.SCALE}")
        self.targets_fn = UNetTargets(cfg)

    # ---------------------------------------------------------------- geometry helpers
    @property
    def border(self) -> int:
        return unet_border(self.depth, self.padding)

    def _normalize(self, image: Tensor) -> Tensor:
        dtype = self.net.head.weight.dtype
        device = self.net.head.weight.device
        image = image.to(device=device, dtype=dtype)
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"U-Net expects images of shape (3, H, W), got {tuple(image.shape)}")
        image = normalise_modality(image, self.invert_bright, self.grey, self.grey_fluorescence)
        mean = self.pixel_mean.to(dtype)
        std = self.pixel_std.to(dtype)
        return (image - mean) / std

    def _pad_for_output(self, x: Tensor, h: int, w: int) -> Tensor:
        """Mirror-pad ``(..., h, w)`` so that the network's output covers it from (0, 0)."""
        if self.padding == "same":
            f = 2 ** (self.depth - 1)
            return mirror_pad(x, 0, -h % f, 0, -w % f)
        lo = self.border // 2
        oh = valid_output_size(h, self.depth)
        ow = valid_output_size(w, self.depth)
        return mirror_pad(x, lo, oh + self.border - lo - h, lo, ow + self.border - lo - w)

    def _tile_geometry(self, tile_size: int) -> Tuple[int, int, int]:
        """``(stride, context_before, context_after)``: tiles advance by ``stride`` output px;
        a tile's input spans ``context_before`` px before and ``context_after`` px after its
        ``stride`` kept px; its output starts at the kept px (valid) or ``context_before``
        px before them (same)."""
        f = 2 ** (self.depth - 1)
        stride = f * max(1, int(round(tile_size / f)))
        if self.padding == "same":
            # padded convs: no exact identity; give each tile a receptive-field margin
            m = f * math.ceil(unet_border(self.depth) / 2 / f)
            return stride, m, m
        lo = self.border // 2
        return stride, lo, 4 + self.border - lo

    # -------------------------------------------------------------------- prediction
    @torch.no_grad()
    def predict_probabilities(self, image: Tensor, tile_size: Optional[int] = None) -> Tensor:
        """Overlap-tile prediction of an image of any size.

        Args:
            image: ``Tensor[3, H, W]`` float RGB in 0..1 (any device; moved to the model's).
            tile_size: output px per tile (rounded to a multiple of ``2^(depth-1)``);
                default ``MODEL.UNET.TILE_SIZE``.

        Returns:
            ``Tensor[3, H, W]`` float32 softmax probabilities (background, interior,
            boundary) on the model's device.
        """
        x = self._normalize(image)
        if self.scale != 1.0:
            size = image.shape[-2:]
            x = F.interpolate(x[None], scale_factor=self.scale, mode="bilinear",
                              align_corners=False)[0]
            probs = self._predict_tiles(x, tile_size)
            return F.interpolate(probs[None], size=size, mode="bilinear",
                                 align_corners=False)[0]
        return self._predict_tiles(x, tile_size)

    def _tile_starts(self, length: int, stride: int) -> Tuple[List[int], int]:
        """Output offsets of the prediction tiles along an axis of ``length`` px, and the stride
        actually used: regular steps of ``stride`` (a multiple of ``2^(depth-1)``), the last
        one moved back so that the tiles end less than ``2^(depth-1)`` px after ``length``
        (every offset stays a multiple of ``2^(depth-1)``, so the output does not change);
        an axis shorter than a tile gets one tile just long enough."""
        f = 2 ** (self.depth - 1)
        if length <= stride:
            return [0], max(f, f * math.ceil(length / f))
        starts = list(range(0, length - stride, stride))
        last = f * math.ceil((length - stride) / f)
        starts = sorted({min(s, last) for s in starts} | {last})
        return starts, stride

    def _predict_tiles(self, x: Tensor, tile_size: Optional[int]) -> Tensor:
        """Overlap-tile prediction of a normalised ``(3, H, W)`` image -> ``(3, H, W)``: the
        image mirrored at its edges (missing context is mirrored, as in the paper)."""
        h, w = x.shape[-2:]
        before, after_h, after_w = self._context_needed(h, w, tile_size)
        padded = mirror_pad(x, before, after_h, before, after_w)
        return self._predict_window(padded, before, before, h, w, tile_size)

    def _context_needed(self, h: int, w: int, tile_size: Optional[int]) -> Tuple[int, int, int]:
        """``(before, after_h, after_w)``: input px the overlap-tile prediction of an
        ``h`` x ``w`` output needs before its first and after its last row / column."""
        stride, before, after = self._tile_geometry(tile_size or self.tile_size)
        ends = []
        for n in (h, w):
            starts, s = self._tile_starts(n, stride)
            ends.append(starts[-1] + s + after - n)
        return before, ends[0], ends[1]

    def _predict_window(self, xp: Tensor, top: int, left: int, h: int, w: int,
                        tile_size: Optional[int]) -> Tensor:
        """Probabilities ``(3, h, w)`` of the output window whose first pixel is input pixel
        ``(top, left)`` of the normalised input ``xp``; ``xp`` holds at least the context of
        :meth:`_context_needed` around the window (real neighbouring pixels or mirrored).
        The output equals that of the whole image when the window starts at a multiple of
        ``2^(depth-1)`` px of it (max pooling is equivariant only to such shifts)."""
        stride, before, after = self._tile_geometry(tile_size or self.tile_size)
        ys, sy = self._tile_starts(h, stride)
        xs, sx = self._tile_starts(w, stride)
        keep0 = before if self.padding == "same" else 0
        out = xp.new_zeros((NUM_UNET_CLASSES, ys[-1] + sy, xs[-1] + sx), dtype=torch.float32)
        corners = [(y, x0) for y in ys for x0 in xs]
        for k in range(0, len(corners), self.tile_batch):
            batch = corners[k:k + self.tile_batch]
            tiles = torch.stack([
                xp[:, top - before + y:top - before + y + sy + before + after,
                   left - before + x0:left - before + x0 + sx + before + after]
                for y, x0 in batch])
            probs = torch.softmax(self.net(tiles), dim=1)
            for (y, x0), p in zip(batch, probs):
                out[:, y:y + sy, x0:x0 + sx] = p[:, keep0:keep0 + sy, keep0:keep0 + sx].float()
        return out[:, :h, :w]

    # ------------------------------------------------------------- seamless slide tiles
    @property
    def slide_context(self) -> int:
        """Px of real image the slide runner reads around each tile (mirrored only at the
        slide's edge), so that tiled prediction equals one-piece prediction: the network's
        context plus up to ``2^(depth-1) - 1`` px to align the tile with the pooling grid.
        0 when ``INPUT.SCALE`` != 1 (the in-model resize breaks the alignment; such tiles are
        predicted on their own, mirrored at their border)."""
        if self.scale != 1.0:
            return 0
        f = 2 ** (self.depth - 1)
        stride, before, after = self._tile_geometry(self.tile_size)
        return max(before, after) + f - 1

    @torch.no_grad()
    def predict_tile_probabilities(self, image: Tensor, origin: Tuple[int, int],
                                   context: int) -> Tensor:
        """Probabilities of one slide tile read with ``context`` px of its surroundings.

        Args:
            image: ``Tensor[3, h + 2 context, w + 2 context]`` float RGB 0..1: the tile and
                ``context`` px of real neighbouring pixels on every side (mirrored beyond the
                slide's edge, position-stable: :func:`mirror_indices` of the whole slide).
            origin: ``(x0, y0)`` of the tile in px of the analysed image (the slide at the
                model's mpp); the pooling grid is aligned to that image's origin.
            context: ``>= slide_context``.

        Returns:
            ``Tensor[3, h, w]`` float32 probabilities, equal (up to float noise) to those of
            the whole image predicted in one piece at the tile's pixels.
        """
        if context < self.slide_context or self.slide_context == 0:
            raise ValueError(f"tile context {context} px < the U-Net's {self.slide_context} px")
        x = self._normalize(image)
        h, w = x.shape[-2] - 2 * context, x.shape[-1] - 2 * context
        f = 2 ** (self.depth - 1)
        dx, dy = int(origin[0]) % f, int(origin[1]) % f  # window starts on the pooling grid
        probs = self._predict_window(x, context - dy, context - dx, h + dy, w + dx, None)
        return probs[:, dy:, dx:]

    def predict_slide_tiles(self, images: Sequence[Tensor], origins: Sequence[Tuple[int, int]],
                            cores: Sequence[Tuple[int, int, int, int]], context: int
                            ) -> List[Instances]:
        """Instances of slide tiles read with context (see :meth:`predict_tile_probabilities`),
        in tile px: the watershed runs over the whole tile, and a tile keeps the instances
        whose seed's centroid lies in its ``core`` (``(x0, y0, x1, y1)`` tile px; the cores of
        a slide's tiles partition it, :func:`detector.inference.tiling.tile_cores`). An
        instance is then found once, by the tile that owns its seed, and is the same as in
        one-piece prediction when the tiles overlap by more than twice the largest nucleus
        (the margin the watershed of the owning tile sees around it)."""
        out = []
        for image, origin, core in zip(images, origins, cores):
            probs = self.predict_tile_probabilities(image, origin, context).cpu().numpy()
            out.append(instances_from_probabilities(
                probs, self.category_id, self.seed_thresh, self.fg_thresh, self.min_size,
                self.smooth_sigma, core=core))
        return out

    def instances_from_probabilities(self, probs: np.ndarray,
                                     core: Optional[Tuple[int, int, int, int]] = None
                                     ) -> Instances:
        """:class:`Instances` of a ``(3, H, W)`` probability map with this model's watershed
        parameters (``MODEL.UNET.*``) and category; ``core`` as for
        :func:`detector.modeling.watershed.instances_from_probabilities`. Test-time
        augmentation averages the maps of several views and calls this once."""
        return instances_from_probabilities(probs, self.category_id, self.seed_thresh,
                                            self.fg_thresh, self.min_size, self.smooth_sigma,
                                            core=core)

    def predict_instances(self, image: Tensor, tile_size: Optional[int] = None) -> Instances:
        """:class:`Instances` of one image (RLE masks, XYXY boxes in its px, scores = mean
        interior probability over each instance's seed, labels = the category id)."""
        probs = self.predict_probabilities(image, tile_size).cpu().numpy()
        return instances_from_probabilities(
            probs, self.category_id, self.seed_thresh, self.fg_thresh, self.min_size,
            self.smooth_sigma,
        )

    # ----------------------------------------------------------------------- forward
    def forward(
        self, images: List[Tensor], targets: Optional[List[Dict[str, Any]]] = None
    ) -> Any:
        if not self.training:
            return [self.predict_instances(img) for img in images]
        if targets is None or len(targets) != len(images):
            raise ValueError("U-Net training needs one target dict per image")
        sizes = {tuple(img.shape[-2:]) for img in images}
        if len(sizes) != 1:
            raise ValueError(f"U-Net training images must share one size (crops), got {sizes}")
        h, w = sizes.pop()
        x = torch.stack([self._normalize(img) for img in images])
        cls, wts = [], []
        for img, t in zip(images, targets):
            if "unet_target" not in t or "unet_weight" not in t:
                t = self.targets_fn(img, t)
            cls.append(torch.as_tensor(t["unet_target"]))
            wts.append(torch.as_tensor(t["unet_weight"]))
        target = torch.stack(cls).to(x.device, torch.int64)
        weight = torch.stack(wts).to(x.device, torch.float32)
        if target.shape[-2:] != (h, w):
            raise ValueError(
                f"U-Net target maps are {tuple(target.shape[-2:])} but images are {(h, w)}"
            )
        if self.scale != 1.0:
            x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
            h, w = x.shape[-2:]
            target = F.interpolate(target[:, None].float(), size=(h, w), mode="nearest")[:, 0]
            target = target.long()
            weight = F.interpolate(weight[:, None], size=(h, w), mode="nearest")[:, 0]
        logits = self.net(self._pad_for_output(x, h, w))[..., :h, :w]
        ce = F.cross_entropy(logits.float(), target, reduction="none")
        return {"loss_unet": (ce * weight).mean()}


def build_unet(cfg: Any, classes: Sequence[Dict[str, Any]]) -> UNetModel:
    """The U-Net of ``cfg.MODEL.UNET`` for training data with the COCO categories ``classes``
    (sorted by id). A 3-class U-Net (background / interior / boundary) is single-class: more
    than one category is an error (convert the data with one nucleus category)."""
    classes = list(classes)
    if len(classes) != 1:
        names = [c.get("name") for c in classes]
        raise ValueError(
            f"MODEL.META_ARCHITECTURE UNet predicts one foreground class (nucleus interior and "
            f"boundary) but the training data has {len(classes)} categories {names}; convert "
            f"the annotations with a single category, or use MaskRCNN for several classes"
        )
    if int(cfg.MODEL.NUM_CLASSES) not in (0, 1):
        raise ValueError(
            f"MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES}, but a U-Net has one foreground "
            f"class; set it to 0 (from the data) or 1"
        )
    return UNetModel(cfg, classes)
