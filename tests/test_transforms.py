"""Joint augmentation of image, boxes and masks (transforms.v2 + our cell-specific ones)."""
import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from detector.config.config import get_cfg
from detector.data.transforms import (ElasticGrid, HEDJitter, RandomRot90, RandomScaleCrop,
                                      build_train_transforms, masks_to_boxes_xyxy)


def sample(h=40, w=60):
    """An image with two rectangles of different colours, their masks and boxes."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 5:15, 10:30] = 1
    masks[1, 20:35, 40:55] = 1
    img[0][masks[0].bool()] = 200
    img[1][masks[1].bool()] = 150
    boxes = tv_tensors.BoundingBoxes(masks_to_boxes_xyxy(masks), format="XYXY", canvas_size=(h, w))
    return tv_tensors.Image(img), {"boxes": boxes, "masks": tv_tensors.Mask(masks),
                                   "labels": torch.tensor([1, 1])}


def test_masks_to_boxes_uses_pixel_edges():
    m = torch.zeros(2, 10, 10, dtype=torch.uint8)
    m[0, 2:5, 3:9] = 1
    assert masks_to_boxes_xyxy(m).tolist() == [[3, 2, 9, 5], [0, 0, 0, 0]]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_moves_boxes_with_masks_and_pixels(k):
    img, t = sample()
    t90 = RandomRot90()
    out_img, out = t90.transform(img, {"k": k}), {key: t90.transform(v, {"k": k}) for key, v in t.items()}
    assert out_img.shape[-2:] == torch.rot90(img, k, (-2, -1)).shape[-2:]
    assert torch.equal(out_img, torch.rot90(img, k, (-2, -1)))
    assert torch.equal(out["boxes"].as_subclass(torch.Tensor), masks_to_boxes_xyxy(out["masks"]))
    assert tuple(out["boxes"].canvas_size) == tuple(out_img.shape[-2:])
    # the red object's pixels are those under its rotated mask
    assert torch.equal(out_img[0] > 0, out["masks"][0].bool())


def test_scale_crop_gives_crop_size_keeps_alignment_and_pads_small_images():
    torch.manual_seed(0)
    img, t = sample(40, 60)
    tr = RandomScaleCrop(32, (0.8, 1.25))
    for _ in range(10):
        oi, ot = tr(img, t)
        assert oi.shape == (3, 32, 32) and ot["masks"].shape == (2, 32, 32)
        # image pixels coloured by object 0 lie inside its mask (nearest vs antialiased resize
        # differ only at the border)
        red = oi[0] > 150
        assert (red & ~ot["masks"][0].bool()).sum() <= 0.25 * max(int(red.sum()), 1) + 4
    small = RandomScaleCrop(100)(img, t)
    assert small[0].shape == (3, 100, 100)
    assert int(small[1]["masks"].sum()) == int(t["masks"].sum())  # padded, nothing lost


def test_elastic_grid_warps_image_and_masks_together_and_recomputes_boxes():
    torch.manual_seed(1)
    img, t = sample()
    oi, ot = ElasticGrid(grid=3, std=4.0, p=1.0)(img, t)
    assert oi.shape == img.shape and ot["masks"].shape == t["masks"].shape
    assert not torch.equal(ot["masks"], t["masks"])  # it moved
    assert torch.equal(ot["boxes"].as_subclass(torch.Tensor), masks_to_boxes_xyxy(ot["masks"]))
    # a smooth deformation roughly preserves areas
    a0, a1 = t["masks"].sum((1, 2)).float(), ot["masks"].sum((1, 2)).float()
    assert torch.all((a1 / a0 - 1).abs() < 0.5)
    # pixels and masks warped by the same field
    assert ((oi[0] > 100) != ot["masks"][0].bool()).sum() <= 0.1 * a1[0]
    # std 0 is the identity; p 0 does nothing
    oi0, ot0 = ElasticGrid(std=0.0)(img, t)
    assert torch.equal(oi0, img) and torch.equal(ot0["masks"], t["masks"])


def test_elastic_grid_moves_box_only_targets_by_the_displacement_at_their_centre():
    torch.manual_seed(2)
    img, t = sample()
    boxes = t["boxes"]
    out_img, out_boxes = ElasticGrid(std=5.0)(img, boxes)
    w = boxes[:, 2] - boxes[:, 0]
    w2 = out_boxes[:, 2] - out_boxes[:, 0]
    assert torch.allclose(w, w2, atol=1e-4) or (out_boxes[:, 0] == 0).any()  # size kept unless clipped
    assert not torch.equal(out_boxes.as_subclass(torch.Tensor), boxes.as_subclass(torch.Tensor))


def test_hed_jitter_changes_colour_only():
    torch.manual_seed(3)
    rng = np.random.default_rng(0)
    img = tv_tensors.Image(torch.from_numpy(rng.integers(60, 230, (3, 32, 32), dtype=np.uint8)))
    masks = tv_tensors.Mask(torch.ones(1, 32, 32, dtype=torch.uint8))
    oi, om = HEDJitter(0.2)(img, masks)
    assert oi.dtype == torch.uint8 and oi.shape == img.shape
    assert (oi.int() - img.int()).abs().float().mean() > 0.5
    assert torch.equal(om, masks)
    same, _ = HEDJitter(0.0)(img, masks)
    assert torch.equal(same, img)


def test_training_pipeline_from_config():
    cfg = get_cfg(None, ["INPUT.CROP_SIZE", "32", "INPUT.AUG.ELASTIC_PROB", "0.5"])
    tr = build_train_transforms(cfg)
    kinds = [type(x).__name__ for x in tr.transforms]
    assert kinds[0] == "RandomScaleCrop" and "ElasticGrid" in kinds and "HEDJitter" in kinds
    assert "RandomRot90" in kinds and "ColorJitter" in kinds
    img, t = sample()
    oi, ot = tr(img, t)
    assert oi.shape == (3, 32, 32) and ot["masks"].shape[-2:] == (32, 32)
