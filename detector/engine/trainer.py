"""The training loop: data, model, optimizer, mixed precision, checkpoints, logs, evaluation.

A plain loop (no framework). Reproducibility and resuming rest on three things:
- the data stream is a function of ``(SEED, position)``: :class:`TrainingSampler` yields, for
  global position ``g``, the ``g``-th index of the per-epoch permutations seeded by
  ``(SEED, epoch)`` together with a per-sample augmentation seed derived from ``(SEED, g)``;
  rank ``r`` of ``W`` takes positions ``g % W == r``; a resumed run starts at
  ``iteration * IMS_PER_BATCH``. Worker processes therefore do not matter.
- the model's own randomness (RPN/RoI sampling) draws from the global torch RNG, seeded with
  ``SEED + rank`` once the model is built, and saved in / restored from every checkpoint
  (Python, numpy, torch, CUDA states, per rank).
- optimizer, LR scheduler and gradient scaler states are checkpointed with the weights.
So a run killed after a checkpoint and resumed with ``--resume`` ends with the weights of an
uninterrupted run (on CPU bit for bit; on GPU up to non-deterministic kernels).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from ..device import DeviceError
from ..device import resolve_device as _resolve_device
from ..errors import DetectorError
from ..config.config import cfg_to_yaml
from ..data.coco import load_coco
from ..data.dataset import CocoInstanceDataset, DatasetError, check_classes, collate_list
from ..data.patches import build_dataset
from ..inference.second_stage import SecondStage, second_stage_from_checkpoint
from ..modeling.build import build_model, load_model, load_weights, test_time_overrides
from . import distributed as du
from ..evaluation import evaluate_coco
from .checkpoint import (CheckpointError, get_rng_state, last_checkpoint, load_checkpoint,
                         prune_checkpoints, remove_orphan_temp_files,
                         resume_candidates, save_checkpoint, set_rng_state,
                         write_last_checkpoint)
from .evaluator import dataset_name, evaluate_datasets, format_metrics, predict_dataset_two_stage
from .logger import MetricsWriter, peak_memory_mb
from .optim import build_lr_scheduler, build_optimizer

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError, DetectorError):
    """Training cannot go on (non-finite loss, bad setup); the message says why and what to do."""


def resolve_device(name: str) -> torch.device:
    """``MODEL.DEVICE`` (:func:`detector.device.resolve_device`); a missing GPU is a
    :class:`TrainingError` that names the key."""
    try:
        return _resolve_device(name)
    except DeviceError as e:
        raise TrainingError(f"MODEL.DEVICE {name}: {e}") from None


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def sample_seed(seed: int, position: int, stream: int = 0) -> int:
    """Augmentation seed of the sample at global stream ``position`` (``stream`` 1: the seed of
    epoch ``position``'s permutation)."""
    return int(np.random.SeedSequence([seed % 2 ** 32, stream, position]).generate_state(1)[0])


class TrainingSampler(Sampler):
    """Infinite stream of ``(index, sample_seed)``: epoch ``e`` is a permutation seeded by
    ``(seed, e)``; this rank takes the global positions ``start, start + W, ...`` shifted by its
    rank (``start`` = images already consumed by all ranks)."""

    def __init__(self, size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1,
                 weights: Optional[np.ndarray] = None) -> None:
        self.size, self.seed, self.start = int(size), int(seed), int(start)
        self.rank, self.world_size = int(rank), int(world_size)
        # with per-index sampling probabilities, position g draws its index from them with a
        # generator seeded by (seed, g): still a pure function of the position
        self.cum = None if weights is None else np.cumsum(np.asarray(weights, np.float64)
                                                          / float(np.sum(weights)))

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, stream=1))
        return torch.randperm(self.size, generator=g)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        pos = self.start + self.rank
        epoch, perm = -1, None
        while self.cum is not None:
            u = np.random.default_rng(sample_seed(self.seed, pos, stream=2)).random()
            yield min(int(np.searchsorted(self.cum, u, side="right")), self.size - 1), \
                sample_seed(self.seed, pos)
            pos += self.world_size
        while True:
            e = pos // self.size
            if e != epoch:
                epoch, perm = e, self._perm(e)
            yield int(perm[pos % self.size]), sample_seed(self.seed, pos)
            pos += self.world_size


def _to_device(images: List[torch.Tensor], targets: List[Dict[str, Any]], device: torch.device
               ) -> Tuple[List[torch.Tensor], List[Dict[str, Any]]]:
    nb = device.type == "cuda"
    images = [im.to(device, non_blocking=nb) for im in images]
    targets = [{k: (v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v)
                for k, v in t.items()} for t in targets]
    return images, targets


class Trainer:
    """Builds everything from ``cfg`` and checks the data before any training starts.

    Args:
        cfg: the resolved config.
        resume: continue from ``OUTPUT_DIR/last_checkpoint`` when it exists (same iteration,
            optimizer, scheduler, scaler and random states).
    """

    def __init__(self, cfg: Any, resume: bool = False) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.MODEL.DEVICE)
        du.init_process_group(str(self.device))
        self.rank, self.world_size = du.get_rank(), du.get_world_size()
        self.output_dir = cfg.OUTPUT_DIR
        s = cfg.SOLVER
        if int(s.IMS_PER_BATCH) % self.world_size:
            raise TrainingError(f"SOLVER.IMS_PER_BATCH {s.IMS_PER_BATCH} is the total over "
                                f"{self.world_size} processes and must be divisible by it")
        if int(s.MAX_ITER) <= 0:
            raise TrainingError("SOLVER.MAX_ITER must be positive")
        self.batch_per_rank = int(s.IMS_PER_BATCH) // self.world_size
        self.seed = int(cfg.SEED)
        if self.seed < 0:
            self.seed = int.from_bytes(os.urandom(4), "little") // 2
            if self.world_size > 1:
                box = [self.seed]
                torch.distributed.broadcast_object_list(box, src=0)
                self.seed = box[0]
            cfg.SEED = self.seed

        ckpt = self._checkpoint_to_resume() if resume else None
        if not resume:
            refuse_to_overwrite(self.output_dir)
        # ---- data (all checks happen here, before the model is even built)
        self.train_set = build_dataset(cfg, list(cfg.DATASETS.TRAIN), train=True)
        self.classes = self.train_set.classes
        if ckpt is not None:
            check_classes(self.classes, list(ckpt["classes"]), ", ".join(cfg.DATASETS.TRAIN),
                          f"the checkpoint being resumed ({self.output_dir})")
        self.test_sets = [build_dataset(cfg, [p], train=False, classes=self.classes)
                          for p in cfg.DATASETS.TEST]
        self.mpp = float(cfg.INPUT.MPP) if cfg.INPUT.MPP else self.train_set.mpp
        # ---- model
        torch.manual_seed(self.seed)
        model = build_model(cfg, self.classes)
        if ckpt is None:
            load_weights(model, cfg.MODEL.WEIGHTS)
        else:
            model.load_state_dict(ckpt["model"])
        model.to(self.device)
        if self.world_size > 1 and cfg.MODEL.BACKBONE.NORM == "SyncBN":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model_without_ddp = model
        self.optimizer = build_optimizer(cfg, model)
        # SOLVER.SCHEDULE_BY_TIME: training seconds of earlier runs (from the checkpoint) plus
        # this run's, as a fraction of the time budget
        self.train_seconds_before = 0.0
        self._t_train: Optional[float] = None
        self._elapsed: Optional[float] = None
        self.scheduler = build_lr_scheduler(cfg, self.optimizer, self.time_progress)
        amp = cfg.SOLVER.AMP
        self.amp_dtype = None
        if amp.ENABLED and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if amp.DTYPE == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.start_iter = 0
        self._saved_iter: Optional[int] = None
        self._rng_to_restore = None
        if ckpt is not None:
            self.start_iter = int(ckpt["iteration"])
            if "optimizer" in ckpt:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            if "scheduler" in ckpt:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and "scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["scaler"])
            ranks = (ckpt.get("extra") or {}).get("rng_ranks")
            self._rng_to_restore = (ranks[self.rank] if ranks and len(ranks) == self.world_size
                                    else ckpt.get("rng"))
            self.best = (ckpt.get("extra") or {}).get("best")
            self.train_seconds_before = float((ckpt.get("extra") or {}).get("train_seconds") or 0)
        else:
            self.best = None
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model: nn.Module = nn.parallel.DistributedDataParallel(
                model, device_ids=ids, broadcast_buffers=False)
        else:
            self.model = model

    def _checkpoint_to_resume(self) -> Optional[Dict[str, Any]]:
        """``--resume``: the newest checkpoint that loads (see :func:`resume_candidates`), or
        None in a folder without checkpoints. Refuses
        (CheckpointError) when checkpoints exist but none loads, so that a restart from
        iteration 0 never overwrites them."""
        if self.rank == 0 and os.path.isdir(self.output_dir):
            remove_orphan_temp_files(self.output_dir)
        du.synchronize()
        marker = os.path.join(self.output_dir, "last_checkpoint")
        failed = []
        for path in resume_candidates(self.output_dir):
            try:
                ckpt = load_checkpoint(path)
            except CheckpointError as e:
                logger.warning("--resume: %s; trying an older checkpoint", e)
                failed.append(os.path.basename(path))
                continue
            named = last_checkpoint(self.output_dir) if os.path.isfile(marker) else None
            if os.path.isfile(marker) and named != path:
                logger.warning("--resume: %s names %s, but %s is the newest checkpoint that "
                               "loads; resuming from it", marker,
                               os.path.basename(named) if named else "a missing file",
                               os.path.basename(path))
            if "optimizer" not in ckpt:
                logger.warning("--resume: %s holds no optimizer state (an inference checkpoint);"
                               " the optimizer and LR schedule start afresh", path)
            logger.info("resuming from %s (iteration %d)", path, ckpt["iteration"])
            return ckpt
        others = _run_files(self.output_dir)
        if failed or others:
            raise CheckpointError(
                f"--resume: no checkpoint in {self.output_dir} loads ("
                + ", ".join(failed + [n for n in others if n not in failed])
                + "); starting again from iteration 0 would overwrite them. Resume with a "
                "fresh OUTPUT_DIR and MODEL.WEIGHTS set to one of these files, or move them away")
        logger.info("--resume: no checkpoint in %s, starting from iteration 0", self.output_dir)
        return None

    # ------------------------------------------------------------------------------ parts
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def build_loader(self) -> DataLoader:
        cfg = self.cfg
        sampler = TrainingSampler(len(self.train_set), self.seed,
                                  start=self.start_iter * int(cfg.SOLVER.IMS_PER_BATCH),
                                  rank=self.rank, world_size=self.world_size,
                                  weights=self.train_set.sample_weights())
        workers = int(cfg.DATALOADER.NUM_WORKERS)
        return DataLoader(
            self.train_set, batch_size=self.batch_per_rank, sampler=sampler,
            num_workers=workers, collate_fn=collate_list,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            # an explicit generator keeps the DataLoader from drawing on the global RNG
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_seconds(self) -> float:
        """Training time so far, over this run and the runs it resumed (this run's part as all
        ranks last agreed on it, when there is a time limit)."""
        if self._elapsed is not None:
            return self.train_seconds_before + self._elapsed
        now = 0.0 if self._t_train is None else time.perf_counter() - self._t_train
        return self.train_seconds_before + now

    def time_progress(self) -> float:
        """The fraction of ``SOLVER.TIME_LIMIT_MINUTES`` spent (0 without a limit)."""
        limit = float(self.cfg.SOLVER.TIME_LIMIT_MINUTES) * 60.0
        return self.train_seconds() / limit if limit > 0 else 0.0

    def save(self, name: str, iteration: int) -> None:
        """Checkpoint (rank 0 writes; every rank contributes its RNG state)."""
        self._saved_iter = iteration
        rng = get_rng_state()
        ranks = [rng]
        if self.world_size > 1:
            ranks = [None] * self.world_size
            torch.distributed.all_gather_object(ranks, rng)
        if self.rank == 0:
            save_checkpoint(os.path.join(self.output_dir, name), self.model_without_ddp, self.cfg,
                            self.classes, self.mpp, iteration, self.optimizer, self.scheduler,
                            self.scaler, extra={"rng_ranks": ranks, "best": self.best,
                                                "train_seconds": self.train_seconds()})
            write_last_checkpoint(self.output_dir, name)
            for path in prune_checkpoints(self.output_dir, int(self.cfg.SOLVER.CHECKPOINTS_KEPT)):
                logger.info("removed %s (SOLVER.CHECKPOINTS_KEPT %d)", os.path.basename(path),
                            int(self.cfg.SOLVER.CHECKPOINTS_KEPT))

    def evaluate(self, iteration: Optional[int], writer: Optional[MetricsWriter] = None
                 ) -> Optional[Dict[str, Dict[str, float]]]:
        """Evaluate on DATASETS.TEST (rank 0), log, and keep ``model_best.pth``."""
        if not self.test_sets:
            return None
        metrics = None
        if self.rank == 0:
            metrics = evaluate_datasets(self.model_without_ddp, self.cfg, self.test_sets,
                                        self.device, self.output_dir, iteration,
                                        autocast=self.autocast if self.amp_dtype else None)
            logger.info("evaluation at iteration %s:\n%s", iteration, format_metrics(metrics))
            first = next(iter(metrics.values()))
            key = self.cfg.TEST.BEST_METRIC
            if writer is not None:
                for name, m in metrics.items():
                    rec = {"iter": int(iteration or self.cfg.SOLVER.MAX_ITER)}
                    rec.update({f"{name}/{k}": v for k, v in m.items() if isinstance(v, float)})
                    writer.write(rec, prefix="eval")
            if key not in first:
                logger.warning("TEST.BEST_METRIC %r is not among the metrics %s", key, sorted(first))
            elif self.best is None or first[key] > self.best["value"]:
                self.best = {"value": float(first[key]), "iter": int(iteration or 0), "metric": key}
                save_checkpoint(os.path.join(self.output_dir, "model_best.pth"),
                                self.model_without_ddp, self.cfg, self.classes, self.mpp,
                                int(iteration or self.cfg.SOLVER.MAX_ITER),
                                extra={"best": self.best})
                logger.info("new best %s = %.4f: model_best.pth", key, first[key])
        du.synchronize()
        return metrics

    # ------------------------------------------------------------------------------ loop
    def train(self) -> Optional[Dict[str, Dict[str, float]]]:
        """Train from ``start_iter`` to ``SOLVER.MAX_ITER``; returns the final metrics."""
        cfg = self.cfg
        s = cfg.SOLVER
        max_iter = int(s.MAX_ITER)
        main = self.rank == 0
        if main:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "config.yaml"), "w") as f:
                f.write(cfg_to_yaml(cfg))
        writer = MetricsWriter(self.output_dir, self.start_iter) if main else None
        classifier = cfg.MODEL.META_ARCHITECTURE == "PatchClassifier"
        if classifier:
            network = cfg.MODEL.CLASSIFIER.NAME
        elif cfg.MODEL.META_ARCHITECTURE == "UNet":  # no backbone: its own size
            network = f"depth {cfg.MODEL.UNET.DEPTH}, {cfg.MODEL.UNET.BASE_CHANNELS} channels"
        elif cfg.MODEL.META_ARCHITECTURE == "Classical":
            network = "no network"
        else:
            network = cfg.MODEL.BACKBONE.NAME
        logger.info("training %s (%s, %d classes) on %d %s from %s, %d process(es) on %s, "
                    "iterations %d..%d, %d images per step", cfg.MODEL.META_ARCHITECTURE, network,
                    len(self.classes), len(self.train_set), "patches" if classifier else "images",
                    ", ".join(cfg.DATASETS.TRAIN), self.world_size, self.device,
                    self.start_iter, max_iter, int(s.IMS_PER_BATCH))
        loader = self.build_loader()
        data_iter = iter(loader)
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
        else:
            seed_all(self.seed + self.rank)
        self.model.train()
        clip = float(s.CLIP_GRADIENTS.MAX_NORM) if s.CLIP_GRADIENTS.ENABLED else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        log_period, ckpt_period = max(1, int(s.LOG_PERIOD)), int(s.CHECKPOINT_PERIOD)
        eval_period = int(cfg.TEST.EVAL_PERIOD)
        pbar = tqdm(total=max_iter, initial=self.start_iter, disable=not main, desc="train",
                    dynamic_ncols=True)
        t_start = self._t_train = time.perf_counter()
        limit_s = float(s.TIME_LIMIT_MINUTES) * 60.0
        window: List[float] = []
        done = self.start_iter
        try:
            for it in range(self.start_iter, max_iter):
                t0 = time.perf_counter()
                images, targets = next(data_iter)
                images, targets = _to_device(images, targets, self.device)
                t_data = time.perf_counter() - t0
                with self.autocast():
                    loss_dict = self.model(images, targets)
                losses = sum(loss_dict.values())
                reduced = du.all_reduce_mean(loss_dict)
                total = sum(reduced.values())
                if not math.isfinite(total):
                    raise TrainingError(
                        f"non-finite loss at iteration {it + 1}: "
                        + ", ".join(f"{k}={v:.4g}" for k, v in reduced.items())
                        + f" (lr {self.optimizer.param_groups[0]['lr']:.3g}). Training stopped; "
                        "lower SOLVER.BASE_LR, lengthen SOLVER.WARMUP_ITERS or keep "
                        "SOLVER.CLIP_GRADIENTS enabled, then --resume from the last checkpoint.")
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(losses).backward()
                    if clip:
                        self.scaler.unscale_(self.optimizer)
                        torch.nn.utils.clip_grad_norm_(params, clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    losses.backward()
                    if clip:
                        torch.nn.utils.clip_grad_norm_(params, clip)
                    self.optimizer.step()
                lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                iteration = done = it + 1
                dt = time.perf_counter() - t0
                window.append(dt)
                pbar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}", refresh=False)
                pbar.update(1)
                if main and (iteration % log_period == 0 or iteration == max_iter):
                    rec = {"iter": iteration, "total_loss": total, **reduced, "lr": lr,
                           "time": float(np.mean(window)), "data_time": t_data,
                           "images_per_s": int(s.IMS_PER_BATCH) / max(float(np.mean(window)), 1e-9),
                           "memory_mb": peak_memory_mb(self.device)}
                    window = []
                    writer.write(rec)
                    logger.info("iter %d/%d  loss %.4f  (%s)  lr %.3g  %.2fs/it  data %.2fs  mem %.0f MB",
                                iteration, max_iter, total,
                                " ".join(f"{k} {v:.3f}" for k, v in reduced.items()), lr,
                                rec["time"], t_data, rec["memory_mb"])
                if ckpt_period > 0 and iteration % ckpt_period == 0 and iteration < max_iter:
                    self.save(f"model_{iteration:07d}.pth", iteration)
                if eval_period > 0 and iteration % eval_period == 0 and iteration < max_iter:
                    self.evaluate(iteration, writer)
                    self.model.train()
                if limit_s > 0 and iteration < max_iter:
                    # every rank sees the slowest rank's time: they stop at the same iteration
                    # and follow one time-based LR schedule
                    elapsed = torch.tensor(time.perf_counter() - t_start, dtype=torch.float64)
                    if self.world_size > 1:
                        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
                    self._elapsed = float(elapsed)
                    if self._elapsed >= limit_s:
                        logger.info("SOLVER.TIME_LIMIT_MINUTES %.1f reached at iteration %d of %d; "
                                    "stopping (continue with --resume)", limit_s / 60, iteration,
                                    max_iter)
                        break
        finally:
            pbar.close()
        if self.start_iter < done or last_checkpoint(self.output_dir) is None:
            # the full state (for --resume) as a periodic checkpoint, and model_final.pth with
            # what inference needs only (weights, config, classes, mpp)
            name = f"model_{done:07d}.pth"
            if self._saved_iter == done or (self.start_iter == done and
                                            os.path.isfile(os.path.join(self.output_dir, name))):
                if main:
                    write_last_checkpoint(self.output_dir, name)
            else:
                self.save(name, done)
            if main:
                save_checkpoint(os.path.join(self.output_dir, "model_final.pth"),
                                self.model_without_ddp, self.cfg, self.classes, self.mpp, done,
                                extra={"best": self.best}, rng=False)
        elapsed = time.perf_counter() - t_start
        self.train_seconds = elapsed
        self.iterations_done = done - self.start_iter
        logger.info("trained %d iterations in %.1f s (%.2f images/s)", done - self.start_iter,
                    elapsed, (done - self.start_iter) * int(s.IMS_PER_BATCH) / max(elapsed, 1e-9))
        metrics = self.evaluate(done, writer)
        if writer is not None:
            writer.close()
        return metrics


def _run_files(output_dir: str) -> List[str]:
    """The checkpoints and ``last_checkpoint`` of an earlier run in ``output_dir``."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir)
                  if n == "last_checkpoint" or (n.startswith("model_") and n.endswith(".pth")))


def refuse_to_overwrite(output_dir: str) -> None:
    """Training without ``--resume`` into a folder that holds an earlier run's checkpoints
    would overwrite them and cut its metrics.json: refuse, naming the two ways on."""
    found = _run_files(output_dir)
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise TrainingError(
            f"OUTPUT_DIR {output_dir} holds an earlier run ({shown}); training again there "
            "would overwrite it. Continue that run with --resume, or train into a fresh "
            "OUTPUT_DIR (or delete the folder first to start over)")


#: Architectures with nothing to learn: ``train_net.py`` writes their checkpoint directly.
UNTRAINED_ARCHITECTURES = ("Classical",)


def save_untrained(cfg: Any) -> Optional[Dict[str, Dict[str, float]]]:
    """``train_net.py`` for a model with nothing to learn (:data:`UNTRAINED_ARCHITECTURES`,
    the classical baseline): write ``OUTPUT_DIR/config.yaml`` and ``model_final.pth`` (the
    checkpoint layout of every run: an empty state dict, the config, the classes of
    ``DATASETS.TRAIN`` (the one class ``nucleus`` without it), the mpp (``INPUT.MPP``, else
    the training data's), iteration 0), then evaluate on ``DATASETS.TEST`` as a trained run
    does (``eval_0000000.json``, ``predictions_<set>.json``). Returns the metrics (None without
    test sets)."""
    out = cfg.OUTPUT_DIR
    refuse_to_overwrite(out)
    if list(cfg.DATASETS.TRAIN):
        train_set = build_dataset(cfg, list(cfg.DATASETS.TRAIN), train=False)
        classes, data_mpp = train_set.classes, train_set.mpp
    else:
        classes, data_mpp = [{"id": 1, "name": "nucleus"}], None
    mpp = float(cfg.INPUT.MPP) if cfg.INPUT.MPP else data_mpp
    test_sets = [build_dataset(cfg, [p], train=False, classes=classes)
                 for p in cfg.DATASETS.TEST]
    model = build_model(cfg, classes)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write(cfg_to_yaml(cfg))
    save_checkpoint(os.path.join(out, "model_final.pth"), model, cfg, classes, mpp, 0)
    write_last_checkpoint(out, "model_final.pth")
    logger.info("%s has nothing to learn: wrote %s (config and classes %s, mpp %s)",
                cfg.MODEL.META_ARCHITECTURE, os.path.join(out, "model_final.pth"),
                ", ".join(c["name"] for c in classes), mpp)
    if not test_sets:
        return None
    device = resolve_device(cfg.MODEL.DEVICE)
    metrics = evaluate_datasets(model.to(device), cfg, test_sets, device, out, 0,
                                write_predictions=True)
    logger.info("evaluation:\n%s", format_metrics(metrics))
    return metrics


def evaluate_only(cfg: Any, write_predictions: bool = True) -> Dict[str, Dict[str, float]]:
    """``--eval-only``: evaluate the checkpoint ``MODEL.WEIGHTS`` on ``DATASETS.TEST``."""
    if not cfg.MODEL.WEIGHTS:
        raise TrainingError("--eval-only needs MODEL.WEIGHTS (a checkpoint of ours)")
    if not list(cfg.DATASETS.TEST):
        raise DatasetError("--eval-only needs DATASETS.TEST (COCO files to evaluate on)")
    device = resolve_device(cfg.MODEL.DEVICE)
    # the weights and architecture come from the checkpoint; how it predicts (thresholds,
    # INPUT.SCALE, U-Net tiles and watershed) from the config given now
    model, mcfg, classes, _ = load_model(cfg.MODEL.WEIGHTS, str(device),
                                         overrides=test_time_overrides(cfg))
    second = second_stage_from_checkpoint(load_checkpoint(cfg.MODEL.WEIGHTS), str(device))
    if second is not None:
        return evaluate_two_stage(model, classes, second, cfg, write_predictions)
    datasets = [build_dataset(mcfg, [p], train=False, classes=classes) for p in cfg.DATASETS.TEST]
    metrics = evaluate_datasets(model, cfg, datasets, device, cfg.OUTPUT_DIR, None,
                                write_predictions=write_predictions)
    return metrics


def evaluate_two_stage(model: nn.Module, classes: List[Dict[str, Any]], second: SecondStage,
                       cfg: Any, write_predictions: bool = True) -> Dict[str, Dict[str, float]]:
    """``--eval-only`` of a two-stage mitosis bundle: per test file, the metrics after stage 2
    (at the bundle's threshold; phases scored when the file has the classifier's classes) and,
    as ``<file>/stage1``, the detector's candidates alone (at ``TEST.SCORE_THRESH``)."""
    out: Dict[str, Dict[str, float]] = {}
    for path in cfg.DATASETS.TEST:
        gt = load_coco(path)
        file_classes = [{"id": int(c["id"]), "name": str(c["name"])} for c in gt["categories"]]
        keep_phases = sorted(file_classes, key=lambda c: c["id"]) == \
            sorted(({"id": int(c["id"]), "name": str(c["name"])} for c in second.classes),
                   key=lambda c: c["id"])
        ds = CocoInstanceDataset([path], cfg, train=False)
        final, stage1 = predict_dataset_two_stage(model, second, ds, keep_phases,
                                                  det_label=int(classes[0]["id"]))
        gt_one = gt
        if not keep_phases and len(file_classes) > 1:  # score detection of any figure class
            gt_one = dict(gt, categories=[dict(classes[0])], annotations=[
                dict(a, category_id=int(classes[0]["id"])) for a in gt["annotations"]])
        name = dataset_name(path)
        for key, results, g, thresh in ((name, final, gt if keep_phases else gt_one,
                                         second.threshold),
                                        (f"{name}/stage1", stage1, gt_one,
                                         float(cfg.TEST.SCORE_THRESH))):
            m = evaluate_coco(g, results, iou_thresh=float(cfg.TEST.IOU_THRESH),
                              score_thresh=thresh, max_dets=int(cfg.TEST.MAX_DETS))
            out[key] = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in m.items()}
            out[key]["score_thresh"] = thresh
            if write_predictions:
                os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
                fname = f"predictions_{key.replace('/', '_')}.json"
                with open(os.path.join(cfg.OUTPUT_DIR, fname), "w") as f:
                    json.dump(results, f)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(cfg.OUTPUT_DIR, "eval_final.json"), "w") as f:
        json.dump({"iter": None, "metrics": out}, f, indent=1)
    return out
