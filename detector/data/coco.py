"""COCO instance files: reading, writing and the mask <-> annotation conversions.

A COCO file of ours is loadable by pycocotools and carries ``info.image_root``: the folder that
every ``images[].file_name`` is relative to (absolute, or relative to the JSON file). Images may
carry ``mpp`` (microns per pixel) and ``slide`` (the group id used for splits). Category ids start
at 1. Boxes are XYWH in the file and XYXY in the library.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO

from ..errors import DetectorError
from ..fileio import atomic_write
from ..structures.masks import CropMask, rle_from_json, rle_to_json, trace_polygons


class CocoFormatError(ValueError, DetectorError):
    """A COCO file that cannot be used; the message names the file and the problem."""


# ----------------------------------------------------------------------------- masks <-> COCO
def encode_mask(mask: np.ndarray) -> Dict[str, Any]:
    """Binary H x W mask to a JSON-ready COCO RLE (``counts`` as str)."""
    m = np.asfortranarray(mask.astype(np.uint8, copy=False))
    return rle_to_json(mask_utils.encode(m))


def annotation_parts(mask: CropMask) -> Dict[str, Any]:
    """The JSON parts of one COCO annotation of ``mask``: ``{"segmentation": RLE (str counts),
    "bbox": XYWH px, "area": pixels}``."""
    x0, y0, x1, y1 = mask.bbox
    return {"segmentation": rle_to_json(mask.to_coco_rle()), "bbox": [x0, y0, x1 - x0, y1 - y0],
            "area": float(mask.area)}


def encode_masks(masks: np.ndarray, areas: Optional[Sequence[int]] = None
                 ) -> List[Dict[str, Any]]:
    """``(H, W, N)`` 0/1 masks (uint8, best Fortran-ordered) to the JSON parts of N COCO
    annotations: ``{"segmentation": RLE (str counts), "bbox": XYWH px, "area": pixels}``.
    ``areas`` (pixel counts) may be passed when the caller already knows them."""
    if masks.shape[-1] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks, dtype=np.uint8))
    boxes = mask_utils.toBbox(rles)
    if areas is None:
        # counted on the masks: pycocotools.mask.area overflows with numpy 2 on some builds
        areas = np.count_nonzero(masks.reshape(-1, masks.shape[-1], order="F"), axis=0)
    out = []
    for rle, box, area in zip(rles, boxes, areas):
        out.append({"segmentation": rle_to_json(rle), "bbox": [float(v) for v in box],
                    "area": float(area)})
    return out


def mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """Outer boundaries of a binary ``(H, W)`` mask as COCO polygons through pixel *corners*
    (``[x0, y0, x1, y1, ...]``), which pycocotools rasterises back to the same pixels (holes
    aside: COCO polygons have none). The outlines are :func:`~detector.structures.masks.
    trace_polygons`' exteriors (one per 4-connected part)."""
    return [[float(v) for pt in poly[0][:-1] for v in pt] for poly in trace_polygons(mask)]


def bbox_of_mask(mask: np.ndarray) -> Optional[List[float]]:
    """XYWH box of the mask's pixels (pixel edges), or None for an empty mask."""
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    return [float(xs[0]), float(ys[0]), float(xs[-1] + 1 - xs[0]), float(ys[-1] + 1 - ys[0])]


def mask_annotation(
    mask: np.ndarray,
    image_id: int,
    category_id: int,
    mask_format: str = "rle",
    ann_id: Optional[int] = None,
) -> Optional[Dict[str, Any]]:
    """A COCO annotation (segmentation, bbox XYWH, area, iscrowd 0) of one binary mask, or
    None when the mask is empty."""
    mask = mask.astype(bool, copy=False)
    bbox = bbox_of_mask(mask)
    if bbox is None:
        return None
    if mask_format == "rle":
        seg: Any = encode_mask(mask)
    elif mask_format == "polygon":
        seg = mask_to_polygons(mask)
    else:
        raise ValueError(f"mask_format must be 'rle' or 'polygon', got {mask_format!r}")
    ann = {
        "image_id": int(image_id),
        "category_id": int(category_id),
        "segmentation": seg,
        "bbox": bbox,
        "area": float(mask.sum()),
        "iscrowd": 0,
    }
    if ann_id is not None:
        ann["id"] = int(ann_id)
    return ann


def box_annotation(box_xyxy: Sequence[float], image_id: int, category_id: int,
                   ann_id: Optional[int] = None) -> Dict[str, Any]:
    """A box-only COCO annotation (no segmentation, as for mitosis points)."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    ann = {
        "image_id": int(image_id),
        "category_id": int(category_id),
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": (x1 - x0) * (y1 - y0),
        "iscrowd": 0,
    }
    if ann_id is not None:
        ann["id"] = int(ann_id)
    return ann


def annotation_to_rle(ann: Dict[str, Any], height: int, width: int) -> Optional[Dict[str, Any]]:
    """The annotation's segmentation as a pycocotools RLE (bytes counts), or None if it has
    none (box-only annotation)."""
    seg = ann.get("segmentation")
    if seg is None or (isinstance(seg, list) and len(seg) == 0):
        return None
    if isinstance(seg, list):  # polygons
        rles = mask_utils.frPyObjects(seg, height, width)
        return mask_utils.merge(rles)
    return rle_from_json(seg)


def annotation_to_crop_mask(ann: Dict[str, Any], height: int, width: int) -> Optional[CropMask]:
    """The annotation's segmentation as a :class:`CropMask`, or None without one."""
    rle = annotation_to_rle(ann, height, width)
    return None if rle is None else CropMask.from_coco_rle(rle)


def annotation_to_mask(ann: Dict[str, Any], height: int, width: int) -> Optional[np.ndarray]:
    """The annotation's segmentation decoded to an H x W bool mask, or None without one."""
    rle = annotation_to_rle(ann, height, width)
    return None if rle is None else mask_utils.decode(rle).astype(bool)


# ------------------------------------------------------------------------------- files
def new_coco(categories: Sequence[Dict[str, Any]], image_root: str,
             description: str = "") -> Dict[str, Any]:
    return {
        "info": {"description": description, "image_root": image_root, "version": "1.0"},
        "licenses": [],
        "images": [],
        "annotations": [],
        "categories": [dict(c) for c in categories],
    }


def image_entry(image_id: int, file_name: str, height: int, width: int,
                mpp: Optional[float] = None, slide: Optional[str] = None) -> Dict[str, Any]:
    e: Dict[str, Any] = {"id": int(image_id), "file_name": file_name,
                         "height": int(height), "width": int(width)}
    if mpp is not None:
        e["mpp"] = float(mpp)
    if slide is not None:
        e["slide"] = str(slide)
    return e


def save_coco(data: Dict[str, Any], path: str) -> None:
    """Write a COCO file atomically (temporary file in the same folder, then rename), giving
    annotations consecutive ids from 1 when they have none."""
    _number_annotations(data)
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def save_coco_files(files: Sequence[Tuple[str, Dict[str, Any]]]) -> None:
    """Write several COCO files (``(path, data)`` pairs, e.g. the parts of a split) all or
    none: every file goes to a temporary file first, and only when all are written are they
    renamed into place; an error (disk full, a path that is a folder) leaves none of them."""
    for path, _ in files:
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    with contextlib.ExitStack() as stack:
        for path, data in files:
            f = stack.enter_context(atomic_write(path, "w", encoding="utf-8"))
            _number_annotations(data)
            json.dump(data, f)


def _number_annotations(data: Dict[str, Any]) -> None:
    next_id = 1 + max((a.get("id", 0) for a in data["annotations"]), default=0)
    for a in data["annotations"]:
        if "id" not in a:
            a["id"] = next_id
            next_id += 1


def resolve_image_root(data: Dict[str, Any], json_path: str) -> str:
    """Absolute image root of a COCO file: ``info.image_root`` (relative to the JSON file's
    folder when relative), or the JSON file's folder when absent."""
    base = os.path.dirname(os.path.abspath(json_path))
    root = (data.get("info") or {}).get("image_root")
    if not root:
        return base
    return root if os.path.isabs(root) else os.path.normpath(os.path.join(base, root))


def load_coco(path: str) -> Dict[str, Any]:
    """Read and sanity-check a COCO instance file. The returned dict gets ``_image_root``
    (absolute) and ``_path`` keys; they are not written back by :func:`save_coco` users who
    copy only the standard keys."""
    if not os.path.isfile(path):
        raise CocoFormatError(f"{path}: COCO file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: a COCO instance file is a JSON object; this looks like a "
                              "results list (use it as predictions, not as ground truth)")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise CocoFormatError(f"{path}: missing the '{key}' list of a COCO instance file")
    image_ids = {im["id"] for im in data["images"]}
    cat_ids = {c["id"] for c in data["categories"]}
    for a in data["annotations"]:
        if a["image_id"] not in image_ids:
            raise CocoFormatError(f"{path}: annotation {a.get('id')} refers to image "
                                  f"{a['image_id']}, which is not in 'images'")
        if a["category_id"] not in cat_ids:
            raise CocoFormatError(f"{path}: annotation {a.get('id')} has category "
                                  f"{a['category_id']}, which is not in 'categories'")
    data["_image_root"] = resolve_image_root(data, path)
    data["_path"] = os.path.abspath(path)
    return data


def strip_private(data: Dict[str, Any]) -> Dict[str, Any]:
    """A copy without the ``_image_root``/``_path`` keys added by :func:`load_coco`."""
    return {k: v for k, v in data.items() if not k.startswith("_")}


def to_pycocotools(data: Dict[str, Any]):
    """A ``pycocotools.coco.COCO`` object built from an in-memory dict (no file round trip)."""
    coco = COCO()
    coco.dataset = strip_private(data)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
