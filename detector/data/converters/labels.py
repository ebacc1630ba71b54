"""Instance label images: one integer image per picture, 0 = background, every other value one
object (PNG/TIFF, 8/16/32-bit; RGB-coded labels are read as ``R * 65536 + G * 256 + B``).

Pairing by name: the label of ``images/X.png`` is ``labels/X.<ext>`` or ``labels/X<suffix>.<ext>``
with a suffix among ``_label(s)``, ``_mask(s)``, ``_instance(s)``, ``_inst``, ``_seg`` (also with
``-``). Layouts: ``--input DIR`` holding ``images/`` and ``labels/`` (or ``masks/``); or
``--input IMAGES --labels LABELS``; or one folder holding both, the label files told apart by
their suffix. An image without a label file, a label file without an image, a size mismatch or a
corrupt file is an error naming the file (``--skip-invalid`` skips it). A label image that is all
0 gives a negative image (kept, no instances). The split group of an image is the image itself.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .common import (IMAGE_EXTS, Conversion, ConversionError, add_image, check_image,
                     default_workers, empty_conversion, encode_label_image,
                     list_images, parallel_map, read_error_reason, read_label_array)

DEFAULT_CATEGORY = "nucleus"
_SUFFIX = re.compile(r"[_-](labels?|masks?|instances?|inst|seg)$", re.IGNORECASE)


def label_stem(name: str) -> Optional[str]:
    """The image stem a label file name belongs to when it carries a label suffix, else None."""
    stem = os.path.splitext(name)[0]
    m = _SUFFIX.search(stem)
    return stem[:m.start()] if m else None


def to_label_array(arr: np.ndarray, path: str) -> np.ndarray:
    """A label image as ``(H, W)`` integers; RGB(A) colour codes become ``R*65536+G*256+B``."""
    if arr.ndim == 3:
        if arr.shape[2] in (2, 4):
            arr = arr[..., :-1]  # drop alpha
        if arr.shape[2] == 1 or np.all(arr == arr[..., :1]):
            arr = arr[..., 0]
        else:
            a = arr.astype(np.int64)
            arr = (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ConversionError(path, "label image has non-integer values",
                                  "a label image holds one integer id per object, 0 = background")
        arr = arr.astype(np.int64)
    if arr.dtype == bool:
        raise ConversionError(path, "binary mask, not an instance label image",
                              "label each object with its own integer (e.g. "
                              "skimage.measure.label) or use --format dsb for one mask per object")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise ConversionError(path, "label image has negative values",
                              "0 is background, objects are 1, 2, ...")
    return arr


def pair_files(images_dir: str, labels_dir: str) -> Tuple[List[Tuple[str, Optional[str]]],
                                                          List[str]]:
    """``[(image path, label path or None)]`` sorted by image name, and the label files that
    match no image."""
    same = os.path.abspath(images_dir) == os.path.abspath(labels_dir)
    label_files = list_images(labels_dir)
    by_stem: Dict[str, str] = {}
    for f in label_files:
        s = label_stem(f)
        if s is None and same:
            continue  # in a shared folder, files without a label suffix are the images
        by_stem.setdefault(s if s is not None else os.path.splitext(f)[0],
                           os.path.join(labels_dir, f))
    images = [f for f in list_images(images_dir) if not (same and label_stem(f) is not None)]
    pairs = []
    used = set()
    for f in images:
        stem = os.path.splitext(f)[0]
        lab = by_stem.get(stem)
        if lab is not None:
            used.add(lab)
        pairs.append((os.path.join(images_dir, f), lab))
    orphans = sorted(set(by_stem.values()) - used)
    return pairs, orphans


def _convert_pair(args) -> Dict[str, Any]:
    img_path, lab_path = args
    try:
        h, w = check_image(img_path)
    except Exception as e:
        return {"error": (img_path, read_error_reason(e))}
    try:
        lab = to_label_array(read_label_array(lab_path), lab_path)
    except ConversionError as e:
        return {"error": (lab_path, e.reason + (f" ({e.fix})" if e.fix else ""))}
    except Exception as e:
        return {"error": (lab_path, read_error_reason(e))}
    if lab.shape != (h, w):
        return {"error": (lab_path, f"label image is {lab.shape[1]}x{lab.shape[0]} px but "
                          f"{os.path.basename(img_path)} is {w}x{h} px")}
    ids, parts = encode_label_image(lab)
    return {"height": h, "width": w, "anns": parts, "ids": ids.tolist()}


def convert_labels(input_path: str, *, labels_dir: Optional[str] = None,
                   images_dir: Optional[str] = None, mpp: Optional[float] = None,
                   skip_invalid: bool = False, workers: Optional[int] = None,
                   progress: bool = True) -> Conversion:
    """Convert images + instance label images (see the module docstring for the layouts).

    Returns:
        a :class:`Conversion` with one category ``nucleus``; one exact RLE annotation per label
        value; ``mpp`` on every image when given.
    """
    input_path = os.path.abspath(input_path)
    if not os.path.isdir(input_path):
        raise ConversionError(input_path, "folder not found", "give the folder of the images "
                              "(or one holding images/ and labels/)")
    if images_dir is None:
        sub = os.path.join(input_path, "images")
        images_dir = sub if os.path.isdir(sub) and labels_dir is None else input_path
    if labels_dir is None:
        for name in ("labels", "masks", "label", "instances"):
            if os.path.isdir(os.path.join(input_path, name)):
                labels_dir = os.path.join(input_path, name)
                break
        else:
            labels_dir = input_path
    images_dir, labels_dir = os.path.abspath(images_dir), os.path.abspath(labels_dir)
    for d in (images_dir, labels_dir):
        if not os.path.isdir(d):
            raise ConversionError(d, "folder not found", "check --images/--labels")
    pairs, orphans = pair_files(images_dir, labels_dir)
    if not pairs:
        raise ConversionError(images_dir, f"no images ({', '.join(IMAGE_EXTS)}) found",
                              "give the images folder, and --labels for the label images")
    conv = empty_conversion([{"id": 1, "name": DEFAULT_CATEGORY, "supercategory": "cell"}],
                            images_dir, f"instance label images converted from {labels_dir}")
    for o in orphans:
        conv.fail(o, f"label image without an image of the same name in {images_dir}",
                  skip_invalid, "rename it to <image stem>.png or <image stem>_label.png, or "
                  "pass --skip-invalid")
    todo = []
    for img, lab in pairs:
        if lab is None:
            conv.fail(img, f"no label image for it in {labels_dir}", skip_invalid,
                      "add <stem>.png or <stem>_label.png there (all zeros for an image without "
                      "objects), or pass --skip-invalid")
        else:
            todo.append((img, lab))
    workers = default_workers() if workers is None else workers
    for (img, lab), r in zip(todo, parallel_map(_convert_pair, todo, workers, "labels",
                                                 progress)):
        if "error" in r:
            conv.fail(*r["error"], skip_invalid=skip_invalid)
            continue
        image_id = add_image(conv, os.path.relpath(img, images_dir), r["height"], r["width"],
                             mpp=mpp, slide=os.path.splitext(os.path.basename(img))[0])
        for part in r["anns"]:
            conv.coco["annotations"].append({"image_id": image_id, "category_id": 1, **part,
                                             "iscrowd": 0})
    return conv
