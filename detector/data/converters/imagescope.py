"""Aperio ImageScope XML (as in MoNuSeg): ``<Annotations MicronsPerPixel=..>`` /
``<Annotation Name=..>`` / ``<Region Type=..>`` / ``<Vertex X= Y=>``, one region per object.

Rasterisation: vertices are float pixel coordinates with pixel centres at integers (the
convention of the MoNuSeg reference masks); a pixel belongs to the object when its centre lies
inside the polygon (``skimage.draw.polygon``), clipped to the image. Region types: 0 polygon /
freehand, 1 rectangle (its 4 corners), 2 ellipse (2 opposite corners of its bounding box);
arrows, rulers and exclusion regions (``NegativeROA="1"``) are skipped and counted.
Degenerate regions (fewer than 3 distinct vertices, zero polygon area, or no pixel centre inside)
are counted and reported, never a crash.

Class: the ``Annotation`` layer's ``Name`` when set, else ``nucleus``. mpp: the file's
``MicronsPerPixel`` when > 0 (``--mpp`` overrides). Split group (``slide``): for TCGA file names
the patient (case) id, the first 12 characters (``TCGA-2Z-A9J9``), so that tiles of one patient
never straddle splits; otherwise the file stem.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from defusedxml import ElementTree as ET
from skimage.draw import ellipse as draw_ellipse
from skimage.draw import polygon as draw_polygon

from .common import (IMAGE_EXTS, WSI_EXTS, Conversion, ConversionError, add_image,
                     empty_conversion, pixels_to_annotation)
from tqdm import tqdm

DEFAULT_CATEGORY = "nucleus"
_TCGA = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.IGNORECASE)


def slide_group(stem: str) -> str:
    """Split group of an image: TCGA patient id (first 12 characters) or the file stem."""
    m = _TCGA.match(stem)
    return m.group(1).upper() if m else stem


def parse_imagescope(path: str) -> Tuple[Optional[float], List[Dict[str, Any]]]:
    """Read an ImageScope XML file.

    Returns:
        ``(mpp or None, regions)``; each region is ``{"label": str, "type": int,
        "negative": bool, "vertices": (K, 2) float64 array of x, y}``.
    Raises:
        ConversionError naming the file when it is not well-formed XML of this kind.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ConversionError(path, f"not well-formed XML ({e})",
                              "re-export it from ImageScope or pass --skip-invalid") from None
    except Exception as e:  # defusedxml refuses entities/DTDs: EntitiesForbidden & co.
        raise ConversionError(path, f"XML refused ({type(e).__name__}: {e})") from None
    if root.tag != "Annotations":
        raise ConversionError(path, f"root element is <{root.tag}>, not <Annotations>",
                              "is this an Aperio ImageScope / MoNuSeg XML file?")
    mpp: Optional[float] = None
    raw = root.get("MicronsPerPixel", "0") or "0"
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if math.isfinite(v) and v > 0:
        mpp = v
    elif not (math.isfinite(v) and v == 0):  # 0 / absent: unknown, as ImageScope writes it
        warnings.warn(f"{path}: MicronsPerPixel {raw!r} is not a positive number; ignored (the "
                      "image's own mpp, or --mpp, is used)")
    regions: List[Dict[str, Any]] = []
    for ann in root.iter("Annotation"):
        label = (ann.get("Name") or "").strip() or DEFAULT_CATEGORY
        for reg in ann.iter("Region"):
            verts = []
            for v in reg.iter("Vertex"):
                try:
                    verts.append((float(v.get("X")), float(v.get("Y"))))
                except (TypeError, ValueError):
                    raise ConversionError(path, f"Region {reg.get('Id')}: vertex without numeric "
                                          "X/Y") from None
            try:
                rtype = int(reg.get("Type", "0") or 0)
            except ValueError:
                rtype = 0
            regions.append({"label": label, "type": rtype, "id": reg.get("Id"),
                            "negative": reg.get("NegativeROA", "0") == "1",
                            "vertices": np.asarray(verts, dtype=np.float64).reshape(-1, 2)})
    return mpp, regions


def region_pixels(region: Dict[str, Any], height: int, width: int
                  ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Row and column indices of a region's pixels (clipped to the image), or None when it is
    degenerate (fewer than 3 distinct vertices, zero area, or no pixel centre inside)."""
    v = region["vertices"]
    if region["type"] == 2:  # ellipse: two opposite corners of its bounding box
        if len(v) < 2:
            return None
        (x0, y0), (x1, y1) = v.min(0), v.max(0)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            return None
        rr, cc = draw_ellipse((y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2,
                              shape=(height, width))
    else:
        if len(np.unique(v, axis=0)) < 3:
            return None
        x, y = v[:, 0], v[:, 1]
        if abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2 <= 0:  # shoelace
            return None
        rr, cc = draw_polygon(y, x, shape=(height, width))
    if len(rr) == 0:
        return None
    return rr, cc


def rasterize_region(region: Dict[str, Any], height: int, width: int) -> Optional[np.ndarray]:
    """A region as an ``(H, W)`` bool mask, or None when it is degenerate."""
    px = region_pixels(region, height, width)
    if px is None:
        return None
    m = np.zeros((height, width), dtype=bool)
    m[px] = True
    return m


def _find_image(xml_path: str, images_dir: str) -> Optional[str]:
    stem = os.path.splitext(os.path.basename(xml_path))[0]
    exts = IMAGE_EXTS + WSI_EXTS
    for ext in exts + tuple(e.upper() for e in exts):
        p = os.path.join(images_dir, stem + ext)
        if os.path.isfile(p):
            return p
    return None


def convert_xml(input_path: str, *, images_dir: Optional[str] = None, mpp: Optional[float] = None,
                skip_invalid: bool = False, progress: bool = True) -> Conversion:
    """Convert ImageScope XML files with their images (same stem, any of .tif/.png/.jpg...).

    Args:
        input_path: a folder of ``*.xml`` or one XML file.
        images_dir: folder of the images (default: the XML's folder).
        mpp: microns per pixel overriding the files' ``MicronsPerPixel``.
    Returns:
        a :class:`Conversion`; ``per_file`` lists regions, instances, degenerate and skipped
        regions per XML file.
    """
    input_path = os.path.abspath(input_path)
    if os.path.isdir(input_path):
        xmls = sorted(os.path.join(input_path, f) for f in os.listdir(input_path)
                      if f.lower().endswith(".xml"))
        base = input_path
    elif os.path.isfile(input_path):
        xmls, base = [input_path], os.path.dirname(input_path)
    else:
        raise ConversionError(input_path, "not found", "give a folder of ImageScope .xml files "
                              "(with their images) or one .xml file")
    if not xmls:
        raise ConversionError(input_path, "no .xml files found", "give the folder that holds the "
                              "ImageScope/MoNuSeg .xml annotation files")
    images_dir = os.path.abspath(images_dir) if images_dir else base
    # pass 1: parse everything to know the classes (layer names) before numbering them
    parsed: List[Tuple[str, str, Optional[float], List[Dict[str, Any]]]] = []
    conv = empty_conversion([], images_dir, f"ImageScope XML converted from {input_path}")
    for xp in xmls:
        img = _find_image(xp, images_dir)
        if img is None:
            conv.fail(xp, f"no image with the same name in {images_dir}", skip_invalid,
                      "put the image (.tif/.png/.jpg) next to the XML or give --images DIR")
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                file_mpp, regions = parse_imagescope(xp)
            conv.notes.extend(f"warning: {w.message}" for w in caught)
        except ConversionError as e:
            conv.fail(xp, e.reason, skip_invalid)
            continue
        parsed.append((xp, img, file_mpp, regions))
    cat_id = conv.set_categories({r["label"] for _, _, _, regs in parsed for r in regs},
                                 DEFAULT_CATEGORY)
    tot_degenerate = tot_unsupported = 0
    overlap_images = 0
    for xp, img, file_mpp, regions in tqdm(parsed, desc="xml", unit="file", disable=not progress,
                                           leave=False):
        info = conv.image_info(img, skip_invalid)
        if info is None:
            continue
        h, w, slide_mpp = info
        if h * w >= 2 ** 32:
            conv.fail(img, f"{w}x{h} px is too large for COCO RLE (32-bit run lengths)",
                      skip_invalid, "cut the slide into tiles with their own XML, or pass "
                      "--skip-invalid")
            continue
        file_mpp = file_mpp or slide_mpp
        parts, cats = [], []
        degenerate = unsupported = 0
        cover = np.zeros((h, w), dtype=np.uint16)
        for r in regions:
            if r["negative"] or r["type"] not in (0, 1, 2):
                unsupported += 1
                continue
            px = region_pixels(r, h, w)
            if px is None:
                degenerate += 1
                continue
            np.add.at(cover, px, 1)
            # RLE straight from the pixel list: no full-tile mask per object
            parts.append(pixels_to_annotation(px[0], px[1], h, w))
            cats.append(cat_id[r["label"]])
        overlap_px = int((cover > 1).sum())
        image_id = add_image(conv, os.path.relpath(img, images_dir), h, w,
                             mpp=mpp if mpp is not None else file_mpp,
                             slide=slide_group(os.path.splitext(os.path.basename(img))[0]))
        for c, part in zip(cats, parts):
            conv.coco["annotations"].append({"image_id": image_id, "category_id": c, **part,
                                             "iscrowd": 0})
        tot_degenerate += degenerate
        tot_unsupported += unsupported
        if overlap_px:
            overlap_images += 1
            conv.count("overlap_pixels", overlap_px)
        conv.per_file.append((os.path.basename(xp), {
            "regions": len(regions), "instances": len(parts), "degenerate": degenerate,
            "not_polygons": unsupported, "overlap_px": overlap_px}))
    conv.counters.update(degenerate_regions=tot_degenerate, unsupported_regions=tot_unsupported,
                         overlap_images=overlap_images)
    if tot_degenerate:
        conv.notes.append(f"{tot_degenerate} degenerate region(s) (fewer than 3 distinct "
                          "vertices, zero area, or no pixel inside) were skipped")
    if tot_unsupported:
        conv.notes.append(f"{tot_unsupported} region(s) that are not polygons/rectangles/"
                          "ellipses (arrows, rulers, exclusion regions) were skipped")
    if overlap_images:
        conv.notes.append(f"{overlap_images} image(s) have overlapping instance masks "
                          f"({conv.counters['overlap_pixels']} pixels in more than one mask)")
    return conv
