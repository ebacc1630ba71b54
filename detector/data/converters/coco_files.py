"""Existing COCO instance files: merge several, re-split, remap categories (``--categories``).

Images are re-rooted on the deepest folder common to all of them, so files with different image
roots merge into one file (``file_name`` relative to the new ``info.image_root``). Categories are
merged by name (first file's order first). An image listed in several files (same image path) is
kept once with the annotations of all of them, and reported. Image and annotation ids are
renumbered; ``mpp``, ``slide`` and any other image/annotation keys are kept. Images are checked
to exist (not decoded).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

from ..coco import CocoFormatError, load_coco
from .common import Conversion, empty_conversion


def convert_coco(paths: Sequence[str], *, skip_invalid: bool = False) -> Conversion:
    """Merge COCO files into one :class:`Conversion` (see the module docstring)."""
    loaded: List[Dict[str, Any]] = []
    conv = empty_conversion([], os.getcwd(), "")
    for p in paths:
        try:
            loaded.append(load_coco(p))
        except CocoFormatError as e:
            conv.fail(p, str(e).split(": ", 1)[-1], skip_invalid)
    cat_names: List[str] = []
    supercat: Dict[str, str] = {}
    for d in loaded:
        for c in sorted(d["categories"], key=lambda c: c["id"]):
            if c["name"] not in cat_names:
                cat_names.append(c["name"])
                supercat[c["name"]] = c.get("supercategory", "cell")
    cat_id = {n: i + 1 for i, n in enumerate(cat_names)}
    # absolute path of every image, to re-root them on their common folder
    entries = []  # (file index, image dict, absolute path)
    for i, d in enumerate(loaded):
        for im in d["images"]:
            entries.append((i, im, os.path.normpath(os.path.join(d["_image_root"],
                                                                 im["file_name"]))))
    missing = [(d_i, im, ap) for d_i, im, ap in entries if not os.path.isfile(ap)]
    bad_ids = set()
    for d_i, im, ap in missing:
        conv.fail(ap, f"image listed in {loaded[d_i]['_path']} does not exist", skip_invalid,
                  "fix info.image_root/file_name, or pass --skip-invalid")
        bad_ids.add((d_i, im["id"]))
    entries = [e for e in entries if (e[0], e[1]["id"]) not in bad_ids]
    root = os.path.commonpath([os.path.dirname(ap) for _, _, ap in entries]) if entries \
        else os.getcwd()
    conv.coco["info"]["image_root"] = root
    conv.coco["info"]["description"] = "merged from " + ", ".join(
        d["_path"] for d in loaded)
    conv.coco["categories"] = [{"id": i, "name": n, "supercategory": supercat[n]}
                               for n, i in cat_id.items()]
    new_id: Dict[Any, int] = {}
    by_path: Dict[str, int] = {}
    duplicates = 0
    for d_i, im, ap in entries:
        if ap in by_path:
            new_id[(d_i, im["id"])] = by_path[ap]
            duplicates += 1
            continue
        e = {k: v for k, v in im.items() if k not in ("id", "file_name")}
        nid = len(conv.coco["images"]) + 1
        conv.coco["images"].append({"id": nid, "file_name": os.path.relpath(ap, root)
                                    .replace(os.sep, "/"), **e})
        new_id[(d_i, im["id"])] = nid
        by_path[ap] = nid
    for d_i, d in enumerate(loaded):
        names = {c["id"]: c["name"] for c in d["categories"]}
        for a in d["annotations"]:
            key = (d_i, a["image_id"])
            if key not in new_id:
                continue
            b = {k: v for k, v in a.items() if k != "id"}
            b["image_id"] = new_id[key]
            b["category_id"] = cat_id[names[a["category_id"]]]
            conv.coco["annotations"].append(b)
    if duplicates:
        conv.notes.append(f"{duplicates} image(s) appear in more than one input file; each is "
                          "kept once with the annotations of every file")
    conv.counters["duplicate_images"] = duplicates
    return conv
