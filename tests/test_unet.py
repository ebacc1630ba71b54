"""The U-Net of Ronneberger et al. (2015): geometry, initialisation, overlap-tile prediction,
the model interface (training losses, eval Instances) and a small end-to-end training loop."""
import glob
import math
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
import torch.nn.functional as F

import detector.data.transforms as transforms
import detector.engine.checkpoint as checkpoint
import detector.modeling.build as build
from detector.config.config import get_cfg
from detector.data.image_io import read_array, read_image
from detector.data.unet_targets import UNetTargets
from detector.modeling.unet import (
    UNet,
    build_unet,
    is_valid_input_size,
    mirror_pad,
    unet_border,
    valid_input_size,
    valid_output_size,
)
from detector.structures.instances import Instances
from tests.conftest import shared_path

NUCLEUS = [{"id": 1, "name": "nucleus"}]
DSB_ID = "00ae65c1c6631ae6f2be1a449902976e6eb8483bf6b0740d00530220832c6d3e"  # 256x320, 70 nuclei


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


def small_cfg(*opts):
    return get_cfg(None, ["MODEL.META_ARCHITECTURE", "UNet", "MODEL.UNET.DEPTH", "3",
                          "MODEL.UNET.BASE_CHANNELS", "8", *opts])


def dsb_image_and_masks():
    folder = shared_path("dsb2018", "stage1_train", DSB_ID)
    image = read_image(os.path.join(str(folder), "images", DSB_ID + ".png"))
    masks = [read_array(p) for p in sorted(glob.glob(os.path.join(str(folder), "masks", "*.png")))]
    masks = np.stack([(m[..., 0] if m.ndim == 3 else m) > 0 for m in masks]).astype(np.uint8)
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0, masks


# ------------------------------------------------------------------------------- geometry
def test_paper_geometry_572_to_388():
    assert unet_border(5) == 184
    assert valid_input_size(388, 5) == (572, 388)
    assert is_valid_input_size(572, 5) and not is_valid_input_size(570, 5)
    assert valid_output_size(300, 5) == 308  # 16 * 19 + 4
    assert unet_border(5, "same") == 0


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("wanted", [1, 5, 37])
def test_valid_input_sizes_run_and_give_the_promised_output(depth, wanted):
    size_in, size_out = valid_input_size(wanted, depth)
    assert size_out >= wanted
    net = UNet(3, 3, depth, 2)
    y = net(torch.zeros(1, 3, size_in, size_in + 2 ** (depth - 1)))
    assert y.shape == (1, 3, size_out, size_out + 2 ** (depth - 1))


def test_odd_size_at_a_pooling_is_a_clear_error():
    net = UNet(3, 3, 3, 2)
    with pytest.raises(ValueError, match="odd size"):
        net(torch.zeros(1, 3, 43, 43))


def test_architecture_follows_the_paper():
    net = UNet(3, 3, depth=5, base_channels=64)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    # 2 convs per level on the way down (5), 2 per level up (4), 1x1 head
    assert len(convs) == 2 * 5 + 2 * 4 + 1
    assert all(c.padding == (0, 0) for c in convs)
    assert [b[0].out_channels for b in net.down] == [64, 128, 256, 512, 1024]
    ups = [m for m in net.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(u.in_channels, u.out_channels, u.kernel_size, u.stride) for u in ups] == [
        (c * 2, c, (2, 2), (2, 2)) for c in (512, 256, 128, 64)]
    assert net.head.kernel_size == (1, 1) and net.head.out_channels == 3
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    # initialisation: std sqrt(2 / N), N = 3 * 3 * input channels
    w = net.down[3][2].weight.detach()  # second conv of level 4: 512 -> 512
    assert float(w.std()) == pytest.approx(math.sqrt(2 / (9 * 512)), rel=0.02)
    assert float(w.mean()) == pytest.approx(0.0, abs=1e-3)


def test_same_padding_variant_has_batch_norm_and_keeps_size():
    net = UNet(3, 3, 3, 4, padding="same")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert net(torch.zeros(2, 3, 32, 48)).shape == (2, 3, 32, 48)
    model = build_unet(small_cfg("MODEL.UNET.PADDING", "same"), NUCLEUS)
    model.train()
    t = {"unet_target": torch.zeros(30, 45, dtype=torch.int64), "unet_weight": torch.ones(30, 45)}
    assert torch.isfinite(model([torch.rand(3, 30, 45)], [t])["loss_unet"])
    model.eval()
    probs = model.predict_probabilities(torch.rand(3, 50, 70), tile_size=16)
    assert probs.shape == (3, 50, 70)
    assert torch.allclose(probs.sum(0), torch.ones(50, 70), atol=1e-5)


def test_mirror_pad_matches_numpy_reflect_and_repeats_beyond_the_image():
    x = torch.arange(2 * 5 * 4, dtype=torch.float32).reshape(2, 5, 4)
    got = mirror_pad(x, 2, 3, 1, 2).numpy()
    assert (got == np.pad(x.numpy(), ((0, 0), (2, 3), (1, 2)), mode="reflect")).all()
    big = mirror_pad(x, 11, 9, 7, 13).numpy()
    assert (big == np.pad(x.numpy(), ((0, 0), (11, 9), (7, 13)), mode="reflect")).all()
    one = mirror_pad(torch.ones(1, 1, 1) * 3, 2, 2, 2, 2)
    assert one.shape == (1, 5, 5) and (one == 3).all()


# ------------------------------------------------------------------ overlap-tile prediction
def test_tiled_prediction_equals_whole_image_prediction_on_a_real_image():
    image, _ = dsb_image_and_masks()  # 256 x 320 fluorescence image
    model = build_unet(small_cfg(), NUCLEUS).eval()
    whole = model.predict_probabilities(image, tile_size=512)  # one tile
    tiled = model.predict_probabilities(image, tile_size=40)  # 7 x 8 tiles of 40 px
    assert whole.shape == tiled.shape == (3, 256, 320)
    assert torch.allclose(whole.sum(0), torch.ones(256, 320), atol=1e-5)
    assert float(whole.std(dim=(1, 2)).min()) > 1e-3  # the map is not constant
    assert float((whole - tiled).abs().max()) < 1e-4
    # also at the paper's depth (4 poolings), tiles of 64 px, in float64
    deep = build_unet(small_cfg("MODEL.UNET.DEPTH", "5", "MODEL.UNET.BASE_CHANNELS", "4"),
                      NUCLEUS).double().eval()
    crop = image[:, :100, :120]
    a = deep.predict_probabilities(crop, tile_size=256)
    b = deep.predict_probabilities(crop, tile_size=64)
    assert float((a - b).abs().max()) < 1e-4


def test_tiles_misaligned_with_the_pooling_grid_would_differ():
    """Control for the identity test: shifting the image by a non-multiple of 2^(D-1) px
    changes the prediction (max pooling), which is why tiles advance by such multiples."""
    image, _ = dsb_image_and_masks()
    model = build_unet(small_cfg(), NUCLEUS).eval()
    a = model.predict_probabilities(image[:, :, :200], tile_size=512)
    b = model.predict_probabilities(image[:, :, 1:201], tile_size=512)
    assert float((a[:, 20:-20, 21:-20] - b[:, 20:-20, 20:-21]).abs().max()) > 1e-4


def test_eval_forward_returns_instances_for_any_image_size():
    model = build_unet(small_cfg("MODEL.UNET.MIN_SIZE", "1", "MODEL.UNET.SEED_THRESH", "-1",
                                 "MODEL.UNET.FOREGROUND_THRESH", "0"),
                       [{"id": 5, "name": "nucleus"}]).eval()
    images = [torch.rand(3, 37, 53), torch.rand(3, 70, 20)]
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and all(isinstance(o, Instances) for o in out)
    for img, inst in zip(images, out):
        h, w = img.shape[-2:]
        assert inst.image_size == (h, w)
        assert len(inst) >= 1 and inst.masks is not None
        assert all(tuple(m.image_size) == (h, w) for m in inst.masks)
        assert (inst.labels == 5).all()
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        assert (inst.boxes[:, 2] <= w).all() and (inst.boxes[:, 3] <= h).all()


def test_input_scale_resizes_inside_the_model():
    """INPUT.SCALE 2: the network sees the image at twice its size (tiles, content) and the
    probabilities come back at the input's size; training sees the crop and its targets at
    twice the size too."""
    model = build_unet(small_cfg("INPUT.SCALE", "2.0"), NUCLEUS).eval()
    ref = build_unet(small_cfg(), NUCLEUS).eval()  # the same weights at scale 1
    ref.load_state_dict(model.state_dict())
    seen = []
    model.net.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    img = torch.rand(3, 30, 41)
    probs = model.predict_probabilities(img, tile_size=16)
    assert probs.shape == (3, 30, 41)
    # 60 x 82 px in tiles of 16 output px (4 x 6), not 30 x 41 (2 x 3)
    assert sum(s[0] for s in seen) == math.ceil(60 / 16) * math.ceil(82 / 16)
    up = F.interpolate(img[None], scale_factor=2.0, mode="bilinear", align_corners=False)[0]
    want = F.interpolate(ref.predict_probabilities(up, tile_size=16)[None], size=(30, 41),
                         mode="bilinear", align_corners=False)[0]
    assert torch.allclose(probs, want, atol=1e-5)
    model.train()
    ref.train()
    img = torch.rand(3, 24, 24)
    tgt = torch.randint(0, 3, (24, 24))
    wt = torch.rand(24, 24)
    seen.clear()
    loss = model([img], [{"unet_target": tgt, "unet_weight": wt}])["loss_unet"]
    assert torch.isfinite(loss)
    up = F.interpolate(img[None], scale_factor=2.0, mode="bilinear", align_corners=False)[0]
    big = {"unet_target": tgt.repeat_interleave(2, 0).repeat_interleave(2, 1),
           "unet_weight": wt.repeat_interleave(2, 0).repeat_interleave(2, 1)}
    want = ref([up], [big])["loss_unet"]
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    padded_48 = ref._pad_for_output(torch.zeros(1, 3, 48, 48), 48, 48).shape
    assert seen == [tuple(padded_48)]  # one batch of the 48 x 48 crop, padded for the net


def test_build_unet_rejects_several_classes_with_a_clear_message():
    with pytest.raises(ValueError, match="one foreground class"):
        build_unet(small_cfg(), [{"id": 1, "name": "nucleus"}, {"id": 2, "name": "mitosis"}])
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        build_unet(small_cfg("MODEL.NUM_CLASSES", "2"), NUCLEUS)


def test_build_model_dispatches_to_unet():
    model = build.build_model(small_cfg(), NUCLEUS)
    assert type(model).__name__ == "UNetModel"


# ------------------------------------------------------------------------------ training
def test_training_loss_is_the_weighted_cross_entropy():
    model = build_unet(small_cfg(), NUCLEUS).train()
    img = torch.rand(3, 20, 20)
    tgt = torch.randint(0, 3, (20, 20))
    weight = torch.rand(20, 20) * 5
    loss = model([img], [{"unet_target": tgt, "unet_weight": weight}])["loss_unet"]
    # reference: run the bare net on the mirror-padded input and crop
    x = model._normalize(img)[None]
    logits = model.net(model._pad_for_output(x, 20, 20))[..., :20, :20]
    ce = torch.nn.functional.cross_entropy(logits, tgt[None], reduction="none")
    assert float(loss.detach()) == pytest.approx(float((ce * weight).mean().detach()), rel=1e-5)
    loss.backward()
    assert model.net.down[0][0].weight.grad is not None


def test_targets_are_computed_from_masks_when_the_dataset_did_not():
    model = build_unet(small_cfg(), NUCLEUS).train()
    img = torch.rand(3, 32, 32)
    masks = torch.zeros(1, 32, 32, dtype=torch.uint8)
    masks[0, 8:20, 8:20] = 1
    t = {"masks": masks, "boxes": torch.tensor([[8.0, 8.0, 20.0, 20.0]])}
    t2 = UNetTargets(small_cfg())(img, t)
    torch.manual_seed(1)
    a = model([img], [t])["loss_unet"]
    b = model([img], [t2])["loss_unet"]
    assert float(a.detach()) == pytest.approx(float(b.detach()))
    with pytest.raises(ValueError, match="share one size"):
        model([img, torch.rand(3, 16, 16)], [t2, t2])


def test_small_training_loop_learns_nuclei_of_a_real_image():
    """End to end without the engine: dataset-like crops with UNetTargets -> losses ->
    SGD steps -> eval Instances that find the nuclei."""
    image, masks = dsb_image_and_masks()
    cfg = small_cfg("MODEL.UNET.MIN_SIZE", "5")
    model = build_unet(cfg, NUCLEUS)
    targets_fn = UNetTargets(cfg)
    img = image[:, :128, :128]
    m = masks[:, :128, :128]
    m = m[m.reshape(len(m), -1).any(1)]
    target = targets_fn(img, {"masks": torch.from_numpy(m)})
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(40):
        k = step % 4  # flips/rotations of the crop, applied to image and targets alike
        x = torch.rot90(img, k, (1, 2))
        t = {"unet_target": torch.rot90(target["unet_target"], k, (0, 1)),
             "unet_weight": torch.rot90(target["unet_weight"], k, (0, 1))}
        loss = model([x], [t])["loss_unet"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    model.eval()
    with torch.no_grad():
        inst = model([img])[0]
    gt = [mask_utils.encode(np.asfortranarray(x)) for x in m]
    iou = mask_utils.iou([x.to_coco_rle() for x in inst.masks], gt, [0] * len(gt)) if len(inst) else np.zeros((0, len(gt)))
    found = int((iou.max(0) >= 0.5).sum()) if len(inst) else 0
    assert found >= 0.5 * len(gt), f"{found} of {len(gt)} nuclei found after 40 steps"


def test_checkpoint_round_trip_through_load_model(tmp_path):
    cfg = small_cfg("MODEL.UNET.TILE_SIZE", "32")
    model = build.build_model(cfg, [{"id": 3, "name": "nucleus"}]).eval()
    path = str(tmp_path / "unet.pth")
    checkpoint.save_checkpoint(path, model, cfg, [{"id": 3, "name": "nucleus"}], 0.25, 7)
    loaded, cfg2, classes, mpp = build.load_model(path)
    assert not loaded.training and classes == [{"id": 3, "name": "nucleus"}] and mpp == 0.25
    assert cfg2.MODEL.UNET.DEPTH == 3 and loaded.tile_size == 32
    img = torch.rand(3, 50, 60)
    assert torch.equal(model.predict_probabilities(img), loaded.predict_probabilities(img))
    with torch.no_grad():
        assert (loaded([img])[0].labels == 3).all()


def test_state_dict_round_trip_gives_identical_predictions():
    cfg = small_cfg()
    a = build_unet(cfg, NUCLEUS).eval()
    b = build_unet(cfg, NUCLEUS).eval()
    sd = a.state_dict()
    assert all(not k.startswith("pixel_") for k in sd)  # normalisation comes from the config
    b.load_state_dict(sd)
    img = torch.rand(3, 40, 40)
    assert torch.equal(a.predict_probabilities(img), b.predict_probabilities(img))


def test_augmentation_deforms_image_targets_and_weights_alike():
    """The paper's elastic deformation plus flips and rotations, applied before UNetTargets:
    the targets and weight map follow the image (nuclei drawn as bright pixels stay on the
    foreground of the target map after warping)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    _, masks = dsb_image_and_masks()
    masks = masks[:, :128, :128]
    masks = masks[masks.reshape(len(masks), -1).any(1)]
    fg = masks.max(0).astype(np.float32)
    image = torch.from_numpy(np.stack([fg * 255] * 3)).to(torch.uint8)
    aug = v2.Compose([transforms.ElasticGrid(3, 10.0, 1.0), v2.RandomHorizontalFlip(0.5),
                      transforms.RandomRot90()])
    targets_fn = UNetTargets(small_cfg())
    for seed in range(3):
        torch.manual_seed(seed)
        img, t = aug(tv_tensors.Image(image), {"masks": tv_tensors.Mask(torch.from_numpy(masks))})
        assert not torch.equal(img, tv_tensors.Image(image))  # something moved
        t = targets_fn(img.float() / 255, t)
        bright = img[0].numpy() > 127
        target_fg = t["unet_target"].numpy() > 0
        agree = (bright == target_fg).mean()
        assert agree > 0.97, f"image and target maps disagree on {1 - agree:.1%} of pixels"
        assert t["unet_weight"].shape == img.shape[-2:]
