"""The classical baseline: Otsu threshold + distance-transform watershed, what CellProfiler's
``IdentifyPrimaryObjects`` does (global Otsu, "declump by shape"), as a model with the project's
interface, so that ``infer_tiles.py`` and ``evaluate.py`` take it like the learned ones and a
report shows what learning buys.

Per image (``MODEL.CLASSICAL.*``):

1. **signal**: nuclei bright on dark. Fluorescence: the brightest channel per pixel; H&E: the
   haematoxylin channel of ``skimage.color.rgb2hed``; brightfield: inverted grey
   (1 - mean of R, G, B). ``MODALITY auto`` chooses per image with
   :func:`detector.data.experiments.modality_of` (on whole slides, set it: tiles of glass
   and tissue could be read differently);
2. the signal smoothed with a Gaussian of ``SMOOTH_SIGMA`` px;
3. **foreground**: above Otsu's threshold (``skimage.filters.threshold_otsu``) times
   ``THRESHOLD_CORRECTION`` (or above a fixed ``THRESHOLD``), holes filled (``FILL_HOLES``);
4. **seeds**: maxima of the foreground's Euclidean distance transform that are the largest in
   a ``PEAK_FOOTPRINT`` px square (``skimage.feature.peak_local_max``), touching maxima of one
   plateau merged into one seed;
5. the watershed of the negated distance from the seeds inside the foreground, objects without
   a seed kept, objects below ``MIN_SIZE`` px removed
   (:func:`detector.modeling.watershed.grow_seeds`, the U-Net's post-processing).

**Score** of an object: ``0.5 + 0.5 * clip((m - t) / (p99 - t), 0, 1)``, with ``m`` the mean
smoothed signal over the object, ``t`` the threshold and ``p99`` the 99th percentile of the
smoothed signal: every object scores at least 0.5 (kept at the default score threshold of
``infer_tiles.py`` / ``evaluate.py``), brighter ones more, which orders them for AP.

Nothing is learned: the checkpoint (``train_net.py`` with ``MODEL.META_ARCHITECTURE
Classical``) holds the config, classes and an empty state dict.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import Tensor, nn

from ..data.experiments import modality_of
from ..structures.instances import Instances
from .watershed import grow_seeds, instances_from_label_map

_EIGHT = np.ones((3, 3), bool)


def nucleus_signal(rgb: np.ndarray, modality: str) -> np.ndarray:
    """``(H, W)`` float32 signal in which nuclei are bright, from ``(H, W, 3)`` uint8 RGB:
    the brightest channel (fluorescence), haematoxylin (``he``) or inverted grey
    (``brightfield``)."""
    if modality == "fluorescence":
        return rgb.max(axis=2).astype(np.float32) / 255.0
    if modality == "he":
        from skimage.color import rgb2hed

        return rgb2hed(rgb)[..., 0].astype(np.float32)
    if modality == "brightfield":
        return 1.0 - rgb.astype(np.float32).mean(axis=2) / 255.0
    raise ValueError(f"modality {modality!r}: expected fluorescence, he or brightfield")


def segment_nuclei(rgb: np.ndarray, modality: str = "auto", smooth_sigma: float = 1.0,
                   threshold_correction: float = 1.0, peak_footprint: int = 17,
                   fill_holes: bool = True, min_size: int = 20, threshold: float = 0.0
                   ) -> Tuple[np.ndarray, np.ndarray, str]:
    """Label image of the nuclei of one image (steps 1 to 5 of the module docstring).

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB.
        the rest: ``MODEL.CLASSICAL.*`` (see config/defaults.py).
    Returns:
        ``(labels, scores, modality)``: ``(H, W)`` int32 labels 0 = background, 1..N;
        ``(N + 1,)`` float scores (index 0 unused); the modality used.
    """
    from skimage.filters import threshold_otsu

    if modality == "auto":
        modality = modality_of(rgb)
    signal = nucleus_signal(rgb, modality)
    if smooth_sigma > 0:
        signal = ndi.gaussian_filter(signal, float(smooth_sigma), mode="nearest")
    lo, hi = float(signal.min()), float(signal.max())
    empty = (np.zeros(signal.shape, np.int32), np.zeros(1), modality)
    if hi - lo < 1e-6:  # a flat image: nothing to threshold
        return empty
    t = float(threshold) if threshold > 0 else \
        float(threshold_otsu(signal)) * float(threshold_correction)
    fg = signal > t
    if fill_holes:
        fg = ndi.binary_fill_holes(fg)
    if not fg.any():
        return empty
    labels = split_foreground(fg, peak_footprint, min_size)
    n = int(labels.max())
    scores = np.zeros(n + 1, np.float64)
    if n:
        flat = labels.reshape(-1)
        mean = np.bincount(flat, weights=signal.reshape(-1).astype(np.float64), minlength=n + 1) \
            / np.maximum(np.bincount(flat, minlength=n + 1), 1)
        top = max(float(np.percentile(signal, 99)), t + 1e-6)
        scores = 0.5 + 0.5 * np.clip((mean - t) / (top - t), 0.0, 1.0)
        scores[0] = 0.0
    return labels, scores, modality


def split_foreground(fg: np.ndarray, peak_footprint: int = 17, min_size: int = 20
                     ) -> np.ndarray:
    """Instances of a binary nucleus mask (steps 4 and 5 of the module docstring): one seed
    per maximum of the distance transform within ``peak_footprint`` px, grown by watershed
    over the mask; instances under ``min_size`` px dropped. Returns ``(H, W)`` int32 labels
    (0 = background, 1..N)."""
    from skimage.feature import peak_local_max

    fg = np.asarray(fg, bool)
    if not fg.any():
        return np.zeros(fg.shape, np.int32)
    dist = ndi.distance_transform_edt(fg)
    comps, _ = ndi.label(fg, structure=_EIGHT)
    f = max(1, int(peak_footprint))
    peaks = peak_local_max(dist, footprint=np.ones((f, f), bool), labels=comps,
                           exclude_border=False)
    mask = np.zeros(fg.shape, bool)
    mask[tuple(peaks.T)] = True
    seeds, _ = ndi.label(mask, structure=_EIGHT)  # one seed per plateau
    labels, _ = grow_seeds(-dist, seeds, fg, min_size)
    return labels.astype(np.int32, copy=False)


class ClassicalModel(nn.Module):
    """Otsu + distance-transform watershed behind the model interface (see the module
    docstring): ``forward(images)`` / ``predict(images, score_thresh)`` take ``[3, H, W]``
    float 0..1 images and return one :class:`Instances` per image (CropMask masks, XYXY boxes,
    scores, label = the one category id). It has no parameters; training is refused."""

    def __init__(self, cfg: Any, classes: Sequence[Dict[str, Any]]):
        super().__init__()
        c = cfg.MODEL.CLASSICAL
        self.classes = [{"id": int(k["id"]), "name": str(k["name"])} for k in classes]
        self.category_id = int(self.classes[0]["id"])
        self.modality = str(c.MODALITY)
        self.smooth_sigma = float(c.SMOOTH_SIGMA)
        self.threshold_correction = float(c.THRESHOLD_CORRECTION)
        self.peak_footprint = int(c.PEAK_FOOTPRINT)
        self.fill_holes = bool(c.FILL_HOLES)
        self.min_size = int(c.MIN_SIZE)
        self.threshold = float(c.THRESHOLD)
        self.scale = float(cfg.INPUT.SCALE)
        if self.scale <= 0:
            raise ValueError(f"INPUT.SCALE must be > 0, got {cfg.INPUT.SCALE}")

    def predict_image(self, image: Tensor, score_thresh: float = 0.0) -> Instances:
        """:class:`Instances` of one ``[3, H, W]`` 0..1 image, in its px."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image of shape (3, H, W), got {tuple(image.shape)}")
        x = image.detach().float().clamp(0, 1)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if self.scale != 1.0:
            x = torch.nn.functional.interpolate(x[None], scale_factor=self.scale,
                                                mode="bilinear", align_corners=False)[0]
        rgb = (x.permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
        labels, scores, _ = segment_nuclei(rgb, self.modality, self.smooth_sigma,
                                           self.threshold_correction, self.peak_footprint,
                                           self.fill_holes, self.min_size, self.threshold)
        if self.scale != 1.0:  # labels back to the image's px (nearest)
            import cv2

            labels = cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)
        inst = instances_from_label_map(labels, scores, self.category_id)
        return inst[inst.scores >= score_thresh] if score_thresh > 0 else inst

    def predict(self, images: List[Tensor], score_thresh: float = 0.0) -> List[Instances]:
        return [self.predict_image(im, score_thresh) for im in images]

    def forward(self, images: List[Tensor], targets: Any = None) -> List[Instances]:
        if self.training and targets is not None:
            raise ValueError("MODEL.META_ARCHITECTURE Classical learns nothing: train_net.py "
                             "writes its checkpoint without training")
        return self.predict(images)


def build_classical(cfg: Any, classes: Sequence[Dict[str, Any]]) -> ClassicalModel:
    """The classical baseline for data with the COCO categories ``classes`` (one: it separates
    nuclei from background, no classes)."""
    classes = list(classes)
    if len(classes) != 1:
        raise ValueError(f"MODEL.META_ARCHITECTURE Classical finds one class (nucleus) but the "
                         f"data has {len(classes)} categories {[c.get('name') for c in classes]}")
    return ClassicalModel(cfg, classes)
