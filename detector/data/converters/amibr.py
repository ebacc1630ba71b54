"""AMi-Br (atypical and normal mitotic figures in breast cancer): ``AMI-BR.csv`` plus 128 x 128 px
crops ``patches/{normal,atypical}/<dataset>_<uid>.png`` centred on each figure.

Each crop becomes one image. Every figure of the CSV whose centre falls inside a crop becomes a
box there, not only the centred one: a crop spans the figure centre +-64 px on its original
slide (``origin = (x - w // 2, y - h // 2)``), so rows of the same ``slide`` within that window
are found and placed at ``(x' - origin_x, y' - origin_y)``. Crops near the slide's top/left edge
are zero-padded; boxes are clipped to the crop and to the slide area inside it.

Boxes are squares of ``box_size_um`` (default 12.5 um, MIDOG's 50 px at 0.25 um/px) at the
crop's mpp. mpp: MIDOG 2021 cases 001-050 were scanned on a Hamamatsu XR (0.23 um/px),
051-100 on a Hamamatsu S360 (0.23), 101-150 on an Aperio ScanScope CS2 (0.25) and 151-200 on a
Leica GT450 (0.26) (Aubreville et al., MIDOG 2021 challenge paper); TUPAC16: 0.25. ``--mpp``
overrides. Split group (``slide``): ``<dataset>_<slide stem>`` (e.g. ``MIDOG21_002``).

Label modes and their stable category ids:

- ``mitosis``: 1 ``mitosis``.
- ``atypical``: 1 ``normal``, 2 ``atypical`` from ``majority_atypical`` (majority of 3 experts;
  the same rule that sorted the crops into ``patches/normal`` and ``patches/atypical``).
- ``phase``: 1 ``prophase-prometaphase``, 2 ``metaphase``, 3 ``anaphase-telophase``,
  4 ``atypical``. Rule: ``atypical`` when ``majority_atypical`` is true. Otherwise each of the
  two experts' labels maps to a normal phase (``NMF prometaphase`` and ``NMF ring shape`` -- a
  prometaphase seen from a pole -- to ``prophase-prometaphase``; ``NMF metaphase``;
  ``NMF anaphase-telophase``); an ``AMF ...`` label of an expert outvoted on atypia gives no
  phase. Agreement -> that phase; only one expert gives a phase -> that one; the two phases
  differ -> expert 1's phase; neither gives one (both chose an atypical subtype, outvoted by the
  third expert) -> ``metaphase``, the most frequent normal phase. Disagreements and the last
  case are counted in the summary.
"""
from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

from .common import (Conversion, ConversionError, add_image, check_image, empty_conversion,
                     read_error_reason)

LABEL_MODES: Dict[str, List[str]] = {
    "mitosis": ["mitosis"],
    "atypical": ["normal", "atypical"],
    "phase": ["prophase-prometaphase", "metaphase", "anaphase-telophase", "atypical"],
}
PHASE_OF_LABEL = {
    "NMF prometaphase": "prophase-prometaphase",
    "NMF prophase": "prophase-prometaphase",
    "NMF ring shape": "prophase-prometaphase",
    "NMF metaphase": "metaphase",
    "NMF anaphase-telophase": "anaphase-telophase",
    "NMF anaphase": "anaphase-telophase",
    "NMF telophase": "anaphase-telophase",
}
REQUIRED_COLUMNS = ("slide", "dataset", "uid", "x", "y")
SCANNER_MPP_MIDOG21 = ((1, 50, 0.23), (51, 100, 0.23), (101, 150, 0.25), (151, 200, 0.26))
TUPAC16_MPP = 0.25


def _truthy(v: Any) -> bool:
    return str(v).strip().lower() in ("true", "1", "yes", "t")


def slide_mpp(dataset: str, slide: str) -> Optional[float]:
    """Known scanner resolution of an AMi-Br source slide, or None."""
    if dataset.upper().startswith("TUPAC"):
        return TUPAC16_MPP
    m = re.match(r"(\d+)", os.path.basename(slide))
    if dataset.upper().startswith("MIDOG") and m:
        n = int(m.group(1))
        for lo, hi, mpp in SCANNER_MPP_MIDOG21:
            if lo <= n <= hi:
                return mpp
    return None


def phase_label(row: Dict[str, str]) -> Tuple[str, bool]:
    """Category name of a CSV row in ``phase`` mode, and whether the two experts disagreed on the
    normal phase (resolved by expert 1). See the module docstring for the rule."""
    if _truthy(row.get("majority_atypical", "")):
        return "atypical", False
    p1 = PHASE_OF_LABEL.get((row.get("expert1_label") or "").strip())
    p2 = PHASE_OF_LABEL.get((row.get("expert2_label") or "").strip())
    if p1 and p2:
        return p1, p1 != p2
    if p1 or p2:
        return (p1 or p2), False  # type: ignore[return-value]
    # both experts gave atypical subtypes but the 3-expert majority said normal: no phase vote;
    # metaphase is the most frequent normal phase in AMi-Br
    return "metaphase", True


def category_of(row: Dict[str, str], label_mode: str) -> str:
    if label_mode == "mitosis":
        return "mitosis"
    if label_mode == "atypical":
        return "atypical" if _truthy(row.get("majority_atypical", "")) else "normal"
    return phase_label(row)[0]


def _find_csv(input_path: str) -> Tuple[str, str]:
    if os.path.isfile(input_path):
        return input_path, os.path.dirname(input_path)
    if not os.path.isdir(input_path):
        raise ConversionError(input_path, "not found", "give the AMi-Br folder (AMI-BR.csv and "
                              "patches/) or its CSV file")
    csvs = sorted(f for f in os.listdir(input_path) if f.lower().endswith(".csv"))
    if not csvs:
        raise ConversionError(input_path, "no CSV file found", "the AMi-Br folder holds "
                              "AMI-BR.csv next to patches/")
    pick = [f for f in csvs if f.upper().startswith("AMI-BR")] or csvs
    return os.path.join(input_path, pick[0]), input_path


def read_amibr_csv(path: str) -> List[Dict[str, str]]:
    """Rows of the AMi-Br CSV, with the required columns checked (error names the file)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in cols]
            if missing:
                raise ConversionError(path, f"missing column(s) {', '.join(missing)}",
                                      "the AMi-Br CSV has slide,dataset,uid,x,y,expert1_label,"
                                      "expert2_label,...,majority_atypical")
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise ConversionError(path, f"not a text CSV ({e})") from None
    for i, r in enumerate(rows, 2):
        try:
            r["_x"], r["_y"] = float(r["x"]), float(r["y"])
        except (TypeError, ValueError):
            raise ConversionError(path, f"line {i}: x/y are not numbers ({r.get('x')!r}, "
                                  f"{r.get('y')!r})") from None
    return rows


def convert_amibr(input_path: str, *, label_mode: str = "mitosis", mpp: Optional[float] = None,
                  box_size_um: float = 12.5, box_size_px: Optional[float] = None,
                  skip_invalid: bool = False, patches_dir: Optional[str] = None) -> Conversion:
    """Convert AMi-Br crops to a box-only COCO set (one image per crop).

    Args:
        input_path: the AMi-Br folder (``AMI-BR.csv`` + ``patches/``) or the CSV file.
        label_mode: ``mitosis`` | ``phase`` | ``atypical`` (see the module docstring).
        mpp: microns per pixel of every crop (default: per scanner, see :func:`slide_mpp`).
        box_size_um / box_size_px: box side; pixels win when given.
        patches_dir: crop folder (default ``<folder>/patches``), searched recursively.
    """
    if label_mode not in LABEL_MODES:
        raise ConversionError("--label-mode", f"unknown mode {label_mode!r}",
                              f"choose one of {', '.join(LABEL_MODES)}")
    csv_path, base = _find_csv(os.path.abspath(input_path))
    rows = read_amibr_csv(csv_path)
    patches_dir = os.path.abspath(patches_dir or os.path.join(base, "patches"))
    if not os.path.isdir(patches_dir):
        raise ConversionError(patches_dir, "crop folder not found",
                              "AMi-Br crops are in patches/{normal,atypical}/<dataset>_<uid>.png")
    crops: Dict[str, str] = {}
    for d, _, files in os.walk(patches_dir):
        for f in files:
            if f.lower().endswith(".png"):
                crops.setdefault(os.path.splitext(f)[0], os.path.join(d, f))
    names = LABEL_MODES[label_mode]
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    conv = empty_conversion([{"id": i, "name": n, "supercategory": "mitotic figure"}
                             for n, i in cat_id.items()], base,
                            f"AMi-Br crops ({label_mode} labels) converted from {csv_path}")
    by_slide: Dict[Tuple[str, str], List[Dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_slide[(r["dataset"], r["slide"])].append(r)

    def sort_key(r):
        uid = r["uid"]
        return (r["dataset"], r["slide"], int(uid) if uid.isdigit() else 0, uid)

    without_crop = 0
    neighbours = clipped = disagreements = 0
    for r in sorted(rows, key=sort_key):
        key = f"{r['dataset']}_{r['uid']}"
        crop = crops.get(key)
        if crop is None:
            without_crop += 1
            continue
        try:
            h, w = check_image(crop)
        except Exception as e:
            conv.fail(crop, read_error_reason(e), skip_invalid)
            continue
        crop_mpp = mpp if mpp is not None else slide_mpp(r["dataset"], r["slide"])
        side = box_size_px if box_size_px else (box_size_um / (crop_mpp or 0.25))
        ox, oy = r["_x"] - w // 2, r["_y"] - h // 2
        # the slide's own area inside the crop (zero padding beyond the top/left slide edge)
        vx0, vy0 = max(0.0, -ox), max(0.0, -oy)
        image_id = add_image(conv, os.path.relpath(crop, base), h, w, mpp=crop_mpp,
                             slide=f"{r['dataset']}_{os.path.splitext(r['slide'])[0]}")
        for q in by_slide[(r["dataset"], r["slide"])]:
            cx, cy = q["_x"] - ox, q["_y"] - oy
            if not (0 <= cx < w and 0 <= cy < h):
                continue
            if q is not r:
                neighbours += 1
            x0, y0 = max(vx0, cx - side / 2), max(vy0, cy - side / 2)
            x1, y1 = min(float(w), cx + side / 2), min(float(h), cy + side / 2)
            if (x1 - x0) < side - 1e-6 or (y1 - y0) < side - 1e-6:
                clipped += 1
            name = category_of(q, label_mode)
            if label_mode == "phase" and q is r and phase_label(q)[1]:
                disagreements += 1
            conv.coco["annotations"].append({
                "image_id": image_id, "category_id": cat_id[name],
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0, "uid": f"{q['dataset']}_{q['uid']}"})
    conv.counters.update(rows=len(rows), rows_without_crop=without_crop,
                         neighbour_figures=neighbours, clipped_boxes=clipped,
                         phase_disagreements=disagreements)
    conv.notes.append(f"{len(rows)} CSV rows; {without_crop} have no crop in {patches_dir} "
                      "(e.g. the TUPAC16 part): no image of their own, but still boxed when "
                      "they fall inside a crop of their slide")
    conv.notes.append(f"{neighbours} additional figure(s) found inside another figure's crop; "
                      f"{clipped} box(es) clipped at a crop or slide edge")
    if label_mode == "phase":
        conv.notes.append(f"{disagreements} figure(s) where the experts' normal phases differ "
                          "(expert 1's phase used)")
    return conv
