"""Cellpose 3.x as a peer in the nuclei benchmark: trained from scratch on our COCO files within a
wall-clock budget, its predictions written as COCO results for ``tools/evaluate.py``.

    pip install -c constraints.txt -e ".[peer]"      (cellpose>=3,<4; a benchmark extra only)
    python benchmarks/bench_cellpose.py train --train D/dsb_train.json D/monuseg_fit.json \
        --out OUT/cellpose --minutes 45 --threads 2 --images-per-epoch 16 --train-weights 1 10
    python benchmarks/bench_cellpose.py predict --model OUT/cellpose/cellpose_model \
        --input D/val.json D/dsb_test.json D/monuseg_test.json --out OUT/pred/cellpose
    python tools/evaluate.py --gt D/dsb_test.json --pred OUT/pred/cellpose/predictions_dsb_test.json

Data. Every image of the COCO files is read with the project's reader (H x W x 3 RGB uint8) and
its instances are painted into a label image (0 background, 1..N the objects; larger objects
first, so where annotations overlap the smaller one stays whole; crowd and box-only annotations
are left out). Cellpose's channel convention: ``channels=[0, 0]`` (segment the grey image, the
mean of R, G and B; no second channel), ``nchan=2``, each image normalised to its 1st-99th
percentiles (``cellpose.transforms.normalize_img``) in training as in ``eval``. The flows are
computed once (``dynamics.labels_to_flows``). Images with fewer than ``--min-train-masks``
objects (Cellpose's default 5) are dropped by Cellpose's training code, which train.json counts.

Training: ``cellpose.train.train_seg`` (Cellpose's own loop: AdamW, lr 0.005 with its warm-up and
final decay, weight decay 1e-5, batches of 8 random 224 px crops, rotation/flip/scale
augmentation) on a ``CellposeModel(pretrained_model=False)``: random weights, nothing
downloaded. ``train_seg`` raises its learning rate from 0 over the first 10 epochs; at 5 s a
step on 2 cores, 45 minutes are about 6 passes over the 520 training images, which would never
leave the warm-up (and epoch 0 trains at learning rate 0). ``--images-per-epoch 16`` (2 steps)
makes epochs short enough for more than 100 of them to fit (about 190 at 6.6 s a step), so that
the warm-up ends early and ``train_seg``'s own final decay (the learning rate halved every 5
epochs over the last 50, from 100 epochs on) runs within the budget, with the same number of
steps; validation-loss passes (``--val``) cost about 10 steps each and are left out of the
reproduction for that reason; ``--train-weights 1 10`` draws each image of the second file 10x
as often, as the project's mixed configs do (``DATASETS.TRAIN_WEIGHTS``). ``train_seg`` runs a fixed
number of epochs, so the number that fits the budget is estimated from the measured time of a
few training steps (on a copy of the network, which is then thrown away; two to five steps,
about 3% of the budget), counting from the start of the command (reading and flows included: a
budget spent on them leaves no training). Below 100 epochs the schedule does not depend on the
epoch count, so 99 are planned and a guard stops the loop at the deadline
(``stopped_by_budget`` in train.json); from 100 on, the epochs that fit are planned; the weights
are saved either way.

Scale. A from-scratch model has no size model, so no diameter estimate per image. The median
diameter of all training objects (``2 sqrt(area / pi)``, Cellpose's definition) is the network's
``diam_mean`` and ``eval`` gets the same diameter, so every image is segmented at its own pixel
size; training therefore uses Cellpose's ``rescale=False`` (crops at their own pixel size, scale
augmentation 0.5-1.5x) to match what ``eval`` then sees. Per-image rescaling to the median
(``rescale=True``) would train on nuclei all of one size that a fixed ``eval`` diameter does not
give back on images of other magnifications.

Prediction: ``CellposeModel.eval`` (flow threshold 0.4, cell probability threshold 0, min size 15
px: Cellpose's defaults; the first two are options) on each image; each object becomes a COCO result with the input file's
image id and (first) category id. Score: the mean cell probability (sigmoid of ``flows[2]``, the
network's cell probability logits) inside the object's mask, so that ``evaluate.py``'s score
sweep and its threshold of best validation F1 apply as to the other models.

Cellpose is imported inside the functions that need it: this module (and its conversion
functions, tested in tests/test_bench_cellpose.py) imports without it.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from detector.data.coco import annotation_to_crop_mask, load_coco  # noqa: E402
from detector.data.image_io import read_image  # noqa: E402
from detector.modeling.watershed import instances_from_label_map  # noqa: E402
from detector.structures.masks import CropMask  # noqa: E402

logger = logging.getLogger("bench_cellpose")

#: Cellpose's channel convention for our RGB images: segment the grey image, no nuclear channel.
CHANNELS = [0, 0]
NCHAN = 2


# ----------------------------------------------------------------------------- conversion
def label_image(anns: Sequence[Dict[str, Any]], height: int, width: int) -> np.ndarray:
    """``(height, width)`` int32 label image of the annotations' masks: 0 background, object
    ``k`` (1..N, in the order of ``anns``) painted as ``k``. Larger objects are painted first so
    that where masks overlap the smaller one stays whole. Crowd annotations, box-only ones and
    empty masks are left out (their numbers are not used)."""
    label = np.zeros((height, width), np.int32)
    masks: List[Tuple[int, CropMask]] = []
    for k, a in enumerate(anns, 1):
        if a.get("iscrowd", 0):
            continue
        m = annotation_to_crop_mask(a, height, width)
        if m is not None and not m.is_empty:
            masks.append((k, m))
    for k, m in sorted(masks, key=lambda km: -km[1].area):
        h, w = m.crop_size
        view = label[m.y0:m.y0 + h, m.x0:m.x0 + w]
        view[m.crop()] = k
    return label


def coco_to_label_images(path: str) -> List[Dict[str, Any]]:
    """Every image of a COCO instance file as ``{"image_id", "file", "image": H x W x 3 RGB
    uint8, "labels": H x W int32 label image (:func:`label_image`)}``, in the file's order."""
    data = load_coco(path)
    by_image: Dict[int, List[Dict[str, Any]]] = {}
    for a in data["annotations"]:
        by_image.setdefault(int(a["image_id"]), []).append(a)
    out = []
    for im in data["images"]:
        file = os.path.join(data["_image_root"], im["file_name"])
        img = read_image(file)
        h, w = img.shape[:2]
        if (int(im["height"]), int(im["width"])) != (h, w):
            raise ValueError(f"{path}: image {im['id']} is {h} x {w} px, the file says "
                             f"{im['height']} x {im['width']}")
        out.append({"image_id": int(im["id"]), "file": file, "image": img,
                    "labels": label_image(by_image.get(int(im["id"]), []), h, w)})
    return out


def object_diameters(labels: np.ndarray) -> np.ndarray:
    """Diameters of the objects of a label image as Cellpose defines them (``utils.diameters``:
    the diameter of the disc of the same area, ``2 sqrt(area / pi)``)."""
    counts = np.bincount(labels.ravel())[1:]
    counts = counts[counts > 0]
    return 2.0 * np.sqrt(counts / np.pi)


def label_to_results(labels: np.ndarray, image_id: int, category_id: int,
                     scores: Optional[np.ndarray] = None) -> List[Dict[str, Any]]:
    """COCO results (``{"image_id", "category_id", "segmentation": RLE with str counts,
    "bbox": XYWH, "score"}``, as ``Instances.to_coco_results`` writes them) of the objects of
    a label image, in label order: the project's own label-image -> Instances step (the
    U-Net's, :func:`~detector.modeling.watershed.instances_from_label_map`). ``scores[k - 1]``
    is the score of label ``k`` (1.0 without ``scores``)."""
    labels = np.asarray(labels)
    n = int(labels.max()) if labels.size else 0
    per_label = np.ones(n + 1) if scores is None else np.r_[0.0, np.asarray(scores, np.float64)]
    return instances_from_label_map(labels, per_label, category_id).to_coco_results(image_id)


def mean_in_labels(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean of ``values`` inside each label ``1..labels.max()`` (0 for an absent label)."""
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return np.zeros(0)
    s = np.bincount(labels.ravel(), weights=values.ravel().astype(np.float64), minlength=n + 1)
    c = np.bincount(labels.ravel(), minlength=n + 1)
    return np.where(c[1:] > 0, s[1:] / np.maximum(c[1:], 1), 0.0)


def category_of(path: str) -> int:
    """The category id that predictions on a COCO file get: its (lowest) category id."""
    cats = sorted(int(c["id"]) for c in load_coco(path)["categories"])
    if not cats:
        raise ValueError(f"{path}: no categories")
    if len(cats) > 1:
        logger.warning("%s has %d categories; Cellpose's objects get the first, %d",
                       path, len(cats), cats[0])
    return cats[0]


def predictions_path(out_dir: str, input_path: str) -> str:
    """``out_dir/predictions_<stem>.json``, as train_net.py --eval-only names them."""
    stem = os.path.splitext(os.path.basename(input_path))[0]
    return os.path.join(out_dir, f"predictions_{stem}.json")


# ----------------------------------------------------------------------------- cellpose
def cellpose_input(img: np.ndarray) -> np.ndarray:
    """What Cellpose's ``eval`` makes of an RGB image with ``channels=[0, 0]``: the grey image
    and a zero channel, normalised to the 1st-99th percentiles, as ``(2, H, W)`` float32."""
    from cellpose import transforms
    x = transforms.convert_image(img, CHANNELS, channel_axis=-1, nchan=NCHAN)
    x = transforms.normalize_img(x, axis=-1)
    return np.ascontiguousarray(x.transpose(2, 0, 1), np.float32)


def _load_sets(paths: Sequence[str]) -> Tuple[List[np.ndarray], List[np.ndarray], List[int]]:
    """Cellpose inputs and label images of every image of ``paths``, and how many each file gave
    (for the per-file draw weights)."""
    imgs, labels, per_file = [], [], []
    for p in paths:
        recs = coco_to_label_images(p)
        logger.info("%s: %d images", p, len(recs))
        for r in recs:
            imgs.append(cellpose_input(r["image"]))
            labels.append(r["labels"])
        per_file.append(len(recs))
    return imgs, labels, per_file


def _time_steps(net: Any, data: List[np.ndarray], flows: List[np.ndarray], batch_size: int,
                lr: float, weight_decay: float, until: float, steps: int = 4) -> float:
    """Seconds of one training step of ``train_seg`` (augmentation, forward, loss, backward,
    AdamW step), the median of up to ``steps`` timed after one untimed step (fewer once the
    clock passes ``until``; at least one), on a copy of ``net``."""
    import torch
    from cellpose import train, transforms
    net = copy.deepcopy(net)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(0)
    times = []
    for i in range(steps + 1):
        t0 = time.time()
        inds = rng.choice(len(data), size=min(batch_size, len(data)), replace=False)
        imgi, lbl = transforms.random_rotate_and_resize(
            [data[j] for j in inds], Y=[flows[j][1:] for j in inds],
            rescale=np.ones(len(inds), np.float32), scale_range=1.0, xy=(224, 224))[:2]
        y = net(torch.from_numpy(imgi).to(net.device))[0]
        loss = train._loss_fn_seg(lbl, y, net.device)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.time() - t0)
            if time.time() > until:
                break
    return float(np.median(times))


def epochs_that_fit(left: float, epoch_s: float, step_s: float, n_val_batches: int) -> int:
    """Epochs of ``train_seg`` that fit in ``left`` seconds (95% of it), counting its
    validation loss at epochs 0, 5, 10, 20, ... (one forward per validation batch, taken as a
    step); at least 1."""
    n_epochs = 1
    if not left > 0 or not epoch_s > 0:
        return n_epochs
    while True:
        n = n_epochs + 1
        evals = sum(1 for e in range(n) if e == 5 or e % 10 == 0) if n_val_batches else 0
        if n * epoch_s + evals * n_val_batches * step_s > 0.95 * left:
            return n_epochs
        n_epochs = n


def planned_epochs(fits: int) -> int:
    """The ``n_epochs`` handed to ``train_seg``. Its learning-rate schedule is the same for every
    n_epochs below 100 (a 10-epoch warm-up, then the constant rate; the halvings at the end
    begin at 100 epochs), so an estimate under 100 plans 99 and the deadline guard ends the
    loop: a pessimistic step time no longer leaves budget unused (the first 45-min run stopped
    after 32 min). From 100 epochs on the end of the schedule depends on n_epochs: the estimate
    is kept."""
    return 99 if fits < 100 else fits


def draw_probabilities(images_per_file: Sequence[int],
                       weights: Optional[Sequence[float]]) -> Optional[np.ndarray]:
    """Per-image draw probabilities for ``train_seg``'s ``train_probs``: every image of the
    i-th training file weighs ``weights[i]`` (the meaning of the project's
    ``DATASETS.TRAIN_WEIGHTS``: [1, 10] draws each MoNuSeg tile 10x as often as a DSB image).
    None without weights (Cellpose's uniform draw)."""
    if not weights:
        return None
    if len(weights) != len(images_per_file):
        raise SystemExit(f"--train-weights: {len(weights)} weights for "
                         f"{len(images_per_file)} --train files; give one per file")
    if min(weights) <= 0:
        raise SystemExit("--train-weights: every weight must be > 0")
    w = np.concatenate([np.full(n, float(x)) for n, x in zip(images_per_file, weights)])
    return w / w.sum()


class _BudgetSpent(Exception):
    pass


def train(args: argparse.Namespace) -> Dict[str, Any]:
    start = time.time()
    deadline = start + 60.0 * args.minutes
    import torch
    torch.set_num_threads(args.threads)
    from cellpose import dynamics, models
    from cellpose import train as cp_train
    version = _cellpose_version()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cpu")

    train_imgs, train_labels, per_file = _load_sets(args.train)
    probs = draw_probabilities(per_file, args.train_weights)
    if probs is not None and not args.images_per_epoch:
        raise SystemExit("--train-weights needs --images-per-epoch (train_seg draws by weight "
                         "only when an epoch is not one pass over every image)")
    val_imgs, val_labels, _ = _load_sets(args.val) if args.val else ([], [], [])
    diams = np.concatenate([object_diameters(lb) for lb in train_labels] or [np.zeros(0)])
    if diams.size == 0:
        raise SystemExit("no objects in the training files")
    diameter = float(np.median(diams))
    logger.info("%d training images, %d objects, median diameter %.1f px", len(train_imgs),
                diams.size, diameter)
    n_masks = np.asarray([len(np.unique(lb)) - 1 for lb in train_labels])
    n_used = int((n_masks >= args.min_train_masks).sum())
    train_flows = dynamics.labels_to_flows(train_labels, device=device)
    val_flows = dynamics.labels_to_flows(val_labels, device=device) if val_labels else None
    t_data = time.time() - start

    model = models.CellposeModel(gpu=False, pretrained_model=False, diam_mean=diameter,
                                 nchan=NCHAN, device=device)
    net = model.net
    images_per_epoch = args.images_per_epoch or n_used
    steps_per_epoch = math.ceil(images_per_epoch / args.batch_size)
    n_val_batches = math.ceil(len(val_imgs) / args.batch_size)
    left = deadline - time.time()
    if left > 0:  # timing steps costs at most ~3% of what is left (and at least 2 steps)
        keep = np.flatnonzero(n_masks >= args.min_train_masks)
        step_s = _time_steps(net, [train_imgs[i] for i in keep], [train_flows[i] for i in keep],
                             args.batch_size, args.lr, args.weight_decay,
                             until=time.time() + 0.03 * left)
    else:
        step_s = float("nan")
        logger.warning("the budget was spent reading the data; no training")
    epoch_s = step_s * steps_per_epoch
    left = deadline - time.time()
    fits = epochs_that_fit(left, epoch_s, step_s, n_val_batches)
    n_epochs = planned_epochs(fits)
    logger.info("one step %.2f s, %d steps per epoch: about %.0f s per epoch; %.0f s left -> "
                "%d epochs fit, %d planned (the deadline stops the loop)", step_s,
                steps_per_epoch, epoch_s, left, fits, n_epochs)

    state = {"batches": 0, "stopped": False}

    def guard(module, inputs):
        if module.training:
            if time.time() > deadline:
                raise _BudgetSpent()
            state["batches"] += 1

    losses: List[str] = []

    class _Losses(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if "train_loss" in msg:
                losses.append(msg)

    cp_logger = logging.getLogger(cp_train.__name__)
    handler = _Losses()
    cp_logger.addHandler(handler)
    hook = net.register_forward_pre_hook(guard)
    work = os.path.join(args.out, "cellpose_work")  # train_seg's own saves (none: save_every)
    os.makedirs(work, exist_ok=True)
    t_train = time.time()
    try:
        cp_train.train_seg(
            net, train_data=train_imgs, train_labels=train_flows,
            test_data=val_imgs or None, test_labels=val_flows,
            normalize={"normalize": False},  # normalised above, as eval normalises
            batch_size=args.batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
            n_epochs=n_epochs, rescale=False, min_train_masks=args.min_train_masks,
            train_probs=probs, nimg_per_epoch=args.images_per_epoch,
            save_path=work, save_every=10 ** 9, model_name="cellpose_model")
    except _BudgetSpent:
        state["stopped"] = True
        logger.warning("budget spent after %d batches; saving the weights as they are",
                       state["batches"])
    finally:
        hook.remove()
        cp_logger.removeHandler(handler)
    t_train = time.time() - t_train
    model_path = os.path.join(args.out, "cellpose_model")
    net.save_model(model_path)
    shutil.rmtree(work, ignore_errors=True)
    seconds = time.time() - start
    info = {
        "cellpose_version": version,
        "train": [os.path.abspath(p) for p in args.train],
        "val": [os.path.abspath(p) for p in args.val or []],
        "images": len(train_imgs), "images_used": n_used,
        "min_train_masks": args.min_train_masks, "objects": int(diams.size),
        "val_images": len(val_imgs),
        "median_diameter": diameter,
        "epochs_planned": n_epochs,
        "epochs_completed": state["batches"] // max(1, steps_per_epoch),
        "batches": state["batches"], "steps_per_epoch": steps_per_epoch,
        "images_per_epoch": images_per_epoch,
        "train_weights": list(args.train_weights) if args.train_weights else None,
        "step_seconds_measured": None if math.isnan(step_s) else step_s,
        "epoch_seconds_estimated": None if math.isnan(epoch_s) else epoch_s,
        "epoch_seconds": (t_train * steps_per_epoch / state["batches"]) if state["batches"]
        else None,
        "stopped_by_budget": state["stopped"],
        "seconds": seconds, "seconds_data": t_data, "seconds_training": t_train,
        "budget_minutes": args.minutes, "threads": args.threads,
        "batch_size": args.batch_size, "learning_rate": args.lr,
        "weight_decay": args.weight_decay, "channels": CHANNELS, "nchan": NCHAN,
        "rescale": False, "pretrained_model": None,
        "log": losses,
    }
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump(info, f, indent=1)
    logger.info("wrote %s and train.json: %d epochs in %.0f s (%.0f s in all)", model_path,
                info["epochs_completed"], t_train, seconds)
    return info


def _cellpose_version() -> str:
    from importlib.metadata import version
    return version("cellpose")


def predict(args: argparse.Namespace) -> List[str]:
    import torch
    torch.set_num_threads(args.threads)
    from cellpose import models
    diameter = args.diameter
    if diameter is None:
        with open(os.path.join(os.path.dirname(os.path.abspath(args.model)), "train.json")) as f:
            diameter = float(json.load(f)["median_diameter"])
    model = models.CellposeModel(gpu=False, pretrained_model=args.model, nchan=NCHAN,
                                 device=torch.device("cpu"))
    os.makedirs(args.out, exist_ok=True)
    written = []
    for path in args.input:
        data = load_coco(path)
        cat = category_of(path)
        results: List[Dict[str, Any]] = []
        t0 = time.time()
        for im in data["images"]:
            img = read_image(os.path.join(data["_image_root"], im["file_name"]))
            masks, flows, _ = model.eval(img, channels=CHANNELS, channel_axis=-1,
                                         diameter=diameter, normalize=True,
                                         cellprob_threshold=args.cellprob_threshold,
                                         flow_threshold=args.flow_threshold)
            masks = np.asarray(masks)
            prob = 1.0 / (1.0 + np.exp(-np.asarray(flows[2], np.float64)))
            if prob.shape != masks.shape:  # not expected with resample=True
                import cv2
                prob = cv2.resize(prob, masks.shape[::-1], interpolation=cv2.INTER_LINEAR)
            results.extend(label_to_results(masks, im["id"], cat, mean_in_labels(prob, masks)))
        out = predictions_path(args.out, path)
        with open(out, "w") as f:
            json.dump(results, f)
        logger.info("%s: %d objects on %d images in %.0f s -> %s", path, len(results),
                    len(data["images"]), time.time() - t0, out)
        written.append(out)
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train Cellpose from scratch within a time budget")
    t.add_argument("--train", nargs="+", required=True, help="COCO instance files")
    t.add_argument("--val", nargs="*", default=[], help="COCO files for train_seg's test loss")
    t.add_argument("--out", required=True, help="writes OUT/cellpose_model and OUT/train.json")
    t.add_argument("--minutes", type=float, default=45.0,
                   help="wall-clock budget of the whole command (default 45)")
    t.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    t.add_argument("--batch-size", type=int, default=8, help="train_seg default 8")
    t.add_argument("--lr", type=float, default=0.005, help="train_seg default 0.005 (AdamW)")
    t.add_argument("--weight-decay", type=float, default=1e-5, help="train_seg default 1e-5")
    t.add_argument("--train-weights", nargs="+", type=float, default=None,
                   help="draw weight of each --train file's images (as DATASETS.TRAIN_WEIGHTS; "
                        "default: uniform, Cellpose's draw); needs --images-per-epoch")
    t.add_argument("--images-per-epoch", type=int, default=None,
                   help="images drawn per epoch (train_seg's nimg_per_epoch; default: all). "
                        "train_seg warms its learning rate up over the first 10 epochs: on a "
                        "CPU budget of a few hundred steps full epochs never finish the warm-up")
    t.add_argument("--min-train-masks", type=int, default=5,
                   help="images with fewer objects are not trained on (train_seg default 5)")
    q = sub.add_parser("predict", help="COCO results of a trained model on COCO files' images")
    q.add_argument("--model", required=True, help="DIR/cellpose_model of `train`")
    q.add_argument("--input", nargs="+", required=True, help="COCO files (their images)")
    q.add_argument("--out", required=True, help="writes OUT/predictions_<stem>.json")
    q.add_argument("--diameter", type=float, default=None,
                   help="object diameter in px passed to eval (default: train.json's "
                   "median_diameter beside the model)")
    q.add_argument("--cellprob-threshold", type=float, default=0.0,
                   help="eval's cell probability logit threshold (Cellpose's default 0)")
    q.add_argument("--flow-threshold", type=float, default=0.4,
                   help="eval's flow error threshold (Cellpose's default 0.4)")
    q.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.cmd == "train":
        train(args)
    else:
        predict(args)


if __name__ == "__main__":
    main()
