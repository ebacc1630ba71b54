"""How a model runs on the slide path: numeric precision, memory layout, threads, and
test-time augmentation.

- **bf16 autocast** where the hardware computes in bf16: CUDA, and CPUs with native bf16
  instructions (``avx512_bf16`` or AMX, as torch reports them; elsewhere bf16 is emulated and
  many times slower than fp32, e.g. 70x for a ResNet-18 on an AVX2-only EPYC). ``amp=False``
  (``infer_tiles.py --no-amp``) keeps fp32 everywhere.
- **channels-last** convolutions for the R-CNN backbone on CPU (oneDNN's native layout).
- **threads**: DataLoader workers only read and resample tiles (torch gives each one intra-op
  thread); the model's intra-op threads stay torch's default (one per core). OpenCV's thread
  count is left alone in the workers: changing it in a forked worker after the parent used
  OpenCV's pool deadlocks.
- **test-time augmentation** (``TEST.AUG.ENABLED`` / ``infer_tiles.py --tta``): the model on
  flipped and rotated views of each image, turned back and merged (:func:`predict_tta`).
"""
from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

if TYPE_CHECKING:
    from ..structures.instances import Instances


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as torch sees it; the
    ``/proc/cpuinfo`` flags when torch does not say."""
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, name, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except RuntimeError:
                pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, amp: bool = True) -> Optional[torch.dtype]:
    """The autocast dtype for inference on ``device``: bf16 on CUDA and on CPUs with native
    bf16, None (fp32) otherwise or when ``amp`` is False."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


@contextlib.contextmanager
def autocast(device: torch.device, amp: bool = True) -> Iterator[None]:
    """``torch.autocast`` with :func:`autocast_dtype`, or nothing when that is fp32."""
    dtype = autocast_dtype(device, amp)
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, and channels-last weights for a model that supports it on CPU (the R-CNN:
    ``channels_last`` attribute); returns the model."""
    model.eval()
    dev = next(iter(model.parameters()), torch.empty(0)).device
    if hasattr(model, "channels_last") and dev.type == "cpu" and not model.channels_last:
        model.to(memory_format=torch.channels_last)
        setattr(model, "channels_last", True)  # a plain flag of the R-CNN wrapper
    return model


# ------------------------------------------------------------------------ test-time augmentation
# The dihedral group of the square pixel grid: transform k (0..7) rotates the image by
# 90 degrees (k % 4) times (counter-clockwise, ``torch.rot90`` over (H, W)) and then, for k >= 4,
# mirrors it left-right. Nuclei have no orientation, so every view is as good as the image.
#: TEST.AUG.TRANSFORMS 8: the whole group; 4: the flips (identity, left-right, up-down, both =
#: 180 degrees), which keep the image's height and width.
TTA_TRANSFORMS = {8: (0, 1, 2, 3, 4, 5, 6, 7), 4: (0, 2, 4, 6)}


def tta_transforms(n: int) -> Tuple[int, ...]:
    """The transform ids of ``TEST.AUG.TRANSFORMS`` ``n`` (4 or 8)."""
    if int(n) not in TTA_TRANSFORMS:
        raise ValueError(f"TEST.AUG.TRANSFORMS {n}: use 4 (flips) or 8 (flips and 90-degree "
                         "rotations)")
    return TTA_TRANSFORMS[int(n)]


def transform_image(x: torch.Tensor, k: int) -> torch.Tensor:
    """View ``k`` of a ``(..., H, W)`` tensor (an image or a probability map)."""
    y = torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x
    return torch.flip(y, dims=(-1,)) if k >= 4 else y


def untransform_image(y: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`transform_image`: a ``(..., H', W')`` map of view ``k`` back in the
    image's orientation."""
    if k >= 4:
        y = torch.flip(y, dims=(-1,))
    return torch.rot90(y, -(k % 4), dims=(-2, -1)) if k % 4 else y


def untransform_points(k: int, x: np.ndarray, y: np.ndarray, size: Tuple[int, int]
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """Continuous pixel coordinates (pixel ``i`` spans ``[i, i + 1)``) of view ``k`` of an image
    of ``size`` ``(H, W)`` back in the image's frame."""
    H, W = int(size[0]), int(size[1])
    r = k % 4
    h, w = (H, W) if r % 2 == 0 else (W, H)  # the view's size
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if k >= 4:
        x = w - x
    for _ in range(r):  # undo one counter-clockwise rotation of a (w, h) frame into (h, w)
        x, y = h - y, x
        h, w = w, h
    return x, y


def untransform_instances(inst: "Instances", k: int, size: Tuple[int, int]) -> "Instances":
    """Detections of view ``k`` (in its px) back in the px of the image of ``size``: boxes
    through :func:`untransform_points`, each mask's crop through the array inverse of the view
    (exact: a rotation or mirror of whole pixels)."""
    from ..structures.instances import Instances
    from ..structures.masks import CropMask

    H, W = int(size[0]), int(size[1])
    if k == 0:
        return inst
    b = inst.boxes.astype(np.float64).reshape(-1, 4)
    xa, ya = untransform_points(k, b[:, 0], b[:, 1], (H, W))
    xb, yb = untransform_points(k, b[:, 2], b[:, 3], (H, W))
    boxes = np.stack([np.minimum(xa, xb), np.minimum(ya, yb), np.maximum(xa, xb),
                      np.maximum(ya, yb)], axis=1).astype(np.float32)
    masks = None
    if inst.masks is not None:
        masks = []
        for m in inst.masks:
            if m.is_empty:
                masks.append(CropMask.empty((H, W)))
                continue
            crop = m.crop()
            ch, cw = crop.shape
            x0, y0 = int(m.x0), int(m.y0)
            cx, cy = untransform_points(k, np.array([x0, x0 + cw]), np.array([y0, y0 + ch]),
                                        (H, W))
            back = untransform_image(torch.from_numpy(np.ascontiguousarray(crop)), k).numpy()
            masks.append(CropMask.from_crop(np.ascontiguousarray(back), int(round(cx.min())),
                                            int(round(cy.min())), (H, W)))
    return Instances((H, W), boxes, inst.scores.copy(), inst.labels.copy(), masks)


def merge_views(views: List["Instances"], iou_thresh: float = 0.5) -> "Instances":
    """One set of detections from the same image predicted in ``len(views)`` views (each
    already back in the image's px).

    Greedy by score: the best remaining detection gathers, from each other view, its
    best-overlapping remaining detection of the same class with IoU > ``iou_thresh`` (mask IoU
    when there are masks, else box IoU; :func:`detector.evaluation.matching.iou_pairs`). The
    group becomes one detection: its mask the pixels inside at least half of the group's
    masks (mask voting; the leader's mask if that is empty), its box that mask's (without
    masks: the score-weighted mean box), its score the sum of the group's scores divided by
    the number of views: a nucleus found in every view keeps its mean score, one found in a
    single view of 8 scores an eighth. Sorted by descending score."""
    from ..evaluation.matching import iou_pairs
    from ..structures.instances import Instances
    from ..structures.masks import CropMask

    n_views = len(views)
    if n_views == 0:
        raise ValueError("merge_views: no views")
    size = views[0].image_size
    allv = Instances.cat(views, size)
    if n_views == 1 or len(allv) == 0:
        return allv
    view_of = np.concatenate([np.full(len(v), i, np.int64) for i, v in enumerate(views)])
    rows, cols, ious = iou_pairs(allv.boxes, allv.boxes, allv.masks, allv.masks,
                                 allv.labels, allv.labels)
    ok = (rows != cols) & (view_of[rows] != view_of[cols]) & (ious > iou_thresh)
    rows, cols, ious = rows[ok], cols[ok], ious[ok]
    order = np.argsort(-allv.scores, kind="stable")
    by_row: Dict[int, List[Tuple[float, int]]] = {}
    for a, b, v in zip(rows.tolist(), cols.tolist(), ious.tolist()):
        by_row.setdefault(a, []).append((v, b))
    used = np.zeros(len(allv), bool)
    boxes, scores, labels, masks = [], [], [], []
    for lead in order.tolist():
        if used[lead]:
            continue
        group = [lead]
        taken = {int(view_of[lead])}
        for v, b in sorted(by_row.get(lead, []), reverse=True):
            if not used[b] and int(view_of[b]) not in taken:
                group.append(b)
                taken.add(int(view_of[b]))
        used[group] = True
        sc = allv.scores[group].astype(np.float64)
        scores.append(float(sc.sum()) / n_views)
        labels.append(int(allv.labels[lead]))
        if allv.masks is not None:
            gm = [allv.masks[g] for g in group]
            bx = np.array([m.bbox for m in gm if not m.is_empty], np.float64).reshape(-1, 4)
            if len(bx) == 0:
                masks.append(allv.masks[lead])
                boxes.append(allv.boxes[lead].astype(np.float64))
                continue
            x0, y0 = int(np.floor(bx[:, 0].min())), int(np.floor(bx[:, 1].min()))
            x1, y1 = int(np.ceil(bx[:, 2].max())), int(np.ceil(bx[:, 3].max()))
            votes = np.zeros((y1 - y0, x1 - x0), np.int32)
            for m in gm:
                if m.is_empty:
                    continue
                c = m.crop()
                votes[m.y0 - y0:m.y0 - y0 + c.shape[0], m.x0 - x0:m.x0 - x0 + c.shape[1]] += c
            voted = votes * 2 >= len(group)
            mk = CropMask.from_crop(voted, x0, y0, size) if voted.any() else allv.masks[lead]
            masks.append(mk)
            boxes.append(np.asarray(mk.bbox, np.float64) if not mk.is_empty
                         else allv.boxes[lead].astype(np.float64))
        else:
            w = sc / max(float(sc.sum()), 1e-12)
            boxes.append((allv.boxes[group].astype(np.float64) * w[:, None]).sum(0))
    out = Instances(size, np.asarray(boxes, np.float32).reshape(-1, 4),
                    np.asarray(scores, np.float32), np.asarray(labels, np.int64),
                    masks if allv.masks is not None else None)
    return out[np.argsort(-out.scores, kind="stable")]


def _tile_view_origin(k: int, origin: Tuple[int, int], size: Tuple[int, int]) -> Tuple[int, int]:
    """Origin, in the coordinates of the whole image seen in view ``k``, of view ``k`` of a tile
    of ``size`` ``(h, w)`` at ``origin`` ``(x0, y0)``: every tile of an image gets the view
    coordinates of one global frame, so that a U-Net's pooling grid lines up in all tiles of a
    view as it does without TTA. The frame is the whole image's view shifted by the image's
    height or width, so tiles give the one-piece view's probabilities exactly when these are
    multiples of the pooling grid (``2^(depth-1)`` px)."""
    h, w = int(size[0]), int(size[1])
    probe_x = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    probe_y = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    px, py = transform_image(probe_x, k), transform_image(probe_y, k)
    ax, ay = float(px[0, 1] - px[0, 0]), float(py[0, 1] - py[0, 0])  # view x in image (x, y)
    bx, by = float(px[1, 0] - px[0, 0]), float(py[1, 0] - py[0, 0])  # view y in image (x, y)
    ix = transform_image(torch.arange(w, dtype=torch.float64).expand(h, w), k)[0, 0].item()
    iy = transform_image(torch.arange(h, dtype=torch.float64)[:, None].expand(h, w), k)[0, 0].item()
    gx, gy = origin[0] + ix, origin[1] + iy  # the image px shown at the view's (0, 0)
    # the view frame's coordinate of that pixel's top-left corner: pixel (x, y) spans
    # [x, x + 1) x [y, y + 1) and a mirrored axis turns it into [-x - 1, -x)
    return (int(round(ax * gx + ay * gy + min(ax, 0) + min(ay, 0))),
            int(round(bx * gx + by * gy + min(bx, 0) + min(by, 0))))


@torch.no_grad()
def predict_tta(model: torch.nn.Module, images: List[torch.Tensor], n_transforms: int = 8,
                score_thresh: float = 0.0, tiles: Optional[Sequence[Tuple[int, int, int, int]]] = None,
                cores: Optional[Sequence[Tuple[int, int, int, int]]] = None, context: int = 0
                ) -> List["Instances"]:
    """Test-time augmentation: one :class:`Instances` per ``[3, H, W]`` 0..1 image, from the
    model run on ``n_transforms`` flipped / rotated views (:data:`TTA_TRANSFORMS`).

    - A model that forms instances from probability maps (the U-Net: it has
      ``instances_from_probabilities``): the views' probability maps, turned back, are
      averaged, and the instances are formed once from the mean (the clean way: one watershed,
      no duplicates to reconcile). With ``context`` (slide tiles read with their
      surroundings, ``tiles`` and tile-local ``cores`` as for ``predict_slide_tiles``) each
      view is predicted with the same real context and the instances are kept by core.
    - Instance models (Mask R-CNN, Faster R-CNN, the classical baseline): each view's
      detections are turned back (:func:`untransform_instances`) and merged by
      :func:`merge_views` (mask voting).
    """
    ks = tta_transforms(n_transforms)
    if hasattr(model, "instances_from_probabilities"):
        out = []
        for i, im in enumerate(images):
            acc: Optional[torch.Tensor] = None
            for k in ks:
                view = transform_image(im, k)
                if context:
                    assert tiles is not None
                    t = tiles[i]
                    h, w = int(im.shape[-2]) - 2 * context, int(im.shape[-1]) - 2 * context
                    p = getattr(model, "predict_tile_probabilities")(
                        view, _tile_view_origin(k, (t[0], t[1]), (h, w)), context)
                else:
                    p = getattr(model, "predict_probabilities")(view)
                p = untransform_image(p.float(), k)
                acc = p if acc is None else acc + p
            assert acc is not None
            probs = (acc / len(ks)).cpu().numpy()
            core = cores[i] if (context and cores is not None) else None
            out.append(getattr(model, "instances_from_probabilities")(probs, core=core))
        return out
    predict = getattr(model, "predict", None)
    per_view: List[List["Instances"]] = []
    for k in ks:
        views = [transform_image(im, k) for im in images]
        res = predict(views, score_thresh) if callable(predict) else model(views)
        per_view.append([untransform_instances(r, k, (int(im.shape[-2]), int(im.shape[-1])))
                         for r, im in zip(res, images)])
    return [merge_views([pv[i] for pv in per_view]) for i in range(len(images))]
