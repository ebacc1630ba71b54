"""Imaging modality and experiment groups of images, for splits that hold out whole experiments.

DSB2018-like sets are crops of a few dozen experiments (one microscope, stain and magnification
each); a split by image puts crops of one experiment in both training and validation, which
then promises what a new experiment does not give. Here every image gets

- a **modality** (:func:`modality_of`): ``"fluorescence"`` (dark background, bright nuclei),
  ``"brightfield"`` (light grey background, dark nuclei) or ``"he"`` (light background, coloured
  stain: H&E and other histology stains);
- an **experiment group** (:func:`experiment_groups`): images are first partitioned by modality
  and size (height, width), then, inside each part, clustered on the background colour (the
  median of R, G, B and of the saturation, on a 0..1 scale) by average-linkage hierarchical
  clustering (``scipy.cluster.hierarchy``) cut at ``distance``. The background is a property
  of the microscope, stain and exposure; means and standard deviations were tried first and
  rejected: they follow how many nuclei a crop holds, so the four quadrants of one DSB image
  fell into different groups. The cut is coarse on purpose: merging two experiments gives a
  lumpier but still honest split, while splitting one would leak.

Or the groups come from a CSV ``image,group`` (:func:`read_group_csv`). The group id is
stored as the COCO image's ``group``, which :func:`detector.data.splits.image_groups` prefers
to ``slide``.
"""
from __future__ import annotations

import csv
import os
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..errors import DetectorError

MODALITIES = ("fluorescence", "brightfield", "he")
#: Median brightness (0..1) below which the background is dark: fluorescence. DSB2018's
#: fluorescence images lie at or below 0.2 (most below 0.1); dense H&E tiles of MoNuSeg come
#: down to 0.32, DSB2018's brightfield and H&E images to 0.6.
DARK_BACKGROUND = 0.25
#: Mean HSV saturation (0..1) above which a light-background image is stained (H&E).
STAINED_SATURATION = 0.05
#: Default cut of the average-linkage tree (Euclidean distance of the 0..1 background colours).
#: On DSB2018 stage1_train it gives 31 groups of 1 to 186 images; the 2 x 2 crops of one
#: image stay together (tests/test_experiments.py) while two fluorescence experiments whose
#: backgrounds differ by 0.04 per channel are told apart.
DEFAULT_DISTANCE = 0.05
#: The features of :func:`image_features` used for clustering, in order.
FEATURE_NAMES = ("median_r", "median_g", "median_b", "median_saturation")


class GroupFileError(ValueError, DetectorError):
    """A group CSV that cannot be used; the message names the file, the image and the fix."""


def image_features(rgb: np.ndarray) -> Dict[str, float]:
    """Colour statistics of an ``(H, W, 3)`` uint8 RGB image, each in 0..1: the median of each
    channel (``median_r/g/b``: the background colour when nuclei cover less than half the
    image), the median and the mean HSV saturation, and the median brightness (mean of R, G,
    B per pixel)."""
    x = np.asarray(rgb)
    if x.ndim != 3 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise ValueError(f"image_features expects (H, W, 3) uint8 RGB, got {x.shape} {x.dtype}")
    flat = x.reshape(-1, 3)
    sat = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)[..., 1]
    med = np.median(flat, axis=0) / 255.0
    return {"median_r": float(med[0]), "median_g": float(med[1]), "median_b": float(med[2]),
            "median_saturation": float(np.median(sat)) / 255.0,
            "saturation": float(sat.mean()) / 255.0,
            "median_brightness": float(np.median(flat.mean(1))) / 255.0}


def modality_from_features(f: Mapping[str, float]) -> str:
    """``"fluorescence"`` when the background is dark (median brightness below
    :data:`DARK_BACKGROUND`), else ``"he"`` when stained (mean saturation above
    :data:`STAINED_SATURATION`), else ``"brightfield"``."""
    if f["median_brightness"] < DARK_BACKGROUND:
        return "fluorescence"
    return "he" if f["saturation"] > STAINED_SATURATION else "brightfield"


def modality_of(rgb: np.ndarray) -> str:
    """The imaging modality of an ``(H, W, 3)`` uint8 RGB image (:func:`modality_from_features`).
    On DSB2018 stage1_train: 541 fluorescence, 107 H&E (the purple tissue images), 16
    brightfield."""
    return modality_from_features(image_features(rgb))


def experiment_groups(sizes: Sequence[Tuple[int, int]], features: Sequence[Mapping[str, float]],
                      modalities: Sequence[str], distance: float = DEFAULT_DISTANCE) -> List[str]:
    """One experiment id per image: ``"<modality>-<H>x<W>-<k>"`` (``k`` numbers the colour
    clusters of that modality and size, from 1, largest cluster first).

    Args:
        sizes: ``(height, width)`` per image.
        features: :func:`image_features` per image.
        modalities: the modality per image.
        distance: cut of the average-linkage tree; larger merges more (0: one group per
            distinct feature vector).
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    n = len(sizes)
    if not (len(features) == len(modalities) == n):
        raise ValueError("experiment_groups: sizes, features and modalities differ in length")
    if distance < 0:
        raise ValueError(f"experiment distance must be >= 0, got {distance}")
    parts: Dict[Tuple[str, int, int], List[int]] = defaultdict(list)
    for i, (size, mod) in enumerate(zip(sizes, modalities)):
        parts[(mod, int(size[0]), int(size[1]))].append(i)
    out = [""] * n
    for (mod, h, w), idx in sorted(parts.items()):
        if len(idx) == 1:
            labels = np.ones(1, np.int64)
        else:
            x = np.array([[features[i][k] for k in FEATURE_NAMES] for i in idx], np.float64)
            labels = fcluster(linkage(x, "average"), float(distance), "distance")
        # number clusters by size (largest first), ties by first image: stable names
        count: Dict[int, int] = defaultdict(int)
        first: Dict[int, int] = {}
        for pos, c in enumerate(labels.tolist()):
            count[c] += 1
            first.setdefault(c, pos)
        order = sorted(count, key=lambda c: (-count[c], first[c]))
        rank = {c: r + 1 for r, c in enumerate(order)}
        for i, c in zip(idx, labels.tolist()):
            out[i] = f"{mod}-{h}x{w}-{rank[c]}"
    return out


def _image_keys(im: Mapping[str, Any]) -> List[str]:
    """The names a group CSV may use for a COCO image: its file name (relative to the image
    root), the base name, the stem, and its ``slide`` (the DSB sample id)."""
    fn = str(im.get("file_name", ""))
    base = os.path.basename(fn)
    keys = [fn, base, os.path.splitext(base)[0]]
    if im.get("slide") is not None:
        keys.append(str(im["slide"]))
    return list(dict.fromkeys(k for k in keys if k))


def read_group_csv(path: str, images: Sequence[Mapping[str, Any]]
                   ) -> Tuple[List[str], List[Optional[str]]]:
    """Groups (and optional modalities) of COCO ``images`` from a CSV with the columns
    ``image,group[,modality]`` (a header row naming them, or the first two columns without a
    header). ``image`` is the file name relative to the image root, its base name, its stem,
    or the DSB sample id.

    Returns ``(groups, modalities)``, one per image (modality None where the CSV gives none).
    Raises :class:`GroupFileError` naming the file and the image when an image has no row,
    when a row is malformed, or when a modality is not one of :data:`MODALITIES`.
    """
    if not os.path.isfile(path):
        raise GroupFileError(f"{path}: group file not found (a CSV with the columns image,group)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise GroupFileError(f"{path}: empty group file (expected the columns image,group)")
    head = [c.strip().lower() for c in rows[0]]
    if "image" in head and "group" in head:
        ci, cg = head.index("image"), head.index("group")
        cm = head.index("modality") if "modality" in head else None
        rows, first_line = rows[1:], 2
    else:
        ci, cg, cm, first_line = 0, 1, None, 1
    table: Dict[str, Tuple[str, Optional[str]]] = {}
    for line, r in enumerate(rows, first_line):
        if len(r) <= max(ci, cg) or not r[ci].strip() or not r[cg].strip():
            raise GroupFileError(f"{path}, line {line}: expected image,group, got {','.join(r)!r}")
        mod = r[cm].strip().lower() if cm is not None and cm < len(r) and r[cm].strip() else None
        if mod is not None and mod not in MODALITIES:
            raise GroupFileError(f"{path}, line {line}: modality {mod!r} is not one of "
                                 f"{', '.join(MODALITIES)}")
        key = r[ci].strip().replace("\\", "/")
        if key in table and table[key][0] != r[cg].strip():
            raise GroupFileError(f"{path}, line {line}: image {key!r} is given two groups "
                                 f"({table[key][0]!r} and {r[cg].strip()!r})")
        table[key] = (r[cg].strip(), mod)
    groups: List[str] = []
    mods: List[Optional[str]] = []
    for im in images:
        hit = next((table[k] for k in _image_keys(im) if k in table), None)
        if hit is None:
            raise GroupFileError(f"{path}: no group for image {im.get('file_name')!r} (add a row "
                                 f"'{_image_keys(im)[-1]},<group>'; every image needs one)")
        groups.append(hit[0])
        mods.append(hit[1])
    return groups, mods


def _features_of_file(path: str) -> Dict[str, Any]:
    """Worker: :func:`image_features` of an image file (of a whole slide's thumbnail), or the
    error naming the file."""
    try:
        from .converters.common import WSI_EXTS

        if path.lower().endswith(WSI_EXTS):
            import openslide

            with openslide.OpenSlide(path) as s:
                rgb = np.asarray(s.get_thumbnail((1024, 1024)).convert("RGB"))
        else:
            from .image_io import read_image

            rgb = read_image(path)
        return {"features": image_features(rgb)}
    except Exception as e:  # ImageReadError, OpenSlide errors: reported with the file
        return {"error": f"{path}: cannot read for experiment grouping ({e})"}


def annotate_images(coco: Dict[str, Any], experiments: Optional[str] = None,
                    modality: Optional[str] = None, distance: float = DEFAULT_DISTANCE,
                    workers: int = 1, progress: bool = True) -> Dict[str, int]:
    """Give every image of ``coco`` (in place) a ``modality`` and, with ``experiments``, a
    ``group``.

    Args:
        coco: a COCO dict whose ``info.image_root`` holds the images.
        experiments: ``"auto"`` (:func:`experiment_groups` of the images' sizes and colour
            statistics), a CSV path (:func:`read_group_csv`), or None (no groups).
        modality: ``"auto"`` (:func:`modality_of` each image), one of :data:`MODALITIES` for
            every image, or None: auto when ``experiments`` is given, else no modality field.
        distance: the clustering cut of ``experiments="auto"``.
    Returns:
        images per group (empty without ``experiments``).
    Raises:
        GroupFileError: a bad CSV, an image without a row, an unreadable image.
    """
    from .converters.common import parallel_map

    images = coco["images"]
    if modality is not None and modality != "auto" and modality not in MODALITIES:
        raise GroupFileError(f"--modality {modality!r}: use auto, {', '.join(MODALITIES)}")
    if experiments is None and modality is None:
        return {}
    csv_groups: Optional[List[str]] = None
    csv_mods: List[Optional[str]] = [None] * len(images)
    if experiments is not None and experiments != "auto":
        csv_groups, csv_mods = read_group_csv(experiments, images)
    mode = modality or "auto"
    need_pixels = experiments == "auto" or (mode == "auto" and not all(csv_mods))
    feats: List[Optional[Dict[str, float]]] = [None] * len(images)
    if need_pixels:
        root = coco.get("info", {}).get("image_root", "")
        paths = [os.path.join(root, im["file_name"]) for im in images]
        for k, r in enumerate(parallel_map(_features_of_file, paths, workers, "experiments",
                                           progress)):
            if "error" in r:
                raise GroupFileError(r["error"])
            feats[k] = r["features"]
    mods: List[str] = []
    for f, m in zip(feats, csv_mods):
        if mode != "auto":
            mods.append(mode)
        elif m is not None:
            mods.append(m)
        else:
            assert f is not None
            mods.append(modality_from_features(f))
    if experiments == "auto":
        groups: Optional[List[str]] = experiment_groups(
            [(im["height"], im["width"]) for im in images], [f or {} for f in feats], mods,
            distance)
    else:
        groups = csv_groups
    counts: Dict[str, int] = defaultdict(int)
    for k, im in enumerate(images):
        im["modality"] = mods[k]
        if groups is not None:
            im["group"] = groups[k]
            counts[groups[k]] += 1
    return dict(counts)
