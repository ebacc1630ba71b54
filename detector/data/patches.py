"""Patches centred on objects, for the patch classifier (stage 2 of the mitosis counter).

Every object of the COCO files gives one item: a square patch centred on its box centre,
labelled with its category (1..K), or 0 ("look-alike") for objects of
``DATASETS.NEGATIVE_CATEGORIES`` (nuclei of tissue without figures, the detector's mined false
positives, MIDOG's "not mitotic figure"). Patches are cut at the training resolution, with
centre jitter and scale jitter in training, and filled with white where they leave the image:
not mirrored, since a mirrored dark nucleus at a border looks like an anaphase (the detector's
most confident look-alikes on 1000-px tiles were such mirror images). In training one side of a
patch is sometimes replaced by the same fill, so that a border is no cue for either class.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .dataset import CocoInstanceDataset, DatasetError, negative_sampling_weights
from .transforms import build_train_transforms

LOOK_ALIKE = "look-alike"
#: Negative categories drawn DATALOADER.HARD_NEGATIVE_FRACTION of the negative samples.
HARD_NEGATIVE_CATEGORIES = frozenset({LOOK_ALIKE, "not mitotic figure"})


def read_patch(read: Callable[[int, int, int, int], np.ndarray], height: int, width: int,
               cx: float, cy: float, size: int, fill: int = 255) -> np.ndarray:
    """The ``size x size x 3`` uint8 patch centred on ``(cx, cy)`` of an image of ``(height,
    width)`` px, read with ``read(top, left, h, w)`` (a rectangle inside the image) and filled
    with ``fill`` where it leaves the image (``MODEL.CLASSIFIER.BORDER_VALUE``)."""
    top, left = int(round(cy - size / 2)), int(round(cx - size / 2))
    out = np.full((size, size, 3), fill, np.uint8)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, height), min(left + size, width)
    if y1 > y0 and x1 > x0:
        part = read(y0, x0, y1 - y0, x1 - x0)
        out[y0 - top:y1 - top, x0 - left:x1 - left] = part[:y1 - y0, :x1 - x0, :3]
    return out


def border_band(patch: torch.Tensor, fill: int, u: torch.Tensor) -> torch.Tensor:
    """Training augmentation: one side of a ``[3, P, P]`` uint8 patch replaced by a band of
    ``fill`` up to P/4 wide (side and width from the 2 uniform numbers ``u``), as a patch at an
    image border has it."""
    side, frac = int(u[0] * 4) % 4, float(u[1])
    p = patch.shape[-1]
    width = 1 + int(frac * (p // 4 - 1))
    patch = patch.clone()
    if side == 0:
        patch[:, :width, :] = fill
    elif side == 1:
        patch[:, -width:, :] = fill
    elif side == 2:
        patch[:, :, :width] = fill
    else:
        patch[:, :, -width:] = fill
    return patch


def patch_tensor(patch: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``h x w x 3`` -> float ``[3, size, size]`` in 0..1 (resized when h != size)."""
    t = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1).float().div_(255.0)
    if t.shape[-1] != size or t.shape[-2] != size:
        t = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)[0]
    return t


class CocoPatchDataset(Dataset):
    """Labelled patches of the objects of one or more COCO files (see the module docstring).

    ``items`` is a list of ``(record index, cx, cy, label)``; ``classes`` the predicted
    categories (label ``i + 1`` is ``classes[i]``). Items are looked up by index or by
    ``(index, seed)`` as in :class:`CocoInstanceDataset`.
    """

    def __init__(self, coco_paths: Sequence[str], cfg: Any, train: bool = True,
                 classes: Optional[List[Dict[str, Any]]] = None) -> None:
        # the images, categories and their checks are those of the detection data set
        self.source = CocoInstanceDataset(coco_paths, cfg, train=False, classes=classes)
        self.paths, self.records, self.classes = self.source.paths, self.source.records, \
            self.source.classes
        self.cfg, self.train = cfg, train
        self.patch_size = int(cfg.MODEL.CLASSIFIER.PATCH_SIZE)
        cat_to_label = self.source.cat_to_label
        self.items: List[Tuple[int, float, float, int]] = []
        hard: List[bool] = []  # per item: a hard negative (mined look-alike, MIDOG imposter)
        for i, r in enumerate(self.records):
            for a in r["anns"]:
                x, y, w, h = a["bbox"]
                self.items.append((i, x + w / 2, y + h / 2, cat_to_label[a["category_id"]]))
                hard.append(False)
            for b, name in zip(r["negatives"], r["negative_categories"]):
                self.items.append((i, float(b[0] + b[2]) / 2, float(b[1] + b[3]) / 2, 0))
                hard.append(name in HARD_NEGATIVE_CATEGORIES)
        self.hard = np.asarray(hard, bool)
        if not self.items:
            raise DatasetError(f"{', '.join(self.paths)}: no objects to cut patches around")
        if train and not any(it[3] > 0 for it in self.items):
            raise DatasetError(f"{', '.join(self.paths)}: no object of a predicted category; "
                               "the classifier needs positives")
        self.transforms = build_train_transforms(cfg, crop=False) if train else None
        # read once: config attribute lookups cost as much as reading a patch
        self.scale_range = tuple(float(v) for v in cfg.INPUT.AUG.SCALE_RANGE)
        self.jitter = float(cfg.MODEL.CLASSIFIER.CENTER_JITTER)
        self.fill = int(cfg.MODEL.CLASSIFIER.BORDER_VALUE)
        self.border_prob = float(cfg.MODEL.CLASSIFIER.BORDER_AUG_PROB)

    @property
    def label_names(self) -> List[str]:
        return [LOOK_ALIKE] + [c["name"] for c in self.classes]

    @property
    def mpp(self) -> Optional[float]:
        return self.source.mpp

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> np.ndarray:
        return np.array([it[3] for it in self.items], np.int64)

    def sample_weights(self) -> Optional[np.ndarray]:
        """``DATALOADER.NEGATIVE_FRACTION`` of the samples are look-alikes (label 0), and of
        those ``DATALOADER.HARD_NEGATIVE_FRACTION`` hard negatives (mined look-alikes)."""
        neg = self.labels() == 0
        w = negative_sampling_weights(neg, float(self.cfg.DATALOADER.NEGATIVE_FRACTION))
        hard_frac = float(self.cfg.DATALOADER.HARD_NEGATIVE_FRACTION)
        if w is None or hard_frac <= 0:
            return w
        within = negative_sampling_weights(self.hard[neg], hard_frac)
        if within is not None:  # both kinds present: split the negatives' mass between them
            w = w.copy()
            w[neg] = w[neg].sum() * within
        return w

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        if isinstance(key, (tuple, list)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(key[1]))
                return self._item(int(key[0]))
        return self._item(int(key))

    def _item(self, idx: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
        ri, cx, cy, label = self.items[idx]
        rec = self.records[ri]
        size = self.patch_size
        win = size
        if self.train:
            lo, hi = self.scale_range
            s = lo + float(torch.rand(())) * (hi - lo)
            win = max(8, int(round(size / s)))
            dx, dy = ((torch.rand(2) * 2 - 1) * self.jitter).tolist()
            cx, cy = cx + dx, cy + dy
        cache = self.source.window_cache()
        h, w = cache.size(rec["file"])
        patch = read_patch(lambda t, l, hh, ww: cache.read(rec["file"], t, l, hh, ww), h, w,
                           cx, cy, win, self.fill)
        image = torch.from_numpy(patch).permute(2, 0, 1)
        if self.train and float(torch.rand(())) < self.border_prob:
            image = border_band(image, self.fill, torch.rand(2))
        if win != size:
            image = F.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                                  align_corners=False, antialias=True)[0].round().clamp(0, 255) \
                .to(torch.uint8)
        if self.transforms is not None:
            image = self.transforms(tv_tensors.Image(image))
        image = image.as_subclass(torch.Tensor).float().div_(255.0)
        return image, {"labels": torch.tensor(label, dtype=torch.int64),
                       "image_id": rec["image_id"]}


def build_dataset(cfg: Any, coco_paths: Sequence[str], train: bool,
                  classes: Optional[List[Dict[str, Any]]] = None
                  ) -> Union[CocoInstanceDataset, CocoPatchDataset]:
    """The training / test data set the model of ``cfg.MODEL.META_ARCHITECTURE`` takes: patches
    for the patch classifier, whole images (cropped in training) for the detectors."""
    if cfg.MODEL.META_ARCHITECTURE == "PatchClassifier":
        return CocoPatchDataset(coco_paths, cfg, train=train, classes=classes)
    return CocoInstanceDataset(coco_paths, cfg, train=train, classes=classes)
