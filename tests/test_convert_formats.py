"""Unit tests of every converter on small synthetic cases, the bad ones included, and of the CLI
(exit codes, one-line errors, --skip-invalid, splits, polygons, categories, COCOeval)."""
import contextlib
import io
import json
import os

import cv2
import numpy as np
import pytest
import tifffile
from skimage.draw import disk

from detector.cli.convert_to_coco import main
from detector.data.coco import annotation_to_mask, load_coco, to_pycocotools
from detector.data.converters import ConversionError, remap_categories
from detector.data.converters.amibr import convert_amibr, phase_label
from detector.data.converters.coco_files import convert_coco
from detector.data.converters.dsb import convert_dsb
from detector.data.converters.imagescope import convert_xml, slide_group
from detector.data.converters.labels import convert_labels
from detector.data.converters.points import convert_points, read_points_csv


# ----------------------------------------------------------------------------- helpers
def run_cli(*argv):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv] + ["--quiet"])
    return rc, out.getvalue(), err.getvalue()


def write_png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[..., [2, 1, 0, 3][: arr.shape[2]]]  # RGB(A) -> BGR(A) for OpenCV
    assert cv2.imwrite(str(path), arr)


def truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def disc(shape, center, r):
    m = np.zeros(shape, np.uint8)
    rr, cc = disk(center, r, shape=shape)
    m[rr, cc] = 255
    return m


def make_dsb(root, n_masks=(3, 0, 2), size=(40, 50), overlap=False):
    """DSB layout: RGBA images, 0/255 masks; returns {sample: [masks]} of what was written."""
    written = {}
    for i, n in enumerate(n_masks):
        sid = f"s{i}"
        img = np.zeros(size + (4,), np.uint8)
        img[..., 3] = 255
        img[..., 0] = (40 * i) % 256
        write_png(os.path.join(root, sid, "images", f"{sid}.png"), img)
        os.makedirs(os.path.join(root, sid, "masks"), exist_ok=True)
        masks = []
        for k in range(n):
            c = (8 + 12 * k, 10 + 14 * k)
            m = disc(size, c, 5)
            if overlap and k == 1:
                m = disc(size, (8 + 12 * 0 + 4, 10 + 14 * 0 + 4), 5)
            write_png(os.path.join(root, sid, "masks", f"m{k}.png"), m)
            masks.append(m > 0)
        written[sid] = masks
    return written


def decoded(ann, h, w):
    return annotation_to_mask(ann, h, w)


# ----------------------------------------------------------------------------- dsb
def test_dsb_exact_masks_negatives_and_overlaps(tmp_path):
    written = make_dsb(tmp_path / "dsb", overlap=True)
    # an empty mask file is ignored and reported, not an annotation
    write_png(str(tmp_path / "dsb" / "s2" / "masks" / "zz_empty.png"), np.zeros((40, 50), np.uint8))
    conv = convert_dsb(str(tmp_path / "dsb"), workers=1, progress=False)
    coco = conv.coco
    assert [im["file_name"] for im in coco["images"]] == [f"s{i}/images/s{i}.png" for i in range(3)]
    assert os.path.isabs(coco["info"]["image_root"])
    assert all("mpp" not in im for im in coco["images"])
    assert [im["slide"] for im in coco["images"]] == ["s0", "s1", "s2"]
    assert len(coco["annotations"]) == 5
    for im in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        src = written[im["slide"]]
        assert len(anns) == len(src)  # s1 has none: kept as a negative image
        for a, m in zip(anns, src):
            assert np.array_equal(decoded(a, 40, 50), m)
            assert a["area"] == m.sum() and a["iscrowd"] == 0 and a["category_id"] == 1
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
    assert conv.counters["overlap_images"] == 2 and conv.counters["overlap_pixels"] > 0  # s0, s2
    assert conv.counters["empty_masks"] == 1


def test_dsb_parallel_equals_serial(tmp_path):
    make_dsb(tmp_path / "dsb", n_masks=(2, 3, 1, 4, 0))
    a = convert_dsb(str(tmp_path / "dsb"), workers=1, progress=False).coco
    b = convert_dsb(str(tmp_path / "dsb"), workers=2, progress=False).coco
    assert a["images"] == b["images"] and a["annotations"] == b["annotations"]


@pytest.mark.parametrize("what", ["mask", "image"])
def test_dsb_truncated_file_is_an_error_naming_it(tmp_path, what):
    make_dsb(tmp_path / "dsb")
    bad = tmp_path / "dsb" / "s0" / ("masks/m1.png" if what == "mask" else "images/s0.png")
    truncate(bad)
    with pytest.raises(ConversionError) as e:
        convert_dsb(str(tmp_path / "dsb"), workers=1, progress=False)
    assert str(bad) in str(e.value)
    conv = convert_dsb(str(tmp_path / "dsb"), workers=1, progress=False, skip_invalid=True)
    assert [p for p, _ in conv.skipped] == [str(bad)]
    assert [im["slide"] for im in conv.coco["images"]] == ["s1", "s2"]


def test_dsb_mask_size_mismatch(tmp_path):
    make_dsb(tmp_path / "dsb")
    write_png(str(tmp_path / "dsb" / "s2" / "masks" / "big.png"), np.zeros((41, 50), np.uint8))
    with pytest.raises(ConversionError, match="big.png.*50x41"):
        convert_dsb(str(tmp_path / "dsb"), workers=1, progress=False)


def test_cli_error_is_one_line_exit_2(tmp_path):
    make_dsb(tmp_path / "dsb")
    truncate(tmp_path / "dsb" / "s1" / "images" / "s1.png")
    rc, out, err = run_cli("--format", "dsb", "--input", tmp_path / "dsb", "--output",
                           tmp_path / "o.json", "--workers", "1")
    assert rc == 2
    lines = [l for l in err.splitlines() if l.strip() and "libpng" not in l]
    assert len(lines) == 1 and "s1.png" in lines[0] and "--skip-invalid" in lines[0]
    assert "Traceback" not in err and not (tmp_path / "o.json").exists()
    # --skip-invalid: converted, the skipped file listed at the end, exit 0
    rc, out, err = run_cli("--format", "dsb", "--input", tmp_path / "dsb", "--output",
                           tmp_path / "o.json", "--workers", "1", "--skip-invalid")
    assert rc == 0
    assert "skipped 1 invalid file(s)" in out and "s1.png" in out.split("skipped 1")[1]
    assert len(json.load(open(tmp_path / "o.json"))["images"]) == 2


def test_cli_nothing_converted_exits_non_zero(tmp_path):
    make_dsb(tmp_path / "dsb", n_masks=(1,))
    truncate(tmp_path / "dsb" / "s0" / "images" / "s0.png")
    rc, out, err = run_cli("--format", "dsb", "--input", tmp_path / "dsb", "--output",
                           tmp_path / "o.json", "--skip-invalid", "--workers", "1")
    assert rc == 2 and "nothing was converted" in err and "s0.png" in err
    rc, out, err = run_cli("--format", "dsb", "--input", tmp_path / "nope", "--output",
                           tmp_path / "o.json")
    assert rc == 2 and "nope" in err and "Traceback" not in err


def test_cli_summary_and_pycocotools_loads(tmp_path):
    make_dsb(tmp_path / "dsb")
    rc, out, err = run_cli("--format", "dsb", "--input", tmp_path / "dsb", "--output",
                           tmp_path / "o.json", "--workers", "1")
    assert rc == 0
    assert "images:    3 (1 without instances" in out and "nucleus" in out
    assert "instance area (px)" in out and "skipped: none" in out
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO(str(tmp_path / "o.json"))
    assert len(c.getAnnIds()) == 5 and c.loadCats(1)[0]["name"] == "nucleus"
    data = load_coco(str(tmp_path / "o.json"))
    assert data["_image_root"] == str(tmp_path / "dsb")
    assert sorted(a["id"] for a in data["annotations"]) == [1, 2, 3, 4, 5]


def test_cocoeval_gt_against_itself_is_ap_1(tmp_path):
    make_dsb(tmp_path / "dsb", n_masks=(4, 2, 3))
    rc, _, _ = run_cli("--format", "dsb", "--input", tmp_path / "dsb", "--output",
                       tmp_path / "o.json", "--workers", "1")
    assert rc == 0
    from pycocotools.cocoeval import COCOeval

    gt = load_coco(str(tmp_path / "o.json"))
    coco_gt = to_pycocotools(gt)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "segmentation": a["segmentation"], "score": 1.0} for a in gt["annotations"]]
    for iou_type in ("segm", "bbox"):
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0)  # AP@[.5:.95]
        assert ev.stats[1] == pytest.approx(1.0)  # AP50


def test_cli_split_and_folds_file_names(tmp_path):
    make_dsb(tmp_path / "dsb", n_masks=(1, 2, 3, 1, 2, 0, 1, 1, 2, 1))
    rc, out, _ = run_cli("--format", "dsb", "--input", tmp_path / "dsb", "--output",
                         tmp_path / "d.json", "--split", "train=0.6,val=0.2,test=0.2",
                         "--seed", "0", "--workers", "1")
    assert rc == 0
    files = {n: json.load(open(tmp_path / f"d_{n}.json")) for n in ("train", "val", "test")}
    assert not (tmp_path / "d.json").exists()
    names = [im["file_name"] for f in files.values() for im in f["images"]]
    assert sorted(names) == sorted(f"s{i}/images/s{i}.png" for i in range(10))
    assert sum(len(f["annotations"]) for f in files.values()) == 14
    ann_ids = [a["id"] for f in files.values() for a in f["annotations"]]
    assert sorted(ann_ids) == list(range(1, 15))  # ids unique across the splits
    assert files["val"]["info"]["split"] == "val" and files["val"]["info"]["seed"] == 0
    rc, out, _ = run_cli("--format", "dsb", "--input", tmp_path / "dsb", "--output",
                         tmp_path / "k.json", "--folds", "3", "--workers", "1")
    assert rc == 0
    vals = []
    for i in range(3):
        tr = json.load(open(tmp_path / f"k_fold{i}_train.json"))
        va = json.load(open(tmp_path / f"k_fold{i}_val.json"))
        assert len(tr["images"]) + len(va["images"]) == 10
        assert not {im["file_name"] for im in tr["images"]} & {im["file_name"] for im in va["images"]}
        vals += [im["file_name"] for im in va["images"]]
    assert len(vals) == len(set(vals)) == 10
    rc, _, err = run_cli("--format", "dsb", "--input", tmp_path / "dsb", "--output",
                         tmp_path / "x.json", "--split", "train=0.9,val=0.2")
    assert rc == 2 and "sum to" in err


def test_polygon_round_trip_close_and_rle_exact(tmp_path):
    rng = np.random.default_rng(0)
    masks = []
    root = tmp_path / "dsb"
    img = np.zeros((96, 96, 3), np.uint8)
    write_png(str(root / "a" / "images" / "a.png"), img)
    for k in range(12):  # ellipses of several sizes and angles
        m = np.zeros((96, 96), np.uint8)
        c = tuple(int(v) for v in rng.integers(15, 80, 2))
        axes = tuple(int(v) for v in rng.integers(3, 12, 2))
        cv2.ellipse(m, c, axes, float(rng.integers(0, 180)), 0, 360, 255, -1)
        write_png(str(root / "a" / "masks" / f"m{k:02d}.png"), m)
        masks.append(m > 0)
    rc, _, _ = run_cli("--format", "dsb", "--input", root, "--output", tmp_path / "p.json",
                       "--mask-format", "polygon", "--workers", "1")
    assert rc == 0
    poly = json.load(open(tmp_path / "p.json"))
    ious = []
    for a, m in zip(poly["annotations"], masks):
        assert isinstance(a["segmentation"], list) and a["area"] == m.sum()
        p = decoded(a, 96, 96)
        ious.append((p & m).sum() / (p | m).sum())
    assert min(ious) > 0.97  # pixel-corner outlines rasterise back to (nearly) the same pixels
    rc, _, _ = run_cli("--format", "dsb", "--input", root, "--output", tmp_path / "r.json",
                       "--workers", "1")
    rle = json.load(open(tmp_path / "r.json"))
    assert all(np.array_equal(decoded(a, 96, 96), m) for a, m in zip(rle["annotations"], masks))


def test_copy_images(tmp_path):
    make_dsb(tmp_path / "dsb")
    rc, _, _ = run_cli("--format", "dsb", "--input", tmp_path / "dsb", "--output",
                       tmp_path / "out" / "c.json", "--copy-images", "--workers", "1")
    assert rc == 0
    data = load_coco(str(tmp_path / "out" / "c.json"))
    assert data["info"]["image_root"] == "c_images"
    for im in data["images"]:
        p = os.path.join(data["_image_root"], im["file_name"])
        assert p.startswith(str(tmp_path / "out" / "c_images")) and os.path.isfile(p)
        assert open(p, "rb").read() == open(tmp_path / "dsb" / im["file_name"], "rb").read()


# ----------------------------------------------------------------------------- labels
def test_labels_bit_depths_negative_and_pairing(tmp_path):
    root = tmp_path / "lab"
    shape = (30, 40)
    lab8 = np.zeros(shape, np.uint8)
    lab8[disc(shape, (10, 10), 4) > 0] = 7
    lab8[disc(shape, (20, 28), 5) > 0] = 200
    lab16 = np.zeros(shape, np.uint16)
    lab16[disc(shape, (15, 15), 6) > 0] = 40000
    lab32 = np.zeros(shape, np.uint32)
    lab32[disc(shape, (8, 30), 4) > 0] = 3_000_000_000
    lab32[disc(shape, (22, 10), 4) > 0] = 5
    rgb = np.zeros(shape + (3,), np.uint8)
    rgb[disc(shape, (10, 10), 4) > 0] = (255, 0, 0)
    rgb[disc(shape, (20, 28), 4) > 0] = (0, 0, 255)
    img16 = (np.random.default_rng(0).random(shape) * 60000).astype(np.uint16)
    write_png(str(root / "images" / "a.png"), np.zeros(shape + (4,), np.uint8))  # RGBA image
    write_png(str(root / "images" / "b.png"), img16)  # 16-bit gray image
    tifffile.imwrite(str(root / "images" / "c.tif"), np.zeros(shape + (3,), np.uint8))
    write_png(str(root / "images" / "d.png"), np.zeros(shape + (3,), np.uint8))
    write_png(str(root / "images" / "e.png"), np.zeros(shape + (3,), np.uint8))
    write_png(str(root / "labels" / "a_label.png"), lab8)
    write_png(str(root / "labels" / "b.png"), lab16)
    tifffile.imwrite(str(root / "labels" / "c_mask.tif"), lab32)
    write_png(str(root / "labels" / "d_instances.png"), rgb)
    write_png(str(root / "labels" / "e_labels.png"), np.zeros(shape, np.uint16))  # negative
    conv = convert_labels(str(root), mpp=0.5, workers=1, progress=False)
    coco = conv.coco
    assert [im["file_name"] for im in coco["images"]] == ["a.png", "b.png", "c.tif", "d.png",
                                                          "e.png"]
    assert all(im["mpp"] == 0.5 for im in coco["images"])
    per = {im["file_name"]: [a for a in coco["annotations"] if a["image_id"] == im["id"]]
           for im in coco["images"]}
    assert [len(per[k]) for k in ("a.png", "b.png", "c.tif", "d.png", "e.png")] == [2, 1, 2, 2, 0]
    for name, lab in (("a.png", lab8), ("b.png", lab16), ("c.tif", lab32)):
        ids = [v for v in np.unique(lab) if v]
        for a, v in zip(per[name], ids):  # one annotation per label value, in value order
            assert np.array_equal(decoded(a, *shape), lab == v)


def test_labels_bad_cases(tmp_path):
    root = tmp_path / "lab"
    shape = (20, 20)
    lab = np.zeros(shape, np.uint8)
    lab[5:9, 5:9] = 1
    for n in ("a", "b", "c"):
        write_png(str(root / "images" / f"{n}.png"), np.zeros(shape + (3,), np.uint8))
    write_png(str(root / "labels" / "a.png"), lab)
    write_png(str(root / "labels" / "b.png"), np.zeros((21, 20), np.uint8))  # size mismatch
    # c has no label file; orphan has no image
    write_png(str(root / "labels" / "orphan.png"), lab)
    with pytest.raises(ConversionError, match="orphan.png"):
        convert_labels(str(root), workers=1, progress=False)
    conv = convert_labels(str(root), workers=1, progress=False, skip_invalid=True)
    skipped = {os.path.basename(p): r for p, r in conv.skipped}
    assert set(skipped) == {"orphan.png", "c.png", "b.png"}
    assert "20x21" in skipped["b.png"] and "no label image" in skipped["c.png"]
    assert [im["file_name"] for im in conv.coco["images"]] == ["a.png"]


def test_labels_truncated_jpeg_image_is_an_error(tmp_path):
    shape = (64, 64)
    img = (np.random.default_rng(0).random(shape + (3,)) * 255).astype(np.uint8)
    os.makedirs(tmp_path / "images")
    assert cv2.imwrite(str(tmp_path / "images" / "a.jpg"), img)
    write_png(str(tmp_path / "labels" / "a.png"), np.zeros(shape, np.uint8))
    truncate(tmp_path / "images" / "a.jpg", 0.6)
    with pytest.raises(ConversionError, match="a.jpg.*(truncated|cannot decode)"):
        convert_labels(str(tmp_path), workers=1, progress=False)


def test_labels_one_folder_with_suffixes(tmp_path):
    shape = (16, 16)
    lab = np.zeros(shape, np.uint16)
    lab[2:6, 2:6] = 3
    lab[8:12, 8:14] = 9
    write_png(str(tmp_path / "x.png"), np.zeros(shape + (3,), np.uint8))
    write_png(str(tmp_path / "x_label.png"), lab)
    conv = convert_labels(str(tmp_path), workers=1, progress=False)
    assert [im["file_name"] for im in conv.coco["images"]] == ["x.png"]
    assert [a["area"] for a in conv.coco["annotations"]] == [16.0, 24.0]


# ----------------------------------------------------------------------------- xml
XML_HEAD = '<?xml version="1.0"?>\n<Annotations MicronsPerPixel="0.2527">\n'


def region(rid, verts, rtype=0, negative=0):
    v = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in verts)
    return (f'<Region Id="{rid}" Type="{rtype}" NegativeROA="{negative}"><Attributes/>'
            f"<Vertices>{v}</Vertices></Region>")


def write_xml(path, regions_by_layer):
    body = ""
    for name, regs in regions_by_layer:
        body += f'<Annotation Id="1" Name="{name}"><Regions>{"".join(regs)}</Regions></Annotation>'
    open(path, "w").write(XML_HEAD + body + "</Annotations>\n")


def test_xml_polygons_degenerate_and_types(tmp_path):
    tifffile.imwrite(str(tmp_path / "TCGA-AB-1234-01Z-00-DX1.tif"), np.zeros((50, 60, 3), np.uint8))
    regs = [
        region(1, [(10.5, 10.2), (20.7, 10.1), (20.2, 20.9), (10.1, 20.5)]),  # square-ish
        region(2, [(30, 30), (31, 31)]),  # 2 distinct vertices: degenerate
        region(3, [(5, 5), (10, 10), (15, 15), (5, 5)]),  # collinear: zero area
        region(4, [(40, 5), (40, 5), (40, 5)]),  # one distinct vertex
        region(5, [(40, 30), (55, 30), (55, 45), (40, 45)], rtype=1),  # rectangle
        region(6, [(25, 35), (35, 45)], rtype=2),  # ellipse from its bounding box
        region(7, [(1, 1), (5, 1), (5, 5)], negative=1),  # exclusion region
        region(8, [(15, 15), (25, 15), (25, 25), (15, 25)]),  # overlaps region 1
        region(9, [(58, 48), (70, 48), (70, 60), (58, 60)]),  # partly outside: clipped
    ]
    write_xml(tmp_path / "TCGA-AB-1234-01Z-00-DX1.xml", [("", regs)])
    conv = convert_xml(str(tmp_path), progress=False)
    coco = conv.coco
    (im,) = coco["images"]
    assert im["mpp"] == pytest.approx(0.2527) and im["slide"] == "TCGA-AB-1234"
    assert coco["categories"] == [{"id": 1, "name": "nucleus", "supercategory": "cell"}]
    assert len(coco["annotations"]) == 5
    row = dict(conv.per_file)["TCGA-AB-1234-01Z-00-DX1.xml"]
    assert row["regions"] == 9 and row["instances"] == 5 and row["degenerate"] == 3
    assert row["not_polygons"] == 1 and row["overlap_px"] > 0
    assert conv.counters["degenerate_regions"] == 3
    rect = decoded(coco["annotations"][1], 50, 60)
    assert rect.sum() == 16 * 16 and rect[30:46, 40:56].all()  # pixel centres 40..55
    clipped = decoded(coco["annotations"][4], 50, 60)
    assert clipped.sum() == 2 * 2 and clipped[48:50, 58:60].all()
    assert convert_xml(str(tmp_path), mpp=0.5, progress=False).coco["images"][0]["mpp"] == 0.5


def test_xml_layers_become_classes_and_bad_files(tmp_path):
    write_png(str(tmp_path / "a.png"), np.zeros((20, 20, 3), np.uint8))
    write_xml(tmp_path / "a.xml", [("tumor", [region(1, [(2, 2), (8, 2), (8, 8)])]),
                                   ("lymphocyte", [region(2, [(12, 12), (18, 12), (18, 18)])])])
    open(tmp_path / "b.xml", "w").write(XML_HEAD + "<Annotation><Regions>")  # truncated XML
    write_png(str(tmp_path / "b.png"), np.zeros((20, 20, 3), np.uint8))
    write_xml(tmp_path / "c.xml", [("", [])])  # no image for it
    bomb = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
            '<!ENTITY lol2 "&lol;&lol;&lol;">]><Annotations>&lol2;</Annotations>')
    open(tmp_path / "d.xml", "w").write(bomb)
    write_png(str(tmp_path / "d.png"), np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(ConversionError, match="b.xml: not well-formed XML"):
        convert_xml(str(tmp_path), progress=False)
    conv = convert_xml(str(tmp_path), progress=False, skip_invalid=True)
    assert sorted(os.path.basename(p) for p, _ in conv.skipped) == ["b.xml", "c.xml", "d.xml"]
    assert [c["name"] for c in conv.coco["categories"]] == ["lymphocyte", "tumor"]
    assert [a["category_id"] for a in conv.coco["annotations"]] == [2, 1]
    assert slide_group("some_tile") == "some_tile"


# ----------------------------------------------------------------------------- points
def test_points_csv_forms(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text("X,Y,Class,Image\n1.5,2,mitotic figure,a.png\n")
    assert read_points_csv(str(p)) == ([(1.5, 2.0, "mitotic figure", "a.png")], True)
    p.write_text("3,4\n5,6\n")
    assert read_points_csv(str(p)) == ([(3.0, 4.0, "mitosis", None), (5.0, 6.0, "mitosis", None)],
                                       False)
    p.write_text("x,y\n3,four\n")
    with pytest.raises(ConversionError, match="line 2"):
        read_points_csv(str(p))
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ConversionError, match="no x/y columns"):
        read_points_csv(str(p))


def test_points_boxes_border_outside_and_negatives(tmp_path):
    for n in ("s0", "s1", "s2"):
        write_png(str(tmp_path / f"{n}.png"), np.zeros((100, 120, 3), np.uint8))
    (tmp_path / "pts.csv").write_text(
        "x,y,label,slide\n60,50,mitosis,s0.png\n0,0,mitosis,s0\n119,99,imposter,s1\n"
        "500,20,mitosis,s1\n")
    conv = convert_points(str(tmp_path / "pts.csv"), mpp=0.25, progress=False)
    coco = conv.coco
    assert [c["name"] for c in coco["categories"]] == ["mitosis", "imposter"]
    assert [im["file_name"] for im in coco["images"]] == ["s0.png", "s1.png", "s2.png"]
    assert all(im["mpp"] == 0.25 and "slide" in im for im in coco["images"])
    boxes = [(a["image_id"], a["category_id"], a["bbox"]) for a in coco["annotations"]]
    assert boxes == [(1, 1, [35.0, 25.0, 50.0, 50.0]),  # 12.5 um at 0.25 um/px = 50 px
                     (1, 1, [0.0, 0.0, 25.0, 25.0]),  # corner point: clipped box
                     (2, 2, [94.0, 74.0, 26.0, 26.0])]
    assert conv.counters == {"points_outside": 1, "clipped_boxes": 2}
    assert all("segmentation" not in a for a in coco["annotations"])
    # s2 has no points: kept as a negative image
    conv = convert_points(str(tmp_path / "pts.csv"), box_size_px=20, progress=False)
    assert conv.coco["annotations"][0]["bbox"] == [50.0, 40.0, 20.0, 20.0]
    assert "mpp" not in conv.coco["images"][0]
    with pytest.raises(ConversionError, match="--mpp"):
        convert_points(str(tmp_path / "pts.csv"), progress=False)


def test_points_per_image_csvs_and_missing_slide(tmp_path):
    write_png(str(tmp_path / "a.png"), np.zeros((40, 40, 3), np.uint8))
    write_png(str(tmp_path / "b.png"), np.zeros((40, 40, 3), np.uint8))
    (tmp_path / "a.csv").write_text("20,20\n")
    (tmp_path / "zz.csv").write_text("x,y,slide\n1,1,nothere.png\n")
    with pytest.raises(ConversionError, match="nothere"):
        convert_points(str(tmp_path), box_size_px=10, progress=False)
    conv = convert_points(str(tmp_path), box_size_px=10, progress=False, skip_invalid=True)
    assert [os.path.basename(p) for p, _ in conv.skipped] == ["zz.csv"]
    assert [a["bbox"] for a in conv.coco["annotations"]] == [[15.0, 15.0, 10.0, 10.0]]
    assert len(conv.coco["images"]) == 2


def test_points_cli_pycocotools_bbox(tmp_path):
    write_png(str(tmp_path / "a.png"), np.zeros((40, 40, 3), np.uint8))
    (tmp_path / "a.csv").write_text("x,y\n20,20\n39,39\n")
    rc, out, err = run_cli("--format", "points", "--input", tmp_path / "a.csv", "--mpp", "0.5",
                           "--box-size-um", "5", "--output", tmp_path / "p.json",
                           "--categories", "cell")
    assert rc == 0, err
    data = load_coco(str(tmp_path / "p.json"))
    assert data["categories"][0]["name"] == "cell"
    assert [a["bbox"] for a in data["annotations"]] == [[15.0, 15.0, 10.0, 10.0],
                                                        [34.0, 34.0, 6.0, 6.0]]
    rc, _, err = run_cli("--format", "points", "--input", tmp_path / "a.csv",
                         "--output", tmp_path / "q.json")
    assert rc == 2 and "--mpp" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- amibr
def make_amibr(root):
    rows = [
        # slide 001: figure 1 at (100, 100); figure 2 at (140, 90) falls inside 1's crop
        ("001.tiff", "MIDOG21", 1, 100, 100, "NMF metaphase", "NMF metaphase", "False"),
        ("001.tiff", "MIDOG21", 2, 140, 90, "NMF prometaphase", "NMF metaphase", "False"),
        ("001.tiff", "MIDOG21", 3, 900, 900, "AMF other", "AMF segregation", "True"),
        # slide 120 (Aperio CS2): near the top-left slide corner, zero-padded crop
        ("120.tiff", "MIDOG21", 4, 20, 10, "AMF other", "NMF ring shape", "False"),
        # same coordinates on another slide: must not appear in slide 001's crops
        ("050.tiff", "MIDOG21", 5, 101, 101, "NMF anaphase-telophase", "AMF other", "False"),
        # no crop for this one
        ("01_01.tif", "TUPAC16", 6, 10, 10, "NMF metaphase", "NMF metaphase", "False"),
    ]
    lines = [",slide,dataset,uid,x,y,expert1_label,expert2_label,expert1_atypical,"
             "expert2_atypical,expert3_atypical,majority_atypical"]
    for i, (s, d, u, x, y, e1, e2, maj) in enumerate(rows):
        lines.append(f"{i},{s},{d},{u},{x},{y},{e1},{e2},{maj},{maj},{maj},{maj}")
    os.makedirs(root, exist_ok=True)
    (root / "AMI-BR.csv").write_text("\n".join(lines) + "\n")
    for s, d, u, x, y, e1, e2, maj in rows[:5]:
        sub = "atypical" if maj == "True" else "normal"
        write_png(str(root / "patches" / sub / f"{d}_{u}.png"), np.zeros((128, 128, 3), np.uint8))


def test_amibr_neighbours_padding_and_modes(tmp_path):
    make_amibr(tmp_path / "amibr")
    conv = convert_amibr(str(tmp_path / "amibr"), label_mode="mitosis")
    coco = conv.coco
    assert coco["categories"] == [{"id": 1, "name": "mitosis", "supercategory": "mitotic figure"}]
    ims = {im["file_name"]: im for im in coco["images"]}
    assert set(ims) == {f"patches/{s}/MIDOG21_{u}.png" for s, u in
                        (("normal", 1), ("normal", 2), ("atypical", 3), ("normal", 4),
                         ("normal", 5))}
    im1 = ims["patches/normal/MIDOG21_1.png"]
    assert im1["slide"] == "MIDOG21_001" and im1["mpp"] == 0.23
    assert ims["patches/normal/MIDOG21_4.png"]["mpp"] == 0.25
    boxes = {im["file_name"]: [a["bbox"] for a in coco["annotations"] if a["image_id"] == im["id"]]
             for im in coco["images"]}
    side = 12.5 / 0.23
    b = boxes["patches/normal/MIDOG21_1.png"]
    assert len(b) == 2  # its own figure and figure 2 (same slide, inside the crop)
    assert b[0] == pytest.approx([64 - side / 2, 64 - side / 2, side, side])
    assert b[1][0] == pytest.approx(104 - side / 2) and b[1][1] == pytest.approx(54 - side / 2)
    assert b[1][0] + b[1][2] == pytest.approx(128.0)  # clipped at the crop's right edge
    assert len(boxes["patches/normal/MIDOG21_2.png"]) == 2
    assert len(boxes["patches/normal/MIDOG21_5.png"]) == 1  # other slide: no neighbours
    # figure 4 at (20, 10): crop origin (-44, -54); the padding is outside the slide, so its
    # 50 px box (0.25 um/px) is clipped to x >= 44, y >= 54
    (b4,) = boxes["patches/normal/MIDOG21_4.png"]
    assert b4[0] == pytest.approx(44.0) and b4[1] == pytest.approx(54.0)
    assert b4[0] + b4[2] == pytest.approx(64 + 25.0) and b4[1] + b4[3] == pytest.approx(89.0)
    assert conv.counters["neighbour_figures"] == 2 and conv.counters["rows_without_crop"] == 1

    phase = convert_amibr(str(tmp_path / "amibr"), label_mode="phase").coco
    assert [c["name"] for c in phase["categories"]] == ["prophase-prometaphase", "metaphase",
                                                       "anaphase-telophase", "atypical"]
    by_uid = {a["uid"]: a["category_id"] for a in phase["annotations"]}
    assert by_uid == {"MIDOG21_1": 2, "MIDOG21_2": 1, "MIDOG21_3": 4, "MIDOG21_4": 1,
                      "MIDOG21_5": 3}
    aty = convert_amibr(str(tmp_path / "amibr"), label_mode="atypical").coco
    assert [c["name"] for c in aty["categories"]] == ["normal", "atypical"]
    assert {a["uid"]: a["category_id"] for a in aty["annotations"]}["MIDOG21_3"] == 2


def test_amibr_phase_rule():
    row = {"majority_atypical": "False"}
    assert phase_label({**row, "expert1_label": "NMF prometaphase",
                        "expert2_label": "NMF metaphase"}) == ("prophase-prometaphase", True)
    assert phase_label({**row, "expert1_label": "AMF other",
                        "expert2_label": "NMF anaphase-telophase"}) == ("anaphase-telophase", False)
    assert phase_label({**row, "expert1_label": "NMF ring shape",
                        "expert2_label": "NMF prometaphase"})[0] == "prophase-prometaphase"
    assert phase_label({"majority_atypical": "True", "expert1_label": "NMF metaphase",
                        "expert2_label": "NMF metaphase"})[0] == "atypical"


def test_amibr_bad_inputs(tmp_path):
    make_amibr(tmp_path / "a")
    truncate(tmp_path / "a" / "patches" / "normal" / "MIDOG21_2.png")
    with pytest.raises(ConversionError, match="MIDOG21_2.png"):
        convert_amibr(str(tmp_path / "a"))
    conv = convert_amibr(str(tmp_path / "a"), skip_invalid=True)
    assert len(conv.coco["images"]) == 4 and len(conv.skipped) == 1
    (tmp_path / "a" / "AMI-BR.csv").write_text("slide,uid\n1,2\n")
    with pytest.raises(ConversionError, match="missing column"):
        convert_amibr(str(tmp_path / "a"))


# ----------------------------------------------------------------------------- coco + categories
def test_coco_merge_remap_and_duplicates(tmp_path):
    make_dsb(tmp_path / "d1", n_masks=(1, 2))
    make_dsb(tmp_path / "d2", n_masks=(3,))
    assert run_cli("--format", "dsb", "--input", tmp_path / "d1", "--output", tmp_path / "a.json",
                   "--workers", "1")[0] == 0
    assert run_cli("--format", "dsb", "--input", tmp_path / "d2", "--output", tmp_path / "b.json",
                   "--workers", "1", "--categories", "cell")[0] == 0
    conv = convert_coco([str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                         str(tmp_path / "a.json")])
    coco = conv.coco
    assert coco["info"]["image_root"] == str(tmp_path)
    assert [im["file_name"] for im in coco["images"]] == ["d1/s0/images/s0.png",
                                                          "d1/s1/images/s1.png",
                                                          "d2/s0/images/s0.png"]
    assert [c["name"] for c in coco["categories"]] == ["nucleus", "cell"]
    assert len(coco["annotations"]) == 3 + 3 + 3  # a.json twice: duplicates merged, reported
    assert conv.counters["duplicate_images"] == 2
    rc, out, err = run_cli("--format", "coco", "--input", tmp_path / "a.json", tmp_path / "b.json",
                           "--output", tmp_path / "m.json", "--categories", "cell=nucleus")
    assert rc == 0, err
    m = load_coco(str(tmp_path / "m.json"))
    assert m["categories"] == [{"id": 1, "name": "nucleus", "supercategory": "cell"}]
    assert len(m["annotations"]) == 6 and len(m["images"]) == 3
    for im in m["images"]:
        assert os.path.isfile(os.path.join(m["_image_root"], im["file_name"]))
    rc, out, err = run_cli("--format", "coco", "--input", tmp_path / "a.json", "--output",
                           tmp_path / "n.json", "--categories", "nucleus=-")
    assert rc == 0 and "dropped 3 instance(s)" in out
    assert json.load(open(tmp_path / "n.json"))["annotations"] == []
    (tmp_path / "bad.json").write_text("[]")
    rc, _, err = run_cli("--format", "coco", "--input", tmp_path / "bad.json", "--output",
                         tmp_path / "x.json")
    assert rc == 2 and "bad.json" in err and "results list" in err


def test_remap_categories_rules():
    def coco():
        return {"categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"},
                               {"id": 5, "name": "c"}],
                "annotations": [{"category_id": 1}, {"category_id": 2}, {"category_id": 5}]}

    d = coco()
    remap_categories(d, "c,a")  # order only
    assert [(c["id"], c["name"]) for c in d["categories"]] == [(1, "c"), (2, "a"), (3, "b")]
    assert [a["category_id"] for a in d["annotations"]] == [2, 3, 1]
    d = coco()
    dropped = remap_categories(d, "a=x,b=x,5=-")
    assert [c["name"] for c in d["categories"]] == ["x"] and dropped == {"c": 1}
    assert [a["category_id"] for a in d["annotations"]] == [1, 1]
    with pytest.raises(ValueError, match="'zz' is not in the input"):
        remap_categories(coco(), "zz=y")
    with pytest.raises(ValueError, match="not a category"):
        remap_categories(coco(), "q")
    one = {"categories": [{"id": 1, "name": "nucleus"}], "annotations": [{"category_id": 1}]}
    remap_categories(one, "cell")
    assert one["categories"][0]["name"] == "cell"


# The demo (python -m detector.demo), which converts synthetic label images with --classes,
# is tested in tests/test_demo.py.


def test_coco_keeps_or_changes_the_mask_encoding(tmp_path):
    make_dsb(tmp_path / "d", n_masks=(2, 3))
    assert run_cli("--format", "dsb", "--input", tmp_path / "d", "--output", tmp_path / "p.json",
                   "--mask-format", "polygon", "--workers", "1")[0] == 0
    poly = json.load(open(tmp_path / "p.json"))
    assert run_cli("--format", "coco", "--input", tmp_path / "p.json", "--output",
                   tmp_path / "same.json")[0] == 0
    same = json.load(open(tmp_path / "same.json"))
    assert [a["segmentation"] for a in same["annotations"]] == \
        [a["segmentation"] for a in poly["annotations"]]
    assert run_cli("--format", "coco", "--input", tmp_path / "p.json", "--output",
                   tmp_path / "rle.json", "--mask-format", "rle")[0] == 0
    rle = json.load(open(tmp_path / "rle.json"))
    assert rle["info"]["mask_format"] == "rle"
    for a, b in zip(rle["annotations"], poly["annotations"]):
        assert isinstance(a["segmentation"], dict)
        assert np.array_equal(decoded(a, 40, 50), decoded(b, 40, 50))
        assert decoded(a, 40, 50).sum() == b["area"]  # pixel-corner polygons: same pixels
