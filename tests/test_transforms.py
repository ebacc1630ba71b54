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


def _visible_boxes_match_masks(boxes, masks, atol):
    """The boxes of the objects still in the picture equal their masks' boxes (within atol)."""
    boxes = boxes.as_subclass(torch.Tensor).float()
    from_masks = masks_to_boxes_xyxy(masks).float()
    seen = masks.flatten(1).bool().any(1)
    assert torch.allclose(boxes[seen], from_masks[seen], atol=atol), (boxes, from_masks)


def test_scale_crop_at_scale_1_is_an_exact_crop_of_pixels_masks_and_boxes():
    torch.manual_seed(0)
    img, t = sample(40, 60)
    tr = RandomScaleCrop(32)
    seen = 0
    for _ in range(20):
        oi, ot = tr(img, t)
        assert oi.shape == (3, 32, 32) and ot["masks"].shape == (2, 32, 32)
        # object 0 is painted 200 in channel 0, object 1 150 in channel 1: at native scale the
        # pixels and the masks must coincide exactly
        assert torch.equal(oi[0] > 0, ot["masks"][0].bool())
        assert torch.equal(oi[1] > 0, ot["masks"][1].bool())
        _visible_boxes_match_masks(ot["boxes"], ot["masks"], 0)
        seen += int(ot["masks"].flatten(1).bool().any(1).sum())
    assert seen > 10  # the crops did hold the objects
    # an image smaller than the crop: padded, nothing lost, still aligned
    oi, ot = RandomScaleCrop(100)(img, t)
    assert oi.shape == (3, 100, 100)
    assert int(ot["masks"].sum()) == int(t["masks"].sum())
    assert torch.equal(oi[0] > 0, ot["masks"][0].bool())
    _visible_boxes_match_masks(ot["boxes"], ot["masks"], 0)


def test_scale_crop_with_scaling_keeps_pixels_masks_and_boxes_aligned():
    torch.manual_seed(0)
    img, t = sample(40, 60)
    tr = RandomScaleCrop(32, (0.8, 1.25))
    checked = 0
    for _ in range(30):
        oi, ot = tr(img, t)
        assert oi.shape == (3, 32, 32) and ot["masks"].shape == (2, 32, 32)
        for k, ch, val in ((0, 0, 200), (1, 1, 150)):
            m = ot["masks"][k].bool()
            if m.sum() < 20:  # (an object cut to a sliver: its IoU is all border)
                continue
            pix = oi[ch] > val / 2
            iou = float((pix & m).sum()) / float((pix | m).sum())
            assert iou > 0.9, iou
            checked += 1
        _visible_boxes_match_masks(ot["boxes"], ot["masks"], 1.5)
    assert checked > 10


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
    img, t = sample()
    boxes = t["boxes"]
    tr = ElasticGrid(std=5.0)
    # a constant field d = (3, -2): output(p) = input(p + d), so the picture moves by -d and
    # every box with it, exactly as the pixels do
    disp = torch.stack([torch.full((40, 60), 3.0), torch.full((40, 60), -2.0)])
    moved_img = tr.transform(img, {"disp": disp})
    moved = tr.transform(boxes, {"disp": disp}).as_subclass(torch.Tensor)
    assert torch.equal(moved, boxes.as_subclass(torch.Tensor) + torch.tensor([-3.0, 2, -3, 2]))
    assert torch.equal((moved_img[0] > 0).nonzero().min(0).values, torch.tensor([5 + 2, 10 - 3]))
    # a random field: each box moves by minus the displacement at its centre, size kept
    torch.manual_seed(2)
    params = tr.make_params([img, boxes])
    d = params["disp"]
    out = tr.transform(boxes, params).as_subclass(torch.Tensor)
    b = boxes.as_subclass(torch.Tensor)
    for i in range(len(b)):
        cx, cy = int(round(float(b[i, 0] + b[i, 2]) / 2)), int(round(float(b[i, 1] + b[i, 3]) / 2))
        shift = torch.stack([-d[0, cy, cx], -d[1, cy, cx]]).repeat(2)
        want = b[i] + shift
        want[0::2], want[1::2] = want[0::2].clamp(0, 60), want[1::2].clamp(0, 40)  # in the image
        assert torch.allclose(out[i], want, atol=1e-4)
    # p = 0 leaves image and boxes as they are
    torch.manual_seed(3)
    oi, ob = ElasticGrid(std=5.0, p=0.0)(img, boxes)
    assert torch.equal(oi, img) and torch.equal(ob.as_subclass(torch.Tensor),
                                                boxes.as_subclass(torch.Tensor))


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
