"""The U-Net on slides is seamless: tiles read with the network's context from the real
neighbouring pixels give the probabilities and the instances of one-piece prediction."""
import glob
import json
import os

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from detector.config.config import get_cfg
from detector.data.image_io import read_array, read_image
from detector.data.unet_targets import UNetTargets
from detector.inference.runner import (InferenceOptions, SlideGeometry, infer_slide,
                                       read_tile_with_context)
from detector.inference.slide import open_slide
from detector.inference.tiling import tile_cores, tile_grid
from detector.modeling.unet import build_unet
from tests.conftest import shared_path

NUCLEUS = [{"id": 1, "name": "nucleus"}]
DSB_ID = "0ea221716cf13710214dcd331a61cea48308c3940df1d28cfc7fd817c83714e1"  # 696x520, 369 nuclei
MONUSEG = "TCGA-2Z-A9J9-01A-01-TS1.tif"
MONUSEG_TRAIN = "TCGA-A6-6782-01A-01-BS1.tif"


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dsb_path():
    return str(shared_path("dsb2018", "stage1_train", DSB_ID, "images", DSB_ID + ".png"))


def _training_crop(image, masks, size=192):
    img = torch.from_numpy(np.ascontiguousarray(image[:size, :size, :3])).permute(2, 0, 1)
    m = np.asarray(masks)[:, :size, :size].astype(np.uint8)
    return img.float() / 255.0, m[m.reshape(len(m), -1).any(1)]


@pytest.fixture(scope="module")
def unet():
    """A small U-Net (4 levels, 8 base channels) trained for 40 steps on a crop of the DSB
    image and one of a MoNuSeg H&E tile (not the tested one): its instances look like nuclei
    on both, which is what the seams must not change."""
    import tifffile

    from detector.data.converters.imagescope import parse_imagescope, rasterize_region

    torch.manual_seed(0)
    folder = os.path.dirname(os.path.dirname(dsb_path()))
    masks = np.stack([read_array(p) > 0 for p in sorted(glob.glob(folder + "/masks/*.png"))])
    crops = [_training_crop(read_image(dsb_path()), masks)]
    he_path = str(shared_path("monuseg", MONUSEG_TRAIN))
    he = tifffile.imread(he_path)
    _, regions = parse_imagescope(he_path[:-4] + ".xml")
    he_masks = [rasterize_region(r, 192, 192) for r in regions]  # clipped to the crop
    crops.append(_training_crop(he, [m for m in he_masks if m is not None]))
    cfg = get_cfg(None, ["MODEL.META_ARCHITECTURE", "UNet", "MODEL.UNET.DEPTH", "4",
                         "MODEL.UNET.BASE_CHANNELS", "8", "MODEL.UNET.TILE_SIZE", "128"])
    model = build_unet(cfg, NUCLEUS)
    targets = [UNetTargets(cfg)(img, {"masks": torch.from_numpy(m)}) for img, m in crops]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(40):
        k = step // 2 % 4
        img, t = crops[step % 2][0], targets[step % 2]
        loss = model([torch.rot90(img, k, (1, 2))],
                     [{"unet_target": torch.rot90(t["unet_target"], k, (0, 1)),
                       "unet_weight": torch.rot90(t["unet_weight"], k, (0, 1))}])["loss_unet"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_tile_cores_partition_the_analysed_image():
    w, h, size, overlap = 700, 530, 200, 50
    tiles = tile_grid(w, h, size, overlap)
    cores = tile_cores(w, h, size, overlap)
    owner = np.zeros((h, w), int)
    for (x0, y0, x1, y1), (a0, b0, a1, b1) in zip(tiles, cores):
        assert x0 <= a0 < a1 <= x1 and y0 <= b0 < b1 <= y1  # a core lies inside its tile
        owner[b0:b1, a0:a1] += 1
    assert (owner == 1).all()
    # a core reaches its tile's edge across a skipped neighbour: skipped tiles own nothing
    selected = np.ones(len(tiles), bool)
    selected[1] = False
    cores = tile_cores(w, h, size, overlap, selected)
    assert cores[0][2] == tiles[0][2] and cores[2][0] == tiles[2][0]


def test_tile_probabilities_from_real_context_equal_one_piece(unet):
    """Tiles at offsets off the pooling grid, at the image's edges (mirrored) and inside."""
    image = read_image(dsb_path())
    h, w = image.shape[:2]
    whole = unet.predict_probabilities(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    assert float(whole.std(dim=(1, 2)).min()) > 1e-3
    context = unet.slide_context
    geom = SlideGeometry(0, 1.0, 1.0, (h, w))  # size (height, width)
    with open_slide(dsb_path()) as reader:
        for tile in tile_grid(w, h, 200, 50):  # x starts 0, 150, 300, 450, 496
            x0, y0, x1, y1 = tile
            rgb = read_tile_with_context(reader, geom, tile, context)
            assert rgb.shape == (y1 - y0 + 2 * context, x1 - x0 + 2 * context, 3)
            x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
            p = unet.predict_tile_probabilities(x, (x0, y0), context)
            assert float((p - whole[:, y0:y1, x0:x1]).abs().max()) < 1e-4, tile


def _slide_masks(model, path, tile_size, out):
    opts = InferenceOptions(tile_size=tile_size, overlap=96, num_workers=0, mpp=0.5,
                            tissue_detection=False, progress=False, score_thresh=0.0)
    infer_slide(model, NUCLEUS, None, path, str(out), opts)
    stem = os.path.splitext(os.path.basename(path))[0]
    with open(os.path.join(str(out), stem, "detections.json")) as f:
        dets = json.load(f)
    return [d["segmentation"] for d in dets], np.array([d["score"] for d in dets])


@pytest.mark.parametrize("image", ["dsb", "monuseg"])
def test_unet_slide_run_tiled_equals_one_piece_on_real_images(unet, image, tmp_path):
    if image == "dsb":
        path = dsb_path()
    else:  # a 640 px crop of a MoNuSeg H&E tile, as a PNG slide
        import tifffile

        he = tifffile.imread(str(shared_path("monuseg", MONUSEG)))[:640, :640, :3]
        path = str(tmp_path / "monuseg.png")
        cv2.imwrite(path, np.ascontiguousarray(he[..., ::-1]))
    tiled, s_tiled = _slide_masks(unet, path, 256, tmp_path / "tiled")
    whole, s_whole = _slide_masks(unet, path, 2048, tmp_path / "whole")
    assert len(whole) > 100  # the fixture model finds nuclei-like objects
    iou = mask_utils.iou(tiled, whole, [0] * len(whole))
    matched = int(((iou >= 0.5).sum(1) > 0).sum())
    f1 = 2 * matched / (len(tiled) + len(whole))
    assert f1 >= 0.999, f"F1 {f1:.4f}: {len(tiled)} tiled vs {len(whole)} one-piece instances"
    # nearly every instance is the same to the pixel, with the same score; the few that may
    # differ are larger than the overlap allows (their watershed sees a neighbour cut at the
    # owning tile's edge), or reach the tile's outer edge, where the default 1 px smoothing of
    # the probabilities (MODEL.UNET.SMOOTH_SIGMA) pads differently (7 of 380 on the MoNuSeg
    # crop since smoothing became the default; 0 of 310 on the DSB image)
    best = iou.argmax(1)
    same = (iou[np.arange(len(tiled)), best] == 1.0) & (np.abs(s_tiled - s_whole[best]) < 1e-4)
    assert same.mean() >= 0.98, f"{int((~same).sum())} of {len(tiled)} instances differ"


def test_tta_tile_probabilities_equal_one_piece_tta(unet):
    """Test-time augmentation on slide tiles read with real context: each of the 8 views of a
    tile is predicted on the pooling grid of one global frame, so the tiles' averaged
    probabilities equal those of the whole image's views averaged (the image's sides, 696 and
    520 px, are multiples of the 8 px pooling grid)."""
    from detector.inference.predictor import (_tile_view_origin, transform_image,
                                              untransform_image)

    image = read_image(dsb_path())
    h, w = image.shape[:2]
    x_whole = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    ks = range(8)
    whole = sum(untransform_image(unet.predict_probabilities(transform_image(x_whole, k)), k)
                for k in ks) / 8
    plain = unet.predict_probabilities(x_whole)
    assert float((whole - plain).abs().max()) > 1e-3  # the views do differ
    context = unet.slide_context
    geom = SlideGeometry(0, 1.0, 1.0, (h, w))
    tiles = tile_grid(w, h, 200, 50)
    with open_slide(dsb_path()) as reader:
        for tile in (tiles[0], tiles[len(tiles) // 2], tiles[-1]):  # corner, inside, far corner
            x0, y0, x1, y1 = tile
            rgb = read_tile_with_context(reader, geom, tile, context)
            x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
            p = sum(untransform_image(unet.predict_tile_probabilities(
                transform_image(x, k), _tile_view_origin(k, (x0, y0), (y1 - y0, x1 - x0)),
                context), k) for k in ks) / 8
            assert float((p - whole[:, y0:y1, x0:x1]).abs().max()) < 1e-4, tile


def test_tta_instances_match_plain_prediction_on_a_real_image(unet):
    """8-view TTA of the (learned, not rotation-equivariant) U-Net on the real DSB image: its
    instances match the plain prediction's at F1@0.5 >= 0.85 without being the same."""
    from detector.inference.predictor import predict_tta

    x = torch.from_numpy(read_image(dsb_path())).permute(2, 0, 1).float() / 255
    plain = unet.predict_instances(x)
    tta = predict_tta(unet, [x], 8)[0]
    assert len(plain) > 100 and len(tta) > 100
    a = [m.to_coco_rle() for m in tta.masks]
    b = [m.to_coco_rle() for m in plain.masks]
    iou = mask_utils.iou(a, b, [0] * len(b))
    matched = int(((iou > 0.5).sum(1) > 0).sum())
    f1 = 2 * matched / (len(a) + len(b))
    assert 0.85 <= f1 < 1.0 or len(a) != len(b), f1
    same = sum(1 for m in tta.masks if any(m == p for p in plain.masks))
    assert same < len(tta.masks)  # not the plain prediction again
    print(f"U-Net TTA vs plain: {len(a)} vs {len(b)} instances, F1@0.5 {f1:.3f}, "
          f"{same} identical masks")
