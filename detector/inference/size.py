"""Size normalisation: nuclei at one canonical size, whatever the image's magnification.

Images of different experiments show nuclei from 5 to 60 px across, and nothing in a plain
image says which. A model trained with ``INPUT.NUCLEUS_DIAMETER`` D > 0 saw every training
image resampled so that its median nucleus (equivalent diameter of the annotated areas) was D
px across (:class:`detector.data.dataset.CocoInstanceDataset`). At inference the scale is
found from the nuclei themselves, as Cellpose does with its size model, but with the
segmentation model itself: a first pass at the image's own scale gives the median diameter d
of what it finds, the image is resampled by D / d and predicted again, and the estimate is
refined once more from that pass when it moved by more than 10%. Instances come back in the
image's own px.

Whole slides (:mod:`.runner`) estimate the scale once per slide, from a few tiles with tissue,
and analyse every tile at it.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..structures.instances import Instances, median_diameter, size_scale
from .merge import tile_to_slide

#: Fewer objects than this give no estimate: the image is predicted at its own scale.
MIN_OBJECTS = 5
#: A new estimate within this ratio of the current scale ends the refinement.
TOLERANCE = 1.1


def model_nucleus_diameter(model: torch.nn.Module) -> float:
    """The canonical nucleus diameter (px) a model was trained at, or 0 (no size
    normalisation): the ``nucleus_diameter`` attribute the model builders set from
    ``INPUT.NUCLEUS_DIAMETER``."""
    inner = getattr(model, "module", model)
    return float(getattr(inner, "nucleus_diameter", 0.0) or 0.0)


def resize_image(image: torch.Tensor, scale: float) -> torch.Tensor:
    """``[3, H, W]`` image (float, or uint8 kept uint8) resampled by ``scale`` (antialiased
    when shrinking)."""
    if scale == 1.0:
        return image
    h, w = image.shape[-2:]
    size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                        antialias=scale < 1.0)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else out


def predict_at_scale(predict: Callable[[torch.Tensor], Instances], image: torch.Tensor,
                     scale: float) -> Instances:
    """``predict`` on ``image`` resampled by ``scale``, instances mapped back to its px."""
    if scale == 1.0:
        return predict(image)
    h, w = int(image.shape[-2]), int(image.shape[-1])
    small = resize_image(image, scale)
    inst = predict(small)
    # the resampled grid is (round(h * s), round(w * s)) px: map back with its true ratio
    ratio = h / small.shape[-2]
    return tile_to_slide(inst, (0.0, 0.0), ratio, (h, w))


def predict_normalised(predict: Callable[[torch.Tensor], Instances], image: torch.Tensor,
                       canonical: float, rounds: int = 2, score_thresh: float = 0.5
                       ) -> Tuple[Instances, float]:
    """Predict ``image`` (``[3, H, W]`` float 0..1) at the scale that makes its nuclei
    ``canonical`` px across; returns the instances (in ``image`` px) and the scale used.
    The diameter is the median over instances scoring at least ``score_thresh``."""
    scale = 1.0
    inst = predict(image)
    for _ in range(rounds):
        keep = inst.scores >= score_thresh
        if int(keep.sum()) < MIN_OBJECTS:
            break
        d = median_diameter(inst.areas()[keep])  # image px (instances are mapped back)
        new = size_scale(d, canonical)
        if max(new, scale) / min(new, scale) < TOLERANCE:
            break
        scale = new
        inst = predict_at_scale(predict, image, scale)
    return inst, scale


def slide_scale(predict: Callable[[torch.Tensor], Instances], tiles: List[torch.Tensor],
                canonical: float,
                score_thresh: float = 0.5) -> Tuple[float, Optional[float]]:
    """One scale for a whole slide from sample ``tiles`` (``[3, h, w]`` float 0..1 at the
    slide's own px): each is predicted by :func:`predict_normalised`, and the median diameter
    of all their nuclei, in slide px, gives the scale. Returns ``(scale, diameter px)``;
    ``(1.0, None)`` when the tiles hold too few nuclei."""
    areas = []
    for t in tiles:
        inst, _ = predict_normalised(predict, t, canonical, score_thresh=score_thresh)
        areas.append(inst.areas()[inst.scores >= score_thresh])
    allp = np.concatenate(areas) if areas else np.zeros(0)
    if len(allp) < MIN_OBJECTS:
        return 1.0, None
    d = median_diameter(allp)
    return size_scale(d, canonical), d


def equivalent_mpp(slide_mpp: float, scale: float) -> float:
    """The mpp that the slide path resamples to so that the slide is analysed at ``scale``."""
    return float(slide_mpp) / scale if scale > 0 else float(slide_mpp)


