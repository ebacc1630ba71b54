"""The slide run's stages, each alone (no model), and a candidate stage added between merge and
region filter."""
import json
import os
import warnings

import numpy as np
import pytest

from detector.inference.runner import (AnalysisGrid, Candidates, InferenceOptions,
                                       SlideGeometry, TilePredictions, analysis_grid,
                                       export_slide, infer_slide, merge_tiles, region_filter,
                                       summarize_slide)
from detector.structures import CropMask, Instances
from tests.conftest import shared_path
from tests.test_infer import MONUSEG, ClassicalNucleusDetector

CLASSES = [{"id": 1, "name": "nucleus"}, {"id": 2, "name": "mitotic figure"}]


def _grid(size=(400, 600), region=None, roi=None, mpp=0.5):
    H, W = size
    thumb = np.full((H // 4, W // 4, 3), 220, np.uint8)
    region = np.ones(thumb.shape[:2], bool) if region is None else region
    tiles = [(0, 0, 320, 400), (280, 0, 600, 400)]
    return AnalysisGrid("virtual.tif", (H, W), mpp, "file", mpp, mpp,
                        SlideGeometry(0, 1.0, 1.0, (H, W)), 320, 40, tiles, (1, 2),
                        np.ones(2, bool), thumb, 4.0, region, roi,
                        float(region.sum()) * (4.0 * mpp / 1000) ** 2)


def _disc(cx, cy, r, size):
    yy, xx = np.mgrid[:2 * r + 1, :2 * r + 1]
    return CropMask.from_crop((yy - r) ** 2 + (xx - r) ** 2 <= r * r, cx - r, cy - r, size)


def _inst(size, discs, labels=None, scores=None):
    masks = [_disc(cx, cy, r, size) for cx, cy, r in discs]
    n = len(masks)
    return Instances(size, np.array([m.bbox for m in masks], np.float32).reshape(-1, 4),
                     scores if scores is not None else np.linspace(0.9, 0.6, n),
                     labels if labels is not None else np.ones(n, np.int64), masks)


def test_analysis_grid_on_a_real_slide():
    path = shared_path("slides", "CMU-1-Small-Region.svs")
    opts = InferenceOptions(tile_size=512, overlap=64, progress=False)
    grid = analysis_grid(str(path), 1.0, opts)  # model at 1 um/px: the slide (0.499) is resampled
    assert grid.slide_size == (2967, 2220)  # (height, width)
    g = grid.geometry
    assert g.analysis_per_level == pytest.approx(0.499 / 1.0, rel=1e-3)
    assert g.level0_per_analysis == pytest.approx(1.0 / 0.499, rel=1e-3)
    assert g.size == (round(2967 * g.analysis_per_level), round(2220 * g.analysis_per_level))
    assert grid.grid_shape[0] * grid.grid_shape[1] == len(grid.tiles)
    # tissue detection: some tiles analysed, the glass ones skipped; the area is positive
    assert 0 < grid.selected.sum() <= len(grid.tiles)
    assert 0 < grid.tissue_area_mm2 < 2967 * 2220 * (0.499e-3) ** 2


def test_merge_filter_summary_and_export_alone(tmp_path):
    size = (400, 600)
    # the same nucleus seen by both tiles (overlap 280..320), two distinct ones, one on glass
    a = _inst(size, [(300, 100, 8), (100, 200, 10)])
    b = _inst(size, [(300, 100, 8), (500, 300, 9), (560, 30, 6)], labels=np.array([1, 2, 1]))
    preds = TilePredictions([a, b], {}, 0.0)
    opts = InferenceOptions(progress=False)
    cands = merge_tiles(preds, _grid(size), opts)
    assert len(cands.instances) == 4  # the duplicate is gone
    region = np.ones((100, 150), bool)
    region[:20, 130:] = False  # glass around (560, 30)
    grid = _grid(size, region)
    dets = region_filter(cands, grid, opts)
    assert len(dets.instances) == 3 and dets.outside_tissue == 1
    np.testing.assert_allclose(sorted(dets.centroids[:, 0]), [100.5, 300.5, 500.5])
    assert dets.areas.tolist() == [m.area for m in dets.instances.masks]
    s = summarize_slide(dets, grid, CLASSES, opts, preds)
    assert s["counts"] == {"nucleus": 2, "mitotic figure": 1}
    assert s["slide_size"] == [400, 600] and s["analysis"]["detections_outside_tissue_dropped"] == 1
    export_slide(str(tmp_path), dets, grid, CLASSES, opts, s)
    for f in ("summary.json", "detections.geojson", "detections.json", "detections.csv",
              "overlay.png", "density.png"):
        assert os.path.isfile(tmp_path / f), f
    feats = json.loads((tmp_path / "detections.geojson").read_text())["features"]
    assert len(feats) == s["total_detections"] == 3


def test_a_candidate_stage_runs_between_merge_and_region_filter(tmp_path):
    path = shared_path(*MONUSEG)
    seen = {}

    def rescore(cands: Candidates, grid: AnalysisGrid) -> Candidates:
        """A stand-in second-stage classifier: every other candidate becomes a mitotic figure."""
        inst = cands.instances
        seen["n"], seen["slide"] = len(inst), grid.slide_path
        labels = inst.labels.copy()
        labels[::2] = 2
        return Candidates(Instances(inst.image_size, inst.boxes, inst.scores, labels, inst.masks))

    opts = InferenceOptions(mpp=0.25, num_workers=0, tissue_detection=False, progress=False,
                            tile_size=512, overlap=96)
    s = infer_slide(ClassicalNucleusDetector(), CLASSES, 0.25, str(path), str(tmp_path), opts,
                    candidate_stages=[rescore])
    assert seen["n"] == s["total_detections"] > 100
    assert seen["slide"] == os.path.abspath(str(path))
    assert s["counts"]["mitotic figure"] == (seen["n"] + 1) // 2


def test_api_load_and_predict_an_image_array(tmp_path):
    """detector.api: a checkpoint -> Detector; an (H, W, 3) uint8 array -> Instances with
    CropMask masks in the image's pixels, the same as the model's own forward."""
    import torch

    from detector import api
    from detector.engine.checkpoint import save_checkpoint
    from detector.errors import DetectorError
    from detector.modeling.build import build_model
    from tests.test_model import tiny_cfg

    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg, CLASSES)
    ck = str(tmp_path / "ck.pth")
    save_checkpoint(ck, model, cfg, CLASSES, 0.25, 1)
    det = api.load(ck, device="cpu")
    assert det.classes == CLASSES and det.mpp == 0.25
    rgb = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    inst = det.predict(rgb, amp=False)  # fp32, as the reference below (bf16 CPUs differ)
    assert inst.image_size == (70, 90) and len(inst) > 0
    assert all(isinstance(m, CropMask) and m.image_size == (70, 90) for m in inst.masks)
    model.eval()
    with torch.no_grad():
        ref = model([torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0])[0]
    np.testing.assert_allclose(inst.boxes, ref.boxes, atol=1e-4)
    assert inst.masks == ref.masks
    frozen = rgb.copy()
    frozen.flags.writeable = False  # as read_image returns some files: no warning, same result
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert det.predict(frozen, amp=False).masks == inst.masks
    with pytest.raises(DetectorError):
        det.predict(rgb.astype(np.float32))
    with pytest.raises(DetectorError, match="unknown option"):
        det.predict_slide("x.svs", str(tmp_path), tile_sise=256)


def _monuseg_detections():
    """The ground-truth nuclei of a real H&E tile as detections (two classes, scores), with
    an empty mask among them."""
    from detector.data.coco import annotation_to_mask
    from detector.data.converters.imagescope import convert_xml

    coco = convert_xml(str(shared_path("monuseg", "TCGA-2Z-A9J9-01A-01-TS1.xml")),
                       progress=False).coco
    h, w = int(coco["images"][0]["height"]), int(coco["images"][0]["width"])
    masks = [CropMask.from_full(m) for m in
             (annotation_to_mask(a, h, w) for a in coco["annotations"]) if m is not None]
    masks.insert(7, CropMask.empty((h, w)))
    rng = np.random.default_rng(0)
    boxes = np.array([m.bbox for m in masks], np.float32)
    return Instances((h, w), boxes, rng.random(len(masks)).astype(np.float32),
                     rng.choice([1, 2], len(masks)), masks)


def test_detection_files_written_by_several_processes_are_the_same_bytes(tmp_path, monkeypatch,
                                                                         caplog):
    """A slide with many detections has its GeoJSON, COCO and CSV files written by forked
    processes, each taking a part of the detections: the files are byte for byte those one
    process writes (real MoNuSeg nuclei, an empty mask, masks and boxes alone), the outlines
    come back for the overlay as one process traces them, the empty mask is reported once; a
    failing process is an ExportError and leaves no file."""
    from detector.inference import export

    monkeypatch.setattr(export, "PARALLEL_MIN_DETECTIONS", 100)  # 576 detections: 3 parts
    inst = _monuseg_detections()
    assert len(inst) > 500
    classes = [{"id": 1, "name": "nucleus"}, {"id": 2, "name": "mitotic figure, \"odd\""}]
    cents, areas = inst.centroids(), inst.areas()
    files = ("detections.geojson", "detections.json", "detections.csv")
    for masks in (inst.masks, None):
        one = Instances(inst.image_size, inst.boxes, inst.scores, inst.labels, masks)
        a, b = tmp_path / f"one{masks is None}", tmp_path / f"many{masks is None}"
        outlines = export.write_detections(str(a), one, classes, 0.25, cents, areas, [2], 1)
        caplog.clear()
        many = export.write_detections(str(b), one, classes, 0.25, cents, areas, [2], 3)
        if masks is None:
            assert outlines is None and many is None
        else:  # the parts' outlines joined: those of one process
            for k in ("points", "ring_start", "poly_start", "mask_start"):
                assert np.array_equal(getattr(outlines, k), getattr(many, k)), k
        for f in files:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
        assert sorted(os.listdir(b)) == sorted(files)  # no part files left
        if masks is not None:
            assert [r.message.count("1 detections with an empty mask") for r in caplog.records] == [1]
    assert len(json.loads((a / files[0]).read_text())["features"]) == len(inst)  # boxes: all

    real = export.csv_rows

    def failing(sub, *args, first_id=1, **kw):
        if first_id > 1:  # the forked processes' parts
            raise RuntimeError("disk full")
        return real(sub, *args, first_id=first_id, **kw)

    monkeypatch.setattr(export, "csv_rows", failing)
    with pytest.raises(export.ExportError, match="2 of 3 processes failed"):
        export.write_detections(str(tmp_path / "bad"), inst, classes, 0.25, cents, areas, [2], 3)
    assert os.listdir(tmp_path / "bad") == []


def test_overlay_traces_only_the_outlines_it_draws(tmp_path):
    """Without the outlines of every mask (written by several processes), overlay.png traces
    those it draws itself: the same picture."""
    from detector.inference.export import write_overlay
    from detector.structures.masks import mask_outlines

    inst = _monuseg_detections()
    thumb = np.full((250, 250, 3), 200, np.uint8)
    classes = [{"id": 1, "name": "nucleus"}, {"id": 2, "name": "mitotic figure"}]
    for scale in (4.0, 1.5):  # few / most nuclei big enough for an outline
        a, b = tmp_path / f"a{scale}.png", tmp_path / f"b{scale}.png"
        write_overlay(str(a), thumb, scale, inst, classes, [2], outlines=mask_outlines(inst.masks))
        write_overlay(str(b), thumb, scale, inst, classes, [2])
        assert a.read_bytes() == b.read_bytes()
