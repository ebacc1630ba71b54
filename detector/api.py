"""The public Python API: what the command-line tools do, as library calls.

    from detector import api

    det = api.load("runs/maskrcnn/model_final.pth", device="auto")
    inst = det.predict(rgb)                    # (H, W, 3) uint8 -> Instances (image px)
    summary = det.predict_slide("slide.svs", "results/", tile_size=512)

    api.convert("labels", ["fields/"], "data/fields.json", classes="fields/classes",
                split="train=0.8,test=0.2")
    api.train("configs/mask_rcnn_R_18_FPN.yaml", {"DATASETS.TRAIN": ["data/fields_train.json"]})
    api.evaluate("data/fields_test.json", ["runs/a/predictions.json"], out="report/")

Every function raises a :class:`~detector.errors.DetectorError` subclass for bad input (the
message names the file and the fix). Options are the tools' flags with ``-`` written ``_``
(``--score-thresh`` -> ``score_thresh``); their defaults are the tools' defaults.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .cli import convert_to_coco as _convert_cli
from .cli import evaluate as _evaluate_cli
from .config.config import get_cfg
from .device import resolve_device
from .engine.trainer import Trainer, evaluate_only
from .errors import DetectorError
from .inference.runner import InferenceOptions, checkpoint_defaults, infer_slide, predict_batch
from .inference.size import model_nucleus_diameter, predict_normalised
from .modeling.build import load_model
from .structures.instances import Instances

__all__ = ["Detector", "load", "convert", "train", "predict_dataset", "evaluate"]


class Detector:
    """A trained model with what its checkpoint says about it: ``classes`` (``[{"id",
    "name"}]``), ``mpp`` (training microns per pixel, or None) and the resolved ``cfg``."""

    def __init__(self, model: torch.nn.Module, cfg: Any, classes: List[Dict[str, Any]],
                 mpp: Optional[float], weights: str = ""):
        self.model, self.cfg, self.classes, self.mpp = model, cfg, classes, mpp
        self.weights = weights

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def predict(self, image: np.ndarray, score_thresh: float = 0.0, amp: bool = True
                ) -> Instances:
        """Detections of one ``(H, W, 3)`` uint8 RGB image (or ``(H, W)`` grey) in its pixels:
        boxes XYXY, scores, labels (the checkpoint's category ids), masks
        (:class:`~detector.structures.masks.CropMask`, or None for box-only models). The
        image is used as it is: resample it to :attr:`mpp` first when its scale differs; a
        size-normalised model (``INPUT.NUCLEUS_DIAMETER`` > 0) finds the scale itself. ``amp``:
        bf16 autocast on CUDA and on CPUs with native bf16 (False: fp32 everywhere, the exact
        numbers of the model's own eval forward)."""
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] < 3 or arr.dtype != np.uint8:
            raise DetectorError(f"predict: expected an (H, W, 3) uint8 RGB image, got "
                                f"{arr.dtype} {arr.shape}")
        # a copy only when needed: torch warns on read-only arrays (e.g. read_image's)
        x = torch.from_numpy(np.require(arr[..., :3], requirements=["C", "W"])).permute(2, 0, 1)
        canonical = model_nucleus_diameter(self.model)
        if canonical > 0:  # size normalisation: the scale found from a first pass
            inst, _ = predict_normalised(lambda t: predict_batch(self.model, [t], amp)[0], x,
                                         canonical)
        else:
            inst = predict_batch(self.model, [x], amp)[0]
        return inst[inst.scores >= score_thresh] if score_thresh > 0 else inst

    def predict_slide(self, slide: str, output_dir: str, **options: Any) -> Dict[str, Any]:
        """Analyse one whole-slide image (or large image) into ``output_dir/<slide stem>/``
        (summary.json, GeoJSON, COCO results, CSV, overlay.png, density.png) and return the
        summary. ``options`` are :class:`~detector.inference.runner.InferenceOptions` fields
        (``tile_size``, ``overlap``, ``mpp``, ``roi``, ``score_thresh``, ``resume``, ...)."""
        unknown = set(options) - set(InferenceOptions.__dataclass_fields__)
        if unknown:
            raise DetectorError(f"predict_slide: unknown option(s) {sorted(unknown)}; known: "
                                f"{sorted(InferenceOptions.__dataclass_fields__)}")
        options = {**checkpoint_defaults(self.cfg), **options}
        return infer_slide(self.model, self.classes, self.mpp, slide, output_dir,
                           InferenceOptions(**options), os.path.abspath(self.weights))


def load(checkpoint: str, device: str = "auto",
         overrides: Optional[Mapping[str, Any]] = None) -> Detector:
    """A trained model from one of our checkpoints (weights, config, classes and mpp are in
    it), in eval mode on ``device`` ("auto": this process's GPU when there is one, else CPU).
    ``overrides``: test-time config keys (e.g. ``{"INPUT.SCALE": 0.5}``)."""
    dev = resolve_device(device)
    model, cfg, classes, mpp = load_model(checkpoint, str(dev), dict(overrides or {}))
    return Detector(model, cfg, classes, mpp, checkpoint)


def _namespace(parser: argparse.ArgumentParser, **options: Any) -> argparse.Namespace:
    """The tool's arguments: its defaults, then ``options`` (unknown names refused)."""
    known = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    unknown = set(options) - set(known)
    if unknown:
        raise DetectorError(f"unknown option(s) {sorted(unknown)} of {parser.prog}; known: "
                            f"{sorted(known)}")
    ns = argparse.Namespace(**known)
    for k, v in options.items():
        setattr(ns, k, v)
    missing = [a.dest for a in parser._actions if a.required and getattr(ns, a.dest) is None]
    if missing:
        raise DetectorError(f"{parser.prog}: missing {', '.join(missing)}")
    return ns


def convert(format: str, input: Union[str, Sequence[str]], output: str, **options: Any
            ) -> List[str]:
    """Convert annotations to COCO (``tools/convert_to_coco.py``); returns the files written
    (one per split or fold)."""
    inputs = [input] if isinstance(input, str) else list(input)
    ns = _namespace(_convert_cli.build_parser(), format=format, input=inputs, output=output,
                    **options)
    _conv, outputs = _convert_cli.convert(ns)
    return [path for path, _ in outputs]


def _cfg(config_file: str, overrides: Optional[Mapping[str, Any]]) -> Any:
    opts: List[str] = []
    for k, v in (overrides or {}).items():
        opts += [k, v if isinstance(v, str) else repr(list(v)) if isinstance(v, (list, tuple))
                 else str(v)]
    return get_cfg(config_file, opts)


def train(config_file: str, overrides: Optional[Mapping[str, Any]] = None,
          resume: bool = False) -> str:
    """Train in this process (``tools/train_net.py`` with one process); ``overrides`` are
    config keys (``{"SOLVER.MAX_ITER": 100, "DATASETS.TRAIN": ["train.json"]}``). Returns
    the path of ``model_final.pth``."""
    cfg = _cfg(config_file, overrides)
    Trainer(cfg, resume=resume).train()
    return os.path.join(cfg.OUTPUT_DIR, "model_final.pth")


def predict_dataset(config_file: str, weights: str, test: Sequence[str], output_dir: str,
                    overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Dict[str, float]]:
    """``train_net.py --eval-only``: predictions of checkpoint ``weights`` on the COCO files
    ``test`` (written as ``output_dir/predictions_<stem>.json``) and their metrics."""
    o = dict(overrides or {})
    o.update({"MODEL.WEIGHTS": weights, "DATASETS.TEST": list(test), "OUTPUT_DIR": output_dir})
    return evaluate_only(_cfg(config_file, o))


def evaluate(gt: str, pred: Sequence[str], out: str, **options: Any) -> str:
    """Compare predictions (COCO results files) with ground truth (``tools/evaluate.py``):
    writes ``metrics.json``, ``per_image.csv`` and the report into ``out``; returns the
    ``metrics.json`` path."""
    ns = _namespace(_evaluate_cli.build_parser(), gt=gt, pred=list(pred), out=out, **options)
    _evaluate_cli.run(ns)
    return os.path.join(out, "metrics.json")
