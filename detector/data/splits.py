"""Train/val/test splits and k-fold cross-validation grouped by experiment, slide or patient.

Images of one group (one experiment, one slide, one patient, or one image when nothing better
is known) always
land in the same split, or tissue seen in training leaks into the test set. Groups are shuffled
with a seeded generator and then assigned greedily so that every split gets close to its share
of *images* (groups differ in size: one slide may hold 3 crops, another 40).

Pure functions of the group ids: no files, no COCO. :func:`split_coco` applies a split to a COCO
dict.
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Any, Dict, Hashable, List, Mapping, Sequence

__all__ = ["parse_fractions", "split_groups", "kfold_groups", "split_coco", "image_groups"]


def parse_fractions(spec: str) -> Dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` -> ``{"train": 0.8, "val": 0.1, "test": 0.1}``.

    Raises ValueError with the fix when the text is malformed or the fractions do not sum to 1.
    """
    out: Dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            frac = float(value)
        except ValueError:
            frac = float("nan")
        if not sep or not name or not (0.0 < frac <= 1.0):
            raise ValueError(f"--split {spec!r}: each entry must be NAME=FRACTION with 0 < FRACTION"
                             " <= 1, e.g. train=0.8,val=0.1,test=0.1")
        if name in out:
            raise ValueError(f"--split {spec!r}: split {name!r} is given twice")
        out[name] = frac
    if not out:
        raise ValueError(f"--split {spec!r}: give at least one NAME=FRACTION")
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"--split {spec!r}: fractions sum to {total:g}, they must sum to 1")
    return out


def _sorted_groups(group_ids: Sequence[Hashable]) -> List[Hashable]:
    # sort by str so that mixed int/str ids still sort deterministically
    return sorted(Counter(group_ids), key=lambda g: (str(type(g)), str(g)))


def split_groups(group_ids: Sequence[Hashable], fractions: Mapping[str, float],
                 seed: int = 0) -> Dict[str, List[Hashable]]:
    """Assign groups to named splits.

    Args:
        group_ids: one group id per image (repeated for the images of one group).
        fractions: split name -> share of the images, summing to 1 (order kept in the result).
        seed: the same seed and ids give the same split.
    Returns:
        split name -> list of group ids (sorted); every group is in exactly one split. When there
        are at least as many groups as splits, every split gets at least one group.
    """
    if not fractions:
        raise ValueError("split_groups: no splits given")
    sizes = Counter(group_ids)
    groups = _sorted_groups(group_ids)
    random.Random(seed).shuffle(groups)
    total = float(sum(sizes.values()))
    names = list(fractions)
    targets = {n: max(float(fractions[n]) * total, 1e-9) for n in names}
    counts = {n: 0 for n in names}
    out: Dict[str, List[Hashable]] = {n: [] for n in names}
    for g in groups:
        empty = [n for n in names if not out[n]]
        # a split still without any group first (in the order given), then the split furthest
        # below its target share
        name = empty[0] if empty else min(names, key=lambda n: (counts[n] / targets[n],
                                                                 names.index(n)))
        out[name].append(g)
        counts[name] += sizes[g]
    return {n: sorted(v, key=lambda g: (str(type(g)), str(g))) for n, v in out.items()}


def kfold_groups(group_ids: Sequence[Hashable], k: int,
                 seed: int = 0) -> List[Dict[str, List[Hashable]]]:
    """K-fold cross-validation over groups.

    Returns a list of ``k`` dicts ``{"train": [...groups], "val": [...groups]}``: the ``val``
    parts are disjoint, cover every group once, and hold about 1/k of the images each.
    """
    groups = _sorted_groups(group_ids)
    if k < 2:
        raise ValueError(f"--folds {k}: k-fold cross-validation needs k >= 2")
    if k > len(groups):
        raise ValueError(f"--folds {k}: only {len(groups)} groups (slides/patients/images) to "
                         f"share among {k} folds; use --folds {len(groups)} or fewer")
    parts = split_groups(group_ids, {f"fold{i}": 1.0 / k for i in range(k)}, seed)
    folds = []
    for i in range(k):
        val = parts[f"fold{i}"]
        val_set = set(val)
        folds.append({"train": [g for g in groups if g not in val_set], "val": list(val)})
    for f in folds:
        f["train"].sort(key=lambda g: (str(type(g)), str(g)))
    return folds


def image_groups(coco: Mapping[str, Any]) -> List[Hashable]:
    """The group id of every image of a COCO dict: its ``group`` (the experiment, see
    :mod:`detector.data.experiments`) when present, else its ``slide``, else its id."""
    return [im.get("group", im.get("slide", f"image:{im['id']}")) for im in coco["images"]]


def split_coco(coco: Mapping[str, Any], groups: Sequence[Hashable]) -> Dict[str, Any]:
    """A COCO dict with only the images of the given groups (see :func:`image_groups`) and their
    annotations; info and categories are copied, ids are kept."""
    keep = set(groups)
    images = [im for im, g in zip(coco["images"], image_groups(coco)) if g in keep]
    ids = {im["id"] for im in images}
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations")}
    out["info"] = dict(coco.get("info") or {})
    out["images"] = images
    out["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
    return out
