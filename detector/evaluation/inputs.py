"""Reading and checking what is evaluated: a ground-truth COCO file and a predictions file.

Predictions are a COCO results list (``[{"image_id", "category_id", "bbox" XYWH, "score",
"segmentation"?}, ...]``, as ``Instances.to_coco_results`` writes), a COCO instance file (its
``annotations``, score 1.0 when absent: to compare two annotators), or the ``detections.json``
of ``infer_tiles`` (COCO results in slide pixels).

How a prediction finds its ground-truth image:
  1. an integer ``image_id`` that the GT has;
  2. a string ``image_id`` (infer_tiles writes the slide name): the GT image whose ``file_name``,
     base name, file stem or ``slide`` equals it (it must name exactly one image);
  3. no ``image_id`` at all, or one integer id (not in the GT) shared by all results, as
     ``infer_tiles`` writes a slide's detections as image 1: allowed only when the GT has
     exactly one image (the second with a warning).
Anything else is an :class:`EvaluationInputError` naming the file and the fix.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import DetectorError
from ..data.coco import (CocoFormatError, annotation_to_crop_mask, annotation_to_rle, load_coco,
                        rle_to_json)
from ..structures.masks import CropMask, mask_areas, mask_boxes

MODES = ("auto", "masks", "boxes", "points")


class EvaluationInputError(ValueError, DetectorError):
    """Ground truth or predictions that cannot be evaluated; the message names the file."""


@dataclass
class ImageObjects:
    """The objects of one image, as arrays.

    Attributes:
        boxes: ``(N, 4)`` float64 XYXY px.
        labels: ``(N,)`` int64 COCO category ids.
        scores: ``(N,)`` float64 (1.0 for ground truth).
        masks: N :class:`CropMask` of the image, or None (box/point mode).
        areas: ``(N,)`` float64 mask areas (px) when ``masks`` is given, else box areas.
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    masks: Optional[List[CropMask]]
    areas: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)

    def subset(self, idx: np.ndarray) -> "ImageObjects":
        return ImageObjects(self.boxes[idx], self.labels[idx], self.scores[idx],
                            None if self.masks is None else [self.masks[k] for k in idx],
                            self.areas[idx])

    def centres(self) -> np.ndarray:
        """``(N, 2)`` x, y box centres (px); a point prediction is a zero-size box."""
        return (self.boxes[:, :2] + self.boxes[:, 2:]) / 2


def load_gt(path: str) -> Dict[str, Any]:
    """Load a ground-truth COCO file, turning format problems into EvaluationInputError."""
    try:
        return load_coco(path)
    except CocoFormatError as e:
        raise EvaluationInputError(str(e)) from None


def load_predictions(path: str) -> List[Dict[str, Any]]:
    """Read a predictions file: a COCO results list, a COCO instance file (its annotations) or
    a dict holding such a list under ``detections`` / ``results`` / ``annotations``."""
    if not os.path.isfile(path):
        what = "is a folder; give its detections.json" if os.path.isdir(path) else "not found"
        raise EvaluationInputError(f"{path}: predictions file {what}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise EvaluationInputError(f"{path}: not valid JSON ({e}); expected a COCO results "
                                   "list") from None
    if isinstance(data, dict):
        for key in ("detections", "results", "annotations"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise EvaluationInputError(
                f"{path}: a JSON object without a 'detections', 'results' or 'annotations' list;"
                " expected a COCO results list [{image_id, category_id, bbox, score}, ...]")
    if not isinstance(data, list):
        raise EvaluationInputError(f"{path}: expected a COCO results list, got "
                                   f"{type(data).__name__}")
    return data


def _image_lookup(gt: Dict[str, Any]) -> Dict[str, List[int]]:
    names: Dict[str, List[int]] = {}
    for im in gt["images"]:
        fn = str(im.get("file_name", ""))
        keys = {fn, os.path.basename(fn), os.path.splitext(os.path.basename(fn))[0]}
        if im.get("slide") is not None:
            keys.add(str(im["slide"]))
        for k in keys:
            if k:
                names.setdefault(k, []).append(int(im["id"]))
    return {k: sorted(set(v)) for k, v in names.items()}


def normalize_results(results: Sequence[Dict[str, Any]], gt: Dict[str, Any],
                      source: str = "predictions") -> List[Dict[str, Any]]:
    """Check a results list against the GT and return a clean copy.

    Every entry of the copy has an integer ``image_id`` of the GT, an integer ``category_id``
    (the GT's only category when absent and the GT has one), ``bbox`` XYWH (from the mask when
    absent), ``score`` (1.0 when absent) and ``segmentation`` (RLE with str counts) when given.

    Raises:
        EvaluationInputError: naming ``source`` and what to fix.
    """
    images = {int(im["id"]): im for im in gt["images"]}
    cat_ids = sorted(int(c["id"]) for c in gt["categories"])
    lookup: Optional[Dict[str, List[int]]] = None
    out: List[Dict[str, Any]] = []
    remap: Dict[Any, int] = {}
    if len(images) == 1 and results:
        # infer_tiles writes every slide's detections as image 1: with a one-image GT, one
        # unknown integer id shared by all results is that image
        ids = {r.get("image_id") for r in results if isinstance(r, dict)}
        if len(ids) == 1:
            only = next(iter(ids))
            if isinstance(only, int) and only not in images:
                remap[only] = next(iter(images))
                warnings.warn(f"{source}: all results have image_id {only}, which is not in the "
                              f"ground truth; mapped to its only image ({remap[only]})")
    for n, r in enumerate(results):
        if not isinstance(r, dict):
            raise EvaluationInputError(f"{source}: entry {n} is not an object; expected COCO "
                                       "results {image_id, category_id, bbox, score}")
        img = r.get("image_id")
        img = remap.get(img, img) if isinstance(img, int) else img
        if img is None:
            if len(images) != 1:
                raise EvaluationInputError(
                    f"{source}: entry {n} has no image_id and the ground truth has "
                    f"{len(images)} images; give each result the GT image id (or the image "
                    "file name)")
            img_id = next(iter(images))
        elif isinstance(img, str) and not img.lstrip("-").isdigit():
            lookup = lookup if lookup is not None else _image_lookup(gt)
            ids = lookup.get(img) or lookup.get(os.path.splitext(os.path.basename(img))[0], [])
            if len(ids) != 1:
                if not ids and len(images) == 1:
                    ids = list(images)
                else:
                    raise EvaluationInputError(
                        f"{source}: entry {n} has image_id {img!r}, which names "
                        f"{'no' if not ids else 'several'} ground-truth images (matched against "
                        "file_name, its stem and 'slide'); use the GT's integer image ids")
            img_id = ids[0]
        else:
            try:
                img_id = int(img)
            except (TypeError, ValueError):
                raise EvaluationInputError(f"{source}: entry {n} has image_id {img!r}, not an "
                                           "integer or image name") from None
        if img_id not in images:
            raise EvaluationInputError(
                f"{source}: entry {n} refers to image_id {img_id}, which is not in the ground "
                f"truth ({gt.get('_path', 'GT')}: ids {min(images) if images else '-'}.."
                f"{max(images) if images else '-'}); are prediction and ground truth of the "
                "same split?")
        im = images[img_id]
        cat = r.get("category_id")
        if cat is None:
            if len(cat_ids) != 1:
                raise EvaluationInputError(f"{source}: entry {n} has no category_id and the "
                                           f"ground truth has {len(cat_ids)} categories")
            cat = cat_ids[0]
        e: Dict[str, Any] = {"image_id": img_id, "category_id": int(cat),
                             "score": _finite(r.get("score", 1.0), "score", source, n, img_id)}
        if "id" in r:
            e["id"] = r["id"]
        seg = r.get("segmentation")
        h, w = int(im["height"]), int(im["width"])
        if seg:
            if isinstance(seg, dict):
                size = [int(v) for v in seg.get("size", [])]
                if size != [h, w]:
                    raise EvaluationInputError(
                        f"{source}: entry {n} (image {img_id}) has a mask of size {size} but the "
                        f"ground-truth image is {[h, w]} (height, width); predictions must be in "
                        "the coordinates of the GT image")
            try:
                rle = annotation_to_rle({"segmentation": seg}, h, w)
            except Exception as ex:  # malformed RLE/polygon
                raise EvaluationInputError(f"{source}: entry {n} has an unreadable segmentation "
                                           f"({type(ex).__name__}: {ex})") from None
            e["segmentation"] = rle_to_json(rle)
        bbox = r.get("bbox")
        if bbox is None and "point" in r:
            x, y = (float(v) for v in r["point"][:2])
            bbox = [x, y, 0.0, 0.0]
        if bbox is None:
            if "segmentation" not in e:
                raise EvaluationInputError(f"{source}: entry {n} has neither 'bbox' nor "
                                           "'segmentation'")
            m = annotation_to_crop_mask({"segmentation": e["segmentation"]}, h, w)
            x0, y0, x1, y1 = m.bbox if m is not None else (0.0, 0.0, 0.0, 0.0)
            bbox = [x0, y0, x1 - x0, y1 - y0]
        if len(bbox) != 4:
            raise EvaluationInputError(f"{source}: entry {n} has bbox {bbox}; expected [x, y, "
                                       "width, height]")
        e["bbox"] = [_finite(v, "bbox", source, n, img_id) for v in bbox]
        out.append(e)
    return out


def _finite(value: Any, field: str, source: str, n: int, img_id: int) -> float:
    """``value`` as a float, or an error naming the entry when it is not a finite number (a NaN
    score would otherwise be ranked by COCO AP and the threshold search as if it were valid)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)):
        raise EvaluationInputError(
            f"{source}: entry {n} (image {img_id}) has {field} {value!r}; expected a finite "
            "number")
    return float(value)


def check_compatible(gt: Dict[str, Any], results: Sequence[Dict[str, Any]],
                     source: str = "predictions") -> List[str]:
    """Warnings (not errors) about results that can be scored but may be a mistake:
    categories unknown to the GT (they count as false positives)."""
    warnings = []
    gt_cats = {int(c["id"]) for c in gt["categories"]}
    extra = sorted({int(r["category_id"]) for r in results} - gt_cats)
    if extra:
        warnings.append(f"{source}: category ids {extra} are not in the ground truth's categories "
                        f"{sorted(gt_cats)}; those predictions count as false positives (use "
                        "--class-agnostic to ignore labels)")
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in gt["images"]}
    outside = [r for r in results if r["bbox"][0] + r["bbox"][2] > sizes[r["image_id"]][1] + 1
               or r["bbox"][1] + r["bbox"][3] > sizes[r["image_id"]][0] + 1]
    if outside:
        r = outside[0]
        h, w = sizes[r["image_id"]]
        warnings.append(f"{source}: {len(outside)} prediction(s) extend past their GT image (e.g. "
                        f"image {r['image_id']}, {w} x {h} px, box {r['bbox']}): were they made "
                        "on a different image size or level?")
    return warnings


def has_masks(anns: Sequence[Dict[str, Any]]) -> bool:
    """True when every annotation has a non-empty segmentation (and there is at least one)."""
    return bool(anns) and all(bool(a.get("segmentation")) for a in anns)


def choose_mode(gt: Dict[str, Any], results: Sequence[Dict[str, Any]], mode: str = "auto",
                mpp: Optional[float] = None, source: str = "predictions") -> str:
    """The evaluation mode.

    ``auto``: ``masks`` when every GT annotation and every prediction has a segmentation;
    else ``points`` when the GT has no segmentation at all and every GT image has ``mpp`` (or
    ``mpp`` is given): mitosis-style point annotations; else ``boxes``.
    """
    if mode not in MODES:
        raise EvaluationInputError(f"mode must be one of {MODES}, got {mode!r}")
    anns = gt["annotations"]
    gt_masks = has_masks(anns)
    pred_masks = has_masks(results) or (not results and gt_masks)
    if mode == "masks":
        if not gt_masks:
            raise EvaluationInputError(f"{gt.get('_path', 'ground truth')}: --mode masks needs "
                                       "a segmentation on every ground-truth annotation")
        if not pred_masks:
            raise EvaluationInputError(f"{source}: --mode masks needs a segmentation on every "
                                       "prediction (box-only model? use --mode boxes)")
        return "masks"
    if mode == "points":
        check_mpp(gt, mpp)
        return "points"
    if mode == "boxes":
        return "boxes"
    if gt_masks and pred_masks:
        return "masks"
    any_gt_seg = any(bool(a.get("segmentation")) for a in anns)
    if not any_gt_seg and (mpp is not None or (gt["images"] and all(
            im.get("mpp") for im in gt["images"]))):
        return "points"
    return "boxes"


def check_mpp(gt: Dict[str, Any], mpp: Optional[float]) -> None:
    if mpp is not None:
        if not mpp > 0:
            raise EvaluationInputError(f"--mpp must be positive, got {mpp}")
        return
    missing = [im.get("file_name", im["id"]) for im in gt["images"] if not im.get("mpp")]
    if missing:
        raise EvaluationInputError(
            f"{gt.get('_path', 'ground truth')}: points mode matches within a radius in "
            f"micrometres and needs each image's 'mpp'; {len(missing)} image(s) lack it (e.g. "
            f"{missing[0]}): pass --mpp")


def _xywh_to_xyxy(b: Sequence[float]) -> List[float]:
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def objects_of(anns: Sequence[Dict[str, Any]], image: Dict[str, Any], use_masks: bool,
               is_gt: bool) -> ImageObjects:
    """Array form of one image's annotations or results (``bbox`` XYWH -> XYXY)."""
    h, w = int(image["height"]), int(image["width"])
    n = len(anns)
    boxes = np.asarray([_xywh_to_xyxy(a["bbox"]) for a in anns], np.float64).reshape(n, 4)
    labels = np.asarray([a["category_id"] for a in anns], np.int64)
    scores = np.ones(n) if is_gt else np.asarray([a.get("score", 1.0) for a in anns], np.float64)
    masks = None
    if use_masks:
        masks = [annotation_to_crop_mask(a, h, w) or CropMask.empty((h, w)) for a in anns]
        areas = mask_areas(masks)
        if n:
            boxes = mask_boxes(masks)
    else:
        wh = np.clip(boxes[:, 2:] - boxes[:, :2], 0, None)
        areas = wh[:, 0] * wh[:, 1]
    return ImageObjects(boxes, labels, scores, masks, areas)
