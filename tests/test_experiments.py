"""Experiment-wise splits of DSB-like sets: crops of one experiment stay in one split, groups from
a CSV, modality detection (on real DSB2018 and MoNuSeg images)."""
import contextlib
import io
import json
import os

import cv2
import numpy as np
import pytest

from detector.cli.convert_to_coco import main
from detector.data.experiments import (GroupFileError, experiment_groups, image_features,
                                       modality_of, read_group_csv)
from detector.data.image_io import read_image
from tests.conftest import shared_path

# four DSB2018 stage1_train images of four experiments: two fluorescence experiments of the
# same image size (256 x 256) and different staining, one H&E tissue, one brightfield
ORIGINALS = {
    "fluoA": ("00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552", "fluorescence"),
    "fluoB": ("03398329ced0c23b9ac3fac84dd53a87d9ffe4d9d10f1b5fe8df8fac12380776", "fluorescence"),
    "he": ("1e488c42eb1a54a3e8412b1f12cde530f950f238d71078f2ede6a85a02168e1f", "he"),
    "bright": ("08275a5b1c2dfcd739e8c4888a5ee2d29f83eccfa75185404ced1dc0866ea992", "brightfield"),
}


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv] + ["--quiet", "--workers", "1"])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def crops_root(tmp_path_factory):
    """A DSB-layout folder of the four originals cut into 2 x 2 crops each (16 samples), with
    their masks cropped alike: crops of one experiment, as DSB2018 itself holds."""
    src = shared_path("dsb2018", "stage1_train")
    root = tmp_path_factory.mktemp("dsb_crops")
    for key, (sid, _) in ORIGINALS.items():
        img = cv2.imread(str(src / sid / "images" / f"{sid}.png"), cv2.IMREAD_UNCHANGED)
        masks = [cv2.imread(str(src / sid / "masks" / f), cv2.IMREAD_GRAYSCALE)
                 for f in sorted(os.listdir(src / sid / "masks"))]
        h, w = img.shape[:2]
        for qy in range(2):
            for qx in range(2):
                ys = slice(qy * h // 2, (qy + 1) * h // 2)
                xs = slice(qx * w // 2, (qx + 1) * w // 2)
                name = f"{key}_{qy}{qx}"
                os.makedirs(root / name / "images")
                os.makedirs(root / name / "masks")
                cv2.imwrite(str(root / name / "images" / f"{name}.png"), img[ys, xs])
                for k, m in enumerate(masks):
                    if m[ys, xs].any():
                        cv2.imwrite(str(root / name / "masks" / f"{k:04d}.png"), m[ys, xs])
    return root


def _load_splits(out_json, names=("train", "val", "test")):
    stem = str(out_json)[:-5]
    return {n: json.load(open(f"{stem}_{n}.json")) for n in names}


def test_auto_groups_keep_crops_of_one_experiment_in_one_split(crops_root, tmp_path):
    out = tmp_path / "dsb.json"
    rc, stdout, err = run_cli("--format", "dsb", "--input", crops_root, "--output", out,
                              "--split", "train=0.5,val=0.25,test=0.25", "--experiments", "auto")
    assert rc == 0, err
    assert "4 experiment groups" in stdout
    files = _load_splits(out)
    where = {}
    for split, coco in files.items():
        assert coco["info"]["experiments"] == "auto"
        for im in coco["images"]:
            key = im["slide"].split("_")[0]
            assert im["modality"] == ORIGINALS[key][1], im["slide"]
            where.setdefault(key, set()).add((split, im["group"]))
    # every original's four crops: one group, one split; four originals, four groups
    assert sorted(where) == sorted(ORIGINALS)
    assert all(len(v) == 1 for v in where.values()), where
    assert len({g for v in where.values() for _, g in v}) == 4
    # every split got a whole experiment
    assert all(len(files[n]["images"]) == 4 for n in ("val", "test"))
    # annotations follow their images
    for coco in files.values():
        ids = {im["id"] for im in coco["images"]}
        assert coco["annotations"] and all(a["image_id"] in ids for a in coco["annotations"])


def test_groups_from_csv(crops_root, tmp_path):
    csv_path = tmp_path / "groups.csv"
    samples = sorted(os.listdir(crops_root))
    # the two fluorescence experiments declared one group; modality given for one crop
    lines = ["image,group,modality"]
    for s in samples:
        group = "fluo" if s.startswith("fluo") else s.split("_")[0]
        lines.append(f"{s},{group},{'brightfield' if s == 'he_00' else ''}")
    csv_path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "dsb.json"
    rc, stdout, err = run_cli("--format", "dsb", "--input", crops_root, "--output", out,
                              "--folds", "3", "--experiments", csv_path)
    assert rc == 0, err
    assert "3 experiment groups" in stdout
    folds = [_load_splits(out, (f"fold{i}_train", f"fold{i}_val")) for i in range(3)]
    vals = []
    for f in folds:
        val = f[next(k for k in f if k.endswith("val"))]
        train = f[next(k for k in f if k.endswith("train"))]
        vg = {im["group"] for im in val["images"]}
        assert len(vg) == 1 and not vg & {im["group"] for im in train["images"]}
        vals += [im["slide"] for im in val["images"]]
        for im in val["images"] + train["images"]:
            want = "brightfield" if im["slide"] == "he_00" else \
                ORIGINALS[im["slide"].split("_")[0]][1]
            assert im["modality"] == want  # from the CSV where given, else detected
    assert sorted(vals) == samples


def test_csv_missing_an_image_is_a_clear_error(crops_root, tmp_path):
    csv_path = tmp_path / "groups.csv"
    samples = sorted(os.listdir(crops_root))
    csv_path.write_text("".join(f"{s},{s[:2]}\n" for s in samples if s != "he_01"))  # no header
    out = tmp_path / "dsb.json"
    rc, _, err = run_cli("--format", "dsb", "--input", crops_root, "--output", out,
                         "--split", "train=0.8,test=0.2", "--experiments", csv_path)
    assert rc == 2
    assert str(csv_path) in err and "he_01" in err and "no group" in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("dsb_*.json"))  # nothing written


def test_read_group_csv_rejects_bad_rows(tmp_path):
    images = [{"id": 1, "file_name": "a/images/a.png", "slide": "a"}]
    p = tmp_path / "g.csv"
    p.write_text("image,group,modality\na,1,phase-contrast\n")
    with pytest.raises(GroupFileError, match="phase-contrast"):
        read_group_csv(str(p), images)
    p.write_text("image,group\na,1\na,2\n")
    with pytest.raises(GroupFileError, match="two groups"):
        read_group_csv(str(p), images)
    p.write_text("image,group\na.png,g1\n")  # the base name works too
    assert read_group_csv(str(p), images) == (["g1"], [None])


def test_modality_of_real_images():
    """A sample of DSB2018 (every 20th image, and a brightfield one) and the MoNuSeg H&E tiles: DSB's grey images with
    a dark background are fluorescence, its 1024 x 1024 grey images with a light background are
    brightfield, its coloured tissue is H&E; all MoNuSeg tiles are H&E."""
    root = shared_path("dsb2018", "stage1_train")
    found = {}
    for sid in sorted(os.listdir(root))[::20] + [ORIGINALS["bright"][0]]:
        rgb = read_image(str(root / sid / "images" / f"{sid}.png"))
        mod = modality_of(rgb)
        found[mod] = found.get(mod, 0) + 1
        grey = np.ptp(rgb.reshape(-1, 3).astype(int), axis=1).max() <= 2
        if mod == "he":
            assert not grey, sid
        if mod == "fluorescence":
            assert np.median(rgb) < 100, sid
    assert set(found) == {"fluorescence", "he", "brightfield"}, found
    assert found["fluorescence"] > found["he"] > found["brightfield"]  # 541 / 107 / 16 in all
    monuseg = shared_path("monuseg")
    for tif in sorted(monuseg.glob("*.tif")):
        assert modality_of(read_image(str(tif))) == "he", tif.name


def test_experiment_groups_partition_by_modality_and_size():
    rng = np.random.default_rng(0)
    base = {"median_r": 0.05, "median_g": 0.05, "median_b": 0.05, "median_saturation": 0.0}
    feats = [{k: v + float(rng.normal(0, 0.003)) for k, v in base.items()} for _ in range(6)]
    sizes = [(256, 256)] * 4 + [(520, 696)] * 2
    mods = ["fluorescence"] * 3 + ["brightfield"] + ["fluorescence"] * 2
    g = experiment_groups(sizes, feats, mods)
    assert g[0] == g[1] == g[2] == "fluorescence-256x256-1"
    assert g[3] == "brightfield-256x256-1"
    assert g[4] == g[5] == "fluorescence-520x696-1"
    # far apart colour statistics of one size and modality: two groups, the larger first
    far = dict(base, median_r=0.6, median_g=0.6, median_b=0.6)
    g = experiment_groups([(256, 256)] * 3, [far, base, base], ["fluorescence"] * 3)
    assert g == ["fluorescence-256x256-2", "fluorescence-256x256-1", "fluorescence-256x256-1"]
    with pytest.raises(ValueError):
        image_features(np.zeros((4, 4), np.uint8))
