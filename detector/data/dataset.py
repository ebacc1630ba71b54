"""COCO instance files as a training dataset of ``torchvision.tv_tensors``.

Each item is ``(image, target)``: ``image`` a ``[3, H, W]`` float32 tensor in 0..1 and ``target``
``{"boxes": BoundingBoxes (N, 4) XYXY px, "labels": int64 (N,) contiguous 1..K (index into
classes + 1), "masks": Mask (N, H, W) uint8 (only when the data has masks), "image_id": int}``.
Images without instances are kept (negatives; N = 0). Everything that can be wrong with the data
(missing image files, categories that differ between files or from the config, an empty data
set) is checked when the dataset is built, before any training starts.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from torchvision.transforms import v2

from ..errors import DetectorError
from ..structures.instances import median_diameter, size_scale
from .coco import CocoFormatError, annotation_to_mask, load_coco
from .image_io import WindowCache, tissue_fraction

from .transforms import RandomScaleCrop, build_train_transforms, masks_to_boxes_xyxy
from .unet_targets import UNetTargets

logger = logging.getLogger(__name__)


class DatasetError(ValueError, DetectorError):
    """A data set that cannot be trained or evaluated on; the message names the file and fix."""


def coco_classes(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The categories of a loaded COCO dict as ``[{"id", "name"}]`` sorted by id."""
    return sorted(({"id": int(c["id"]), "name": str(c["name"])} for c in data["categories"]),
                  key=lambda c: c["id"])


def check_classes(found: List[Dict[str, Any]], expected: List[Dict[str, Any]], where: str,
                  expected_from: str) -> None:
    """Raise :class:`DatasetError` when two category lists differ (ids and names)."""
    if found == expected:
        return
    exp = {c["id"]: c["name"] for c in expected}
    got = {c["id"]: c["name"] for c in found}
    unknown = [f"{i}:{n}" for i, n in got.items() if exp.get(i) != n]
    absent = [f"{i}:{n}" for i, n in exp.items() if got.get(i) != n]
    raise DatasetError(
        f"{where}: its categories differ from {expected_from}: "
        f"{'unknown ' + ', '.join(unknown) if unknown else ''}"
        f"{'; ' if unknown and absent else ''}{'missing ' + ', '.join(absent) if absent else ''}. "
        "Every COCO file of a run (and the checkpoint it starts from or resumes) must have the "
        "same categories with the same ids; convert them with the same category list.")


def split_negative_categories(data: Dict[str, Any], negative_names: Sequence[str]
                              ) -> Tuple[List[Dict[str, Any]], set]:
    """The predicted categories of a loaded COCO dict (``[{"id", "name"}]`` sorted by id) and the
    ids of its negative-only ones (names in ``DATASETS.NEGATIVE_CATEGORIES``)."""
    neg = set(negative_names)
    cats = coco_classes(data)
    return [c for c in cats if c["name"] not in neg], {c["id"] for c in cats if c["name"] in neg}


def negative_sampling_weights(negative: np.ndarray, fraction: float) -> Optional[np.ndarray]:
    """Per-item sampling probabilities that draw the ``negative`` items together ``fraction``
    of the time and the others the rest (``DATALOADER.NEGATIVE_FRACTION``), or None (uniform)
    when the fraction is 0 or the items are all of one kind."""
    if fraction <= 0 or not negative.any() or negative.all():
        return None
    return np.where(negative, fraction / negative.sum(), (1.0 - fraction) / (~negative).sum())


def _records(data: Dict[str, Any], path: str, negative_ids: set = frozenset()
             ) -> List[Dict[str, Any]]:
    """One record per image: its file, size, mpp, the annotations of predicted categories
    (``anns``) and the boxes (XYXY) of negative-only objects (``negatives``)."""
    anns: Dict[int, List[Dict[str, Any]]] = {}
    for a in data["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    root = data["_image_root"]
    cat_names = {c["id"]: c["name"] for c in data.get("categories", [])}
    out = []
    for im in data["images"]:
        own = [a for a in anns.get(im["id"], []) if not a.get("iscrowd", 0)]
        neg_anns = [a for a in own if a["category_id"] in negative_ids]
        negatives = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                      a["bbox"][1] + a["bbox"][3]] for a in neg_anns]
        out.append({
            "file": os.path.join(root, im["file_name"]),
            "image_id": int(im["id"]),
            "height": int(im["height"]),
            "width": int(im["width"]),
            "mpp": im.get("mpp"),
            "anns": [a for a in own if a["category_id"] not in negative_ids],
            "negatives": np.asarray(negatives, np.float32).reshape(-1, 4),
            "negative_categories": [cat_names.get(a["category_id"], "") for a in neg_anns],
            "source": path,
        })
    return out


def check_images_exist(records: Sequence[Dict[str, Any]], path: str, root: str) -> None:
    """Raise :class:`DatasetError` listing the first missing image files of a COCO file."""
    missing = [r["file"] for r in records if not os.path.isfile(r["file"])]
    if missing:
        show = "\n  ".join(missing[:5])
        raise DatasetError(
            f"{path}: {len(missing)} of {len(records)} image files are missing, e.g.\n  {show}\n"
            f"file_name is read relative to the image root {root} (info.image_root of the COCO "
            "file, relative to the JSON file's folder); fix info.image_root or the files.")


def check_boxes(records: Sequence[Dict[str, Any]], path: str) -> None:
    """Raise :class:`DatasetError` for box-only annotations (no segmentation) whose width or
    height is zero, negative or not a finite number: they would be dropped silently later."""
    bad = []
    for r in records:
        for a in r["anns"]:
            if a.get("segmentation"):
                continue
            box = a.get("bbox")
            try:
                ok = len(box) == 4 and all(math.isfinite(float(v)) for v in box) \
                    and float(box[2]) > 0 and float(box[3]) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                bad.append(f"annotation {a.get('id')} (image {r['image_id']}): bbox {box}")
    if bad:
        show = "\n  ".join(bad[:5])
        raise DatasetError(
            f"{path}: {len(bad)} box annotation(s) without a positive, finite width and height, "
            f"e.g.\n  {show}\nbbox is [x, y, width, height] in px; fix or remove them.")


class CocoInstanceDataset(Dataset):
    """Images and instances of one or more COCO files (same categories).

    Args:
        coco_paths: COCO instance files (``info.image_root`` names their image folder).
        cfg: the config (``INPUT`` for augmentation, ``MODEL`` for the architecture).
        train: apply the training augmentation (``build_train_transforms(cfg)``); else images
            are returned whole and unaugmented.
        classes: expected categories (``[{"id", "name"}]``, e.g. from a checkpoint); default:
            those of the first file.
        target_fn: called as ``target_fn(image, target) -> target`` after augmentation (the
            U-Net's targets); default: ``UNetTargets(cfg)`` when the architecture is UNet.

    Items are looked up by index, or by ``(index, seed)``: the augmentation then draws its
    random numbers from ``seed`` alone (the global RNG is left untouched), so that the
    sample at a given position of the training stream is the same in a resumed run.
    """

    def __init__(self, coco_paths: Sequence[str], cfg: Any, train: bool = True,
                 classes: Optional[List[Dict[str, Any]]] = None,
                 target_fn: Optional[Callable[[torch.Tensor, Dict[str, Any]], Dict[str, Any]]] = None,
                 transforms: Optional[Callable] = None) -> None:
        paths = [str(p) for p in coco_paths]
        if not paths:
            raise DatasetError(f"DATASETS.{'TRAIN' if train else 'TEST'} is empty: name at least "
                               "one COCO instance file (see tools/convert_to_coco.py)")
        self.paths = paths
        self.records: List[Dict[str, Any]] = []
        self.classes: List[Dict[str, Any]] = list(classes) if classes else []
        expected_from = "the expected categories (checkpoint/config)" if classes else None
        self.has_masks = True
        n_anns = 0
        negative_names = list(cfg.DATASETS.NEGATIVE_CATEGORIES)
        pending: List[Tuple[str, List[Dict[str, Any]], str]] = []
        for path in paths:
            try:
                data = load_coco(path)
            except CocoFormatError as e:
                raise DatasetError(str(e)) from None
            found, negative_ids = split_negative_categories(data, negative_names)
            if not found and not negative_ids:
                raise DatasetError(f"{path}: has no categories")
            recs = _records(data, path, negative_ids)
            # a file whose objects are all of negative-only categories may carry any category
            # list: it cannot mislabel anything
            if not negative_ids or any(r["anns"] for r in recs):
                if not self.classes:
                    self.classes, expected_from = found, f"those of {path}"
                else:
                    check_classes(found, self.classes, path, expected_from or paths[0])
            pending.append((path, recs, data["_image_root"]))
        if not self.classes:
            raise DatasetError(f"{', '.join(paths)}: no file has objects of a predicted category "
                               f"(all are negatives or of DATASETS.NEGATIVE_CATEGORIES "
                               f"{negative_names}); add the positive set")
        for path, recs, root in pending:
            check_images_exist(recs, path, root)
            check_boxes(recs, path)
            for r in recs:
                for a in r["anns"]:
                    seg = a.get("segmentation")
                    if not seg:
                        self.has_masks = False
                n_anns += len(r["anns"])
            self.records.extend(recs)
        if train and cfg.DATALOADER.FILTER_EMPTY:
            self.records = [r for r in self.records if r["anns"]]
        if not self.records:
            raise DatasetError(f"{', '.join(paths)}: no images; the data set is empty")
        if train and n_anns == 0:
            raise DatasetError(f"{', '.join(paths)}: {len(self.records)} images but no "
                               "annotations; nothing to learn from (check the conversion)")
        for key, value in (("INPUT.CROP_OBJECT_FRACTION", cfg.INPUT.CROP_OBJECT_FRACTION),
                           ("INPUT.CROP_MIN_TISSUE", cfg.INPUT.CROP_MIN_TISSUE),
                           ("DATALOADER.NEGATIVE_FRACTION", cfg.DATALOADER.NEGATIVE_FRACTION)):
            if not 0.0 <= float(value) < 1.0 + (key != "DATALOADER.NEGATIVE_FRACTION"):
                raise DatasetError(f"{key} {value}: must be a fraction in [0, 1]"
                                   + ("" if key != "DATALOADER.NEGATIVE_FRACTION" else
                                      " below 1 (some positives must be drawn)"))
        n_cfg = int(cfg.MODEL.NUM_CLASSES)
        if n_cfg and n_cfg != len(self.classes):
            raise DatasetError(f"{paths[0]}: {len(self.classes)} categories "
                               f"{[c['name'] for c in self.classes]} but MODEL.NUM_CLASSES is "
                               f"{n_cfg}; set MODEL.NUM_CLASSES 0 to take them from the data")
        self.cat_to_label = {c["id"]: i + 1 for i, c in enumerate(self.classes)}
        self.train = train
        self.cfg = cfg
        self.nucleus_diameter = float(cfg.INPUT.NUCLEUS_DIAMETER)
        if self.nucleus_diameter < 0:
            raise DatasetError(f"INPUT.NUCLEUS_DIAMETER {self.nucleus_diameter}: must be >= 0 "
                               "(0 = no size normalisation)")
        self._set_size_scales()
        arch = cfg.MODEL.META_ARCHITECTURE
        if train and arch == "MaskRCNN" and not self.has_masks:
            raise DatasetError(f"{', '.join(paths)}: some annotations have no segmentation "
                               "(box/point data), which Mask R-CNN cannot learn from; train "
                               "MODEL.META_ARCHITECTURE FasterRCNN on it "
                               "(e.g. configs/mitosis/faster_rcnn_R_50_FPN.yaml)")
        self.with_masks = self.has_masks and arch != "FasterRCNN"
        self.transforms = transforms if transforms is not None else (
            build_train_transforms(cfg) if train else None)
        if target_fn is None and arch == "UNet":
            target_fn = UNetTargets(cfg)
        self.target_fn = target_fn

    def _set_size_scales(self) -> None:
        """``size_scale`` of every record: the factor that brings its median annotated
        nucleus to ``INPUT.NUCLEUS_DIAMETER`` px (1 without size normalisation; images
        without objects get the median factor of the others)."""
        for r in self.records:
            r["size_scale"] = 1.0
            if self.nucleus_diameter > 0 and r["anns"]:
                d = median_diameter([a.get("area") or a["bbox"][2] * a["bbox"][3]
                                     for a in r["anns"]])
                r["size_scale"] = size_scale(d, self.nucleus_diameter)
        if self.nucleus_diameter > 0:
            known = [r["size_scale"] for r in self.records if r["anns"]]
            fill = float(np.median(known)) if known else 1.0
            for r in self.records:
                if not r["anns"]:
                    r["size_scale"] = fill

    # ------------------------------------------------------------------------------ info
    def __len__(self) -> int:
        return len(self.records)

    def window_cache(self) -> WindowCache:
        """This process's reader cache (each DataLoader worker makes its own)."""
        cache = self.__dict__.get("_window_cache")
        if cache is None:
            cache = self._window_cache = WindowCache()
        return cache

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_window_cache", None)  # open files and cached pixels stay in their process
        return state

    def sample_weights(self) -> Optional[np.ndarray]:
        """Sampling probability of every record for ``DATALOADER.NEGATIVE_FRACTION`` (negative
        images together drawn that often, the others the rest) and ``DATASETS.TRAIN_WEIGHTS``
        (per file), or None for uniform sampling."""
        w = negative_sampling_weights(np.array([not r["anns"] for r in self.records], bool),
                                      float(self.cfg.DATALOADER.NEGATIVE_FRACTION))
        per_file = [float(v) for v in self.cfg.DATASETS.TRAIN_WEIGHTS]
        if not per_file or not self.train:
            return w
        if len(per_file) != len(self.paths) or min(per_file) <= 0:
            raise DatasetError(f"DATASETS.TRAIN_WEIGHTS {per_file}: give one weight > 0 per "
                               f"DATASETS.TRAIN file ({len(self.paths)})")
        src = np.array([per_file[self.paths.index(r["source"])] for r in self.records])
        w = (np.full(len(self.records), 1.0 / len(self.records)) if w is None else w) * src
        return w / w.sum()

    @property
    def mpp(self) -> Optional[float]:
        """Median ``mpp`` of the images when all have one, else None."""
        vals = [r["mpp"] for r in self.records]
        if vals and all(v is not None for v in vals):
            return float(np.median(np.asarray(vals, dtype=np.float64)))
        return None

    # ------------------------------------------------------------------------------ items
    def load(self, idx: int, window: Optional[Tuple[int, int, int]] = None
             ) -> Tuple[tv_tensors.Image, Dict[str, Any]]:
        """Image (uint8 ``[3, H, W]``) and target of record ``idx`` before augmentation.

        With ``window = (top, left, size)`` only that square is returned (zero-padded where it
        leaves the image), and only the masks of instances whose box meets it are decoded:
        a 1000 px field with hundreds of nuclei is never expanded to hundreds of full-size
        masks for a 256 px training crop. Only the window is read from whole-slide files and
        large TIFFs; other images are decoded once per worker and cached (:class:`WindowCache`).
        """
        rec = self.records[idx]
        cache = self.window_cache()
        h, w = cache.size(rec["file"])
        if window is None:
            img = cache.read(rec["file"], 0, 0, h, w)
        else:
            img = cache.read(rec["file"], window[0], window[1], window[2], window[2])
        anns = rec["anns"]
        boxes = np.zeros((len(anns), 4), np.float32)
        for i, a in enumerate(anns):
            x, y, bw, bh = a["bbox"]
            boxes[i] = [x, y, x + bw, y + bh]
        if window is not None:
            top, left, size = window
            keep = ((boxes[:, 0] < left + size) & (boxes[:, 2] > left)
                    & (boxes[:, 1] < top + size) & (boxes[:, 3] > top))
            anns = [a for a, k in zip(anns, keep) if k]
            boxes = boxes[keep] - np.array([left, top, left, top], np.float32)
            ch, cw = size, size
        else:
            ch, cw = h, w
        image = tv_tensors.Image(torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1))
        target: Dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY",
                                              canvas_size=(ch, cw)),
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns],
                                   dtype=torch.int64),
            "image_id": rec["image_id"],
        }
        if rec["mpp"] is not None and rec["size_scale"] == 1.0:
            # UNetTargets scales its px sizes to the image's mpp (not to size-normalised crops)
            target["mpp"] = float(rec["mpp"])
        if self.with_masks:
            masks = np.zeros((len(anns), ch, cw), np.uint8)
            for i, a in enumerate(anns):
                m = annotation_to_mask(a, h, w)
                if m is not None:
                    masks[i] = m if window is None else _crop_pad(m, *window)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        return image, target

    def _clean(self, image: torch.Tensor, target: Dict[str, Any]) -> Dict[str, Any]:
        """Drop instances emptied by cropping; boxes of masked data become the masks' boxes."""
        h, w = image.shape[-2:]
        if "masks" in target:
            masks = target["masks"]
            boxes = masks_to_boxes_xyxy(masks)
            keep = boxes[:, 2] > boxes[:, 0]  # an empty mask has the box [0, 0, 0, 0]
            masks, boxes = masks[keep], boxes[keep]
            target["masks"] = tv_tensors.Mask(masks.as_subclass(torch.Tensor).to(torch.uint8))
        else:
            b = target["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4).clone()
            b[:, 0::2] = b[:, 0::2].clamp(0, w)
            b[:, 1::2] = b[:, 1::2].clamp(0, h)
            keep = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
            boxes = b[keep]
        target["boxes"] = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))
        target["labels"] = target["labels"][keep]
        return target

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        if isinstance(key, (tuple, list)):
            idx, seed = int(key[0]), int(key[1])
        else:
            idx, seed = int(key), None
        if seed is None:
            return self._item(idx)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._item(idx)

    def _item(self, idx: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
        transforms = self.transforms
        first = transforms.transforms[0] if isinstance(transforms, v2.Compose) and \
            transforms.transforms else None
        if isinstance(first, RandomScaleCrop):
            # draw the crop window first and load only it (same RNG draws as the transform)
            rec = self.records[idx]
            canvas = [tv_tensors.Mask(torch.empty(0, rec["height"], rec["width"]))]
            p = self._place_crop(rec, first, canvas)
            image, target = self.load(idx, (p["top"], p["left"], p["win"]))
            image = first.transform(image, {"top": 0, "left": 0, "win": p["win"]})
            target = {k: first.transform(v, {"top": 0, "left": 0, "win": p["win"]})
                      if isinstance(v, torch.Tensor) and k != "labels" else v
                      for k, v in target.items()}
            rest = transforms.transforms[1:]
            if rest:
                image, target = v2.Compose(rest)(image, target)
        else:
            image, target = self.load(idx)
            if transforms is not None:
                image, target = transforms(image, target)
        target = self._clean(image, target)
        image = image.as_subclass(torch.Tensor).float().div_(255.0)
        if self.target_fn is not None:
            target = self.target_fn(image, target)
        return image, target


    def _place_crop(self, rec: Dict[str, Any], crop: RandomScaleCrop, canvas: List[Any]
                    ) -> Dict[str, int]:
        """The crop window ``{"top", "left", "win"}`` of a training sample: drawn by ``crop``,
        then centred on an object (``INPUT.CROP_OBJECT_FRACTION``) or redrawn until it holds
        tissue (``INPUT.CROP_MIN_TISSUE``). Random numbers come from torch's RNG, which the
        sample's seed fixes."""
        p = self._sized(rec, crop.make_params(canvas))
        inp = self.cfg.INPUT
        frac, min_tissue = float(inp.CROP_OBJECT_FRACTION), float(inp.CROP_MIN_TISSUE)
        if frac <= 0 and min_tissue <= 0:
            return p
        win = p["win"]
        if frac > 0 and torch.rand(()) < frac:
            boxes = [a["bbox"] for a in rec["anns"]]
            objects = [[x + bw / 2, y + bh / 2] for x, y, bw, bh in boxes] + \
                [[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for b in rec["negatives"]]
            if objects:
                cx, cy = objects[int(torch.randint(0, len(objects), ()).item())]
                jitter = float(inp.CROP_JITTER) * win
                dx, dy = ((torch.rand(2) * 2 - 1) * jitter).tolist()
                return {"top": int(round(cy + dy - win / 2)), "left": int(round(cx + dx - win / 2)),
                        "win": win}
        if min_tissue > 0:
            cache = self.window_cache()
            for _ in range(10):
                w = p["win"]
                if tissue_fraction(cache.read(rec["file"], p["top"], p["left"], w, w)) >= min_tissue:
                    break
                p = self._sized(rec, crop.make_params(canvas))
        return p

    @staticmethod
    def _sized(rec: Dict[str, Any], p: Dict[str, int]) -> Dict[str, int]:
        """The crop window ``p`` resized about its centre by the record's ``size_scale``
        (``INPUT.NUCLEUS_DIAMETER``): a window ``1 / size_scale`` times as wide, resized to the
        crop side, shows the image's nuclei at the canonical size."""
        f = float(rec.get("size_scale", 1.0))
        if f == 1.0:
            return p
        win = max(1, int(round(p["win"] / f)))
        h, w = int(rec["height"]), int(rec["width"])
        # the same relative place in the image, the window kept inside it where it fits
        top = p["top"] + (p["win"] - win) // 2
        left = p["left"] + (p["win"] - win) // 2
        top = min(max(top, 0), h - win) if h >= win else -((win - h) // 2)
        left = min(max(left, 0), w - win) if w >= win else -((win - w) // 2)
        return {"top": int(top), "left": int(left), "win": win}


def _crop_pad(arr: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """``arr[top:top+size, left:left+size]`` (H x W or H x W x C), zero-padded outside."""
    h, w = arr.shape[:2]
    out = np.zeros((size, size) + arr.shape[2:], arr.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, h), min(left + size, w)
    if y1 > y0 and x1 > x0:
        out[y0 - top:y1 - top, x0 - left:x1 - left] = arr[y0:y1, x0:x1]
    return out


def collate_list(batch: List[Tuple[torch.Tensor, Dict[str, Any]]]) -> Tuple[List[torch.Tensor], List[Dict[str, Any]]]:
    """Batches as lists (images of different sizes are fine for the detection models)."""
    return [b[0] for b in batch], [b[1] for b in batch]
