"""Point annotations in CSV (mitotic figures, cells): ``x,y[,label][,slide]`` -> square boxes.

Each point becomes a box of ``box_size_um`` microns (default 12.5 um: MIDOG's 50 px at
0.25 um/px) centred on it, clipped to the image; no masks. Points outside the image are counted
and reported, never boxed.

CSV layout: with a header, columns are found by name (``x``, ``y``; ``label``/``class``/
``category``/``type``; ``slide``/``image``/``file``/``filename``/``file_name``), otherwise by
position ``x,y[,label][,slide]``. Inputs:

- one CSV with a ``slide`` column naming each point's image (file name or stem) in ``--images``
  (default: the CSV's folder);
- one CSV without ``slide``: the points of the image with the CSV's stem;
- a folder of CSVs, one per image, same stem.

Every image in the images folder is converted; one without points is a negative. Whole-slide
files (``.svs``, ``.ndpi``, ``.mrxs``, ``.scn``, ``.bif``) are sized with OpenSlide, which also
gives their mpp when ``--mpp`` is not set; other images are fully decoded (corrupt files are
errors naming the file). The split group of an image is the image (one image per slide here).
"""
from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

from tqdm import tqdm

from .common import (IMAGE_EXTS, WSI_EXTS, Conversion, ConversionError, add_image,
                     empty_conversion)

DEFAULT_CATEGORY = "mitosis"
POINT_IMAGE_EXTS = IMAGE_EXTS + WSI_EXTS
_COLS = {
    "x": ("x", "cx", "x_px", "col"),
    "y": ("y", "cy", "y_px", "row"),
    "label": ("label", "class", "category", "type", "name"),
    "slide": ("slide", "image", "file", "filename", "file_name", "image_name", "slide_id"),
}

Point = Tuple[float, float, str]


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read_points_csv(path: str) -> Tuple[List[Tuple[float, float, str, Optional[str]]], bool]:
    """Points of a CSV: ``[(x, y, label, slide or None)]`` and whether a slide column exists.

    Raises ConversionError naming the file and line on malformed rows.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (UnicodeDecodeError, OSError) as e:
        raise ConversionError(path, f"cannot read as a text CSV ({e})") from None
    if not rows:
        return [], False
    head = [c.strip().lower() for c in rows[0]]
    if len(head) >= 2 and _is_number(head[0]) and _is_number(head[1]):
        idx = {"x": 0, "y": 1, "label": 2 if len(head) > 2 else None,
               "slide": 3 if len(head) > 3 else None}
        body, first_line = rows, 1
    else:
        idx = {}
        for key, names in _COLS.items():
            idx[key] = next((head.index(n) for n in names if n in head), None)
        if idx["x"] is None or idx["y"] is None:
            raise ConversionError(path, f"no x/y columns in the header {rows[0]}",
                                  "the CSV needs columns x,y[,label][,slide] (with or without "
                                  "a header)")
        body, first_line = rows[1:], 2
    out = []
    for n, r in enumerate(body, first_line):
        try:
            x, y = float(r[idx["x"]]), float(r[idx["y"]])
        except (ValueError, IndexError):
            raise ConversionError(path, f"line {n}: x/y are not numbers: {r}",
                                  "fix the row or remove it") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ConversionError(path, f"line {n}: invalid point, x/y are not finite numbers: "
                                  f"{r}", "fix the row or remove it")
        label = r[idx["label"]].strip() if idx["label"] is not None and idx["label"] < len(r) \
            else ""
        slide = r[idx["slide"]].strip() if idx["slide"] is not None and idx["slide"] < len(r) \
            else None
        out.append((x, y, label or DEFAULT_CATEGORY, slide or None))
    return out, idx["slide"] is not None


def point_box(x: float, y: float, side: float, width: int, height: int
              ) -> Tuple[float, float, float, float]:
    """XYXY box of ``side`` px centred on ``(x, y)``, clipped to the image."""
    h = side / 2.0
    return (max(0.0, x - h), max(0.0, y - h), min(float(width), x + h), min(float(height), y + h))


def convert_points(input_path: str, *, images_dir: Optional[str] = None,
                   mpp: Optional[float] = None, box_size_um: float = 12.5,
                   box_size_px: Optional[float] = None, skip_invalid: bool = False,
                   progress: bool = True) -> Conversion:
    """Convert point CSV(s) to a box-only COCO set (see the module docstring).

    Args:
        input_path: a CSV file or a folder of per-image CSVs.
        images_dir: folder of the images (default: the CSV's folder / the input folder).
        mpp: microns per pixel of the images (whole slides: read from the file when None).
        box_size_um / box_size_px: box side; pixels win when given; microns need the mpp.
    """
    input_path = os.path.abspath(input_path)
    if os.path.isdir(input_path):
        csvs = sorted(os.path.join(input_path, f) for f in os.listdir(input_path)
                      if f.lower().endswith(".csv"))
        base = input_path
        if not csvs:
            raise ConversionError(input_path, "no .csv files found",
                                  "give a CSV of points x,y[,label][,slide] or a folder of them")
    elif os.path.isfile(input_path):
        csvs, base = [input_path], os.path.dirname(input_path)
    else:
        raise ConversionError(input_path, "not found", "give a CSV file of points or a folder")
    images_dir = os.path.abspath(images_dir) if images_dir else base
    if not os.path.isdir(images_dir):
        raise ConversionError(images_dir, "images folder not found", "check --images")
    if box_size_px is not None and box_size_px <= 0:
        raise ConversionError("--box-size-px", f"{box_size_px} is not a positive size")
    if box_size_px is None and box_size_um <= 0:
        raise ConversionError("--box-size-um", f"{box_size_um} is not a positive size")
    if mpp is not None and mpp <= 0:
        raise ConversionError("--mpp", f"{mpp} is not a positive pixel size")

    images = sorted(f for f in os.listdir(images_dir)
                    if f.lower().endswith(POINT_IMAGE_EXTS) and not f.startswith("."))
    by_name = {f: f for f in images}
    for f in images:
        by_name.setdefault(os.path.splitext(f)[0], f)
    conv = empty_conversion([], images_dir, f"point annotations converted from {input_path}")
    points: Dict[str, List[Point]] = defaultdict(list)
    for cp in csvs:
        try:
            rows, has_slide = read_points_csv(cp)
        except ConversionError as e:
            conv.fail(cp, e.reason, skip_invalid)
            continue
        if has_slide:
            local: Dict[str, List[Point]] = defaultdict(list)
            for x, y, label, slide in rows:
                name = by_name.get(slide or "") or by_name.get(os.path.basename(slide or ""))
                if name is None:
                    conv.fail(cp, f"slide {slide!r} has no image in {images_dir}", skip_invalid,
                              "put the image there, give --images DIR, or fix the slide column")
                    break
                local[name].append((x, y, label))
            else:  # the whole CSV is valid
                for name, pts in local.items():
                    points[name].extend(pts)
        else:
            name = by_name.get(os.path.splitext(os.path.basename(cp))[0])
            if name is None:
                conv.fail(cp, f"no image with the CSV's name in {images_dir} and no slide "
                          "column", skip_invalid, "add a slide column naming each point's "
                          "image, or name the CSV after its image")
                continue
            points[name].extend((x, y, label) for x, y, label, _ in rows)
    cat_id = conv.set_categories({p[2] for pts in points.values() for p in pts},
                                 DEFAULT_CATEGORY)
    outside = clipped = 0
    for name in tqdm(images, desc="points", unit="img", disable=not progress, leave=False):
        path = os.path.join(images_dir, name)
        info = conv.image_info(path, skip_invalid)
        if info is None:
            continue
        h, w, file_mpp = info
        img_mpp = mpp if mpp is not None else file_mpp
        if box_size_px is not None:
            side = float(box_size_px)
        elif img_mpp:
            side = box_size_um / img_mpp
        else:
            raise ConversionError(path, f"the box size is {box_size_um} um but the image's "
                                  "microns per pixel are unknown",
                                  "pass --mpp (e.g. 0.25 for a 40x scan) or --box-size-px")
        image_id = add_image(conv, name, h, w, mpp=img_mpp,
                             slide=os.path.splitext(name)[0])
        for x, y, label in points.get(name, []):
            if not (0 <= x < w and 0 <= y < h):
                outside += 1
                continue
            x0, y0, x1, y1 = point_box(x, y, side, w, h)
            if (x1 - x0) < side - 1e-6 or (y1 - y0) < side - 1e-6:
                clipped += 1
            conv.coco["annotations"].append({
                "image_id": image_id, "category_id": cat_id[label],
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0})
    conv.counters.update(points_outside=outside, clipped_boxes=clipped)
    if outside:
        conv.notes.append(f"{outside} point(s) outside their image were left out")
    if clipped:
        conv.notes.append(f"{clipped} box(es) of points near the image border were clipped")
    return conv
