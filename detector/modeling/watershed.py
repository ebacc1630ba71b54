"""Instances from the U-Net's 3-class output: marker-controlled watershed (scikit-image).

The U-Net predicts, per pixel, probabilities of background, nucleus interior and nucleus
boundary (``(3, H, W)``; see :mod:`detector.data.unet_targets`). Instances are recovered as:

0. the probabilities are smoothed with a Gaussian of ``smooth_sigma`` px
   (``MODEL.UNET.SMOOTH_SIGMA``; on DSB2018 validation images a 1 px smoothing removes the
   seed fragments that split one nucleus into several, the main source of false positives);
1. **seeds**: connected components (8-connectivity) of ``p_interior - p_boundary > seed_thresh``
   (interior minus boundary: touching nuclei are split by the boundary class drawn between them);
2. **foreground**: ``p_interior + p_boundary > fg_thresh`` (``= 1 - p_background``);
3. marker-controlled watershed (``skimage.segmentation.watershed``) of the elevation
   ``1 - p_interior`` from the seeds, restricted to the foreground, which gives each nucleus
   back its boundary band;
4. foreground components that hold no seed become instances of their own;
5. instances smaller than ``min_size`` px are removed.

Each instance's **score** is the mean interior probability ``p_interior`` over its seed (its
confidently-interior core); an instance without a seed (step 4) scores the mean foreground
probability ``1 - p_background`` over its pixels times 0.5, i.e. below every seeded instance
with a mean interior probability above 0.5. The result is an :class:`Instances` with one COCO
RLE mask, XYXY box (pixel edges), score and label per nucleus, as Mask R-CNN gives.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from ..config.defaults import UNetConfig
from ..structures.instances import Instances
from ..structures.masks import CropMask

_EIGHT = np.ones((3, 3), bool)
#: The defaults are the config's (``MODEL.UNET.*``), set in one place: config/defaults.py.
_DEFAULTS = UNetConfig()


def label_map_from_probabilities(
    probs: np.ndarray,
    seed_thresh: float = _DEFAULTS.SEED_THRESH,
    fg_thresh: float = _DEFAULTS.FOREGROUND_THRESH,
    min_size: int = _DEFAULTS.MIN_SIZE,
    smooth_sigma: float = _DEFAULTS.SMOOTH_SIGMA,
) -> Tuple[np.ndarray, np.ndarray]:
    """Label image of the nuclei in a 3-class probability map.

    Args:
        probs: ``(3, H, W)`` float probabilities (background, interior, boundary) summing to 1.
        seed_thresh: seeds are ``p_interior - p_boundary > seed_thresh``.
        fg_thresh: foreground is ``p_interior + p_boundary > fg_thresh``.
        min_size: smallest instance kept (px).
        smooth_sigma: Gaussian smoothing of the probabilities (px) first; 0 = none.

    Returns:
        ``(labels, seeds)``: ``(H, W)`` int32 labels 0 = background, 1..N = instances
        (consecutive), and the ``(H, W)`` int32 seed labels that share those ids (0 where an
        instance grew from no seed).
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[0] != 3:
        raise ValueError(f"expected (3, H, W) probabilities, got shape {probs.shape}")
    probs = smooth_probabilities(probs, smooth_sigma)
    p_int, p_bnd = probs[1], probs[2]
    foreground = (p_int + p_bnd) > fg_thresh
    seed_mask = ((p_int - p_bnd) > seed_thresh) & foreground
    seeds, _ = ndi.label(seed_mask, structure=_EIGHT)
    return grow_seeds(1.0 - p_int, seeds, foreground, min_size)


def grow_seeds(elevation: np.ndarray, seeds: np.ndarray, foreground: np.ndarray,
               min_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Steps 3 to 5 of the module docstring: marker-controlled watershed of ``elevation`` from
    ``seeds`` restricted to ``foreground``, foreground components without a seed as instances
    of their own, instances below ``min_size`` px removed.

    Args:
        elevation: ``(H, W)`` float; basins grow from the seeds towards higher values.
        seeds: ``(H, W)`` int labels 1..S (0 = none).
        foreground: ``(H, W)`` bool.
        min_size: smallest instance kept (px).
    Returns:
        ``(labels, seeds)`` as :func:`label_map_from_probabilities` (consecutive ids; seeds
        renumbered alike).
    """
    seeds = np.asarray(seeds, np.int32)
    n_seeds = int(seeds.max()) if seeds.size else 0
    if n_seeds:
        labels = watershed(elevation, markers=seeds, mask=foreground)
    else:
        labels = np.zeros(foreground.shape, np.int32)
    # foreground components without any seed become instances of their own
    rest, n_rest = ndi.label(foreground & (labels == 0), structure=_EIGHT)
    if n_rest:
        labels = np.where(rest > 0, rest + n_seeds, labels)
    # remove small instances and renumber 1..N
    sizes = np.bincount(labels.reshape(-1))
    keep = sizes >= max(int(min_size), 1)
    keep[0] = False
    new_ids = np.zeros(len(sizes), np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    labels = new_ids[labels]
    seeds = np.where(seeds > 0, new_ids[seeds], 0).astype(np.int32)
    return labels.astype(np.int32), seeds


def smooth_probabilities(probs: np.ndarray, sigma: float) -> np.ndarray:
    """``(3, H, W)`` probabilities smoothed per class with a Gaussian of ``sigma`` px (none
    when ``sigma <= 0``); they still sum to 1."""
    if sigma <= 0:
        return probs
    return np.stack([ndi.gaussian_filter(c, sigma, mode="nearest") for c in probs])


def instances_from_label_map(
    labels: np.ndarray,
    scores: np.ndarray,
    category_id: int = 1,
) -> Instances:
    """:class:`Instances` (:class:`CropMask` masks, XYXY boxes at pixel edges) of a label image.

    Args:
        labels: ``(H, W)`` int, 0 = background, 1..N = instances (ids without pixels skipped).
        scores: ``(N + 1,)`` score per label id (index 0 unused).
        category_id: the COCO category id given to every instance.
    """
    h, w = labels.shape
    boxes: List[List[float]] = []
    kept_scores: List[float] = []
    masks: List[CropMask] = []
    for k, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        ys, xs = sl
        masks.append(CropMask.from_crop(labels[sl] == k, xs.start, ys.start, (h, w)))
        boxes.append([xs.start, ys.start, xs.stop, ys.stop])
        kept_scores.append(float(scores[k]))
    return Instances(
        (h, w),
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(kept_scores, np.float32),
        np.full(len(boxes), int(category_id), np.int64),
        masks,
    )


def instances_from_probabilities(
    probs: np.ndarray,
    category_id: int = 1,
    seed_thresh: float = _DEFAULTS.SEED_THRESH,
    fg_thresh: float = _DEFAULTS.FOREGROUND_THRESH,
    min_size: int = _DEFAULTS.MIN_SIZE,
    smooth_sigma: float = _DEFAULTS.SMOOTH_SIGMA,
    core: Optional[Tuple[int, int, int, int]] = None,
) -> Instances:
    """Nuclei of a ``(3, H, W)`` probability map (background, interior, boundary) as
    :class:`Instances` with :class:`CropMask` masks, boxes, scores (see the module docstring) and
    ``category_id`` as label. Scores are computed on the smoothed probabilities.

    ``core`` ``(x0, y0, x1, y1)`` (px of the map, end-exclusive): keep only the instances
    whose seed's centroid (or, without a seed, whose centroid) lies in it, tested exactly on
    integer sums, so that tiles whose cores partition an image find every instance once (see
    :meth:`detector.modeling.unet.UNetModel.predict_slide_tiles`)."""
    probs = smooth_probabilities(np.asarray(probs, dtype=np.float32), smooth_sigma)
    labels, seeds = label_map_from_probabilities(probs, seed_thresh, fg_thresh, min_size, 0.0)
    if core is not None:
        labels, seeds = _keep_centroids_in(labels, seeds, core)
    n = int(labels.max())
    scores = np.zeros(n + 1, np.float64)
    if n:
        seed_count = np.bincount(seeds.reshape(-1), minlength=n + 1)
        seed_sum = np.bincount(seeds.reshape(-1), weights=probs[1].reshape(-1), minlength=n + 1)
        count = np.bincount(labels.reshape(-1), minlength=n + 1)
        fg_sum = np.bincount(labels.reshape(-1), weights=(1.0 - probs[0]).reshape(-1),
                             minlength=n + 1)
        seed_mean = seed_sum / np.maximum(seed_count, 1)
        fg_mean = fg_sum / np.maximum(count, 1)
        scores = np.where(seed_count > 0, seed_mean, 0.5 * fg_mean)
        scores[0] = 0.0
    return instances_from_label_map(labels, np.clip(scores, 0.0, 1.0), category_id)


def _keep_centroids_in(labels: np.ndarray, seeds: np.ndarray, core: Tuple[int, int, int, int]
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """``labels`` and ``seeds`` without the instances whose anchor lies outside ``core``
    ``(x0, y0, x1, y1)`` (ids are kept, not renumbered). The anchor is the centroid of the
    instance's seed (the centroid of its pixels when it has none): a seed is a thresholded
    component of the probabilities, the same in a tile as in the whole image unless it comes
    within the smoothing radius of the tile's edge, while the watershed that grows it may
    shift its rim a little; an instance is then owned by the same tile whatever its rim."""
    n = int(labels.max())
    if n == 0:
        return labels, seeds
    keep = np.zeros(n + 1, bool)
    anchored = np.zeros(n + 1, bool)
    x0, y0, x1, y1 = (int(v) for v in core)
    for ids in (seeds, labels):  # seeds first; instances without a seed by their pixels
        flat = ids.reshape(-1)
        nz = np.flatnonzero(flat)
        ys, xs = np.divmod(nz, ids.shape[1])
        count = np.bincount(flat[nz], minlength=n + 1).astype(np.int64)
        sx = np.bincount(flat[nz], weights=xs, minlength=n + 1).astype(np.int64)  # exact < 2^53
        sy = np.bincount(flat[nz], weights=ys, minlength=n + 1).astype(np.int64)
        # x0 <= sx / count < x1 (likewise y) without rounding: ownership must agree between a
        # tile and the whole image to the last bit
        inside = (sx >= x0 * count) & (sx < x1 * count) & (sy >= y0 * count) & (sy < y1 * count)
        new = (count > 0) & ~anchored
        keep[new] = inside[new]
        anchored |= count > 0
    keep[0] = False
    return np.where(keep[labels], labels, 0), np.where(keep[seeds], seeds, 0)


def probabilities_from_classes(classes: np.ndarray) -> np.ndarray:
    """One-hot ``(3, H, W)`` float32 probabilities of a 3-class map (for ground-truth
    round trips: target map -> instances)."""
    classes = np.asarray(classes)
    return (np.arange(3)[:, None, None] == classes[None]).astype(np.float32)
