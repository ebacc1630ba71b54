"""Stage 2 of the mitosis counter: re-score every candidate of the detector with the patch
classifier (:mod:`detector.modeling.classifier`).

A two-stage checkpoint ("bundle", written by ``tools/mitosis_stage2.py bundle``) is a detector
checkpoint (``model``, ``config``, ``classes``, ``mpp``: :func:`detector.modeling.build.load_model`
reads it as it reads any) with one more entry, ``second_stage``: the classifier's ``model``,
``config``, ``classes`` (the figure classes: "mitotic figure", or the phases), ``mpp``,
``threshold`` (on p(figure), chosen on validation) and ``candidate_threshold`` (the detector
score above which candidates go to stage 2, chosen on validation for recall).

Re-scoring: a patch of ``MODEL.CLASSIFIER.PATCH_SIZE`` px (at the analysis resolution, which is
the training mpp of both stages) centred on each candidate's box centre gives class
probabilities; the candidate's score becomes p(figure) = 1 - p(look-alike) and its label the
most probable figure class (a phase, when the classifier was trained on phases). With the
bundle's ``fusion`` "geometric" the score is sqrt(p(figure) x detector score) instead, so that a
candidate both stages are fairly sure of outranks one only the classifier likes; the bundle step
chooses the rule on validation. The detector's own score is kept alongside
(``detector_scores``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..config.config import cfg_from_string
from ..data.patches import patch_tensor, read_patch
from ..modeling.build import build_model
from ..structures.instances import Instances

ReadFn = Callable[[int, int, int, int], np.ndarray]


#: the rules of :func:`fuse_scores`
FUSIONS = ("classifier", "geometric")


def fuse_scores(p_figure: np.ndarray, det_scores: np.ndarray, fusion: str) -> np.ndarray:
    """A candidate's final score from the classifier's p(figure) and the detector's score:
    p(figure) ("classifier") or their geometric mean ("geometric")."""
    if fusion == "classifier":
        return np.asarray(p_figure, np.float64)
    if fusion == "geometric":
        return np.sqrt(np.clip(p_figure, 0, 1) * np.clip(det_scores, 0, 1))
    raise ValueError(f"second-stage fusion {fusion!r}: one of {', '.join(FUSIONS)}")


@dataclass
class SecondStage:
    """The loaded patch classifier of a bundle and its thresholds."""

    model: nn.Module
    classes: List[Dict[str, Any]]
    patch_size: int
    threshold: float
    candidate_threshold: float
    mpp: Optional[float] = None
    batch_size: int = 128
    info: Dict[str, Any] = field(default_factory=dict)
    #: how the score is formed: "classifier" (p(figure)) or "geometric" (sqrt(p x detector))
    fusion: str = "classifier"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def classify(self, read: ReadFn, size_hw: Tuple[int, int], centres: np.ndarray) -> np.ndarray:
        """``[N, K + 1]`` probabilities for the patches centred on ``centres`` (``(N, 2)`` x, y
        in the px of an image of ``size_hw``, read with ``read(top, left, h, w)``)."""
        n = len(centres)
        out = np.zeros((n, len(self.classes) + 1), np.float32)
        h, w = size_hw
        for start in range(0, n, self.batch_size):
            fill = int(getattr(self.model, "border_value", 255))
            batch = torch.stack([patch_tensor(read_patch(read, h, w, float(cx), float(cy),
                                                         self.patch_size, fill), self.patch_size)
                                 for cx, cy in centres[start:start + self.batch_size]])
            out[start:start + len(batch)] = self.model(batch.to(self.device)).float().cpu().numpy()
        return out

    def rescore(self, inst: Instances, probs: np.ndarray) -> Tuple[Instances, np.ndarray]:
        """``inst`` with scores p(figure) and labels the figure class ids of the classifier, and
        the detector's scores (same order)."""
        ids = np.array([int(c["id"]) for c in self.classes], np.int64)
        labels = ids[probs[:, 1:].argmax(1)] if len(probs) else np.zeros(0, np.int64)
        scores = fuse_scores(1.0 - probs[:, 0], inst.scores, self.fusion)
        out = Instances(inst.image_size, inst.boxes, scores.astype(np.float32), labels,
                        inst.masks)
        return out, inst.scores.copy()

    def apply(self, inst: Instances, read: ReadFn, size_hw: Tuple[int, int],
              px_per_inst_px: float = 1.0) -> Tuple[Instances, np.ndarray]:
        """Classify and re-score ``inst``; patches are read in image px = instance px /
        ``px_per_inst_px`` (e.g. slide level-0 px per analysis px)."""
        if len(inst) == 0:
            return self.rescore(inst, np.zeros((0, len(self.classes) + 1), np.float32))
        return self.rescore(inst, self.classify(read, size_hw,
                                                inst.box_centres() / px_per_inst_px))


def second_stage_from_checkpoint(ckpt: Dict[str, Any], device: str = "cpu"
                                 ) -> Optional[SecondStage]:
    """The :class:`SecondStage` of a loaded bundle checkpoint dict, or None for a plain one."""
    entry = ckpt.get("second_stage")
    if not entry:
        return None
    cfg = cfg_from_string(entry["config"])
    classes = list(entry["classes"])
    model = build_model(cfg, classes)
    model.load_state_dict(entry["model"], strict=True)
    model.to(device).eval()
    return SecondStage(model, classes, int(cfg.MODEL.CLASSIFIER.PATCH_SIZE),
                       float(entry["threshold"]), float(entry["candidate_threshold"]),
                       entry.get("mpp"), info=dict(entry.get("info") or {}),
                       fusion=str(entry.get("fusion", "classifier")))


def predict_two_stage(detector: nn.Module, second: Optional[SecondStage], image: np.ndarray,
                      amp: bool = True) -> Tuple[Instances, np.ndarray]:
    """Both stages on one in-memory ``H x W x 3`` uint8 image: the detector's candidates (above
    the bundle's candidate threshold) re-scored by stage 2. Returns the re-scored instances (all
    candidates; threshold them at ``second.threshold``) and the detector scores. Without a
    second stage: the detector's instances and their scores."""
    from .runner import predict_batch  # the runner imports this module

    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy
    inst = predict_batch(detector, [x], amp)[0]
    if second is None:
        return inst, inst.scores.copy()
    inst = inst[inst.scores >= second.candidate_threshold]
    h, w = image.shape[:2]
    return second.apply(inst, lambda t, l, hh, ww: image[t:t + hh, l:l + ww], (h, w))
