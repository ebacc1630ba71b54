"""The R-CNN models: configuration for cells, the Instances they return, and initial weights."""

import os

import pycocotools.mask as mask_utils
import pytest
import torch
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

from detector.config.config import get_cfg
from detector.modeling.build import WeightsError, build_model, load_weights
from detector.structures.instances import Instances

torch.set_num_threads(1)
CLASSES = [{"id": 3, "name": "lymphocyte"}, {"id": 7, "name": "tumour"}]


def tiny_cfg(*opts):
    return get_cfg(None, ["MODEL.BACKBONE.NAME", "resnet18", "MODEL.BACKBONE.OUT_CHANNELS", "32",
                          "MODEL.ROI_HEADS.FC_DIM", "64", "MODEL.ROI_HEADS.BOX_HEAD_CONVS", "1",
                          "MODEL.ROI_HEADS.MASK_HEAD_CONVS", "1", "MODEL.RPN.CONV_DEPTH", "1",
                          "MODEL.RPN.POST_NMS_TOPK_TEST", "200",
                          "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", *opts])


def disc_target(h, w, n=3):
    masks = torch.zeros(n, h, w, dtype=torch.uint8)
    boxes = []
    for i in range(n):
        y, x = 10 + 15 * i, 12 + 20 * i
        masks[i, y:y + 9, x:x + 11] = 1
        boxes.append([x, y, x + 11, y + 9])
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor([1, 2, 1]),
            "masks": masks}


@pytest.fixture(scope="module")
def mask_model():
    torch.manual_seed(0)
    return build_model(tiny_cfg(), CLASSES)


def test_training_forward_returns_scalar_losses_and_accepts_negatives(mask_model):
    mask_model.train()
    images = [torch.rand(3, 70, 90), torch.rand(3, 64, 64)]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}
    losses = mask_model(images, [disc_target(70, 90), empty])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                           "loss_rpn_box_reg"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mask_model.parameters())


def test_eval_returns_instances_in_input_pixels_with_coco_ids_and_rle(mask_model):
    mask_model.eval()
    with torch.no_grad():
        out = mask_model([torch.rand(3, 70, 90), torch.rand(3, 50, 40)])
    assert len(out) == 2 and all(isinstance(o, Instances) for o in out)
    for inst, (h, w) in zip(out, [(70, 90), (50, 40)]):
        assert inst.image_size == (h, w)  # native resolution: no resize to 800 px
        assert len(inst) > 0
        assert set(inst.labels.tolist()) <= {3, 7}
        assert inst.boxes[:, 2].max() <= w and inst.boxes[:, 3].max() <= h
        assert len(inst.masks) == len(inst)
        assert tuple(inst.masks[0].image_size) == (h, w)
        assert mask_utils.decode(inst.masks[0].to_coco_rle()).shape == (h, w)


def test_native_resolution_and_scale_factor():
    m1 = build_model(tiny_cfg(), CLASSES).model.transform
    img = torch.rand(3, 37, 53)
    batch, _ = m1([img])
    assert batch.image_sizes == [(37, 53)]  # padded to /32 for the FPN, not resized
    m2 = build_model(tiny_cfg("INPUT.SCALE", "2.0"), CLASSES)
    batch, targets = m2.model.transform([img], [disc_target(37, 53, n=1)])
    assert batch.image_sizes == [(74, 106)]
    assert targets[0]["boxes"].tolist() == [[24.0, 20.0, 46.0, 38.0]]
    m2.eval()
    with torch.no_grad():
        inst = m2([img])[0]
    assert inst.image_size == (37, 53) and inst.boxes[:, 2].max() <= 53  # back in input pixels


def test_config_keys_reach_the_torchvision_model():
    cfg = tiny_cfg("MODEL.ANCHOR_GENERATOR.SIZES", "[[4], [8], [16], [32], [64]]",
                   "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[1.0]",
                   "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", "1500",
                   "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "777", "MODEL.RPN.POST_NMS_TOPK_TEST", "1234")
    m = build_model(cfg, CLASSES).model
    assert [tuple(x) for x in m.rpn.anchor_generator.sizes] == [(4,), (8,), (16,), (32,), (64,)]
    assert [tuple(x) for x in m.rpn.anchor_generator.aspect_ratios] == [(1.0,)] * 5
    assert m.roi_heads.detections_per_img == 1500
    assert m.rpn._pre_nms_top_n["training"] == 777 and m.rpn._post_nms_top_n["testing"] == 1234
    assert m.roi_heads.box_predictor.cls_score.out_features == len(CLASSES) + 1
    assert sum(isinstance(x, nn.GroupNorm) for x in m.modules()) > 10
    frozen = build_model(tiny_cfg("MODEL.BACKBONE.NORM", "FrozenBN",
                                  "MODEL.BACKBONE.TRAINABLE_LAYERS", "2"), CLASSES).model
    from torchvision.ops import FrozenBatchNorm2d

    assert any(isinstance(x, FrozenBatchNorm2d) for x in frozen.backbone.body.modules())
    assert not frozen.backbone.body.conv1.weight.requires_grad
    assert frozen.backbone.body.layer4[0].conv1.weight.requires_grad


def test_faster_rcnn_returns_boxes_without_masks():
    m = build_model(tiny_cfg("MODEL.META_ARCHITECTURE", "FasterRCNN"), CLASSES[:1])
    m.eval()
    with torch.no_grad():
        inst = m([torch.rand(3, 48, 48)])[0]
    assert inst.masks is None and set(inst.labels.tolist()) <= {3}
    m.train()
    t = disc_target(48, 48, n=2)
    del t["masks"]
    t["labels"] = torch.tensor([1, 1])
    assert "loss_mask" not in m([torch.rand(3, 48, 48)], [t])


def test_r50_matches_torchvision_v2_so_coco_weights_load(tmp_path):
    """With FrozenBN and 256 channels, our R50 model has torchvision's
    maskrcnn_resnet50_fpn_v2 keys and shapes (class-specific predictors aside), so that the
    COCO-pretrained weights load; the loader skips the class heads and reports them."""
    cfg = get_cfg(None, ["MODEL.BACKBONE.NORM", "FrozenBN", "MODEL.BACKBONE.TRAINABLE_LAYERS", "3"])
    ours = build_model(cfg, CLASSES)
    tv = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict()
    own = ours.state_dict()
    for k, v in tv.items():
        if k.endswith("num_batches_tracked"):  # BN counters; FrozenBN has none
            continue
        assert "model." + k in own, k
        if "predictor" not in k:
            assert own["model." + k].shape == v.shape, k
    with torch.no_grad():
        for v in tv.values():
            if v.dtype.is_floating_point:
                v.add_(0.5)
    path = str(tmp_path / "tv_state.pth")
    torch.save(tv, path)
    load_weights(ours, path)
    k = "backbone.body.layer1.0.conv1.weight"
    assert torch.equal(ours.model.state_dict()[k], tv[k])
    pred = "roi_heads.box_predictor.cls_score.weight"
    assert ours.model.state_dict()[pred].shape[0] == 3 and tv[pred].shape[0] == 91


def test_torchvision_weights_name_offline_fails_at_once_saying_where_to_put_the_file(
        tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    m = build_model(tiny_cfg(), CLASSES)
    with pytest.raises(WeightsError) as e:
        load_weights(m, "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1")
    msg = str(e.value)
    assert "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_v2" in msg
    assert str(tmp_path / "hub" / "checkpoints" / "maskrcnn_resnet50_fpn_v2") in msg
    with pytest.raises(WeightsError, match="no such file"):
        load_weights(m, "missing/weights.pth")


def test_imagenet_classifier_weights_go_to_the_backbone(tmp_path):
    import torchvision

    torch.manual_seed(1)
    resnet = torchvision.models.resnet18(norm_layer=lambda c: nn.GroupNorm(32, c))
    torch.save(resnet.state_dict(), tmp_path / "r18.pth")
    m = build_model(tiny_cfg(), CLASSES)
    load_weights(m, str(tmp_path / "r18.pth"))
    assert torch.equal(m.model.backbone.body.conv1.weight, resnet.conv1.weight)


def test_unet_is_imported_lazily():
    """Importing the builder (which a Mask R-CNN user needs) does not import the U-Net module;
    asking for a U-Net does (checked in a fresh interpreter, where nothing was imported before)."""
    import subprocess
    import sys
    import textwrap

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = textwrap.dedent("""
        import sys
        from detector.config.config import get_cfg
        import detector.modeling.build as b
        import detector.modeling.rcnn
        print("after import", "detector.modeling.unet" in sys.modules)
        b.build_model(get_cfg(None, ["MODEL.META_ARCHITECTURE", "UNet", "MODEL.UNET.DEPTH", "2"]),
                      [{"id": 1, "name": "nucleus"}])
        print("after U-Net", "detector.modeling.unet" in sys.modules)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    p = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split("\n")[:2] == ["after import False", "after U-Net True"], p.stdout


def test_our_checkpoint_as_initial_weights_for_other_classes(tmp_path):
    """Fine-tuning from one of our checkpoints on data with other classes: everything but the
    class-specific predictors is copied."""
    from detector.engine.checkpoint import save_checkpoint

    cfg = tiny_cfg()
    torch.manual_seed(0)
    src = build_model(cfg, CLASSES)
    save_checkpoint(str(tmp_path / "ck.pth"), src, cfg, CLASSES, 0.25, 10)
    dst = build_model(cfg, CLASSES[:1])
    load_weights(dst, str(tmp_path / "ck.pth"))
    s, d = src.state_dict(), dst.state_dict()
    assert torch.equal(s["model.backbone.fpn.layer_blocks.0.0.weight"],
                       d["model.backbone.fpn.layer_blocks.0.0.weight"])
    assert d["model.roi_heads.box_predictor.cls_score.weight"].shape[0] == 2
    assert s["model.roi_heads.box_predictor.cls_score.weight"].shape[0] == 3


def test_test_time_keys_override_the_checkpoint(tmp_path):
    """--eval-only with INPUT.SCALE or thresholds on the command line: the checkpoint's weights
    with the test-time settings given now; keys that would change the weights are refused."""
    from detector.engine.checkpoint import save_checkpoint
    from detector.modeling.build import load_model, test_time_overrides

    cfg = tiny_cfg()
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "ck.pth"), build_model(cfg, CLASSES), cfg, CLASSES, None, 1)
    plain, _, _, _ = load_model(str(tmp_path / "ck.pth"))
    now = tiny_cfg("INPUT.SCALE", "0.5", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.3")
    model, mcfg, _, _ = load_model(str(tmp_path / "ck.pth"), overrides=test_time_overrides(now))
    assert mcfg.INPUT.SCALE == 0.5 and mcfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.3
    assert model.model.roi_heads.score_thresh == 0.3
    assert plain.model.roi_heads.score_thresh == 0.0
    for a, b in zip(plain.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not a test-time key"):
        load_model(str(tmp_path / "ck.pth"), overrides={"MODEL.BACKBONE.NAME": "resnet50"})


@pytest.mark.parametrize("chunk_px", [1 << 22, 700])
def test_mask_rcnn_masks_pasted_in_their_boxes_equal_torchvisions_full_image_paste(chunk_px):
    """Masks are pasted only into each box's crop (CropMask), never into image-sized rasters,
    and give exactly the pixels of torchvision's paste_masks_in_image, in the order of the
    boxes, however the batched resize groups them (700 px: groups of 1 or 2 masks)."""
    import numpy as np
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from detector.modeling.rcnn import paste_masks_in_boxes

    g = torch.Generator().manual_seed(0)
    n = 200
    probs = torch.rand(n, 1, 28, 28, generator=g)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([85.0, 65.0])
    wh = torch.rand(n, 2, generator=g) * 30 + 0.5
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([90.0, 70.0]))], 1)
    full = paste_masks_in_image(probs, boxes, (70, 90))[:, 0] > 0.5
    crops = paste_masks_in_boxes(probs, boxes, (70, 90), 0.5, chunk_px=chunk_px)
    assert len(crops) == n
    for m, f in zip(crops, full):
        assert np.array_equal(m.to_full(), f.numpy())


def test_crop_masks_equal_torchvision_full_image_paste_on_a_real_image(mask_model):
    """Eval masks are pasted into their boxes' crops only (no image-sized raster per
    detection): pixel for pixel torchvision's paste, and a caller's score threshold drops
    detections before the mask head without changing those above it."""
    import numpy as np
    import tifffile

    from tests.conftest import shared_path

    he = tifffile.imread(str(shared_path("monuseg", "TCGA-2Z-A9J9-01A-01-TS1.tif")))
    x = torch.from_numpy(np.ascontiguousarray(he[:200, :260, :3])).permute(2, 0, 1).float() / 255
    mask_model.eval()
    with torch.no_grad():
        ref = mask_model.model([x])[0]  # torchvision's forward: full-image masks
        ours = mask_model.predict([x])[0]
        thr = float(ref["scores"].median())
        high = mask_model.predict([x], score_thresh=thr)[0]
    assert len(ref["boxes"]) > 10 and len(ours) == len(ref["boxes"])
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    # the wrapped model's own forward leaves the mask head's M x M maps unpasted (our predict
    # pastes them into their boxes): paste them as torchvision's postprocess would
    probs = ref["masks"]
    if probs.shape[-2:] != x.shape[-2:]:
        probs = paste_masks_in_image(probs, ref["boxes"], tuple(x.shape[-2:]))
    full = (probs[:, 0] > 0.5).numpy().astype(np.uint8)
    expect = [mask_utils.encode(np.asfortranarray(m)) for m in full]
    assert [m.to_coco_rle()["counts"] for m in ours.masks] == [m["counts"] for m in expect]
    assert torch.equal(torch.from_numpy(ours.boxes), ref["boxes"])
    keep = (ref["scores"] >= thr).numpy()
    assert 0 < len(high) == int(keep.sum()) < len(ours)
    np.testing.assert_array_equal(high.scores, ours.scores[keep])
    assert [m.to_coco_rle()["counts"] for m in high.masks] == \
        [m["counts"] for m, k in zip(expect, keep) if k]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "bf16_autocast"])
def test_roi_align_split_over_threads_is_torchvisions_bit_for_bit(mode, monkeypatch):
    """On a CPU the R-CNN's RoIAlign pools parts of the boxes in parallel threads
    (torchvision's CPU kernel uses one core): the same tensor as torchvision's
    MultiScaleRoIAlign, boxes of several images in their order, also under inference_mode and
    bf16 autocast (thread-local states the threads must take over); in training the same
    output and, computed per part in threads and summed, the same feature gradients up to
    float rounding."""
    import threading
    from collections import OrderedDict

    from torchvision.ops import MultiScaleRoIAlign

    from detector.modeling.rcnn import ParallelRoIAlign

    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if mode == "bf16_autocast" else torch.float32
    feats = OrderedDict((k, torch.randn(2, 8, s, s, generator=g).to(dtype))
                        for k, s in zip("0123", (64, 32, 16, 8)))
    boxes = []
    for n in (300, 170):
        xy = torch.rand(n, 2, generator=g) * 200
        wh = torch.rand(n, 2, generator=g) ** 2 * 150 + 2  # sizes on every FPN level
        boxes.append(torch.cat([xy, torch.clamp(xy + wh, max=255.0)], 1))
    shapes = [(256, 256), (256, 256)]
    ref_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    pool = ParallelRoIAlign(["0", "1", "2", "3"], 7, 2)
    seen = set()
    original = MultiScaleRoIAlign.forward

    def recording(self, *a, **k):
        seen.add(threading.current_thread().name.split("_")[0])
        return original(self, *a, **k)

    monkeypatch.setattr(MultiScaleRoIAlign, "forward", recording)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "bf16_autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}[mode]
    prev = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with torch.no_grad(), ctx():
            ref = ref_pool(feats, boxes, shapes)
            pool(feats, boxes, shapes)  # the first call sets the level scales
            seen.clear()
            out = pool(feats, boxes, shapes)
        assert seen == {"roi"}, seen  # only the worker threads pooled
        assert out.dtype == ref.dtype and out.shape == (470, 8, 7, 7)
        assert torch.equal(out, ref)
        if mode == "bf16_autocast":
            return
        feats_grad = OrderedDict((k, v.clone().requires_grad_()) for k, v in feats.items())
        feats_ref = OrderedDict((k, v.clone().requires_grad_()) for k, v in feats.items())
        w = torch.randn(470, 8, 7, 7, generator=g)
        seen.clear()
        out = pool(feats_grad, boxes, shapes)
        (out * w).sum().backward()  # training: parts in threads, forward and backward
        assert seen == {"roi"}, seen
        ref = ref_pool(feats_ref, boxes, shapes)
        (ref * w).sum().backward()
        assert torch.equal(out, ref)
        assert sum(float(feats_grad[k].grad.abs().sum()) > 0 for k in "0123") >= 2
        for k in "0123":
            torch.testing.assert_close(feats_grad[k].grad, feats_ref[k].grad, rtol=1e-5,
                                       atol=1e-6)
    finally:
        torch.set_num_threads(prev)


def test_detections_dropped_before_the_mask_head_are_those_a_slide_drops_after(mask_model):
    """A slide's tile leaves detections cut by an interior tile edge to its neighbour: the
    R-CNN drops them before the mask head (no mask computed), and what remains is exactly what
    predicting everything and dropping them afterwards gives, masks included."""
    import numpy as np
    import tifffile

    from detector.inference.tiling import touches_edges
    from tests.conftest import shared_path

    he = tifffile.imread(str(shared_path("monuseg", "TCGA-2Z-A9J9-01A-01-TS1.tif")))
    x = torch.from_numpy(np.ascontiguousarray(he[:200, :260, :3])).permute(2, 0, 1).float() / 255
    edges = (True, True, False, True)

    def cut(boxes, size):
        return touches_edges(boxes, size[1], size[0], edges, 25.0)

    rois = []
    hook = mask_model.model.roi_heads.mask_roi_pool.register_forward_hook(
        lambda mod, inp, out: rois.append(int(out.shape[0])))
    mask_model.eval()
    try:
        with torch.no_grad():
            full = mask_model.predict([x])[0]
            dropped = mask_model.predict([x], drop=[cut])[0]
    finally:
        hook.remove()
    after = full[~cut(full.boxes, full.image_size)]
    assert 0 < len(after) < len(full) and rois == [len(full), len(after)]
    np.testing.assert_array_equal(dropped.boxes, after.boxes)
    np.testing.assert_array_equal(dropped.scores, after.scores)
    np.testing.assert_array_equal(dropped.labels, after.labels)
    assert [m.to_json() for m in dropped.masks] == [m.to_json() for m in after.masks]
    assert "postprocess_detections" not in vars(mask_model.model.roi_heads)  # module unchanged


def test_group_norm_channels_last_path_matches_torch(monkeypatch):
    """The models' GroupNorm takes its own CPU path for channels-last float32 maps of groups
    of at most 2 channels (the R-CNN heads: RoIs x 64 channels x 7 x 7 px, where torch's
    kernel is slow): the same normalisation as torch's within float rounding, as accurate as
    torch's channels-last kernel also for maps of a large mean (where both take E[x^2] -
    E[x]^2 and are off by 1e-3), the channels-last layout kept, gradients too; other inputs
    (NCHW, single small maps, bf16) go to torch's own kernel unchanged, as
    with ``fast = False``."""
    from detector.modeling.layers import GroupNorm

    g = torch.Generator().manual_seed(0)
    norm = GroupNorm(32, 64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
        norm.bias.copy_(torch.randn(64, generator=g))
    import torch.nn.functional as F

    calls = []
    original = F.group_norm

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    for shape, offset in (((300, 64, 7, 7), 0.0), ((40, 64, 14, 14), 30.0)):
        x = torch.randn(*shape, generator=g) * 2 + offset
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            exact = F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double())
            torch_cl = nn.GroupNorm.forward(norm, x)  # torch's channels-last kernel
        calls.clear()
        with monkeypatch.context() as m:
            m.setattr(F, "group_norm", counting)
            out = norm(x)
        assert not calls  # its own path
        assert out.is_contiguous(memory_format=torch.channels_last)
        err, err_torch = [float((o.detach().double() - exact).abs().max()) for o in (out, torch_cl)]
        assert err <= max(2e-5, 2 * err_torch), (err, err_torch)
        xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        w = torch.randn(*shape, generator=g)
        (norm(xg) * w).sum().backward()
        (nn.GroupNorm.forward(norm, xr.contiguous()) * w).sum().backward()
        torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-3, atol=1e-3)
    x = torch.randn(300, 64, 7, 7, generator=g)
    for other in (x, x[:1].contiguous(memory_format=torch.channels_last),
                  x.contiguous(memory_format=torch.channels_last).bfloat16()):
        assert torch.equal(norm(other), nn.GroupNorm.forward(norm, other))
    norm.fast = False
    x = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(norm(x), nn.GroupNorm.forward(norm, x))


def test_predict_is_safe_to_call_from_several_threads(mask_model):
    """The slide runner's CPU streams predict with one model from two threads at once: a
    call's score threshold and drops are its own even when another call, with others, starts
    and ends in the middle of it (forced here: the second call runs inside the first's
    backbone). Each gives what it gives alone."""
    import threading

    import numpy as np
    import tifffile

    from detector.inference.tiling import touches_edges
    from tests.conftest import shared_path

    he = tifffile.imread(str(shared_path("monuseg", "TCGA-2Z-A9J9-01A-01-TS1.tif")))
    x = torch.from_numpy(np.ascontiguousarray(he[:200, :260, :3])).permute(2, 0, 1).float() / 255

    def cut(boxes, size):
        return touches_edges(boxes, size[1], size[0], (True, True, False, True), 25.0)

    def signature(inst):
        return inst.boxes.tolist(), inst.scores.tolist(), [m.to_json() for m in inst.masks]

    mask_model.eval()
    with torch.no_grad():
        alone_a = mask_model.predict([x], 0.0, drop=[cut])[0]
        alone_b = mask_model.predict([x], 0.02)[0]
    assert len(alone_a) != len(alone_b)  # the two calls differ: the test can fail
    inner = {}

    def call_b():
        with torch.no_grad():
            inner["b"] = mask_model.predict([x], 0.02)[0]

    def in_backbone(mod, inp):
        if not inner:
            inner["started"] = True
            t = threading.Thread(target=call_b)
            t.start()
            t.join()

    hook = mask_model.model.backbone.register_forward_pre_hook(in_backbone)
    try:
        with torch.no_grad():
            a = mask_model.predict([x], 0.0, drop=[cut])[0]
    finally:
        hook.remove()
    assert signature(a) == signature(alone_a)
    assert signature(inner["b"]) == signature(alone_b)
