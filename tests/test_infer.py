"""Whole-slide inference end to end: tiled vs one-piece equality on a real H&E tile, counts and
exports, resume, bad input, and the CLI with a checkpoint of ours."""
import csv
import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import tifffile
import torch
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from detector.inference import counting
from detector.inference.journal import JOURNAL_NAME, Journal
from detector.structures import CropMask
from detector.inference.runner import InferenceOptions, SlideError, infer_slide, run_slides
from detector.structures import Instances, rle_from_json
from tests.conftest import shared_path

torch.set_num_threads(1)

CLASSES = [{"id": 1, "name": "nucleus"}]
MONUSEG = ("monuseg", "TCGA-2Z-A9J9-01A-01-TS1.tif")


class ClassicalNucleusDetector(torch.nn.Module):
    """A deterministic detector in the model interface: fixed threshold on the hematoxylin
    channel, distance-transform watershed, one instance per basin. Each instance depends only on
    the pixels near it, as a CNN's receptive field does, so tiling must not change the result."""

    def __init__(self, thresh: float = 0.06, min_area: int = 30):
        super().__init__()
        self.thresh, self.min_area = thresh, min_area
        self.calls = 0
        self.tiles = 0

    def forward(self, images, targets=None):
        from skimage.color import rgb2hed
        from skimage.feature import peak_local_max
        from skimage.segmentation import watershed

        self.calls += 1
        self.tiles += len(images)
        out = []
        for im in images:
            rgb = (im.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            hema = ndi.gaussian_filter(rgb2hed(rgb)[..., 0], 1.0)
            fg = ndi.binary_opening(hema > self.thresh)
            dist = ndi.distance_transform_edt(fg)
            peaks = peak_local_max(dist, min_distance=5, threshold_abs=2.0, labels=ndi.label(fg)[0],
                                   exclude_border=False)
            markers = np.zeros(fg.shape, np.int32)
            markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
            lab = watershed(-dist, markers, mask=fg)
            boxes, masks = [], []
            for i, sl in enumerate(ndi.find_objects(lab)):
                if sl is None:
                    continue
                crop = lab[sl] == i + 1
                if crop.sum() < self.min_area:
                    continue
                boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
                masks.append(CropMask.from_crop(crop, sl[1].start, sl[0].start, fg.shape))
            n = len(boxes)
            out.append(Instances(fg.shape, np.array(boxes, np.float32).reshape(-1, 4),
                                 np.linspace(1.0, 0.6, n, dtype=np.float32), np.ones(n, np.int64),
                                 masks))
        return out


def _opts(**kw):
    base = dict(mpp=0.25, num_workers=0, tissue_detection=False, progress=False)
    base.update(kw)
    return InferenceOptions(**base)


def _match_f1(a, b):
    """One-to-one (Hungarian) matching of two COCO result lists at mask IoU >= 0.5."""
    if not a or not b:
        return 0.0
    iou = mask_utils.iou([x["segmentation"] for x in a], [x["segmentation"] for x in b],
                         [0] * len(b))
    r, c = linear_sum_assignment(-iou)
    tp = int((iou[r, c] >= 0.5).sum())
    return 2 * tp / (len(a) + len(b))


@pytest.fixture(scope="module")
def one_piece(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    path = str(shared_path(*MONUSEG))
    summary = infer_slide(ClassicalNucleusDetector(), CLASSES, 0.25, path, str(out),
                          _opts(tile_size=1024, overlap=64))
    stem = os.path.join(str(out), "TCGA-2Z-A9J9-01A-01-TS1")
    with open(os.path.join(stem, "detections.json")) as f:
        return summary, json.load(f), stem


def test_tiled_equals_one_piece_on_real_tile(one_piece, tmp_path):
    summary1, dets1, _ = one_piece
    assert summary1["analysis"]["tiles_total"] == 1 and len(dets1) > 500
    model = ClassicalNucleusDetector()
    path = str(shared_path(*MONUSEG))
    summary = infer_slide(model, CLASSES, 0.25, path, str(tmp_path),
                          _opts(tile_size=256, overlap=64, batch_size=4, num_workers=1))
    assert summary["analysis"]["tiles_total"] == 25 and model.tiles == 25
    with open(tmp_path / "TCGA-2Z-A9J9-01A-01-TS1" / "detections.json") as f:
        dets = json.load(f)
    f1 = _match_f1(dets1, dets)
    assert f1 >= 0.99, f"tiled vs one-piece F1 {f1:.4f}"
    assert abs(len(dets) - len(dets1)) <= 0.01 * len(dets1)
    # without duplicate removal the seams would double-count: the test can fail
    summary_nonms = infer_slide(ClassicalNucleusDetector(), CLASSES, 0.25, path,
                                str(tmp_path / "nonms"), _opts(tile_size=256, overlap=64,
                                                               nms_thresh=1.01))
    assert summary_nonms["total_detections"] > 1.05 * len(dets1)


def test_summary_and_exports_are_consistent(one_piece):
    summary, dets, stem = one_piece
    for name in ("summary.json", "detections.geojson", "detections.json", "detections.csv",
                 "overlay.png", "density.png"):
        assert os.path.getsize(os.path.join(stem, name)) > 0
    assert not os.path.exists(os.path.join(stem, JOURNAL_NAME))  # finished: journal removed
    n = summary["total_detections"]
    assert summary["counts"] == {"nucleus": n} and n == len(dets)
    assert summary["tissue_area_mm2"] == pytest.approx(1000 * 1000 * 0.25 ** 2 / 1e6)
    assert summary["mitotic_classes"] == [] and summary["mitotic_index"] is None
    # COCO results: slide-sized RLE that pycocotools reads, boxes = mask boxes
    assert dets[0]["segmentation"]["size"] == [1000, 1000]
    rles = [rle_from_json(d["segmentation"]) for d in dets]
    # (pycocotools 2.0.11's area() overflows on more than 255 RLEs at once: per object)
    assert min(int(mask_utils.area(r)) for r in rles) >= 30
    np.testing.assert_allclose(mask_utils.toBbox(rles),
                               [d["bbox"] for d in dets], atol=1)
    # GeoJSON for QuPath: polygons with classification and measurements
    with open(os.path.join(stem, "detections.geojson")) as f:
        gj = json.load(f)
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == n
    feat = gj["features"][0]
    assert feat["geometry"]["type"] in ("Polygon", "MultiPolygon")
    assert feat["properties"]["objectType"] == "detection"
    assert feat["properties"]["classification"]["name"] == "nucleus"
    assert set(feat["properties"]["measurements"]) == {"score", "area_um2"}
    ring = np.array(feat["geometry"]["coordinates"][0] if feat["geometry"]["type"] == "Polygon"
                    else feat["geometry"]["coordinates"][0][0])
    assert (ring[0] == ring[-1]).all()
    x0, y0, w, h = dets[0]["bbox"]
    assert ring[:, 0].min() == pytest.approx(x0) and ring[:, 1].max() == pytest.approx(y0 + h)
    # CSV: one row per detection, um = px * mpp
    with open(os.path.join(stem, "detections.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n
    r = rows[0]
    assert float(r["x_um"]) == pytest.approx(float(r["x_px"]) * 0.25, abs=1e-2)
    assert float(r["area_um2"]) == pytest.approx(float(r["area_px"]) * 0.0625, abs=1e-2)


def test_mitotic_counts_through_the_pipeline(tmp_path):
    """Counting every nucleus as 'mitotic' (the flag) exercises per-mm2, 10 HPF and hotspot."""
    path = str(shared_path(*MONUSEG))
    s = infer_slide(ClassicalNucleusDetector(), CLASSES, 0.25, path, str(tmp_path),
                    _opts(tile_size=1024, mitotic_classes="nucleus", hpf_area=0.001))
    mf = s["mitotic_figures"]
    n = s["total_detections"]
    assert mf["total"] == n and mf["per_mm2"] == pytest.approx(n / 0.0625)
    assert mf["per_10_hpf"] == pytest.approx(n / 0.0625 * 0.01)
    hs = mf["hotspot"]  # 10 HPF = 0.01 mm2 = a 400 px square at 0.25 um/px
    assert hs["x1"] - hs["x0"] == pytest.approx(400) and 0 < hs["count"] < n
    assert hs["area_mm2"] == pytest.approx(0.01) and not hs["tissue_smaller_than_window"]
    # the densest window over every position: brute force over the windows whose left and top
    # edges lie on a detection's centroid (an optimum can be slid there), from the CSV
    with open(tmp_path / "TCGA-2Z-A9J9-01A-01-TS1" / "detections.csv") as f:
        pts = np.array([[float(r["x_px"]), float(r["y_px"])] for r in csv.DictReader(f)])
    best = 0
    for x0 in np.minimum(np.append(pts[:, 0], 600.0), 600.0):
        ys = np.sort(pts[(pts[:, 0] >= x0) & (pts[:, 0] < x0 + 400), 1])
        y0 = np.minimum(np.append(ys, 600.0), 600.0)
        best = max(best, int((np.searchsorted(ys, y0 + 400) - np.searchsorted(ys, y0)).max()))
    assert hs["count"] == best


def test_summarize_mitotic_index_and_class_flags():
    classes = [{"id": 1, "name": "nucleus"}, {"id": 2, "name": "mitotic figure"},
               {"id": 3, "name": "non-mitotic figure"}]
    assert counting.default_mitotic_ids(classes) == [2]
    assert counting.resolve_class_ids("mitotic figure,3", classes) == [2, 3]
    assert counting.resolve_class_ids("none", classes) == []
    with pytest.raises(ValueError, match="not a class of the checkpoint"):
        counting.resolve_class_ids("mitosis", classes)
    labels = [1] * 90 + [2] * 10
    boxes = np.array([[i * 20, 0, i * 20 + 10, 10] for i in range(100)], np.float32)
    inst = Instances((1000, 4000), boxes, np.ones(100), labels)
    s = counting.summarize(inst, classes, mpp=0.5, tissue_area_mm2=0.5, mitotic_ids=[2])
    assert s["counts"] == {"nucleus": 90, "mitotic figure": 10, "non-mitotic figure": 0}
    assert s["mitotic_figures"]["total"] == 10
    assert s["mitotic_figures"]["per_mm2"] == pytest.approx(20.0)
    assert s["mitotic_figures"]["per_10_hpf"] == pytest.approx(20.0 * 2.37)
    assert s["mitotic_index"] == pytest.approx(0.1)
    # a mitosis-only model has no mitotic index
    s = counting.summarize(inst[inst.labels == 2], classes[1:2], 0.5, 0.5, [2])
    assert s["mitotic_index"] is None


@pytest.mark.parametrize("streams", [1, 2])
def test_resume_after_kill_skips_done_tiles(tmp_path, streams):
    """A run killed during a batch keeps the batches journalled before it (with two CPU
    streams, those finished in order before the failing one); --resume predicts only the rest
    and gives the uninterrupted run's result."""
    path = str(shared_path(*MONUSEG))

    class Killed(ClassicalNucleusDetector):
        def forward(self, images, targets=None):
            if self.calls == 3:
                raise KeyboardInterrupt  # the run is killed during the 4th batch
            return super().forward(images, targets)

    opts = _opts(tile_size=256, overlap=64, batch_size=4, streams=streams)
    with pytest.raises(KeyboardInterrupt):
        infer_slide(Killed(), CLASSES, 0.25, path, str(tmp_path), opts)
    folder = tmp_path / "TCGA-2Z-A9J9-01A-01-TS1"
    assert (folder / JOURNAL_NAME).exists() and not (folder / "summary.json").exists()
    with open(folder / JOURNAL_NAME) as f:
        done = sum(len(json.loads(line).get("tiles", [])) for line in f.read().splitlines()[1:])
    # one stream: three batches of 4 were done before the kill; two: the 4th or 5th call
    # failed (whichever thread came first), the batches before it in order were kept
    assert done == 12 if streams == 1 else done in (12, 16)
    # a torn last line (killed mid-write) is ignored
    with open(folder / JOURNAL_NAME, "a") as f:
        f.write('{"tiles": [99], "boxes": [[1, 2')
    model = ClassicalNucleusDetector()
    opts.resume = True
    s = infer_slide(model, CLASSES, 0.25, path, str(tmp_path), opts)
    assert model.tiles == 25 - done
    ref = infer_slide(ClassicalNucleusDetector(), CLASSES, 0.25, path, str(tmp_path / "ref"),
                      _opts(tile_size=256, overlap=64))
    assert s["total_detections"] == ref["total_detections"]
    # a finished slide is skipped as a whole
    again = ClassicalNucleusDetector()
    res = run_slides(again, CLASSES, 0.25, [path], str(tmp_path), opts)
    assert res["skipped"] == [path] and again.calls == 0


def test_journal_with_other_parameters_starts_again(tmp_path):
    p = str(tmp_path / JOURNAL_NAME)
    j = Journal(p, {"slide_size": [10, 10], "tile_size": 256})
    j.append([0, 1], Instances((10, 10), [[1, 1, 3, 3]], [0.9], [1]), {2: "bad tile"})
    j2 = Journal(p, {"slide_size": [10, 10], "tile_size": 256})
    assert j2.done == {0, 1, 2} - {2} | {0, 1} and j2.failed == {2: "bad tile"}
    assert len(j2.instances()[0]) == 1
    j3 = Journal(p, {"slide_size": [10, 10], "tile_size": 512})
    assert j3.done == set()


def test_empty_slide_and_missing_mpp(tmp_path):
    white = np.full((1024, 1536, 3), 243, np.uint8)
    p = str(tmp_path / "blank.tif")
    tifffile.imwrite(p, white, tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    model = ClassicalNucleusDetector()
    s = infer_slide(model, CLASSES, 0.5, p, str(tmp_path),
                    InferenceOptions(num_workers=0, progress=False))
    assert model.calls == 0 and s["total_detections"] == 0 and s["tissue_area_mm2"] == 0
    assert s["mitotic_figures"]["per_mm2"] == 0 and s["analysis"]["tiles_analysed"] == 0
    assert os.path.isfile(tmp_path / "blank" / "density.png")
    # the MoNuSeg tile has no mpp in its metadata
    with pytest.raises(SlideError, match="pass --mpp"):
        infer_slide(model, CLASSES, 0.25, str(shared_path(*MONUSEG)), str(tmp_path),
                    InferenceOptions(num_workers=0, progress=False))


def test_corrupt_tile_is_logged_skipped_and_listed(tmp_path, caplog):
    img = tifffile.imread(shared_path(*MONUSEG))[..., :3]
    p = str(tmp_path / "corrupt.tif")
    tifffile.imwrite(p, img, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    with tifffile.TiffFile(p) as tf:
        off, n = tf.pages[0].dataoffsets[5], tf.pages[0].databytecounts[5]
    data = bytearray(open(p, "rb").read())
    data[off:off + n] = b"\x00" * n  # TIFF tile 5: row 1, column 1 of 4 x 4 -> px 256..512
    open(p, "wb").write(bytes(data))
    s = infer_slide(ClassicalNucleusDetector(), CLASSES, 0.25, p, str(tmp_path),
                    _opts(tile_size=256, overlap=32, mpp=None))
    failed = s["analysis"]["tiles_failed"]
    # the analysis tiles that failed are exactly those that overlap the damaged TIFF tile
    # (the grid of 256 px tiles with stride 224 starts at 0, 224, 448, 672, 744)
    from detector.inference.tiling import tile_grid

    hit = [k for k, (x0, y0, x1, y1) in enumerate(tile_grid(1000, 1000, 256, 32))
           if x0 < 512 and x1 > 256 and y0 < 512 and y1 > 256]
    assert hit == [6, 7, 11, 12]
    assert [f["tile"] for f in failed] == hit
    assert [tuple(f["box"]) for f in failed] == [(224, 224, 480, 480), (448, 224, 704, 480),
                                                  (224, 448, 480, 704), (448, 448, 704, 704)]
    # for the stated reason, and each logged with its tile number and the slide
    assert all("corrupt" in f["error"] for f in failed), failed
    for k in hit:
        assert f"tile {k} of {p} skipped" in caplog.text
    assert s["analysis"]["tiles_analysed"] == 25 - 4
    assert s["total_detections"] > 300  # the rest of the slide was analysed


def test_roi_restricts_analysis(tmp_path, one_piece):
    _, dets1, _ = one_piece
    path = str(shared_path(*MONUSEG))
    s = infer_slide(ClassicalNucleusDetector(), CLASSES, 0.25, path, str(tmp_path),
                    _opts(tile_size=256, overlap=64, roi="0,0,500,500"))
    assert s["tissue_area_mm2"] == pytest.approx(500 * 500 * 0.0625 / 1e6, rel=0.05)
    assert 0.1 * len(dets1) < s["total_detections"] < 0.4 * len(dets1)
    with open(tmp_path / "TCGA-2Z-A9J9-01A-01-TS1" / "detections.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["x_px"]) < 500 and float(r["y_px"]) < 500 for r in rows)


# ---------------------------------------------------------------------- CLI with our checkpoint
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised small Mask R-CNN saved with the training engine's checkpoint
    writer (nuclei + mitotic figures, trained at 2 um/px so the SVS is analysed downsampled)."""
    from detector.config.config import get_cfg
    from detector.engine.checkpoint import save_checkpoint
    from detector.modeling.build import build_model

    torch.manual_seed(0)
    cfg = get_cfg(None, ["MODEL.BACKBONE.NAME", "resnet18", "MODEL.BACKBONE.OUT_CHANNELS", "64",
                         "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", "10",
                         "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "50"])
    classes = [{"id": 1, "name": "nucleus"}, {"id": 2, "name": "mitotic figure"}]
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pth")
    save_checkpoint(path, build_model(cfg, classes), cfg, classes, 2.0, 0)
    return path


def test_cli_end_to_end_with_our_checkpoint(tiny_checkpoint, tmp_path, capsys):
    from detector.cli.infer_tiles import main

    svs = str(shared_path("slides", "CMU-1-Small-Region.svs"))
    trunc = tmp_path / "broken.svs"
    trunc.write_bytes(open(svs, "rb").read()[:4000])
    lst = tmp_path / "slides.txt"
    lst.write_text(f"{svs}\n# a comment\nbroken.svs\n")
    out = tmp_path / "out"
    rc = main(["--weights", tiny_checkpoint, "--input", str(lst), "--output", str(out),
               "--tile-size", "256", "--overlap", "32", "--batch-size", "4", "--num-workers", "1",
               "--score-thresh", "0.0", "--device", "cpu", "--quiet"])
    assert rc == 1  # one slide failed ...
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "broken.svs" in printed
    folder = out / "CMU-1-Small-Region"  # ... and the other finished
    for name in ("summary.json", "detections.geojson", "detections.json", "detections.csv",
                 "overlay.png", "density.png"):
        assert (folder / name).is_file(), name
    s = json.loads((folder / "summary.json").read_text())
    assert s["mpp"] == pytest.approx(0.499, abs=1e-3) and s["analysis"]["model_mpp"] == 2.0
    assert s["analysis"]["analysis_per_level"] == pytest.approx(0.499 / 2.0, rel=1e-3)
    assert s["mitotic_classes"] == ["mitotic figure"]
    assert s["total_detections"] > 0 and set(s["counts"]) == {"nucleus", "mitotic figure"}
    dets = json.loads((folder / "detections.json").read_text())
    assert dets[0]["segmentation"]["size"] == [2967, 2220]  # level-0 RLE
    b = np.array([d["bbox"] for d in dets])
    assert (b[:, 0] + b[:, 2] <= 2220 + 1).all() and (b[:, 1] + b[:, 3] <= 2967 + 1).all()
    # --resume: the finished slide is not run again
    rc = main(["--weights", tiny_checkpoint, "--input", svs, "--output", str(out), "--resume",
               "--quiet", "--num-workers", "0"])
    assert rc == 0 and "1 already finished" in capsys.readouterr().out


def test_tile_loader_layout_follows_the_device():
    """Unset, batch size, reader workers and streams suit the device: on a CPU the model's
    threads use every core, so no reader process competes with them, and two streams share
    them where there are two or more; given values are kept (CUDA: one stream)."""
    from detector.inference.runner import loader_layout

    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert loader_layout(InferenceOptions(), on_cuda=False) == (1, 0, 2)
        assert loader_layout(InferenceOptions(), on_cuda=True) == (4, 2, 1)
        assert loader_layout(InferenceOptions(batch_size=8, num_workers=3, streams=3),
                             on_cuda=False) == (8, 3, 3)
        assert loader_layout(InferenceOptions(num_workers=0, streams=2), on_cuda=True) == (4, 0, 1)
        torch.set_num_threads(1)
        assert loader_layout(InferenceOptions(), on_cuda=False) == (1, 0, 1)
    finally:
        torch.set_num_threads(prev)


def test_cpu_streams_give_the_detections_of_one_stream(tmp_path):
    """On a CPU two batches go through the model at once, each in its own thread with half of
    torch's threads: a Mask R-CNN's slide run (score threshold, the drops of each tile's cut
    detections before the mask head, journal, merge) writes the same detections as one stream
    whose model runs with that many threads, and the tiles were predicted in two threads."""
    import threading

    from detector.config.config import get_cfg
    from detector.modeling.build import build_model

    torch.manual_seed(0)
    cfg = get_cfg(None, ["MODEL.BACKBONE.NAME", "resnet18", "MODEL.BACKBONE.OUT_CHANNELS", "32",
                         "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", "30",
                         "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST",
                         "100"])
    model = build_model(cfg, CLASSES).eval()
    seen = set()
    predict = model.predict

    def recording(*a, **k):
        seen.add(threading.current_thread().name.split("_")[0])
        return predict(*a, **k)

    model.predict = recording
    files = {}
    prev = torch.get_num_threads()
    try:
        for streams in (1, 2):
            seen.clear()
            torch.set_num_threads(streams)  # one torch thread per stream
            s = infer_slide(model, CLASSES, 1.0, str(shared_path(*MONUSEG)),
                            str(tmp_path / str(streams)),
                            _opts(tile_size=96, overlap=24, score_thresh=0.05, streams=streams))
            assert s["analysis"]["tiles_total"] == 16  # 250 px: 4 x 4
            files[streams] = (tmp_path / str(streams) / "TCGA-2Z-A9J9-01A-01-TS1" /
                              "detections.json").read_text()
            assert seen == ({"MainThread"} if streams == 1 else {"stream"}), seen
    finally:
        torch.set_num_threads(prev)
    assert len(json.loads(files[1])) > 20
    assert files[2] == files[1]


def test_exported_checkpoint_sets_threshold_and_tta_of_slide_runs(tiny_checkpoint, tmp_path,
                                                                    capsys):
    """train_net.py --export writes the validated threshold and test-time augmentation into a
    checkpoint; infer_tiles.py then uses them with no flag, and --score-thresh / --no-tta
    still override them. Keys that belong to training are refused."""
    from detector.cli.infer_tiles import main as infer
    from detector.cli.train_net import main as train_net
    from detector.checkpoint import load_checkpoint

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("MODEL:\n  BACKBONE:\n    NAME: resnet18\n")
    dep = str(tmp_path / "deploy.pth")
    assert train_net(["--config-file", str(cfg_file), "--export", dep, "MODEL.WEIGHTS",
                      tiny_checkpoint, "TEST.SCORE_THRESH", "0.25", "TEST.AUG.ENABLED", "True",
                      "TEST.AUG.TRANSFORMS", "4"]) == 0
    ck, orig = load_checkpoint(dep), load_checkpoint(tiny_checkpoint)
    assert "optimizer" not in ck and ck["classes"] == orig["classes"] and ck["mpp"] == orig["mpp"]
    assert all(torch.equal(ck["model"][k], v) for k, v in orig["model"].items())
    assert train_net(["--config-file", str(cfg_file), "--export", str(tmp_path / "x.pth"),
                      "MODEL.WEIGHTS", tiny_checkpoint, "SOLVER.BASE_LR", "0.1"]) == 2
    assert "SOLVER.BASE_LR" in capsys.readouterr().err and not (tmp_path / "x.pth").exists()

    img = tmp_path / "field.png"
    import cv2
    cv2.imwrite(str(img), np.full((96, 128, 3), 200, np.uint8))
    base = ["--weights", dep, "--input", str(img), "--mpp", "2.0", "--tile-size", "128",
            "--overlap", "16", "--device", "cpu", "--quiet", "--no-tissue-detection"]

    def analysis(out, *flags):
        assert infer(base + ["--output", str(tmp_path / out), *flags]) == 0
        return json.loads((tmp_path / out / "field" / "summary.json").read_text())["analysis"]

    a = analysis("defaults")
    assert a["score_thresh"] == 0.25 and a["tta"] == 4
    a = analysis("overridden", "--score-thresh", "0.6", "--no-tta")
    assert a["score_thresh"] == 0.6 and a["tta"] == 0


def test_cli_rejects_a_checkpoint_that_is_not_ours(tmp_path, caplog):
    from detector.cli.infer_tiles import main

    bad = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    rc = main(["--weights", str(bad), "--input", str(shared_path(*MONUSEG)), "--output",
               str(tmp_path), "--quiet"])
    assert rc == 2 and "not a detector checkpoint" in caplog.text
    rc = main(["--weights", str(bad), "--input", str(tmp_path / "none*.svs"), "--output",
               str(tmp_path), "--quiet"])
    assert rc == 2 and "matched no slide" in caplog.text


def test_torchrun_sharding_and_input_expansion(tmp_path):
    from detector.cli.infer_tiles import expand_inputs
    from detector.inference.runner import shard

    slides = [f"s{i}.svs" for i in range(7)]
    parts = [shard(slides, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(slides) and parts[0] == ["s0.svs", "s3.svs", "s6.svs"]
    for n in ("a.svs", "b.ndpi", "c.txt"):
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "list.txt").write_text("a.svs\n\n# skip\n/abs/z.svs\n")
    got, missing = expand_inputs([str(tmp_path / "*.svs"), str(tmp_path / "list.txt"),
                                  str(tmp_path / "none_*.tif")])
    assert got == [str(tmp_path / "a.svs"), "/abs/z.svs"]  # duplicates removed, order kept
    assert missing == [str(tmp_path / "none_*.tif")]
    got, _ = expand_inputs([str(tmp_path)])  # a folder: its slide files
    assert got == [str(tmp_path / "a.svs"), str(tmp_path / "b.ndpi")]


@pytest.mark.parametrize("arch,opts", [
    ("UNet", ["MODEL.UNET.DEPTH", "2", "MODEL.UNET.BASE_CHANNELS", "4"]),
    ("FasterRCNN", ["MODEL.BACKBONE.NAME", "resnet18", "MODEL.BACKBONE.OUT_CHANNELS", "32",
                    "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", "10", "MODEL.RPN.PRE_NMS_TOPK_TEST",
                    "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "50"]),
])
def test_every_architecture_runs_through_the_pipeline(arch, opts, tmp_path):
    """U-Net (masks from watershed) and Faster R-CNN (boxes only) checkpoints of ours, on a
    real H&E tile analysed at 4x its resolution's mpp (level 0 downsampled)."""
    from detector.config.config import get_cfg
    from detector.engine.checkpoint import save_checkpoint
    from detector.modeling.build import build_model, load_model

    torch.manual_seed(0)
    cfg = get_cfg(None, ["MODEL.META_ARCHITECTURE", arch] + opts)
    ckpt = str(tmp_path / "m.pth")
    save_checkpoint(ckpt, build_model(cfg, CLASSES), cfg, CLASSES, 1.0, 0)
    model, _, classes, mpp = load_model(ckpt)
    s = infer_slide(model, classes, mpp, str(shared_path(*MONUSEG)), str(tmp_path),
                    _opts(tile_size=128, overlap=32, score_thresh=0.0))
    assert s["analysis"]["analysis_per_level"] == 0.25 and s["analysis"]["tiles_total"] == 9  # 250 px: 3 x 3
    folder = tmp_path / "TCGA-2Z-A9J9-01A-01-TS1"
    dets = json.loads((folder / "detections.json").read_text())
    assert len(dets) == s["total_detections"] > 0
    assert all(0 <= d["bbox"][0] <= 1000 and d["bbox"][0] + d["bbox"][2] <= 1000.01 for d in dets)
    gj = json.loads((folder / "detections.geojson").read_text())
    kinds = {f["geometry"]["type"] for f in gj["features"]}
    if arch == "FasterRCNN":
        assert "segmentation" not in dets[0] and kinds == {"Polygon"}
        ring = gj["features"][0]["geometry"]["coordinates"][0]
        assert len(ring) == 5  # a box
    else:
        assert dets[0]["segmentation"]["size"] == [1000, 1000]
