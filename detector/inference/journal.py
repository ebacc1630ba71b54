"""The per-slide resume journal: ``DIR/<slide>/.journal.jsonl``.

Append-only JSON lines, flushed and fsynced after every batch: a header line (the run's
parameters: a journal from different parameters is not resumed), then one line per batch with
the finished tile indices, the tiles that failed to decode and the batch's detections in slide
coordinates (boxes XYXY level-0 px, masks as ``CropMask.to_json``). A killed run loses at most
the batch in flight; a torn last line is ignored, and a damaged line elsewhere costs only its own
tiles (they are analysed again). A finished slide has ``summary.json`` and no journal.

The weights are identified by content (:func:`weights_identity`, recorded in the header and in
``summary.json`` as ``weights_sha256``), not by path: a checkpoint file rewritten between two
runs (``model_best.pth`` of a training run) restarts the slide instead of merging the tiles of
two models.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np
import torch

from ..structures.instances import Instances
from ..structures.masks import CropMask, masks_to_json

log = logging.getLogger(__name__)

JOURNAL_NAME = ".journal.jsonl"
WEIGHTS_KEY = "weights_sha256"


def weights_identity(model: torch.nn.Module, classes: Optional[List[Dict[str, Any]]] = None,
                     mpp: Optional[float] = None, config: Optional[str] = None) -> str:
    """SHA-256 (hex) of what decides a model's detections: every tensor of its state dict
    (name, dtype, shape, bytes), the classes, the training mpp and, when given, the config
    text (the CLI passes the checkpoint's). Two runs agree on it exactly when they run the same
    weights, wherever the checkpoint file lies."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps([classes, mpp, config], sort_keys=True, default=str).encode())
    return h.hexdigest()


def finished_weights(out_dir: str) -> Optional[str]:
    """The ``weights_sha256`` recorded in a finished slide's ``summary.json`` (None when absent
    or unreadable: a summary of unknown weights)."""
    try:
        with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
            value = json.load(f).get(WEIGHTS_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


class Journal:
    """Append-only record of one slide's finished tiles and their detections."""

    def __init__(self, path: str, header: Dict[str, Any], resume: bool = True):
        """Open ``path``; with ``resume`` an existing journal with the same ``header`` is read
        back (:attr:`done`, :attr:`failed`, :meth:`instances`), otherwise it is started anew."""
        self.path = path
        self.header = json.loads(json.dumps(header))  # normalised (tuples -> lists)
        self.done: Set[int] = set()
        self.failed: Dict[int, str] = {}
        self._parts: List[Instances] = []
        self.slide_size: Tuple[int, int] = tuple(header["slide_size"])  # (H, W)
        if resume and os.path.isfile(path):
            self._load()
        else:
            self._start()

    def _start(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"header": self.header}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _load(self) -> None:
        with open(self.path, "r", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f.read().split("\n") if ln.strip()]
        try:
            head = json.loads(lines[0])["header"]
        except (ValueError, KeyError, IndexError, TypeError):
            log.warning("%s: the journal's header is unreadable (torn or damaged); starting the "
                        "slide again", self.path)
            self._start()
            return
        if head != self.header:
            keys = sorted(k for k in set(self.header) | set(head or {})
                          if (head or {}).get(k) != self.header.get(k))
            log.warning("%s: journal from a run with other parameters (%s); starting the slide "
                        "again", self.path, ", ".join(keys))
            self._start()
            return
        keep = [lines[0]]
        for k, line in enumerate(lines[1:], start=2):
            try:
                rec = json.loads(line)
                part = _from_record(rec, self.slide_size)
                tiles = [int(t) for t in rec["tiles"]]
                failed = {int(t): str(v) for t, v in rec.get("failed", {}).items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                if k == len(lines):
                    log.warning("%s: ignoring a torn last record (the run was killed "
                                "mid-write)", self.path)
                else:
                    log.warning("%s: ignoring the damaged record on line %d of %d; its tiles "
                                "are analysed again", self.path, k, len(lines))
                continue
            keep.append(line)
            self.done.update(tiles)
            self.failed.update(failed)
            self._parts.append(part)
        # rewrite without the bad records so that new records follow valid ones
        if len(keep) < len(lines):
            with open(self.path, "w", encoding="utf-8") as f:
                f.write("\n".join(keep) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def append(self, tiles: List[int], inst: Instances, failed: Optional[Dict[int, str]] = None
               ) -> None:
        """Record one finished batch (detections in slide coordinates), durably."""
        failed = failed or {}
        rec = {
            "tiles": [int(t) for t in tiles],
            "failed": {str(k): v for k, v in failed.items()},
            "boxes": np.round(inst.boxes.astype(np.float64), 3).tolist(),
            "scores": [float(s) for s in inst.scores],
            "labels": [int(v) for v in inst.labels],
            "masks": None if inst.masks is None else masks_to_json(inst.masks),
        }
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.update(int(t) for t in tiles)
        self.failed.update(failed)
        self._parts.append(inst)

    def instances(self) -> List[Instances]:
        """The detections recorded so far, one Instances per batch (slide coordinates)."""
        return list(self._parts)

    def remove(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


def _from_record(rec: Dict[str, Any], size: Tuple[int, int]) -> Instances:
    masks = rec.get("masks")
    return Instances(size, np.asarray(rec["boxes"], np.float32).reshape(-1, 4),
                     np.asarray(rec["scores"], np.float32), np.asarray(rec["labels"], np.int64),
                     None if masks is None else [CropMask.from_json(m) for m in masks])
