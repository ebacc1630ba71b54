"""Images without annotations -> a COCO file of negatives (tissue known to hold no object).

Training a mitosis detector on crops centred on figures teaches it nothing about the ordinary
nuclei around them; whole fields without figures, read as negatives, do. Every image under the
input (a folder, searched recursively, or one file) becomes an image entry with no annotation.
The category list is given (``--categories "mitotic figure"``): it must be the category list
of the positive set the negatives are trained with, since every COCO file of a run has the
same categories. Split group (``slide``): the TCGA patient of the file name when it has one
(``TCGA-XX-XXXX``), else the file stem.
"""
from __future__ import annotations

import os
from typing import List, Optional

from tqdm import tqdm

from .common import (IMAGE_EXTS, WSI_EXTS, Conversion, ConversionError, add_image,
                     empty_conversion, parse_category_spec)
from .imagescope import slide_group


def list_images(input_path: str, exclude_suffixes: tuple = ("_nuclei", "_mask", "_label")
                ) -> List[str]:
    """The image files of a file or folder (recursive, sorted); masks and label images (file
    stems ending in ``exclude_suffixes``) are left out."""
    exts = IMAGE_EXTS + WSI_EXTS
    if os.path.isfile(input_path):
        return [input_path]
    if not os.path.isdir(input_path):
        raise ConversionError(input_path, "no such file or folder")
    found = []
    for root, _dirs, files in os.walk(input_path):
        for f in files:
            stem, ext = os.path.splitext(f)
            if ext.lower() in exts and not stem.endswith(exclude_suffixes):
                found.append(os.path.join(root, f))
    return sorted(found)


def convert_images(input_path: str, *, categories: Optional[str], mpp: Optional[float] = None,
                   skip_invalid: bool = False, progress: bool = True) -> Conversion:
    """COCO negatives: every image of ``input_path`` with no annotation, categories from the
    plain names of ``categories`` (ids 1..K in that order)."""
    if not categories:
        raise ConversionError(input_path, "--format images needs --categories",
                              "name the categories of the positive set these negatives go "
                              "with, e.g. --categories 'mitotic figure'")
    pairs = parse_category_spec(categories)
    if any(src is not None for src, _ in pairs):
        raise ConversionError(input_path, f"--categories {categories!r}: --format images takes "
                              "plain names (the category list), not SOURCE=NAME pairs")
    names = [dst for _, dst in pairs]
    files = list_images(input_path)
    if not files:
        raise ConversionError(input_path, "no image files found",
                              f"expected {', '.join(IMAGE_EXTS + WSI_EXTS)} files")
    root = input_path if os.path.isdir(input_path) else os.path.dirname(os.path.abspath(input_path))
    conv = empty_conversion([{"id": i + 1, "name": n, "supercategory": "cell"}
                             for i, n in enumerate(names)], root,
                            f"negatives (no annotated object) from {input_path}")
    for path in tqdm(files, desc="images", disable=not progress, leave=False):
        info = conv.image_info(path, skip_invalid)
        if info is None:
            continue
        h, w, file_mpp = info
        stem = os.path.splitext(os.path.basename(path))[0]
        add_image(conv, os.path.relpath(path, root), h, w, mpp=mpp or file_mpp,
                  slide=slide_group(stem))
    conv.notes.append(f"{len(conv.coco['images'])} image(s) without annotations (negatives)")
    return conv
