"""Splits grouped by slide/patient: no leakage, reproducible, close to the asked shares."""
import pytest

from detector.data.splits import (image_groups, kfold_groups, parse_fractions, split_coco,
                                  split_groups)


def _groups(n_groups=40, seed=1):
    # uneven group sizes (1..12 images), as slides with different numbers of crops
    import random

    rng = random.Random(seed)
    ids = []
    for g in range(n_groups):
        ids += [f"slide{g:03d}"] * rng.randint(1, 12)
    return ids


def test_parse_fractions():
    assert parse_fractions("train=0.8,val=0.1,test=0.1") == {"train": 0.8, "val": 0.1, "test": 0.1}
    for bad in ("train=0.8,val=0.1", "train=0.8,val=0.3", "train0.8", "train=x", "train=1,train=0",
                ""):
        with pytest.raises(ValueError):
            parse_fractions(bad)


def test_split_groups_no_leakage_and_covers_everything():
    ids = _groups()
    parts = split_groups(ids, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assigned = [g for gs in parts.values() for g in gs]
    assert sorted(assigned) == sorted(set(ids))  # every group exactly once
    assert len(assigned) == len(set(assigned))
    assert all(parts[n] for n in ("train", "val", "test"))
    # shares of images close to the targets (groups are at most 12 of ~260 images)
    n = len(ids)
    for name, frac in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        share = sum(ids.count(g) for g in parts[name]) / n
        assert abs(share - frac) < 0.06, (name, share)


def test_split_groups_reproducible_under_seed():
    ids = _groups()
    fr = {"train": 0.7, "test": 0.3}
    assert split_groups(ids, fr, seed=3) == split_groups(list(reversed(ids)), fr, seed=3)
    assert split_groups(ids, fr, seed=3) != split_groups(ids, fr, seed=4)


def test_split_groups_few_groups_each_split_gets_one():
    parts = split_groups(["a", "a", "b", "c"], {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert sorted(len(v) for v in parts.values()) == [1, 1, 1]


def test_kfold_groups():
    ids = _groups(23)
    folds = kfold_groups(ids, 5, seed=0)
    assert len(folds) == 5
    vals = [g for f in folds for g in f["val"]]
    assert sorted(vals) == sorted(set(ids))  # val parts disjoint and covering
    for f in folds:
        assert not set(f["train"]) & set(f["val"])
        assert set(f["train"]) | set(f["val"]) == set(ids)
        share = sum(ids.count(g) for g in f["val"]) / len(ids)
        assert 0.12 < share < 0.28
    assert kfold_groups(ids, 5, seed=0) == folds
    with pytest.raises(ValueError, match="only 2 groups"):
        kfold_groups(["a", "b", "b"], 3)
    with pytest.raises(ValueError):
        kfold_groups(ids, 1)


def test_split_coco_keeps_group_images_and_their_annotations():
    coco = {"info": {"image_root": "/x"}, "categories": [{"id": 1, "name": "n"}],
            "images": [{"id": 1, "slide": "s1"}, {"id": 2, "slide": "s1"}, {"id": 3, "slide": "s2"},
                       {"id": 4}],
            "annotations": [{"id": 1, "image_id": 1}, {"id": 2, "image_id": 3},
                            {"id": 3, "image_id": 4}]}
    groups = image_groups(coco)
    assert groups == ["s1", "s1", "s2", "image:4"]
    sub = split_coco(coco, ["s1", "image:4"])
    assert [im["id"] for im in sub["images"]] == [1, 2, 4]
    assert [a["id"] for a in sub["annotations"]] == [1, 3]
    assert sub["categories"] == coco["categories"] and sub["info"] is not coco["info"]
