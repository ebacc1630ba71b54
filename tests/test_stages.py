"""The slide run's stages, each alone (no model), and a candidate stage added between merge and
region filter."""
import json
import os

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
    with pytest.raises(DetectorError):
        det.predict(rgb.astype(np.float32))
    with pytest.raises(DetectorError, match="unknown option"):
        det.predict_slide("x.svs", str(tmp_path), tile_sise=256)
