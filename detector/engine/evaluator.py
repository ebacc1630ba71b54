"""Periodic and ``--eval-only`` evaluation: run a model over each ``DATASETS.TEST`` COCO file
(full images, one at a time, eval mode, no gradients) and score it with
:func:`detector.evaluation.evaluate_coco` (COCO AP and object-level precision/recall/F1)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

import torch
from torch import nn
from tqdm import tqdm

from ..data.coco import load_coco
from ..data.dataset import CocoInstanceDataset
from ..data.image_io import read_image
from ..data.patches import CocoPatchDataset
from ..evaluation.classification import classification_metrics
from ..inference.predictor import predict_tta
from ..inference.second_stage import SecondStage, predict_two_stage
from ..inference.size import model_nucleus_diameter, predict_normalised
from ..structures.instances import Instances
from ..evaluation import evaluate_coco

logger = logging.getLogger(__name__)


def dataset_name(path: str) -> str:
    """Short name of a COCO file for logs and output files: its file stem."""
    return os.path.splitext(os.path.basename(path))[0]


def predict_dataset_two_stage(model: nn.Module, second: SecondStage, dataset: CocoInstanceDataset,
                              keep_phases: bool, det_label: int = 1, progress: bool = True
                              ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """COCO results of a two-stage bundle on every image of ``dataset``: the detector's
    candidates scored by stage 2 (labels: the classifier's classes when ``keep_phases``, else
    the detector's class ``det_label``), and the same candidates with the detector's own
    scores."""
    final: List[Dict[str, Any]] = []
    stage1: List[Dict[str, Any]] = []
    for rec in tqdm(dataset.records, desc=f"eval {dataset_name(dataset.paths[0])}",
                    disable=not progress, leave=False):
        inst, det_scores = predict_two_stage(model, second, read_image(rec["file"]))
        one = Instances(inst.image_size, inst.boxes, det_scores,
                        np.full(len(inst), det_label, np.int64), inst.masks)
        if not keep_phases:
            inst = Instances(inst.image_size, inst.boxes, inst.scores, one.labels, inst.masks)
        final.extend(inst.to_coco_results(rec["image_id"]))
        stage1.extend(one.to_coco_results(rec["image_id"]))
    return final, stage1


@torch.no_grad()
def predict_dataset(model: nn.Module, dataset: CocoInstanceDataset, device: torch.device,
                    autocast: Optional[Any] = None, progress: bool = True,
                    tta: int = 0) -> List[Dict[str, Any]]:
    """COCO results (``Instances.to_coco_results``) of ``model`` on every image of ``dataset``;
    with ``tta`` (4 or 8: ``TEST.AUG``), test-time augmented
    (:func:`detector.inference.predictor.predict_tta`)."""
    model = model.module if hasattr(model, "module") else model
    was_training = model.training
    model.eval()
    results: List[Dict[str, Any]] = []
    canonical = model_nucleus_diameter(model)  # size normalisation: a scale per image
    one = (lambda x: predict_tta(model, [x], tta)[0]) if tta else (lambda x: model([x])[0])
    try:
        for rec in tqdm(dataset.records, desc=f"eval {dataset_name(dataset.paths[0])}",
                        disable=not progress, leave=False):
            img = torch.from_numpy(read_image(rec["file"]).copy()).permute(2, 0, 1)
            img = img.to(device, non_blocking=True).float().div_(255.0)
            with (autocast() if autocast is not None else contextlib.nullcontext()):
                if canonical > 0:  # size normalisation: the scale from a first pass
                    inst, _ = predict_normalised(one, img, canonical)
                else:
                    inst = one(img)
            results.extend(inst.to_coco_results(rec["image_id"]))
    finally:
        model.train(was_training)
    return results


@torch.no_grad()
def predict_patches(model: nn.Module, dataset: CocoPatchDataset, device: torch.device,
                    autocast: Optional[Any] = None, batch_size: int = 64,
                    progress: bool = True) -> torch.Tensor:
    """``[N, K + 1]`` class probabilities of the patch classifier on every item of ``dataset``."""
    model = model.module if hasattr(model, "module") else model
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in tqdm(range(0, len(dataset), batch_size), disable=not progress, leave=False,
                          desc=f"eval {dataset_name(dataset.paths[0])}"):
            batch = torch.stack([dataset[i][0] for i in
                                 range(start, min(start + batch_size, len(dataset)))])
            with (autocast() if autocast is not None else contextlib.nullcontext()):
                out.append(model(batch.to(device)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, len(dataset.classes) + 1))


def evaluate_datasets(model: nn.Module, cfg: Any, datasets: List[CocoInstanceDataset],
                      device: torch.device, output_dir: Optional[str] = None,
                      iteration: Optional[int] = None, write_predictions: bool = False,
                      autocast: Optional[Any] = None) -> Dict[str, Dict[str, float]]:
    """Metrics per test set (keyed by file stem). Writes ``eval_<iteration>.json`` (and
    ``predictions_<stem>.json`` with ``write_predictions``) into ``output_dir``."""
    all_metrics: Dict[str, Dict[str, float]] = {}
    with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training RNG
        for ds in datasets:
            name = dataset_name(ds.paths[0])
            if isinstance(ds, CocoPatchDataset):
                probs = predict_patches(model, ds, device, autocast)
                m = classification_metrics(ds.labels(), probs.numpy(), ds.label_names)
                all_metrics[name] = m
                if write_predictions and output_dir:
                    os.makedirs(output_dir, exist_ok=True)
                    with open(os.path.join(output_dir, f"patch_probs_{name}.json"), "w") as f:
                        json.dump({"labels": ds.labels().tolist(), "names": ds.label_names,
                                   "probs": probs.tolist()}, f)
                continue
            aug = getattr(getattr(cfg, "TEST", None), "AUG", None)
            results = predict_dataset(model, ds, device, autocast,
                                      tta=int(aug.TRANSFORMS) if aug is not None and aug.ENABLED
                                      else 0)
            if write_predictions and output_dir:
                os.makedirs(output_dir, exist_ok=True)
                with open(os.path.join(output_dir, f"predictions_{name}.json"), "w") as f:
                    json.dump(results, f)
            gt = load_coco(ds.paths[0])
            metrics = evaluate_coco(gt, results, iou_thresh=float(cfg.TEST.IOU_THRESH),
                                    score_thresh=float(cfg.TEST.SCORE_THRESH),
                                    max_dets=int(cfg.TEST.MAX_DETS))
            all_metrics[name] = {k: (float(v) if isinstance(v, (int, float)) else v)
                                 for k, v in metrics.items()}
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        tag = "final" if iteration is None else f"{iteration:07d}"
        with open(os.path.join(output_dir, f"eval_{tag}.json"), "w") as f:
            json.dump({"iter": iteration, "metrics": all_metrics}, f, indent=1)
    return all_metrics


def format_metrics(all_metrics: Dict[str, Dict[str, float]]) -> str:
    """A small table: one row per test set, the headline metrics as columns."""
    cols = ["precision", "recall", "f1", "dsb_score", "AP", "AP50", "AP75", "tp", "fp", "fn"]
    head = f"{'dataset':<24}" + "".join(f"{c:>10}" for c in cols)
    rows = [head]
    for name, m in all_metrics.items():
        cells = []
        for c in cols:
            v = m.get(c)
            if v is None:
                cells.append(f"{'-':>10}")
            elif c in ("tp", "fp", "fn"):
                cells.append(f"{int(v):>10d}")
            else:
                cells.append(f"{v:>10.4f}")
        rows.append(f"{name[:24]:<24}" + "".join(cells))
    return "\n".join(rows)
