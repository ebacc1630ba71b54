"""``convert_to_coco.py --format labels --classes DIR``: instance classes from class maps."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from detector.cli.convert_to_coco import main as convert_main
from detector.data.coco import annotation_to_mask, load_coco
from detector.data.converters.labels import instance_classes


# --workers 1 everywhere: no processes forked from a pytest process that may already hold
# torch threads (a fork then can deadlock)


def _write(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def test_instance_classes_takes_the_majority_non_zero_class():
    label = np.zeros((6, 8), np.int32)
    label[0:3, 0:4] = 1          # 12 px: 8 of class 2, 4 of class 1
    label[3:6, 0:4] = 2          # 12 px: all class 0 -> no class
    label[0:6, 5:8] = 7          # 18 px: 10 of class 0, 8 of class 3 -> class 3
    cmap = np.zeros((6, 8), np.uint8)
    cmap[0:2, 0:4] = 2
    cmap[2, 0:4] = 1
    cmap[0:2, 5:8] = 3
    cmap[2:4, 6:7] = 3
    cmap[4, 5:7] = 3
    ids = np.array([1, 2, 7])
    assert instance_classes(label, cmap, ids).tolist() == [2, 0, 3]


def _two_class_set(root):
    """Two 32x40 images; image a: a nucleus (class 1) and a mitotic figure (class 2) whose
    class map is noisy (a few class-1 pixels); image b: one instance lying on class 0 only."""
    img = np.full((32, 40, 3), 200, np.uint8)
    la = np.zeros((32, 40), np.uint16)
    ca = np.zeros((32, 40), np.uint8)
    la[2:10, 2:10] = 5
    ca[2:10, 2:10] = 1
    la[15:25, 20:30] = 9
    ca[15:25, 20:30] = 2
    ca[15, 20:25] = 1            # noise: 5 of 100 px
    lb = np.zeros((32, 40), np.uint16)
    lb[5:12, 5:12] = 3
    cb = np.zeros((32, 40), np.uint8)
    for name, lab, cm in (("a", la, ca), ("b", lb, cb)):
        _write(str(root / "images" / f"{name}.png"), img)
        _write(str(root / "labels" / f"{name}.png"), lab)
        _write(str(root / "classes" / f"{name}.png"), cm)
    return la


def test_convert_labels_with_classes_and_category_names(tmp_path, capsys):
    la = _two_class_set(tmp_path / "set")
    out = tmp_path / "out.json"
    rc = convert_main(["--format", "labels", "--input", str(tmp_path / "set"),
                       "--classes", str(tmp_path / "set" / "classes"),
                       "--categories", "1=nucleus,2=mitotic figure", "--mpp", "0.5",
                       "--output", str(out), "--quiet", "--workers", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "dropped 1 instance(s) lying on class 0" in text
    coco = load_coco(str(out))
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "nucleus"),
                                                                   (2, "mitotic figure")]
    img_a = next(i for i in coco["images"] if i["file_name"] == "a.png")
    anns = sorted((a for a in coco["annotations"] if a["image_id"] == img_a["id"]),
                  key=lambda a: a["category_id"])
    assert [a["category_id"] for a in anns] == [1, 2]
    # the masks are still exactly the label image's instances
    assert np.array_equal(annotation_to_mask(anns[0], 32, 40), la == 5)
    assert np.array_equal(annotation_to_mask(anns[1], 32, 40), la == 9)
    assert len(coco["annotations"]) == 2


def test_classes_default_names_and_missing_class_map(tmp_path, capsys):
    _two_class_set(tmp_path / "set")
    out = tmp_path / "out.json"
    assert convert_main(["--format", "labels", "--input", str(tmp_path / "set"),
                         "--classes", str(tmp_path / "set" / "classes"),
                         "--output", str(out), "--quiet", "--workers", "1"]) == 0
    coco = load_coco(str(out))
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "class_1"),
                                                                   (2, "class_2")]
    os.remove(tmp_path / "set" / "classes" / "b.png")
    capsys.readouterr()
    assert convert_main(["--format", "labels", "--input", str(tmp_path / "set"),
                         "--classes", str(tmp_path / "set" / "classes"),
                         "--output", str(out), "--quiet", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "b.png" in err and "no class map" in err


def test_classes_only_with_labels_format(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert convert_main(["--format", "dsb", "--input", str(tmp_path / "x"),
                         "--classes", str(tmp_path), "--output", str(tmp_path / "o.json")]) == 2
    assert "--format labels" in capsys.readouterr().err


def test_class_map_of_the_wrong_size_is_named(tmp_path, capsys):
    _two_class_set(tmp_path / "set")
    _write(str(tmp_path / "set" / "classes" / "a.png"), np.zeros((10, 10), np.uint8))
    assert convert_main(["--format", "labels", "--input", str(tmp_path / "set"),
                         "--classes", str(tmp_path / "set" / "classes"),
                         "--output", str(tmp_path / "o.json"), "--quiet",
                         "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "a.png" in err and "class map is 10x10" in err
