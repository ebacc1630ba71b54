"""Tissue area, the denominator of every per-mm² and per-10-HPF figure, against known truth:
the demo's synthetic slide (its generator writes the true area), all-tissue MoNuSeg fields, and
a small real fragment on glass; and the detections on glass that are dropped from the counts."""
import numpy as np
import pytest
import tifffile
import torch

from detector.inference.runner import InferenceOptions, infer_slide
from detector.structures.instances import Instances
from tests.conftest import shared_path

CLASSES = [{"id": 1, "name": "nucleus"}]
MONUSEG_TILES = ["TCGA-2Z-A9J9-01A-01-TS1.tif", "TCGA-AC-A2FO-01A-01-TS1.tif",
                 "TCGA-HT-8564-01Z-00-DX1.tif"]


class FixedDetector(torch.nn.Module):
    """Returns the same boxes (tile px) for every tile: a stand-in model whose detections sit
    at known places."""

    def __init__(self, boxes=()):
        super().__init__()
        self.boxes = np.asarray(boxes, np.float32).reshape(-1, 4)

    def forward(self, images, targets=None):
        n = len(self.boxes)
        return [Instances(tuple(im.shape[-2:]), self.boxes, np.ones(n, np.float32),
                          np.ones(n, np.int64)) for im in images]


def _opts(**kw):
    # one tile over the whole slide, one at a time (the memory check before the run counts a
    # real model's bytes per pixel)
    base = dict(num_workers=0, progress=False, tile_size=4096, overlap=0, batch_size=1)
    base.update(kw)
    return InferenceOptions(**base)


def test_tissue_area_of_the_demo_slide_matches_its_generator(tmp_path):
    """The demo's synthetic slide (``write_slide``, as ``make demo`` writes it), analysed with
    a thumbnail coarser than level 0, as on a real slide."""
    from detector.data.synthetic import write_slide

    path = str(tmp_path / "synthetic_slide.tif")
    truth = write_slide(path, size=(1024, 1024), mpp=0.5, seed=3, levels=2)
    s = infer_slide(FixedDetector(), CLASSES, 0.5, path, str(tmp_path),
                    _opts(thumbnail_size=512, tile_size=512, overlap=64))
    assert 0.1 < truth["tissue_area_mm2"] < 0.2  # about half of the 0.26 mm2 slide
    assert s["tissue_area_mm2"] == pytest.approx(truth["tissue_area_mm2"], rel=0.03)


@pytest.mark.parametrize("name", MONUSEG_TILES)
def test_an_all_tissue_monuseg_field_is_all_tissue(name, tmp_path):
    path = str(shared_path("monuseg", name))
    s = infer_slide(FixedDetector(), CLASSES, 0.25, path, str(tmp_path), _opts(mpp=0.25))
    full = 1000 * 1000 * 0.25 ** 2 / 1e6
    assert s["tissue_area_mm2"] >= 0.99 * full and s["tissue_area_mm2"] <= full * (1 + 1e-9)


def test_small_fragment_on_glass_and_the_detections_on_glass(tmp_path):
    """A real H&E fragment (an ellipse of a MoNuSeg tile, 0.048 mm²) on a 1 x 0.75 mm glass
    slide: its area within 5 %; detections on the glass are dropped and counted, the ones on
    the fragment kept."""
    tile = tifffile.imread(shared_path("monuseg", MONUSEG_TILES[0]))[..., :3]
    H, W = 3000, 4000
    rng = np.random.default_rng(0)
    slide = (np.array([242, 240, 244]) + rng.normal(0, 2, (H, W, 3))).clip(0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:H, 0:W]
    cx, cy, a, b = 1200, 1000, 350, 220
    frag = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
    ty, tx = yy[frag] - cy + 500, xx[frag] - cx + 500
    slide[frag] = tile[ty, tx]
    path = str(tmp_path / "fragment.tif")
    tifffile.imwrite(path, slide, tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    on_tissue = [[cx - 5, cy - 5, cx + 5, cy + 5], [cx + 300, cy - 5, cx + 310, cy + 5],
                 [cx - 20, cy + 180, cx - 10, cy + 190]]
    on_glass = [[3500, 2500, 3510, 2510], [300, 2700, 310, 2710], [3800, 200, 3812, 212],
                [cx + 420, cy - 5, cx + 430, cy + 5]]  # the last 70 px beyond the fragment
    model = FixedDetector(on_tissue + on_glass)
    s = infer_slide(model, CLASSES, 0.25, path, str(tmp_path), _opts())
    true_mm2 = frag.sum() * 0.25 ** 2 / 1e6
    assert s["tissue_area_mm2"] == pytest.approx(true_mm2, rel=0.05)
    assert s["analysis"]["detections_outside_tissue_dropped"] == len(on_glass)
    assert s["total_detections"] == len(on_tissue) and s["counts"] == {"nucleus": 3}
    # without tissue detection nothing is dropped and the whole slide is the denominator
    s = infer_slide(model, CLASSES, 0.25, path, str(tmp_path / "all"),
                    _opts(tissue_detection=False))
    assert s["analysis"]["detections_outside_tissue_dropped"] == 0
    assert s["total_detections"] == len(on_tissue) + len(on_glass)
    assert s["tissue_area_mm2"] == pytest.approx(H * W * 0.25 ** 2 / 1e6)
