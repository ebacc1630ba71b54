"""Data Science Bowl 2018 layout: ``<id>/images/<id>.png`` + ``<id>/masks/*.png``, one binary
mask (0/255) per nucleus.

Every mask becomes one annotation whose RLE is the mask pixel for pixel (overlapping masks are
kept as they are and reported). Images are RGBA PNGs; they are referenced, not rewritten. DSB has
no mpp; the split group of an image is the image itself.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import cv2
import numpy as np

from ..coco import annotation_to_mask, encode_masks
from .common import (Conversion, ConversionError, add_image, check_image, chunk_size,
                     default_workers, empty_conversion, parallel_map, read_error_reason,
                     read_label_array)

DEFAULT_CATEGORY = "nucleus"


def find_samples(root: str) -> List[str]:
    """Sample folder names under ``root`` (those with an ``images`` sub-folder), sorted."""
    if not os.path.isdir(root):
        raise ConversionError(root, "folder not found", "give the DSB stage1_train folder that "
                              "holds <id>/images/<id>.png and <id>/masks/*.png")
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "images")))
    if not names:
        raise ConversionError(root, "no <id>/images/ folders found", "is this a DSB2018 "
                              "stage1_train folder? for other layouts use --format labels")
    return names


def _convert_sample(args) -> Dict[str, Any]:
    """Worker: read one sample's image and masks; return its image size and annotation parts,
    or the bad file and why."""
    try:
        return _read_sample(*args)
    except OSError as e:  # unreadable folder (permissions, vanished files)
        return {"error": (getattr(e, "filename", None) or os.path.join(*args),
                          f"cannot read ({e.strerror or e})")}


def _read_sample(root: str, name: str) -> Dict[str, Any]:
    folder = os.path.join(root, name)
    img_dir = os.path.join(folder, "images")
    imgs = sorted(f for f in os.listdir(img_dir) if not f.startswith("."))
    if not imgs:
        return {"error": (img_dir, "no image file in the images/ folder")}
    preferred = [f for f in imgs if os.path.splitext(f)[0] == name]
    img_name = (preferred or imgs)[0]
    img_path = os.path.join(img_dir, img_name)
    try:
        h, w = check_image(img_path)
    except Exception as e:  # ImageReadError and anything a decoder throws
        return {"error": (img_path, read_error_reason(e))}
    mask_dir = os.path.join(folder, "masks")
    mask_files = sorted(f for f in os.listdir(mask_dir) if not f.startswith(".")) \
        if os.path.isdir(mask_dir) else []
    # masks are read and encoded in chunks of at most MASK_BUDGET_BYTES; OpenCV's SIMD
    # countNonZero / bitwise_or keep the per-mask work to one pass over the pixels
    step = chunk_size(h, w)
    union = np.zeros((h, w), dtype=np.uint8)
    anns: List[Dict[str, Any]] = []
    empty: List[str] = []
    total_area = 0
    for a in range(0, len(mask_files), step):
        chunk = mask_files[a:a + step]
        masks = np.zeros((h, w, len(chunk)), dtype=np.uint8, order="F")
        areas: List[int] = []
        k = 0
        for mf in chunk:
            mp = os.path.join(mask_dir, mf)
            try:
                m = read_label_array(mp, cv2.IMREAD_GRAYSCALE)
            except Exception as e:
                return {"error": (mp, read_error_reason(e))}
            if m.ndim == 3:
                m = np.ascontiguousarray(m[..., 0])
            if m.shape != (h, w):
                return {"error": (mp, f"mask is {m.shape[1]}x{m.shape[0]} px but its image "
                                  f"{img_name} is {w}x{h} px")}
            if m.dtype != np.uint8:
                m = (m > 0).astype(np.uint8)
            area = cv2.countNonZero(m)
            if area == 0:
                empty.append(mp)
                continue
            cv2.min(m, 1, dst=m)  # 0/255 -> 0/1
            out = cv2.transpose(m, dst=masks[:, :, k].T)  # into the Fortran stack, SIMD
            if not np.shares_memory(out, masks):  # OpenCV reallocated: copy the plain way
                masks[:, :, k] = m
            cv2.bitwise_or(union, m, dst=union)
            areas.append(area)
            k += 1
        total_area += sum(areas)
        anns += encode_masks(masks[:, :, :k], areas)
    overlap_px = 0
    if total_area > cv2.countNonZero(union):  # rare: count the pixels in more than one mask
        cover = np.zeros((h, w), dtype=np.uint16)
        for part in anns:
            cover += annotation_to_mask(part, h, w).astype(np.uint16)
        overlap_px = int((cover > 1).sum())
    return {"file_name": os.path.join(name, "images", img_name), "height": h, "width": w,
            "anns": anns, "empty": empty, "overlap_px": overlap_px}


def convert_dsb(root: str, *, skip_invalid: bool = False, workers: Optional[int] = None,
                progress: bool = True) -> Conversion:
    """Convert a DSB2018-layout folder.

    Args:
        root: the folder holding ``<id>/images/<id>.png`` and ``<id>/masks/*.png``.
        skip_invalid: leave out samples with an unreadable image or mask (listed in
            ``Conversion.skipped``) instead of raising :class:`ConversionError`.
        workers: processes (default: up to 2).
    Returns:
        a :class:`Conversion` with one category ``nucleus`` (id 1); RLE segmentations exact to
        the source masks; ``slide`` = the sample id (each image is its own split group).
    """
    root = os.path.abspath(root)
    names = find_samples(root)
    conv = empty_conversion([{"id": 1, "name": DEFAULT_CATEGORY, "supercategory": "cell"}],
                            root, f"DSB2018 layout converted from {root}")
    workers = default_workers() if workers is None else workers
    overlap_images = 0
    n_empty = 0
    for name, r in zip(names, parallel_map(_convert_sample, [(root, n) for n in names], workers,
                                           "dsb", progress)):
        if "error" in r:
            conv.fail(*r["error"], skip_invalid=skip_invalid)
            continue
        image_id = add_image(conv, r["file_name"], r["height"], r["width"], slide=name)
        for part in r["anns"]:
            conv.coco["annotations"].append({"image_id": image_id, "category_id": 1, **part,
                                             "iscrowd": 0})
        if r["overlap_px"]:
            overlap_images += 1
            conv.count("overlap_pixels", r["overlap_px"])
        n_empty += len(r["empty"])
    if overlap_images:
        conv.notes.append(f"{overlap_images} image(s) have overlapping instance masks "
                          f"({conv.counters['overlap_pixels']} pixels in more than one mask); "
                          "each annotation keeps its full mask")
    conv.counters["overlap_images"] = overlap_images
    if n_empty:
        conv.notes.append(f"{n_empty} empty mask file(s) (no foreground pixel) were ignored")
    conv.counters["empty_masks"] = n_empty
    return conv
