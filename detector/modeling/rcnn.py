"""Mask R-CNN and Faster R-CNN (torchvision) configured for cells, returning :class:`Instances`.

The detectors are torchvision's ``MaskRCNN`` / ``FasterRCNN`` with the "v2" heads of
``maskrcnn_resnet50_fpn_v2`` (Li et al., "Benchmarking Detection Transfer Learning with
Vision Transformers", 2021): a ResNet-18/34/50 FPN backbone, an RPN head with two 3x3
convolutions, a box head of normalised convolutions + one FC layer and a normalised mask head.
With ``MODEL.BACKBONE.NAME resnet50``, ``NORM FrozenBN`` and 256 channels the state dict keys
and shapes are those of torchvision's COCO-pretrained v2 models (class heads aside).

Differences from torchvision's defaults, for nuclei (5 to 60 px, hundreds per field):
anchors, RPN top-k and detections per image come from the config, and images are used at
native resolution (times ``INPUT.SCALE``) instead of being resized to 800 px.
"""
from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, expand_boxes, expand_masks
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from ..structures.instances import Instances
from ..structures.masks import CropMask, masks_from_crops
from .layers import GroupNorm
from .modality import normalise_modality


def norm_layers(norm: str, channels: int = 256) -> Tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
    """``(backbone_norm, head_norm)`` layer factories for ``MODEL.BACKBONE.NORM``.

    "GN" puts GroupNorm(32) everywhere (batch-independent; training from scratch, He et al.
    2019). "FrozenBN" freezes the backbone's BN (fine-tuning) and, like torchvision's v2
    models, uses BatchNorm in FPN/heads. "BN"/"SyncBN" use BatchNorm (SyncBN is converted
    with ``nn.SyncBatchNorm.convert_sync_batchnorm`` when training on several processes).
    """
    if norm == "GN":
        gn = functools.partial(GroupNorm, 32)
        return gn, gn
    if norm == "FrozenBN":
        return misc_nn_ops.FrozenBatchNorm2d, nn.BatchNorm2d
    if norm in ("BN", "SyncBN"):
        return nn.BatchNorm2d, nn.BatchNorm2d
    raise ValueError(f"MODEL.BACKBONE.NORM must be FrozenBN, BN, SyncBN or GN, got {norm!r}")


class NativeResolutionTransform(GeneralizedRCNNTransform):
    """torchvision's batching/normalising transform without the resize to 800 px: every image
    is scaled by the fixed factor ``scale`` (1.0 = native resolution), and predictions are
    mapped back to the input image's pixels by the parent's ``postprocess``."""

    def __init__(self, scale: float, image_mean: List[float], image_std: List[float],
                 size_divisible: int = 32, invert_bright: bool = False, grey: bool = False,
                 grey_fluorescence: bool = False) -> None:
        super().__init__(min_size=1, max_size=1, image_mean=image_mean, image_std=image_std,
                         size_divisible=size_divisible)
        self.scale = float(scale)
        self.invert_bright = bool(invert_bright)
        self.grey = bool(grey)
        self.grey_fluorescence = bool(grey_fluorescence)

    def normalize(self, image: Tensor) -> Tensor:
        # INPUT.GREY, INPUT.GREY_FLUORESCENCE, INPUT.INVERT_BRIGHT_BACKGROUND: one appearance
        # for all modalities
        image = normalise_modality(image, self.invert_bright, self.grey, self.grey_fluorescence)
        return super().normalize(image)

    def resize(self, image: Tensor, target: Optional[Dict[str, Tensor]] = None
               ) -> Tuple[Tensor, Optional[Dict[str, Tensor]]]:
        if self.scale == 1.0:
            return image, target
        h, w = image.shape[-2:]
        image = F.interpolate(image[None], scale_factor=self.scale, mode="bilinear",
                              align_corners=False, recompute_scale_factor=True)[0]
        if target is None:
            return image, target
        nh, nw = image.shape[-2:]
        target = dict(target)
        if "boxes" in target:
            ratio = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=target["boxes"].dtype,
                                 device=target["boxes"].device)
            target["boxes"] = target["boxes"] * ratio
        if "masks" in target and target["masks"].numel():
            target["masks"] = F.interpolate(target["masks"][:, None].float(), size=(nh, nw),
                                            mode="nearest")[:, 0].byte()
        elif "masks" in target:
            target["masks"] = target["masks"].new_zeros((0, nh, nw))
        return image, target

    def postprocess(self, result: List[Dict[str, Tensor]], image_shapes: List[Tuple[int, int]],
                    original_image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """Boxes back to the input image's pixels; Mask R-CNN's ``(N, 1, M, M)`` mask
        probabilities are left as they are (pasted into their boxes only, by
        :func:`paste_masks_in_boxes`, never into image-sized rasters)."""
        if self.training:
            return result
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], im_s, o_im_s)
        return result


def paste_masks_in_boxes(probs: Tensor, boxes: Tensor, image_size: Tuple[int, int],
                         threshold: float = 0.5, chunk_px: int = 1 << 22) -> List[CropMask]:
    """Mask R-CNN's ``(N, 1, M, M)`` mask probabilities as masks of an ``image_size`` image:
    torchvision's ``paste_masks_in_image`` (expand by one mask pixel, bilinear resize to the
    integer box, ``align_corners=False``) but each resized only to its box, then thresholded
    (``> threshold``).

    The resizes are batched (a per-mask ``interpolate`` and device-to-host copy made the paste
    the slowest host step of a GPU slide run): masks whose boxes have the same longer side in
    16-px steps go together, each resized as ``Ry @ P @ Rx^T`` with bilinear weight matrices
    padded to the group's largest box, in float32 on the model's device (autocast off), and
    come to the host in one copy per group of at most ``chunk_px`` pixels;
    :func:`masks_from_crops` makes the CropMasks."""
    n = len(probs)
    if n == 0:
        return []
    probs, scale = expand_masks(probs, padding=1)
    boxes = expand_boxes(boxes, scale).to(dtype=torch.int64)
    wh = (boxes[:, 2:] - boxes[:, :2] + 1).clamp(min=1)
    dev = probs.device
    with torch.autocast(dev.type, enabled=False):
        p = probs[:, 0].float()
        wh_c, xy_c = wh.cpu().numpy(), boxes[:, :2].cpu().numpy()
        size_class = -(-wh_c.max(1) // 16)  # boxes in 16-px steps of their longer side
        order = np.argsort(size_class, kind="stable")
        cls_sorted = size_class[order]
        bounds = np.flatnonzero(np.diff(cls_sorted)) + 1
        groups = []  # [i, j) of ``order``: one size class, <= chunk_px padded pixels
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, n]):
            cap = max(1, chunk_px // (16 * int(cls_sorted[a])) ** 2)
            groups += [(i, min(i + cap, b)) for i in range(int(a), int(b), cap)]
        in_order: List[CropMask] = []  # the masks in the order of ``order``
        for i, j in groups:
            idx = order[i:j]
            sel = torch.as_tensor(idx, device=dev)
            w, h = wh_c[idx, 0], wh_c[idx, 1]
            ry = _bilinear_weights(wh[sel, 1], int(h.max()), p.shape[1])
            rx = _bilinear_weights(wh[sel, 0], int(w.max()), p.shape[2])
            crops = torch.bmm(torch.bmm(ry, p[sel]), rx.transpose(1, 2)) > threshold
            in_order += masks_from_crops(crops.cpu().numpy(), h, w, xy_c[idx, 0], xy_c[idx, 1],
                                         image_size)
    return [in_order[k] for k in np.argsort(order)]


def _bilinear_weights(out_len: Tensor, length: int, n_in: int) -> Tensor:
    """``(N, length, n_in)`` float32 matrices that resize ``n_in`` samples to ``out_len[i]``
    as ``F.interpolate(mode="bilinear", align_corners=False)`` does (source ``(d + 0.5) *
    n_in / out - 0.5`` clamped at 0, the two neighbours weighted linearly); rows past
    ``out_len[i]`` are zero."""
    d = torch.arange(length, device=out_len.device, dtype=torch.float32)
    scale = float(n_in) / out_len.to(torch.float32)
    src = ((d[None] + 0.5) * scale[:, None] - 0.5).clamp(min=0)
    i0 = src.to(torch.int64).clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    l1 = src - i0.to(torch.float32)
    valid = (d[None] < out_len[:, None]).to(torch.float32)
    w = torch.zeros(len(out_len), length, n_in, device=out_len.device, dtype=torch.float32)
    w.scatter_add_(2, i0[..., None], ((1.0 - l1) * valid)[..., None])
    w.scatter_add_(2, i1[..., None], (l1 * valid)[..., None])
    return w


def _resnet_backbone(cfg: Any) -> nn.Module:
    name = cfg.MODEL.BACKBONE.NAME
    body_norm, head_norm = norm_layers(cfg.MODEL.BACKBONE.NORM)
    resnet = torchvision.models.resnet.__dict__[name](weights=None, norm_layer=body_norm)
    trainable = int(cfg.MODEL.BACKBONE.TRAINABLE_LAYERS)
    if not 0 <= trainable <= 5:
        raise ValueError(f"MODEL.BACKBONE.TRAINABLE_LAYERS must be 0..5, got {trainable}")
    backbone = _resnet_fpn_extractor(resnet, trainable, norm_layer=head_norm)
    out = int(cfg.MODEL.BACKBONE.OUT_CHANNELS)
    if out != backbone.out_channels:
        # torchvision fixes the FPN width at 256; narrower FPNs make small CPU models
        fpn = backbone.fpn
        in_channels = [blk[0].in_channels for blk in fpn.inner_blocks]
        backbone.fpn = FeaturePyramidNetwork(in_channels, out, extra_blocks=LastLevelMaxPool(),
                                             norm_layer=head_norm)
        backbone.out_channels = out
    return backbone


class ParallelRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign``, its boxes split over threads on a CPU:
    torchvision's CPU RoIAlign, forward and backward, runs on one core (0.04 s for 1,000 boxes
    on 64 channels here with 1 or 2 torch threads; in CPU training its backward was 15 % of a
    step). Each box's output depends on that box alone, so contiguous parts of the boxes pooled
    in parallel threads give the same tensor, bit for bit (1.6-1.9x on 2 cores). In training
    the parts' gradients are computed in parallel threads too and summed (the same up to the
    order of float additions). CUDA, a single torch thread, few boxes or ``fast = False``
    (what a plain torchvision model does, for baselines) run the original forward."""

    min_boxes_per_thread = 32

    def __init__(self, featmap_names: List[str], output_size: int, sampling_ratio: int) -> None:
        super().__init__(featmap_names, output_size, sampling_ratio)
        self.fast = True

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor],
                image_shapes: List[Tuple[int, int]]) -> Tensor:
        sizes = [int(b.shape[0]) for b in boxes]
        total = sum(sizes)
        threads = min(torch.get_num_threads(), total // self.min_boxes_per_thread)
        dev = next(iter(x.values())).device if x else torch.device("cpu")
        if (not self.fast or threads < 2 or dev.type != "cpu"
                or self.scales is None):  # the first call sets the level scales, in this thread
            return super().forward(x, boxes, image_shapes)
        # contiguous ranges of the boxes in their concatenated order (image after image), so
        # that the parts' outputs concatenate into the original order
        bounds = np.linspace(0, total, threads + 1).round().astype(np.int64)
        starts = np.cumsum([0] + sizes[:-1])
        parts = [[b.detach()[int(np.clip(a - o, 0, n)):int(np.clip(e - o, 0, n))]
                  for b, o, n in zip(boxes, starts, sizes)]
                 for a, e in zip(bounds[:-1], bounds[1:])]
        names = list(x.keys())
        if torch.is_grad_enabled() and any(v.requires_grad for v in x.values()):
            return _RoIAlignParts.apply(self, parts, image_shapes, names, *x.values())
        return torch.cat(_pool_parts(self, dict(x), parts, image_shapes))


def _pool_parts(pool: MultiScaleRoIAlign, x: Dict[str, Tensor], parts: List[List[Tensor]],
                image_shapes: List[Tuple[int, int]]) -> List[Tensor]:
    """torchvision's pooling of each part of the boxes, in parallel threads, without gradients
    (with this thread's inference mode and CPU autocast, which threads do not inherit)."""
    inference = torch.is_inference_mode_enabled()
    amp = torch.is_autocast_enabled("cpu")
    amp_dtype = torch.get_autocast_dtype("cpu")

    def part(sub: List[Tensor]) -> Tensor:
        with torch.inference_mode(inference), torch.no_grad(), \
                torch.autocast("cpu", dtype=amp_dtype, enabled=amp):
            return MultiScaleRoIAlign.forward(pool, x, sub, image_shapes)

    return list(_roi_pool_threads(len(parts)).map(part, parts))


class _RoIAlignParts(torch.autograd.Function):
    """:class:`ParallelRoIAlign` in training: the parts pooled in threads, and in the backward
    pass each part's pooling run again with gradients in its thread (the forward is a small
    share of RoIAlign's cost on a CPU; the backward scatters into the whole feature maps), the
    parts' feature gradients summed in order."""

    @staticmethod
    def forward(ctx: Any, pool: MultiScaleRoIAlign, parts: List[List[Tensor]],
                image_shapes: List[Tuple[int, int]], names: List[str], *feats: Tensor) -> Tensor:
        ctx.pool, ctx.parts, ctx.shapes, ctx.names = pool, parts, image_shapes, names
        ctx.amp = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        ctx.save_for_backward(*feats)
        return torch.cat(_pool_parts(pool, dict(zip(names, feats)), parts, image_shapes))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        feats = ctx.saved_tensors
        sizes = [sum(int(b.shape[0]) for b in sub) for sub in ctx.parts]
        amp, amp_dtype = ctx.amp

        def part(args: Tuple[List[Tensor], Tensor]) -> Tuple[Optional[Tensor], ...]:
            sub, g = args
            with torch.enable_grad(), torch.autocast("cpu", dtype=amp_dtype, enabled=amp):
                leaves = [f.detach().requires_grad_(f.requires_grad) for f in feats]
                out = MultiScaleRoIAlign.forward(ctx.pool, dict(zip(ctx.names, leaves)), sub,
                                                 ctx.shapes)
                wanted = [v for v in leaves if v.requires_grad]
                got = iter(torch.autograd.grad(out, wanted, g, allow_unused=True))
                return tuple(next(got) if v.requires_grad else None for v in leaves)

        results = list(_roi_pool_threads(len(ctx.parts)).map(
            part, zip(ctx.parts, torch.split(grad, sizes))))
        total: List[Optional[Tensor]] = []
        for level in zip(*results):
            acc = None
            for gr in level:
                if gr is not None:
                    acc = gr if acc is None else acc + gr
            total.append(acc)
        return (None, None, None, None, *total)


@functools.lru_cache(maxsize=4)
def _roi_pool_threads(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="roi_align")


def build_torchvision_rcnn(cfg: Any, num_classes: int) -> nn.Module:
    """The torchvision ``MaskRCNN`` or ``FasterRCNN`` for ``cfg`` with ``num_classes``
    outputs (foreground classes + 1 for background)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    backbone = _resnet_backbone(cfg)
    _, head_norm = norm_layers(cfg.MODEL.BACKBONE.NORM)
    ch = backbone.out_channels
    sizes = [tuple(int(s) for s in level) for level in cfg.MODEL.ANCHOR_GENERATOR.SIZES]
    if len(sizes) != 5:
        raise ValueError("MODEL.ANCHOR_GENERATOR.SIZES needs one list of sizes per FPN level "
                         f"(5 levels: P2..P6), got {len(sizes)}")
    ratios = tuple(float(r) for r in cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS)
    per_level = {len(s) for s in sizes}
    if len(per_level) != 1:
        raise ValueError("MODEL.ANCHOR_GENERATOR.SIZES: every FPN level needs the same number of "
                         f"sizes (the RPN head is shared), got {sizes}")
    anchor_gen = AnchorGenerator(sizes, (ratios,) * len(sizes))
    rpn_head = RPNHead(ch, anchor_gen.num_anchors_per_location()[0],
                       conv_depth=int(cfg.MODEL.RPN.CONV_DEPTH))
    roi = cfg.MODEL.ROI_HEADS
    box_head = FastRCNNConvFCHead((ch, 7, 7), [ch] * int(roi.BOX_HEAD_CONVS), [int(roi.FC_DIM)],
                                  norm_layer=head_norm)
    rpn = cfg.MODEL.RPN
    kwargs: Dict[str, Any] = dict(
        box_predictor=FastRCNNPredictor(int(roi.FC_DIM), num_classes),
        rpn_anchor_generator=anchor_gen,
        rpn_head=rpn_head,
        box_head=box_head,
        box_roi_pool=ParallelRoIAlign(["0", "1", "2", "3"], 7, 2),  # torchvision's defaults
        rpn_pre_nms_top_n_train=int(rpn.PRE_NMS_TOPK_TRAIN),
        rpn_pre_nms_top_n_test=int(rpn.PRE_NMS_TOPK_TEST),
        rpn_post_nms_top_n_train=int(rpn.POST_NMS_TOPK_TRAIN),
        rpn_post_nms_top_n_test=int(rpn.POST_NMS_TOPK_TEST),
        rpn_nms_thresh=float(rpn.NMS_THRESH),
        rpn_batch_size_per_image=int(rpn.BATCH_SIZE_PER_IMAGE),
        rpn_positive_fraction=float(rpn.POSITIVE_FRACTION),
        box_score_thresh=float(roi.SCORE_THRESH_TEST),
        box_nms_thresh=float(roi.NMS_THRESH_TEST),
        box_detections_per_img=int(roi.DETECTIONS_PER_IMAGE),
        box_batch_size_per_image=int(roi.BATCH_SIZE_PER_IMAGE),
        box_positive_fraction=float(roi.POSITIVE_FRACTION),
    )
    if arch == "MaskRCNN":
        kwargs["mask_head"] = MaskRCNNHeads(ch, [ch] * int(roi.MASK_HEAD_CONVS), 1,
                                            norm_layer=head_norm)
        kwargs["mask_predictor"] = MaskRCNNPredictor(ch, ch, num_classes)
        kwargs["mask_roi_pool"] = ParallelRoIAlign(["0", "1", "2", "3"], 14, 2)
        model: nn.Module = MaskRCNN(backbone, **kwargs)
    elif arch == "FasterRCNN":
        model = FasterRCNN(backbone, **kwargs)
    else:
        raise ValueError(f"build_torchvision_rcnn: {arch!r} is not an R-CNN")
    # torchvision builds its RoIHeads inside; ours adds RCNN.predict's filters (same state)
    model.roi_heads.__class__ = _RoIHeads
    model.transform = NativeResolutionTransform(
        cfg.INPUT.SCALE, list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD),
        invert_bright=bool(cfg.INPUT.INVERT_BRIGHT_BACKGROUND), grey=bool(cfg.INPUT.GREY),
        grey_fluorescence=bool(cfg.INPUT.GREY_FLUORESCENCE))
    return model


class RCNN(nn.Module):
    """A torchvision Mask/Faster R-CNN behind the project's model interface.

    ``forward(images, targets=None)``: ``images`` is a list of ``[3, H, W]`` float32 tensors
    in 0..1 (any sizes); in training mode ``targets`` is a list of dicts with ``boxes``
    (``(N, 4)`` XYXY px), ``labels`` (``(N,)`` int64 in 1..K) and, for Mask R-CNN, ``masks``
    (``(N, H, W)`` uint8), and a dict of scalar losses is returned. In eval mode a list of
    :class:`Instances` is returned, one per image, in that image's pixels, with labels mapped
    to the COCO category ids of ``classes`` and masks (Mask R-CNN) as :class:`CropMask`.
    """

    def __init__(self, cfg: Any, classes: List[Dict[str, Any]]) -> None:
        super().__init__()
        self.classes = [{"id": int(c["id"]), "name": str(c["name"])} for c in classes]
        if not self.classes:
            raise ValueError("RCNN needs at least one class")
        self.with_masks = cfg.MODEL.META_ARCHITECTURE == "MaskRCNN"
        self.mask_threshold = float(cfg.MODEL.ROI_HEADS.MASK_THRESHOLD)
        # INPUT.NUCLEUS_DIAMETER: the size normalisation of detector/inference/size.py
        self.nucleus_diameter = float(cfg.INPUT.NUCLEUS_DIAMETER)
        self.model = build_torchvision_rcnn(cfg, len(self.classes) + 1)
        # convolutions in channels-last layout (oneDNN's faster path on CPU): set_inference
        self.channels_last = False
        self.register_buffer("label_to_id",
                             torch.tensor([0] + [c["id"] for c in self.classes], dtype=torch.int64),
                             persistent=False)

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        if self.training:
            if targets is None:
                raise ValueError("RCNN in training mode needs targets")
            tv_targets = []
            for t in targets:
                d = {"boxes": t["boxes"].as_subclass(Tensor).float().reshape(-1, 4),
                     "labels": t["labels"].as_subclass(Tensor).long()}
                if self.with_masks:
                    if "masks" not in t:
                        raise ValueError("Mask R-CNN needs masks in its targets; box-only data "
                                         "trains MODEL.META_ARCHITECTURE FasterRCNN")
                    d["masks"] = t["masks"].as_subclass(Tensor)
                tv_targets.append(d)
            return self.model([im.as_subclass(Tensor) for im in images], tv_targets)
        return self.predict(images)

    def predict(self, images: List[Tensor], score_thresh: float = 0.0,
                drop: Optional[Sequence[Optional[DropFn]]] = None) -> List[Instances]:
        """Eval-mode prediction: one :class:`Instances` per ``[3, H, W]`` image (0..1), in its
        px. Detections scoring below ``score_thresh`` (besides the config's
        ``ROI_HEADS.SCORE_THRESH_TEST``) are dropped before the mask head, and masks are
        pasted into their boxes' crops (:func:`paste_masks_in_boxes`): the detections at or
        above the threshold are those of torchvision's forward, pixel for pixel. ``drop``: per
        image, None or a function of the boxes (``(N, 4)`` XYXY in the image's px, as returned)
        and the image's ``(height, width)`` giving the detections to leave out, before the
        mask head (a slide's tile leaves those cut by an interior tile edge to its
        neighbour: no mask is computed for them)."""
        m = self.model
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        # the threshold and drops reach RoIHeads through this thread's state, not the module's:
        # several threads may predict with one model at once (the slide runner's CPU streams)
        _PREDICT.call = (float(score_thresh), list(drop) if drop is not None else None, sizes)
        try:
            batch, _ = m.transform([im.as_subclass(Tensor) for im in images])
            x = batch.tensors
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            features = m.backbone(x)
            proposals, _ = m.rpn(batch, features)
            if self.channels_last:  # RoIAlign reads NCHW: one copy per level, not one per head
                features = OrderedDict((k, v.contiguous()) for k, v in features.items())
            detections, _ = m.roi_heads(features, proposals, batch.image_sizes)
        finally:
            _PREDICT.call = None
        out = []
        for det, resized, size in zip(detections, batch.image_sizes, sizes):
            det["boxes"] = resize_boxes(det["boxes"], resized, size)
            out.append(self._to_instances(det, size))
        return out

    def _to_instances(self, out: Dict[str, Tensor], size: Tuple[int, int]) -> Instances:
        labels = self.label_to_id.to(out["labels"].device)[out["labels"]]
        masks = None
        if self.with_masks:
            masks = paste_masks_in_boxes(out["masks"], out["boxes"], (int(size[0]), int(size[1])),
                                         self.mask_threshold)
        return Instances(
            image_size=(int(size[0]), int(size[1])),
            boxes=out["boxes"].detach().float().cpu().numpy(),
            scores=out["scores"].detach().float().cpu().numpy(),
            labels=labels.cpu().numpy(),
            masks=masks,
        )


#: ``f(boxes (N, 4) float32 XYXY image px, (height, width)) -> (N,) bool``: detections to drop.
DropFn = Callable[[np.ndarray, Tuple[int, int]], np.ndarray]

#: ``call``: ``(score_thresh, drops or None, image sizes)`` of the :meth:`RCNN.predict` running
#: in this thread, else None.
_PREDICT = threading.local()


class _RoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` whose eval-mode detections also pass the score threshold and
    the drops of the :meth:`RCNN.predict` call in this thread (none outside one), before the
    mask head. Applied after torchvision's own filtering (its ``SCORE_THRESH_TEST``, NMS per
    class, top ``DETECTIONS_PER_IMAGE``), which gives the same detections as a higher
    threshold before it: greedy NMS keeps a box by the boxes scoring above it alone, and the
    top-k keeps the highest scores."""

    def postprocess_detections(self, class_logits: Tensor, box_regression: Tensor,
                               proposals: List[Tensor], image_shapes: List[Tuple[int, int]]
                               ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        boxes, scores, labels = super().postprocess_detections(class_logits, box_regression,
                                                               proposals, image_shapes)
        call = getattr(_PREDICT, "call", None)
        if call is None:
            return boxes, scores, labels
        thresh, drop, sizes = call
        for i, (resized, size) in enumerate(zip(image_shapes, sizes)):
            keep = scores[i] >= thresh
            f = drop[i] if drop is not None else None
            if f is not None and len(boxes[i]):
                # the boxes as RCNN.predict returns them, back in the image's px
                shown = resize_boxes(boxes[i], resized, size).detach().float().cpu().numpy()
                keep &= torch.from_numpy(~np.asarray(f(shown, size), bool)).to(keep.device)
            if not bool(keep.all()):
                boxes[i], scores[i], labels[i] = boxes[i][keep], scores[i][keep], labels[i][keep]
        return boxes, scores, labels


def build_rcnn(cfg: Any, classes: List[Dict[str, Any]]) -> RCNN:
    """``RCNN`` for ``cfg.MODEL.META_ARCHITECTURE`` in ("MaskRCNN", "FasterRCNN")."""
    return RCNN(cfg, classes)
