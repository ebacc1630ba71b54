"""The one prediction structure of every model (Mask R-CNN, Faster R-CNN, U-Net).

Coordinates are pixels with the origin at the top-left of the image (or of the slide's level 0),
x to the right and y down. Boxes are XYXY floats. Masks are :class:`~.masks.CropMask` (the RLE
of each object's crop plus its offset, in the same image), or ``None`` for box-only models. Evaluation, merging and export take
this structure and nothing model-specific.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .masks import CropMask, mask_areas, rle_to_json


def median_diameter(areas: Union[Sequence[float], np.ndarray]) -> float:
    """Median equivalent diameter ``sqrt(4 A / pi)`` (px) of objects of ``areas`` (px²), the
    typical nucleus size of size normalisation (``INPUT.NUCLEUS_DIAMETER``); 0 for none."""
    a = np.asarray(areas, np.float64)
    a = a[np.isfinite(a) & (a > 0)]
    return float(np.sqrt(4.0 * np.median(a) / np.pi)) if len(a) else 0.0


#: Size-normalisation factors are kept in this range (a wild estimate stays bounded).
SIZE_SCALE_RANGE = (0.25, 4.0)


def size_scale(diameter: Optional[float], canonical: float) -> float:
    """Resampling factor that brings a median nucleus ``diameter`` (px) to ``canonical`` px,
    within :data:`SIZE_SCALE_RANGE`; 1 when either is unknown (0)."""
    if not diameter or canonical <= 0:
        return 1.0
    return float(np.clip(canonical / diameter, *SIZE_SCALE_RANGE))


@dataclass
class Instances:
    """Detections of one image or slide.

    Attributes:
        image_size: ``(height, width)`` of the image the coordinates refer to.
        boxes: ``(N, 4)`` float32, XYXY in pixels.
        scores: ``(N,)`` float32 confidences in [0, 1].
        labels: ``(N,)`` int64, the COCO category ids of the training data (1-based).
        masks: list of N :class:`CropMask` of images of ``image_size``, or ``None`` for
            box-only models.
    """

    image_size: Tuple[int, int]
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    masks: Optional[List[CropMask]] = None

    def __post_init__(self) -> None:
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        n = len(self.boxes)
        if len(self.scores) != n or len(self.labels) != n:
            raise ValueError(
                f"Instances: {n} boxes but {len(self.scores)} scores and {len(self.labels)} labels"
            )
        if self.masks is not None and len(self.masks) != n:
            raise ValueError(f"Instances: {n} boxes but {len(self.masks)} masks")

    def __len__(self) -> int:
        return len(self.boxes)

    def box_centres(self) -> np.ndarray:
        """``(N, 2)`` float64 x, y of the boxes' centres (px)."""
        b = self.boxes.astype(np.float64)
        return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    def __getitem__(self, idx: Any) -> "Instances":
        """Select instances by a boolean mask, an index array or a slice."""
        idx_arr = np.arange(len(self))[idx]
        idx_arr = np.atleast_1d(idx_arr)
        masks = None if self.masks is None else [self.masks[i] for i in idx_arr]
        return Instances(self.image_size, self.boxes[idx_arr], self.scores[idx_arr],
                         self.labels[idx_arr], masks)

    @staticmethod
    def cat(items: Sequence["Instances"], image_size: Optional[Tuple[int, int]] = None) -> "Instances":
        """Concatenate instances that share one image size (or the given one)."""
        if not items:
            if image_size is None:
                raise ValueError("Instances.cat of nothing needs image_size")
            return Instances(image_size)
        size = image_size or items[0].image_size
        with_masks = [it.masks is not None for it in items]
        if any(with_masks) and not all(with_masks):
            raise ValueError("Instances.cat: some items have masks and some do not")
        masks = None
        if all(with_masks):
            masks = [m for it in items for m in (it.masks or [])]
        return Instances(
            size,
            np.concatenate([it.boxes for it in items]),
            np.concatenate([it.scores for it in items]),
            np.concatenate([it.labels for it in items]),
            masks,
        )

    def areas(self) -> np.ndarray:
        """Mask areas in px when masks exist, else box areas."""
        if self.masks is not None and len(self.masks):
            return mask_areas(self.masks)
        wh = np.clip(self.boxes[:, 2:] - self.boxes[:, :2], 0, None)
        return (wh[:, 0] * wh[:, 1]).astype(np.float64)

    def centroids(self) -> np.ndarray:
        """``(N, 2)`` x, y centre of each box (px)."""
        return np.stack(
            [(self.boxes[:, 0] + self.boxes[:, 2]) / 2, (self.boxes[:, 1] + self.boxes[:, 3]) / 2],
            axis=1,
        ) if len(self) else np.zeros((0, 2), np.float32)

    def to_coco_results(self, image_id: int) -> List[Dict[str, Any]]:
        """COCO results entries (bbox XYWH, score, category_id, segmentation RLE if any)."""
        out = []
        for i in range(len(self)):
            x0, y0, x1, y1 = (float(v) for v in self.boxes[i])
            r: Dict[str, Any] = {
                "image_id": int(image_id),
                "category_id": int(self.labels[i]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(self.scores[i]),
            }
            if self.masks is not None:
                r["segmentation"] = rle_to_json(self.masks[i].to_coco_rle())
            out.append(r)
        return out
