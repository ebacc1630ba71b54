"""U-Net targets (3-class maps, the paper's weight map) and the watershed back to instances."""
import glob
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from detector.config.config import get_cfg
from detector.data.image_io import read_array
from detector.data.unet_targets import (
    BACKGROUND,
    BOUNDARY,
    INTERIOR,
    CLASS_WEIGHT_MAX,
    UNetTargets,
    class_weights,
    labels_from_masks,
    three_class_map,
    weight_map,
    weight_map_naive,
)
from detector.modeling.watershed import (
    instances_from_probabilities,
    label_map_from_probabilities,
    probabilities_from_classes,
)
from detector.structures import CropMask
from tests.conftest import shared_path

# DSB2018 stage1_train images with many touching nuclei (found by scanning for masks that
# touch after a 3x3 dilation): 70, 117 and 95 nuclei.
TOUCHING_DSB = [
    "00ae65c1c6631ae6f2be1a449902976e6eb8483bf6b0740d00530220832c6d3e",
    "2dd3356f2dcf470aec4003800744dfec6490e75d88011e1d835f4f3d60f88e7a",
    "1b44d22643830cd4f23c9deadb0bd499fb392fb2cd9526d81547d93077d983df",
]


def dsb_masks(image_id: str) -> np.ndarray:
    folder = shared_path("dsb2018", "stage1_train", image_id, "masks")
    masks = [read_array(p) for p in sorted(glob.glob(os.path.join(str(folder), "*.png")))]
    return np.stack([(m[..., 0] if m.ndim == 3 else m) > 0 for m in masks]).astype(np.uint8)


def touching_pairs(labels: np.ndarray) -> int:
    """Number of distinct pairs of nuclei whose pixels are 4-neighbours."""
    pairs = set()
    for a, b in ((labels[1:, :], labels[:-1, :]), (labels[:, 1:], labels[:, :-1])):
        sel = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(sorted(p)) for p in zip(a[sel].tolist(), b[sel].tolist())}
    return len(pairs)


def two_touching_squares() -> np.ndarray:
    lab = np.zeros((40, 60), np.int32)
    lab[10:30, 10:30] = 1
    lab[10:30, 30:50] = 2  # shares the column boundary x = 29 | 30 with nucleus 1
    return lab


# ------------------------------------------------------------------------- 3-class map
def test_three_class_map_draws_boundary_between_touching_nuclei():
    lab = two_touching_squares()
    cls = three_class_map(lab, boundary_width=2)
    assert cls[0, 0] == BACKGROUND and cls[20, 20] == INTERIOR and cls[20, 40] == INTERIOR
    # a 2 px band inside each nucleus along its outline and along the shared edge
    assert (cls[20, 28:32] == BOUNDARY).all()
    assert cls[20, 27] == INTERIOR and cls[20, 32] == INTERIOR
    assert (cls[10:12, 15] == BOUNDARY).all() and cls[12, 15] == INTERIOR
    # the two interiors are separate components (the seeds of the watershed)
    from scipy import ndimage as ndi
    assert ndi.label(cls == INTERIOR)[1] == 2
    # wider boundary: wider band
    cls4 = three_class_map(lab, boundary_width=4)
    assert (cls4[20, 26:34] == BOUNDARY).all() and cls4[20, 25] == INTERIOR


def test_contact_map_marks_only_where_nuclei_touch():
    """MODEL.UNET.TARGET contact: class 2 only along the shared edge (and across a gap narrower
    than the width); an isolated nucleus is all class 1; seeds stay apart."""
    from scipy import ndimage as ndi

    lab = two_touching_squares()
    lab[2:8, 50:56] = 3  # isolated
    cls = three_class_map(lab, boundary_width=2, target="contact")
    assert (cls[20, 28:32] == BOUNDARY).all() and cls[20, 27] == INTERIOR
    assert cls[10, 15] == INTERIOR and cls[29, 15] == INTERIOR  # outer rims are not contact
    assert (cls[lab == 3] == INTERIOR).all() and (cls[lab == 0] == BACKGROUND).all()
    assert ndi.label(cls == INTERIOR)[1] == 3
    # a 1 px gap between two nuclei is still a contact at width 2, not at width 1
    gap = np.zeros((20, 30), np.int32)
    gap[5:15, 2:14], gap[5:15, 15:28] = 1, 2
    assert three_class_map(gap, 2, "contact")[10, 13] == BOUNDARY
    assert three_class_map(gap, 1, "contact")[10, 13] == INTERIOR
    # a nucleus squeezed to nothing but contact keeps all its pixels as its seed
    thin = np.zeros((20, 20), np.int32)
    thin[5:15, 2:9], thin[5:15, 9:11], thin[5:15, 11:18] = 1, 2, 3
    assert (three_class_map(thin, 2, "contact")[thin == 2] == INTERIOR).all()
    with pytest.raises(ValueError, match="contact"):
        three_class_map(lab, 2, "edges")


def test_three_class_map_keeps_a_seed_in_tiny_nuclei():
    lab = np.zeros((20, 20), np.int32)
    lab[5:8, 5:8] = 1  # 3x3 nucleus: no pixel is 2 px from its outline
    lab[12, 12] = 2  # single pixel
    cls = three_class_map(lab, boundary_width=2)
    assert cls[6, 6] == INTERIOR
    assert cls[12, 12] == INTERIOR
    assert (cls[lab == 0] == BACKGROUND).all()


def test_labels_from_masks_with_and_without_boxes():
    masks = np.zeros((2, 30, 30), np.uint8)
    masks[0, 2:10, 3:12] = 1
    masks[1, 15:25, 15:28] = 1
    boxes = np.array([[3, 2, 12, 10], [15, 15, 28, 25]], np.float32)
    a = labels_from_masks(masks, boxes)
    b = labels_from_masks(masks)
    assert (a == b).all()
    assert a[5, 5] == 1 and a[20, 20] == 2 and a[0, 0] == 0
    with pytest.raises(ValueError, match="N, H, W"):
        labels_from_masks(masks[0])


# -------------------------------------------------------------------------- weight map
def test_weight_map_matches_paper_formula_in_gap_between_nuclei():
    lab = np.zeros((40, 60), np.int32)
    lab[10:30, 10:28] = 1
    lab[10:30, 31:50] = 2  # 3 px gap (x = 28, 29, 30)
    cls = three_class_map(lab, 2)
    w = weight_map(lab, cls, w0=10.0, sigma=5.0)
    wc = class_weights(cls)
    # pixel x = 29: d1 = 2 (to x=27), d2 = 2 (to x=31)
    expected = wc[BACKGROUND] + 10.0 * np.exp(-(2 + 2) ** 2 / (2 * 25.0))
    assert w[20, 29] == pytest.approx(expected, rel=1e-5)
    # far from nuclei only the class weight remains; inside nuclei too
    assert w[0, 0] == pytest.approx(wc[BACKGROUND], abs=1e-3)
    assert w[20, 20] == pytest.approx(wc[INTERIOR])
    # gap pixels weigh far more than open background
    assert w[20, 29] > 5 * w[0, 0]


def test_class_weights_balance_frequencies_and_are_clipped():
    cls = np.zeros((100, 100), np.uint8)
    cls[:50] = INTERIOR
    cls[:10] = BOUNDARY
    wc = class_weights(cls)
    counts = np.bincount(cls.ravel(), minlength=3)
    # each class contributes the same total weight
    totals = wc * counts
    assert np.allclose(totals, totals[0], rtol=1e-5)
    rare = np.zeros((100, 100), np.uint8)
    rare[0, 0] = BOUNDARY
    wr = class_weights(rare)
    assert wr[BOUNDARY] == pytest.approx(CLASS_WEIGHT_MAX * wr[BACKGROUND])
    assert (class_weights(np.zeros((5, 5), np.uint8)) == 1).all()


def test_fast_weight_map_equals_full_image_reference_on_real_dsb():
    masks = dsb_masks(TOUCHING_DSB[0])
    lab = labels_from_masks(masks)
    cls = three_class_map(lab, 2)
    fast = weight_map(lab, cls, 10.0, 5.0)
    ref = weight_map_naive(lab, cls, 10.0, 5.0)
    assert fast.shape == lab.shape and fast.dtype == np.float32
    assert np.abs(fast - ref).max() < 1e-3
    assert ref.max() > 5.0  # the separation term is present on this crowded image


# ------------------------------------------------------- GT -> 3-class -> watershed round trip
@pytest.mark.parametrize("image_id,target", [(i, "boundary") for i in TOUCHING_DSB]
                         + [(TOUCHING_DSB[0], "contact")])
def test_touching_nuclei_are_separated_by_the_watershed_on_real_dsb(image_id, target):
    masks = dsb_masks(image_id)
    lab = labels_from_masks(masks)
    assert touching_pairs(lab) >= 10, "the test image must have touching nuclei"
    cls = three_class_map(lab, boundary_width=2, target=target)
    inst = instances_from_probabilities(probabilities_from_classes(cls), category_id=7,
                                        min_size=1, seed_thresh=0.5, smooth_sigma=0.0)
    gt = [mask_utils.encode(np.asfortranarray(m)) for m in masks]
    iou = mask_utils.iou([m.to_coco_rle() for m in inst.masks], gt, [0] * len(gt))
    rows, cols = linear_sum_assignment(-iou)
    recovered = int((iou[rows, cols] >= 0.5).sum())
    assert recovered >= 0.95 * len(gt), f"{recovered} of {len(gt)} nuclei recovered"
    # the prediction structure Mask R-CNN gives
    assert inst.image_size == lab.shape
    assert (inst.labels == 7).all()
    assert all(tuple(m.image_size) == lab.shape for m in inst.masks)
    # boxes are the masks' boxes (pixel edges)
    bb = mask_utils.toBbox([m.to_coco_rle() for m in inst.masks])
    assert np.allclose(inst.boxes[:, :2], bb[:, :2]) and np.allclose(
        inst.boxes[:, 2:], bb[:, :2] + bb[:, 2:])


def test_merging_touching_nuclei_without_boundary_class_fails():
    """Control: without the boundary between touching nuclei they merge (the test above
    measures something)."""
    masks = dsb_masks(TOUCHING_DSB[0])
    lab = labels_from_masks(masks)
    cls = np.where(lab > 0, INTERIOR, BACKGROUND).astype(np.uint8)
    labels, _ = label_map_from_probabilities(probabilities_from_classes(cls), min_size=1,
                                           seed_thresh=0.5, smooth_sigma=0.0)
    assert labels.max() < 0.95 * len(masks)


# ----------------------------------------------------------------------------- watershed
def test_watershed_seeds_scores_small_objects_and_seedless_components():
    probs = np.zeros((3, 50, 50), np.float32)
    probs[0] = 1.0
    # nucleus A: interior 0.9 core with a boundary ring
    probs[:, 5:20, 5:20] = np.array([0.0, 0.1, 0.9])[:, None, None]
    probs[:, 8:17, 8:17] = np.array([0.05, 0.9, 0.05])[:, None, None]
    # a foreground blob with no seed (boundary only), 36 px
    probs[:, 30:36, 30:36] = np.array([0.2, 0.3, 0.5])[:, None, None]
    # a tiny seeded speck, 4 px
    probs[:, 45:47, 45:47] = np.array([0.0, 1.0, 0.0])[:, None, None]
    inst = instances_from_probabilities(probs, category_id=3, min_size=10, seed_thresh=0.5,
                                        smooth_sigma=0.0)
    assert len(inst) == 2
    order = np.argsort(inst.boxes[:, 0])
    a, b = inst[order[0]], inst[order[1]]
    assert a.boxes[0].tolist() == [5, 5, 20, 20]
    assert mask_utils.area(a.masks[0].to_coco_rle()) == 15 * 15  # grown back over the boundary ring
    assert a.scores[0] == pytest.approx(0.9)  # mean interior probability over the seed
    assert b.boxes[0].tolist() == [30, 30, 36, 36]
    assert b.scores[0] == pytest.approx(0.5 * 0.8)  # seedless: half the foreground prob.
    assert (inst.labels == 3).all()
    empty = instances_from_probabilities(np.stack([np.ones((8, 9)), np.zeros((8, 9)),
                                                   np.zeros((8, 9))]))
    assert len(empty) == 0 and empty.image_size == (8, 9) and empty.masks == []
    with pytest.raises(ValueError, match="3, H, W"):
        instances_from_probabilities(np.zeros((2, 5, 5)))


def test_smoothing_joins_seed_fragments_of_one_nucleus():
    probs = np.zeros((3, 40, 40), np.float32)
    probs[0] = 1.0
    probs[:, 10:30, 10:30] = np.array([0.0, 0.8, 0.2])[:, None, None]
    # a one-pixel line of noisy, boundary-like output across the nucleus
    probs[:, 19, 10:30] = np.array([0.0, 0.45, 0.55])[:, None]
    split = instances_from_probabilities(probs, seed_thresh=0.3, min_size=5, smooth_sigma=0.0)
    joined = instances_from_probabilities(probs, seed_thresh=0.3, min_size=5, smooth_sigma=1.0)
    assert len(split) == 2
    assert len(joined) == 1 and joined.boxes[0].tolist() == [10, 10, 30, 30]


def test_crop_mask_from_crop_equals_pycocotools_encode():
    rng = np.random.default_rng(0)
    full = np.zeros((37, 41), np.uint8)
    full[5:20, 7:30] = rng.random((15, 23)) > 0.4
    full[5, 29] = 1
    rle = CropMask.from_crop(full[5:20, 7:30], 7, 5, (37, 41)).to_coco_rle()
    assert (mask_utils.decode(rle) == full).all()
    assert rle["counts"] == mask_utils.encode(np.asfortranarray(full))["counts"]
    empty = CropMask.from_crop(np.zeros((3, 3), bool), 0, 0, (5, 6)).to_coco_rle()
    assert mask_utils.area(empty) == 0


# ------------------------------------------------------------------------- UNetTargets
def test_unet_targets_callable_adds_maps_and_scales_with_mpp():
    cfg = get_cfg(None, ["INPUT.MPP", "0.5", "MODEL.UNET.BOUNDARY_WIDTH", "2"])
    lab = two_touching_squares()
    masks = torch.from_numpy(np.stack([(lab == 1), (lab == 2)]).astype(np.uint8))
    boxes = torch.tensor([[10, 10, 30, 30], [30, 10, 50, 30]], dtype=torch.float32)
    image = torch.rand(3, 40, 60)
    fn = UNetTargets(cfg)
    out = fn(image, {"masks": masks, "boxes": boxes, "labels": torch.ones(2), "image_id": 4})
    assert out["image_id"] == 4 and out["unet_target"].dtype == torch.int64
    assert out["unet_weight"].dtype == torch.float32
    assert out["unet_target"].shape == out["unet_weight"].shape == (40, 60)
    assert (out["unet_target"].numpy() == three_class_map(lab, 2)).all()
    # an image at 0.25 um/px (twice the training resolution): boundary 4 px, sigma 10 px
    fine = fn(image, {"masks": masks, "boxes": boxes, "mpp": 0.25})
    assert (fine["unet_target"].numpy() == three_class_map(lab, 4)).all()
    cls4 = three_class_map(lab, 4)
    assert np.allclose(fine["unet_weight"].numpy(), weight_map(lab, cls4, 10.0, 10.0))
    # no nuclei in the crop: all background, weight 1
    none = fn(image, {"masks": torch.zeros((0, 40, 60), dtype=torch.uint8),
                      "boxes": torch.zeros((0, 4))})
    assert (none["unet_target"] == 0).all() and (none["unet_weight"] == 1).all()
    with pytest.raises(ValueError, match="no 'masks'"):
        fn(image, {"boxes": boxes})
