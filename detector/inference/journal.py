"""The per-slide resume journal: ``DIR/<slide>/.journal.jsonl``.

Append-only JSON lines, flushed and fsynced after every batch: a header line (the run's
parameters: a journal from different parameters is not resumed), then one line per batch with
the finished tile indices, the tiles that failed to decode and the batch's detections in slide
coordinates (boxes XYXY level-0 px, RLE masks). A killed run loses at most the batch in flight;
a torn last line is ignored, and a damaged line elsewhere costs only its own tiles (they are
analysed again). A finished slide has ``summary.json`` and no journal.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np

from ..structures.instances import Instances, rle_from_json, rle_to_json

log = logging.getLogger(__name__)

JOURNAL_NAME = ".journal.jsonl"


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
            log.warning("%s: journal from a run with other parameters; starting the slide again",
                        self.path)
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
            "masks": None if inst.masks is None else [rle_to_json(m) for m in inst.masks],
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
                     None if masks is None else [rle_from_json(m) for m in masks])
