"""Train Mask R-CNN / Faster R-CNN (or the U-Net) on COCO instance files, or evaluate a checkpoint.

    python tools/train_net.py --config-file configs/nuclei/mask_rcnn_R_18_FPN_cpu.yaml \\
        OUTPUT_DIR out/run1 SOLVER.MAX_ITER 2000
    python tools/train_net.py --config-file CFG --resume OUTPUT_DIR out/run1
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS out/run1/model_final.pth
    python tools/train_net.py --config-file CFG --num-gpus 4      # or: torchrun --nproc_per_node 4
    python tools/train_net.py --config-file configs/nuclei/classical.yaml   # writes the checkpoint
    python tools/train_net.py --config-file CFG --export out/deploy.pth \
        MODEL.WEIGHTS out/run1/model_final.pth TEST.SCORE_THRESH 0.33 TEST.AUG.ENABLED True

Trailing ``KEY VALUE`` pairs override the config (values parsed as YAML). ``--num-gpus N`` starts N
processes with DistributedDataParallel (NCCL on GPUs; with ``MODEL.DEVICE cpu``, N CPU processes
on gloo). ``SOLVER.IMS_PER_BATCH`` is the total over all processes.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from ..config.config import ConfigError, get_cfg
from ..device import get_rank
from ..errors import DetectorError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_net.py", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n" + "\n".join(l for l in __doc__.splitlines() if l.startswith("    ")))
    p.add_argument("--config-file", required=True, metavar="FILE", help="YAML config")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR/last_checkpoint (iteration, optimizer, "
                        "scheduler and random state)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate MODEL.WEIGHTS on DATASETS.TEST and write the metrics and "
                        "predictions_<name>.json to OUTPUT_DIR")
    p.add_argument("--export", metavar="PATH", default=None,
                   help="write checkpoint MODEL.WEIGHTS to PATH with the test-time keys given "
                        "as KEY VALUE (e.g. TEST.SCORE_THRESH chosen on validation, "
                        "TEST.AUG.ENABLED True) set in its config, for infer_tiles.py; nothing "
                        "is trained or evaluated")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="processes to start on this machine (one per GPU; with MODEL.DEVICE "
                        "cpu: CPU processes on gloo)")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                   help="config overrides, e.g. OUTPUT_DIR out/run1 SOLVER.MAX_ITER 2000")
    return p


FLAGS_WITHOUT_VALUE = ("--resume", "--eval-only")


def split_trailing_flags(opts: List[str]) -> tuple:
    """Flags written after the ``KEY VALUE`` pairs (argparse leaves them among the pairs):
    ``--resume`` / ``--eval-only`` are taken out and returned; any other ``--flag`` at a KEY
    position is refused, naming it."""
    flags, rest = [], []
    for tok in opts:
        if tok in FLAGS_WITHOUT_VALUE:
            flags.append(tok)
        elif tok.startswith("--") and len(rest) % 2 == 0:
            raise ConfigError(f"command line: '{tok}' comes after the KEY VALUE overrides; put "
                              "flags before them (e.g. train_net.py --config-file CFG "
                              f"{tok} ... OUTPUT_DIR out/run1)")
        else:
            rest.append(tok)
    return flags, rest


def check_output_dir(path: str) -> None:
    """OUTPUT_DIR must be a folder this user can create and write (checked before any work)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"OUTPUT_DIR {path}: cannot write there ({e.strerror}); choose a "
                          "folder you can write to (OUTPUT_DIR path/to/run)") from None


def _run(cfg, resume: bool) -> None:
    """Per-process entry point (also the target of the multi-process launcher)."""
    from ..engine.logger import setup_logging
    from ..engine.trainer import Trainer

    rank = get_rank()
    setup_logging(cfg.OUTPUT_DIR, rank)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        # in a worker process: report user errors cleanly instead of a traceback per rank
        try:
            Trainer(cfg, resume=resume).train()
        except _user_errors() as e:
            if rank == 0:
                print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    else:
        Trainer(cfg, resume=resume).train()


def export(cfg, keys: List[str], path: str) -> int:
    """``--export PATH``: MODEL.WEIGHTS with the test-time ``keys`` given on the command line."""
    from omegaconf import OmegaConf

    from ..engine.checkpoint import export_checkpoint

    if not cfg.MODEL.WEIGHTS:
        raise ConfigError("--export needs MODEL.WEIGHTS (the checkpoint to export)")
    settings = {k: OmegaConf.select(cfg, k) for k in keys if k not in ("MODEL.WEIGHTS", "OUTPUT_DIR")}
    export_checkpoint(cfg.MODEL.WEIGHTS, path, settings)  # refuses keys that are not test-time
    shown = ", ".join(f"{k} {v}" for k, v in settings.items()) or "no key changed"
    print(f"wrote {path} ({shown})")
    return 0


def _user_errors() -> tuple:
    """Errors whose message tells the user what to fix (printed without a traceback)."""
    return (DetectorError, FileNotFoundError)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    errors = _user_errors()
    try:
        flags, opts = split_trailing_flags(args.opts)
        args.resume = args.resume or "--resume" in flags
        args.eval_only = args.eval_only or "--eval-only" in flags
        cfg = get_cfg(args.config_file, opts)
        if args.export:
            return export(cfg, opts[0::2], args.export)
        check_output_dir(cfg.OUTPUT_DIR)
        if args.eval_only:
            from ..engine.evaluator import format_metrics
            from ..engine.logger import setup_logging
            from ..engine.trainer import evaluate_only

            setup_logging(cfg.OUTPUT_DIR)
            metrics = evaluate_only(cfg)
            print(format_metrics(metrics))
            return 0
        from ..engine.trainer import UNTRAINED_ARCHITECTURES

        if cfg.MODEL.META_ARCHITECTURE in UNTRAINED_ARCHITECTURES:  # nothing to learn
            from ..engine.evaluator import format_metrics
            from ..engine.logger import setup_logging
            from ..engine.trainer import save_untrained

            setup_logging(cfg.OUTPUT_DIR)
            metrics = save_untrained(cfg)
            if metrics:
                print(format_metrics(metrics))
            return 0
        if args.num_gpus < 1:
            raise ConfigError("--num-gpus must be at least 1")
        if int(cfg.SOLVER.IMS_PER_BATCH) % args.num_gpus:
            raise ConfigError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is the total over "
                              f"--num-gpus {args.num_gpus} processes and must be divisible by it")
        from ..engine.distributed import launch

        import torch.multiprocessing as mp

        try:
            launch(_run, args.num_gpus, (cfg, args.resume))
        except mp.ProcessExitedException as e:
            print(f"error: a training process exited with code {e.exit_code}", file=sys.stderr)
            return 2
        return 0
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
