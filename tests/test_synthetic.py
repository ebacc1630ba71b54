"""The synthetic data set used by the demo: annotations must agree with what is drawn."""
import csv
import json

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage as ndi

from detector.data.synthetic import MITOSIS, NUCLEUS, render_field, write_dataset, write_slide


def test_field_labels_classes_and_touching():
    f = render_field(np.random.default_rng(3), (192, 192), mitotic_fraction=0.2)
    ids = set(np.unique(f.labels)) - {0}
    assert ids == set(f.classes)                      # every instance has a class
    assert {NUCLEUS, MITOSIS} <= set(f.classes.values())
    # mitotic figures are darker (more haematoxylin) than ordinary nuclei
    gray = f.image.mean(axis=2)
    mit = np.isin(f.labels, [i for i, c in f.classes.items() if c == MITOSIS])
    nuc = np.isin(f.labels, [i for i, c in f.classes.items() if c == NUCLEUS])
    assert gray[mit].mean() < gray[nuc].mean() - 30
    # some nuclei touch: a dilated instance meets another instance
    touching = 0
    for i in list(ids)[:60]:
        ring = ndi.binary_dilation(f.labels == i) & (f.labels != i) & (f.labels > 0)
        touching += bool(ring.any())
    assert touching >= 5
    # every instance is one connected piece
    for i in list(ids)[:60]:
        assert ndi.label(f.labels == i)[1] == 1


def test_write_dataset_files_agree(tmp_path):
    s = write_dataset(str(tmp_path), n_images=2, size=(128, 128), seed=1)
    lab = np.asarray(Image.open(tmp_path / "labels" / "synth_000.png"))
    cls = np.asarray(Image.open(tmp_path / "classes" / "synth_000.png"))
    img = np.asarray(Image.open(tmp_path / "images" / "synth_000.png"))
    assert img.shape == (128, 128, 3) and lab.shape == (128, 128)
    assert ((lab > 0) == (cls > 0)).all()
    with open(tmp_path / "mitoses.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == s["mitotic_figures"]
    for r in rows:
        if r["slide"] != "synth_000":
            continue
        x, y = int(round(float(r["x"]))), int(round(float(r["y"])))
        # the listed centre is on or next to a pixel of class "mitotic figure"
        assert (cls[max(0, y - 3):y + 4, max(0, x - 3):x + 4] == MITOSIS).any()


def test_pyramidal_slide_with_truth(tmp_path):
    path = str(tmp_path / "slide.tif")
    truth = write_slide(path, size=(1024, 768), mpp=0.5, levels=3)
    with tifffile.TiffFile(path) as tf:
        levels = tf.series[0].levels
        assert [lv.shape[:2] for lv in levels] == [(1024, 768), (512, 384), (256, 192)]
        xres = tf.pages[0].tags["XResolution"].value
        unit = tf.pages[0].tags["ResolutionUnit"].value
    assert unit == 3  # centimetre
    assert abs(1e4 / (xres[0] / xres[1]) - 0.5) < 1e-6
    with open(path + ".truth.json") as fh:
        saved = json.load(fh)
    assert saved["mitotic_figures"] == truth["mitotic_figures"] == len(saved["mitoses_xy"]) > 0
    assert 0 < saved["tissue_area_mm2"] < 1024 * 768 * 0.25e-6
