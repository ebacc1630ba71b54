"""Instance label images: one integer image per picture, 0 = background, every other value one
object (PNG/TIFF, 8/16/32-bit; RGB-coded labels are read as ``R * 65536 + G * 256 + B``).

Pairing by name: the label of ``images/X.png`` is ``labels/X.<ext>`` or ``labels/X<suffix>.<ext>``
with a suffix among ``_label(s)``, ``_mask(s)``, ``_instance(s)``, ``_inst``, ``_seg`` (also with
``-``). Layouts: ``--input DIR`` holding ``images/`` and ``labels/`` (or ``masks/``); or
``--input IMAGES --labels LABELS``; or one folder holding both, the label files told apart by
their suffix. An image without a label file, a label file without an image, a size mismatch or a
corrupt file is an error naming the file (``--skip-invalid`` skips it). A label image that is all
0 gives a negative image (kept, no instances). The split group of an image is the image itself.

Classes (``--classes DIR``): class-map images paired with the images by name like the label
images (CoNSeP/PanNuke "type maps": 0 background, v > 0 a class). Each instance gets the class
value most frequent under its pixels (class 0 pixels ignored; an instance over class 0 only is
dropped and counted in a note); category ``v`` is named ``class_<v>`` with id ``v`` until
``--categories "1=nucleus,2=mitotic figure"`` names (and renumbers) them.
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


def instance_classes(label: np.ndarray, class_map: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The majority non-zero class value under each instance ``ids[k]`` of ``label`` ((H, W)
    ints, 0 background) in ``class_map`` ((H, W) ints); 0 where an instance covers class 0
    only. Returns ``(N,)`` int64 aligned with ``ids``."""
    fg = (label != 0) & (class_map != 0)
    out = np.zeros(len(ids), np.int64)
    if not fg.any() or len(ids) == 0:
        return out
    lab = label[fg].astype(np.int64)
    cls = class_map[fg].astype(np.int64)
    pairs, counts = np.unique(np.stack([lab, cls], 1), axis=0, return_counts=True)
    # sort by (instance, count) so the last row of each instance is its majority class
    order = np.lexsort((counts, pairs[:, 0]))
    pairs = pairs[order]
    last = np.r_[pairs[1:, 0] != pairs[:-1, 0], True]
    best = dict(zip(pairs[last, 0].tolist(), pairs[last, 1].tolist()))
    for k, i in enumerate(ids.tolist()):
        out[k] = best.get(int(i), 0)
    return out


def _convert_pair(args) -> Dict[str, Any]:
    img_path, lab_path = args[:2]
    cls_path = args[2] if len(args) > 2 else None
    try:
        h, w = check_image(img_path)
    except Exception as e:
        return {"error": (img_path, read_error_reason(e))}
    lab = _read_map(lab_path, "label image", img_path, h, w)
    if isinstance(lab, dict):
        return lab
    ids, parts = encode_label_image(lab)
    out = {"height": h, "width": w, "anns": parts, "ids": ids.tolist()}
    if cls_path is not None:
        cmap = _read_map(cls_path, "class map", img_path, h, w)
        if isinstance(cmap, dict):
            return cmap
        out["classes"] = instance_classes(lab, cmap, ids).tolist()
    return out


def _read_map(path: str, what: str, img_path: str, h: int, w: int) -> Any:
    """A label or class map of the image's size as an integer array, or ``{"error": (path,
    reason)}`` when it cannot be read or has another size."""
    try:
        arr = to_label_array(read_label_array(path), path)
    except ConversionError as e:
        return {"error": (path, e.reason + (f" ({e.fix})" if e.fix else ""))}
    except Exception as e:
        return {"error": (path, read_error_reason(e))}
    if arr.shape != (h, w):
        return {"error": (path, f"{what} is {arr.shape[1]}x{arr.shape[0]} px but "
                          f"{os.path.basename(img_path)} is {w}x{h} px")}
    return arr


def convert_labels(input_path: str, *, labels_dir: Optional[str] = None,
                   images_dir: Optional[str] = None, classes_dir: Optional[str] = None,
                   mpp: Optional[float] = None,
                   skip_invalid: bool = False, workers: Optional[int] = None,
                   progress: bool = True) -> Conversion:
    """Convert images + instance label images (see the module docstring for the layouts).

    Args:
        classes_dir: optional folder of class-map images paired by name (see the module
            docstring): instances get the majority class value, categories ``class_<v>``.

    Returns:
        a :class:`Conversion` with one category ``nucleus`` (or one ``class_<v>`` per class
        value found, with ``classes_dir``); one exact RLE annotation per label value; ``mpp``
        on every image when given.
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
    if classes_dir is not None:
        classes_dir = os.path.abspath(classes_dir)
        if not os.path.isdir(classes_dir):
            raise ConversionError(classes_dir, "folder not found",
                                  "--classes takes the folder of the class-map images")
        cls_pairs, _ = pair_files(images_dir, classes_dir)
        cls_of = dict(cls_pairs)
        with_cls = []
        for img, lab in todo:
            if cls_of.get(img) is None:
                conv.fail(img, f"no class map for it in {classes_dir}", skip_invalid,
                          "add <stem>.png there (0 background, 1, 2, ... the classes), or "
                          "pass --skip-invalid")
            else:
                with_cls.append((img, lab, cls_of[img]))
        todo = with_cls
    workers = default_workers() if workers is None else workers
    seen_classes: set = set()
    no_class = 0
    for item, r in zip(todo, parallel_map(_convert_pair, todo, workers, "labels", progress)):
        img = item[0]
        if "error" in r:
            conv.fail(*r["error"], skip_invalid=skip_invalid)
            continue
        image_id = add_image(conv, os.path.relpath(img, images_dir), r["height"], r["width"],
                             mpp=mpp, slide=os.path.splitext(os.path.basename(img))[0])
        cats = r.get("classes") or [1] * len(r["anns"])
        for part, cat in zip(r["anns"], cats):
            if cat == 0:
                no_class += 1
                continue
            seen_classes.add(int(cat))
            conv.coco["annotations"].append({"image_id": image_id, "category_id": int(cat),
                                             **part, "iscrowd": 0})
    if classes_dir is not None:
        conv.coco["categories"] = [{"id": v, "name": f"class_{v}", "supercategory": "cell"}
                                   for v in sorted(seen_classes)]
        if no_class:
            conv.notes.append(f"dropped {no_class} instance(s) lying on class 0 only in the "
                              f"class maps of {classes_dir}")
    return conv
