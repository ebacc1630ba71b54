"""The converters on the real annotated data in ../shared/data (skipped when it is absent):
DSB2018 stage1_train pixel for pixel, MoNuSeg XML counts per file, AMi-Br crops with their
neighbouring figures, and splits by slide without leakage."""
import contextlib
import csv
import io
import json
import os
import re
from collections import defaultdict

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest

from detector.cli.convert_to_coco import main
from detector.data.coco import annotation_to_mask
from detector.data.converters.dsb import convert_dsb
from detector.data.splits import image_groups, split_coco, split_groups
from tests.conftest import shared_path


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv] + ["--quiet"])
    return rc, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- DSB2018
@pytest.fixture(scope="module")
def dsb_conversion():
    root = shared_path("dsb2018", "stage1_train")
    return str(root), convert_dsb(str(root), workers=2, progress=False)


@pytest.mark.slow
def test_dsb_counts(dsb_conversion):
    root, conv = dsb_conversion
    coco = conv.coco
    assert len(coco["images"]) == 664
    assert len(coco["annotations"]) == 28986
    assert conv.skipped == [] and conv.counters["empty_masks"] == 0
    assert coco["info"]["image_root"] == root
    assert all(os.path.isfile(os.path.join(root, im["file_name"])) for im in coco["images"])
    assert all("mpp" not in im for im in coco["images"])  # DSB has no pixel size


def _compare_image(args):
    """Worker: decode one image's RLEs at once and compare them with its mask files; returns
    (masks checked, list of problems)."""
    mask_dir, height, width, anns = args
    files = sorted(os.listdir(mask_dir))
    if len(anns) != len(files):
        return 0, [f"{mask_dir}: {len(files)} masks but {len(anns)} annotations"]
    rles = [{"size": a["segmentation"]["size"],
             "counts": a["segmentation"]["counts"].encode("ascii")} for a in anns]
    dec = mask_utils.decode(rles)  # (H, W, N)
    if dec.shape != (height, width, len(files)):
        return 0, [f"{mask_dir}: decoded shape {dec.shape}"]
    problems = []
    for k, f in enumerate(files):
        src = cv2.imread(os.path.join(mask_dir, f), cv2.IMREAD_GRAYSCALE) > 0
        if not np.array_equal(dec[:, :, k].view(bool), src):
            problems.append(f"{mask_dir}/{f}: RLE differs from the mask")
        if anns[k]["area"] != src.sum():
            problems.append(f"{mask_dir}/{f}: area {anns[k]['area']} != {src.sum()}")
    return len(files), problems


@pytest.mark.slow
def test_dsb_every_rle_equals_its_source_mask(dsb_conversion):
    """The whole set, not a sample: each image's RLEs are decoded at once and compared with the
    mask files read in the same pass (2 processes)."""
    import multiprocessing as mp

    root, conv = dsb_conversion
    by_image = defaultdict(list)
    for a in conv.coco["annotations"]:
        by_image[a["image_id"]].append(a)
    jobs = [(os.path.join(root, im["slide"], "masks"), im["height"], im["width"],
             by_image[im["id"]]) for im in conv.coco["images"]]
    with mp.get_context("fork").Pool(2) as pool:
        results = pool.map(_compare_image, jobs, chunksize=8)
    problems = [p for _, ps in results for p in ps]
    assert problems == []
    assert sum(n for n, _ in results) == 28986


@pytest.mark.slow
def test_dsb_split_by_image_no_leakage(dsb_conversion):
    root, conv = dsb_conversion
    # the truth from the folders themselves: one image folder per sample, one PNG per nucleus
    samples = [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "images"))]
    n_masks = sum(len(os.listdir(os.path.join(root, d, "masks"))) for d in samples)
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    groups = image_groups(conv.coco)
    parts = split_groups(groups, fractions, seed=0)
    files = {n: split_coco(conv.coco, g) for n, g in parts.items()}
    names = [im["file_name"] for f in files.values() for im in f["images"]]
    assert len(names) == len(set(names)) == len(samples)  # every image once, none twice
    assert sum(len(f["annotations"]) for f in files.values()) == n_masks
    # each image is its own group, so each split holds its share of the images to within the
    # greedy assignment's granularity (two images)
    for n, f in fractions.items():
        assert abs(len(files[n]["images"]) - f * len(samples)) < 2, n
    # and an image's annotations went with it
    for f in files.values():
        ids = {im["id"] for im in f["images"]}
        assert all(a["image_id"] in ids for a in f["annotations"])


# ----------------------------------------------------------------------------- MoNuSeg
@pytest.fixture(scope="module")
def monuseg(tmp_path_factory):
    """(folder, CLI stdout, written COCO dict) of one MoNuSeg conversion."""
    root = shared_path("monuseg")
    out_json = tmp_path_factory.mktemp("monuseg") / "m.json"
    rc, out, err = run_cli("--format", "xml", "--input", root, "--output", out_json)
    assert rc == 0, err
    return str(root), out, json.load(open(out_json))


def test_monuseg_counts_per_file_printed(monuseg):
    root, out, data = monuseg
    assert len(data["images"]) == 4
    total = 0
    for xml in sorted(f for f in os.listdir(root) if f.endswith(".xml")):
        text = open(os.path.join(root, xml)).read()
        n_regions = len(re.findall(r"<Region ", text))
        mpp = float(re.search(r'MicronsPerPixel="([0-9.]+)"', text).group(1))
        line = next(l for l in out.splitlines() if l.strip().startswith(xml))
        regions, instances, degenerate = (int(v) for v in line.split()[1:4])
        assert regions == n_regions and instances + degenerate <= regions
        im = next(i for i in data["images"] if i["file_name"] == xml[:-4] + ".tif")
        assert im["mpp"] == pytest.approx(mpp) and im["slide"] == xml[:12]
        n = sum(1 for a in data["annotations"] if a["image_id"] == im["id"])
        assert n == instances
        total += n
    assert total == len(data["annotations"]) == 1786
    assert "per file:" in out and "overlapping instance masks" in out


def test_monuseg_rasterised_areas_match_imagescope(monuseg):
    """The vertices are boundary pixels (pixel centres on integer coordinates) and belong to the
    nucleus: the pixel area is the polygon Area that ImageScope stored per region plus half the
    perimeter (Pick's theorem). A swapped axis, an offset or dropped boundary would not give
    that."""
    root, _, data = monuseg
    xml = "TCGA-2Z-A9J9-01A-01-TS1.xml"
    text = open(os.path.join(root, xml)).read()
    stored = [float(a) for a in re.findall(r'<Region [^>]*? Area="([0-9.]+)"', text)]
    perimeters = []
    for block in re.findall(r"<Vertices>(.*?)</Vertices>", text, re.S):
        v = np.array([(float(x), float(y)) for x, y in
                      re.findall(r'<Vertex X="([0-9.]+)" Y="([0-9.]+)"', block)])
        perimeters.append(np.sum(np.hypot(*(np.roll(v, -1, axis=0) - v).T)))
    im = next(i for i in data["images"] if i["file_name"].startswith(xml[:-4]))
    ours = [a for a in data["annotations"] if a["image_id"] == im["id"]]
    assert len(ours) == len(stored) == len(perimeters)
    ratio = (np.array([a["area"] for a in ours]) - stored) / (np.array(perimeters) / 2)
    assert np.median(ratio) == pytest.approx(1.0, abs=0.05)
    assert np.mean(np.abs(ratio - 1) < 0.15) > 0.85  # the rest: tile-edge clipping, odd traces
    # and each mask lies inside its own bbox
    for a in ours[:50]:
        m = annotation_to_mask(a, im["height"], im["width"])
        x, y, w, h = (int(v) for v in a["bbox"])
        assert m.sum() == m[y:y + h, x:x + w].sum() == a["area"]


# ----------------------------------------------------------------------------- AMi-Br
def _amibr_rows():
    with open(shared_path("amibr", "AMI-BR.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_amibr_every_figure_inside_a_crop(tmp_path):
    root = shared_path("amibr")
    rc, out, err = run_cli("--format", "amibr", "--input", root, "--label-mode", "mitosis",
                           "--output", tmp_path / "a.json")
    assert rc == 0, err
    data = json.load(open(tmp_path / "a.json"))
    rows = [r for r in _amibr_rows() if r["dataset"] == "MIDOG21"]
    assert len(data["images"]) == len(rows) == 1721
    # independent count of figures whose centre lies in another figure's crop (same slide)
    by_slide = defaultdict(list)
    for r in rows:
        by_slide[r["slide"]].append((int(r["x"]), int(r["y"])))
    neighbours = sum(1 for pts in by_slide.values() for i, (x, y) in enumerate(pts)
                     for j, (u, v) in enumerate(pts)
                     if i != j and -64 <= u - x < 64 and -64 <= v - y < 64)
    assert len(data["annotations"]) == 1721 + neighbours and neighbours > 0
    # each crop holds its own figure's box, centred on (64, 64) unless clipped
    anns = defaultdict(list)
    for a in data["annotations"]:
        anns[a["image_id"]].append(a)
    for im in data["images"]:
        uid = os.path.splitext(os.path.basename(im["file_name"]))[0]
        own = [a for a in anns[im["id"]] if a["uid"] == uid]
        assert len(own) == 1
        x, y, w, h = own[0]["bbox"]
        assert x <= 64 <= x + w and y <= 64 <= y + h
        assert im["mpp"] in (0.23, 0.25) and im["slide"].startswith("MIDOG21_")
    assert data["categories"] == [{"id": 1, "name": "mitosis", "supercategory": "mitotic figure"}]


def test_amibr_phase_and_atypical_labels(tmp_path):
    root = shared_path("amibr")
    atypical_crops = len(os.listdir(os.path.join(root, "patches", "atypical")))
    for mode, names in (("phase", ["prophase-prometaphase", "metaphase", "anaphase-telophase",
                                   "atypical"]), ("atypical", ["normal", "atypical"])):
        rc, out, err = run_cli("--format", "amibr", "--input", root, "--label-mode", mode,
                               "--output", tmp_path / f"{mode}.json")
        assert rc == 0, err
        data = json.load(open(tmp_path / f"{mode}.json"))
        assert [c["name"] for c in data["categories"]] == names
        aty_id = names.index("atypical") + 1
        own = {}
        for im in data["images"]:
            uid = os.path.splitext(os.path.basename(im["file_name"]))[0]
            own[im["file_name"]] = next(a["category_id"] for a in data["annotations"]
                                        if a["image_id"] == im["id"] and a["uid"] == uid)
        # the crop's own figure is atypical exactly when the crop is in patches/atypical
        for fn, cid in own.items():
            assert (cid == aty_id) == fn.startswith("patches/atypical/"), fn
        assert sum(c == aty_id for c in own.values()) == atypical_crops
        if mode == "phase":
            counts = {n: sum(c == i + 1 for c in own.values()) for i, n in enumerate(names)}
            assert all(v > 50 for v in counts.values()), counts


def test_amibr_split_by_slide_no_leakage(tmp_path):
    root = shared_path("amibr")
    rc, out, err = run_cli("--format", "amibr", "--input", root, "--output", tmp_path / "a.json",
                           "--split", "train=0.8,val=0.1,test=0.1", "--seed", "0")
    assert rc == 0, err
    parts = {n: json.load(open(tmp_path / f"a_{n}.json")) for n in ("train", "val", "test")}
    slides = {n: {im["slide"] for im in d["images"]} for n, d in parts.items()}
    assert not slides["train"] & slides["val"] and not slides["train"] & slides["test"]
    assert not slides["val"] & slides["test"]
    assert sum(len(d["images"]) for d in parts.values()) == 1721
    shares = [len(parts[n]["images"]) / 1721 for n in ("train", "val", "test")]
    assert shares[0] == pytest.approx(0.8, abs=0.03) and shares[1] == pytest.approx(0.1, abs=0.03)
    # reproducible: the same seed gives the same files
    rc, _, _ = run_cli("--format", "amibr", "--input", root, "--output", tmp_path / "b.json",
                       "--split", "train=0.8,val=0.1,test=0.1", "--seed", "0")
    again = json.load(open(tmp_path / "b_test.json"))
    assert again["images"] == parts["test"]["images"]


def test_xml_on_a_whole_slide_file(tmp_path):
    """ImageScope XML next to an Aperio .svs: the slide is sized with OpenSlide (not decoded)
    and its mpp used when the XML has none."""
    svs = shared_path("slides", "CMU-1-Small-Region.svs")
    os.symlink(svs, tmp_path / "CMU-1-Small-Region.svs")
    (tmp_path / "CMU-1-Small-Region.xml").write_text(
        '<Annotations><Annotation Name=""><Regions><Region Id="1" Type="0"><Vertices>'
        '<Vertex X="100" Y="100"/><Vertex X="140" Y="100"/><Vertex X="140" Y="130"/>'
        '<Vertex X="100" Y="130"/></Vertices></Region></Regions></Annotation></Annotations>')
    rc, out, err = run_cli("--format", "xml", "--input", tmp_path, "--output", tmp_path / "s.json")
    assert rc == 0, err
    data = json.load(open(tmp_path / "s.json"))
    (im,) = data["images"]
    assert (im["width"], im["height"]) == (2220, 2967)
    assert im["mpp"] == pytest.approx(0.499, abs=1e-3)
    (a,) = data["annotations"]
    assert a["bbox"] == [100.0, 100.0, 41.0, 31.0] and a["area"] == 41 * 31
