"""``make demo`` / ``python -m detector.demo``: the whole pipeline on a built-in synthetic data set.

Steps (each one runs a tool through its Python entry point, ``detector.cli.<tool>.main``, with
the arguments a user would type; the equivalent command line is printed before it runs):

1. generate synthetic H&E fields (``images/``, 16-bit instance ``labels/``, ``classes/`` maps:
   1 nucleus, 2 mitotic figure) and a 3-level pyramidal TIFF slide with known mitotic figures
   (:mod:`detector.data.synthetic`);
2. ``convert_to_coco.py --format labels --classes`` -> two-class COCO train/test files, and
   without ``--classes`` the same split with one class (every nucleus) for the U-Net;
3. ``train_net.py`` a small Mask R-CNN (``configs/demo/mask_rcnn_R_18_FPN.yaml``) and the small
   U-Net (``configs/demo/unet.yaml``), then ``--eval-only`` of each on the test images;
4. ``evaluate.py`` both models side by side (class-agnostic: the U-Net has one class) -> the
   comparison report, and the Mask R-CNN per class;
5. ``infer_tiles.py`` the Mask R-CNN on the synthetic slide (score threshold 0.4 here and in
   the evaluation: a few minutes of training leave the rare class's scores low);
6. print the mitotic count per 10 HPF and the mitotic index, predicted vs true, and the paths of
   the report, the overlay and the GeoJSON; everything also goes to ``<out>/summary.json``.

Outputs under ``--out`` (default ``output/demo``): ``data/``, ``runs/maskrcnn/``, ``runs/unet/``,
``report/``, ``slides/``, ``summary.json``. ``--quick`` runs the same steps at test size (a few
images and iterations, a small slide) in under a minute. Measured on 2 idle CPU cores: 3.9
minutes, 92 of 120 mitotic figures found on the slide (mitotic index 0.031 vs 0.035 true).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import api
from .data.synthetic import write_dataset, write_slide
from .engine.logger import setup_logging
from .errors import EXIT_USER_ERROR, DetectorError, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs", "demo")
CATEGORIES = "1=nucleus,2=mitotic figure"
SLIDE_NAME = "synthetic_slide"


@dataclass
class DemoSize:
    """How big the demo runs. ``None`` iterations: the config's ``SOLVER.MAX_ITER``."""

    train_images: int = 48           # fields of the training + test set (split 80/20 by image)
    image_size: int = 256            # px, square fields at 0.5 um/px
    mitotic_fraction: float = 0.15   # of the training fields' nuclei: more figures to learn from
    edge_fraction: float = 0.35      # fields crossed by a tissue border (glass beyond it)
    slide_size: int = 2048           # px, square slide at 0.5 um/px (1 mm x 1 mm)
    slide_levels: int = 3
    slide_mitotic_fraction: float = 0.03
    # a short training leaves the mitotic figures' scores low (a rare class): keep those > 0.4
    score_thresh: float = 0.4
    maskrcnn_iters: Optional[int] = None
    unet_iters: Optional[int] = None
    bootstrap: int = 200


FULL = DemoSize()
QUICK = DemoSize(train_images=5, image_size=192, slide_size=512, slide_levels=2,
                 maskrcnn_iters=2, unet_iters=2, bootstrap=20)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m detector.demo",
        description="The whole detector pipeline on a built-in synthetic data set:\n"
                    "generate -> convert_to_coco -> train Mask R-CNN (nucleus, mitotic figure)\n"
                    "and U-Net -> evaluate (comparison report) -> infer_tiles on a synthetic\n"
                    "slide -> mitotic count per 10 HPF and mitotic index, predicted vs true.\n"
                    "Outputs under --out: data/, runs/maskrcnn/, runs/unet/, report/, slides/,\n"
                    "summary.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="About 4 minutes on 2 free CPU cores; on a busy machine training stops at the\n"
               "configs' SOLVER.TIME_LIMIT_MINUTES (the demo then ends within about 10 minutes,\n"
               "with a less trained model). --quick: under a minute, untrained.\n"
               "Each step prints the command line that does the same, to copy.")
    p.add_argument("--out", default=os.path.join("output", "demo"), metavar="DIR",
                   help="output folder (default: output/demo)")
    p.add_argument("--quick", action="store_true",
                   help="test size: a few images, 2 training iterations, a small slide "
                        "(checks the pipeline; the counts are meaningless)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic data, the split and training (default 0)")
    p.add_argument("--device", default="cpu",
                   help="device for training and inference: cpu (default), cuda, auto")
    return p


def _cmd(tool: str, args: Sequence[str]) -> str:
    """The command line of ``tools/<tool>.py`` that does what a step does through the API."""
    return " ".join(["python", f"tools/{tool}.py"] + [shlex.quote(str(a)) for a in args])


def _flags(options: Dict[str, Any]) -> List[str]:
    """API keyword options as the tool's flags (``score_thresh=0.4`` -> ``--score-thresh
    0.4``; True -> the bare flag; lists -> one value each)."""
    out: List[str] = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif isinstance(v, (list, tuple)):
            out += [flag] + [str(x) for x in v]
        elif v is not None and v is not False:
            out += [flag, str(v)]
    return out


def _pairs(overrides: Dict[str, Any]) -> List[str]:
    """Config overrides as the trailing ``KEY VALUE`` pairs of ``train_net.py``."""
    out: List[str] = []
    for k, v in overrides.items():
        out += [k, "[" + ",".join(map(str, v)) + "]" if isinstance(v, (list, tuple)) else str(v)]
    return out


def _train(config_file: str, overrides: Dict[str, Any], run_dir: str) -> str:
    """One training run with the log in ``run_dir/log.txt``, as ``train_net.py`` writes it.
    The demo's own run of an earlier demo is removed first (training refuses to overwrite a
    finished run)."""
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    setup_logging(run_dir)
    return api.train(config_file, overrides)


class DemoError(RuntimeError, DetectorError):
    """A step failed; the message names the step and the command to rerun."""


class Runner:
    """Runs the steps, prints them, and times them."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self.commands: Dict[str, str] = {}
        self.n = 0

    def step(self, key: str, title: str, command: Optional[str],
             fn: Callable[[], Any]) -> Any:
        self.n += 1
        print(f"\n[{self.n}] {title}", flush=True)
        if command:
            print(f"    $ {command}", flush=True)
            self.commands[key] = command
        t0 = time.perf_counter()
        try:
            out = fn()
        except DetectorError as e:  # what the tool would print before exiting with status 2
            raise DemoError(f"step {self.n} ({title}) failed with exit status "
                            f"{EXIT_USER_ERROR} ({e}); the command was:\n    {command}") from None
        self.seconds[key] = round(time.perf_counter() - t0, 1)
        print(f"    ({self.seconds[key]:.0f} s)", flush=True)
        return out


def _predictions(run_dir: str, gt: str) -> str:
    return os.path.join(run_dir, f"predictions_{os.path.splitext(os.path.basename(gt))[0]}.json")


def run_demo(out: str, size: DemoSize, seed: int = 0, device: str = "cpu") -> Dict[str, Any]:
    """Run every step into ``out``; returns the summary (also written to ``out/summary.json``).

    Raises :class:`DemoError` when a step fails."""
    t_start = time.perf_counter()
    out = os.path.abspath(out)
    data, runs = os.path.join(out, "data"), os.path.join(out, "runs")
    fields = os.path.join(data, "synthetic")
    slide = os.path.join(data, SLIDE_NAME + ".tif")
    r = Runner()
    rel = lambda p: os.path.relpath(p) if not os.path.relpath(p).startswith("..") else p  # noqa

    # 1. data
    def generate() -> Dict[str, Any]:
        ds = write_dataset(fields, n_images=size.train_images,
                           size=(size.image_size, size.image_size), seed=seed,
                           mitotic_fraction=size.mitotic_fraction, mpp=0.5, progress=True,
                           edge_fraction=size.edge_fraction)
        truth = write_slide(slide, size=(size.slide_size, size.slide_size), mpp=0.5,
                            seed=seed + 1, mitotic_fraction=size.slide_mitotic_fraction,
                            levels=size.slide_levels)
        print(f"    {ds['images']} fields of {size.image_size} px: {ds['nuclei']} nuclei, "
              f"{ds['mitotic_figures']} mitotic figures -> {rel(fields)}/")
        print(f"    slide {size.slide_size} x {size.slide_size} px at 0.5 um/px, "
              f"{size.slide_levels} levels: {truth['nuclei']} nuclei, {truth['mitotic_figures']} "
              f"mitotic figures -> {rel(slide)}")
        return truth

    truth = r.step("generate", "generate synthetic H&E fields and a pyramidal slide "
                   "(detector.data.synthetic)", None, generate)

    # 2. COCO (--workers 1: a few small images, and no processes forked from this one, which
    # may already hold torch's threads)
    two = os.path.join(data, "synthetic.json")
    kw: Dict[str, Any] = dict(format="labels", input=[fields],
                              classes=os.path.join(fields, "classes"), categories=CATEGORIES,
                              mpp=0.5, split="train=0.8,test=0.2", seed=seed, workers=1,
                              output=two)
    r.step("convert", "convert label images + class maps to COCO (two classes), split by image",
           _cmd("convert_to_coco", _flags(kw)), lambda kw=kw: api.convert(**kw))
    two_train, two_test = (os.path.join(data, f"synthetic_{s}.json") for s in ("train", "test"))
    one_train, one_test = (os.path.join(data, f"nuclei_{s}.json") for s in ("train", "test"))
    kw = dict(format="labels", input=[fields], mpp=0.5, split="train=0.8,test=0.2", seed=seed,
              workers=1, output=os.path.join(data, "nuclei.json"))
    r.step("convert_one_class", "the same split with one class (every nucleus) for the U-Net",
           _cmd("convert_to_coco", _flags(kw)), lambda kw=kw: api.convert(**kw))

    # 3. training and test-set predictions
    models = [("maskrcnn", "Mask R-CNN", "mask_rcnn_R_18_FPN.yaml", two_train, two_test,
               size.maskrcnn_iters),
              ("unet", "U-Net", "unet.yaml", one_train, one_test, size.unet_iters)]
    preds: Dict[str, str] = {}
    for key, name, cfg_name, train, test, iters in models:
        cfg = os.path.join(CONFIG_DIR, cfg_name)
        run_dir = os.path.join(runs, key)
        over: Dict[str, Any] = {"DATASETS.TRAIN": [train], "DATASETS.TEST": [],
                                "OUTPUT_DIR": run_dir, "SEED": seed, "MODEL.DEVICE": device}
        if iters is not None:
            over.update({"SOLVER.MAX_ITER": iters, "SOLVER.WARMUP_ITERS": 1})
        r.step(f"train_{key}", f"train the {name}", _cmd("train_net", ["--config-file", cfg]
                                                         + _pairs(over)),
               lambda cfg=cfg, over=over, run_dir=run_dir: _train(cfg, over, run_dir))
        weights = os.path.join(run_dir, "model_final.pth")
        pover = {"MODEL.DEVICE": device}
        shown = {"MODEL.WEIGHTS": weights, "DATASETS.TEST": [test], "OUTPUT_DIR": run_dir, **pover}
        r.step(f"predict_{key}", f"{name}: predictions on the test fields",
               _cmd("train_net", ["--config-file", cfg, "--eval-only"] + _pairs(shown)),
               lambda cfg=cfg, weights=weights, test=test, run_dir=run_dir, pover=pover:
               api.predict_dataset(cfg, weights, [test], run_dir, pover))
        preds[key] = _predictions(run_dir, test)

    # 4. evaluation
    report = os.path.join(out, "report")
    kw = dict(gt=one_test, pred=[preds["maskrcnn"], preds["unet"]],
              names=["Mask R-CNN", "U-Net"], class_agnostic=True, score_thresh=size.score_thresh,
              bootstrap=size.bootstrap, seed=seed, out=report)
    r.step("evaluate", "compare the two models on the test fields (every nucleus, "
           "class-agnostic) -> report", _cmd("evaluate", _flags(kw)),
           lambda kw=kw: api.evaluate(**kw))
    per_class = os.path.join(report, "maskrcnn_per_class")
    kw = dict(gt=two_test, pred=[preds["maskrcnn"]], names=["Mask R-CNN"],
              score_thresh=size.score_thresh, bootstrap=0, no_report=True, out=per_class)
    r.step("evaluate_classes", "Mask R-CNN per class (nucleus, mitotic figure)",
           _cmd("evaluate", _flags(kw)), lambda kw=kw: api.evaluate(**kw))

    # 5. the slide
    slides = os.path.join(out, "slides")
    weights = os.path.join(runs, "maskrcnn", "model_final.pth")
    kw = dict(batch_size=2, num_workers=0, score_thresh=size.score_thresh)
    r.step("infer", "run the Mask R-CNN over the slide, tile by tile",
           _cmd("infer_tiles", _flags(dict(weights=weights, input=[slide], output=slides,
                                           device=device, **kw))),
           lambda kw=kw: api.load(weights, device).predict_slide(slide, slides, **kw))

    # 6. summary
    slide_dir = os.path.join(slides, SLIDE_NAME)
    with open(os.path.join(slide_dir, "summary.json"), encoding="utf-8") as f:
        pred = json.load(f)
    with open(os.path.join(report, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    with open(os.path.join(per_class, "metrics.json"), encoding="utf-8") as f:
        metrics_cls = json.load(f)
    mit = pred["mitotic_figures"]
    summary: Dict[str, Any] = {
        "size": asdict(size), "seed": seed, "device": device,
        "slide": {
            "predicted": {"mitotic_figures": mit["total"], "per_10_hpf": mit["per_10_hpf"],
                          "per_mm2": mit["per_mm2"], "mitotic_index": pred["mitotic_index"],
                          "nuclei": pred["counts"].get("nucleus"),
                          "tissue_area_mm2": pred["tissue_area_mm2"]},
            "true": {"mitotic_figures": truth["mitotic_figures"],
                     "per_10_hpf": truth["mitoses_per_10hpf_0.237"],
                     "per_mm2": truth["mitoses_per_mm2"],
                     "mitotic_index": truth["mitotic_index"], "nuclei": truth["nuclei"],
                     "tissue_area_mm2": truth["tissue_area_mm2"]},
            "hpf_area_mm2": mit["hpf_area_mm2"],
        },
        "evaluation": _f1s(metrics) | {"Mask R-CNN per class": _per_class_f1(metrics_cls)},
        "paths": {
            "report": os.path.join(report, "report.md"),
            "report_html": os.path.join(report, "report.html"),
            "overlay": os.path.join(slide_dir, "overlay.png"),
            "geojson": os.path.join(slide_dir, "detections.geojson"),
            "slide_summary": os.path.join(slide_dir, "summary.json"),
            "summary": os.path.join(out, "summary.json"),
            "slide": slide, "maskrcnn": os.path.join(runs, "maskrcnn", "model_final.pth"),
            "unet": os.path.join(runs, "unet", "model_final.pth"),
        },
        "commands": r.commands,
        "seconds": r.seconds | {"total": round(time.perf_counter() - t_start, 1)},
    }
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print_summary(summary)
    return summary


def _f1s(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """``{model name: {f1, precision, recall, dsb_score}}`` from an evaluate metrics.json."""
    out = {}
    for m in metrics.get("models", []):
        o = m.get("summary", {})
        out[m["name"]] = {k: o.get(k) for k in ("f1", "precision", "recall", "dsb_score", "AP",
                                                "AJI", "PQ") if k in o}
    return out


def _per_class_f1(metrics: Dict[str, Any]) -> Dict[str, Any]:
    models = metrics.get("models", [])
    if not models:
        return {}
    pc = models[0].get("per_class", {})
    if isinstance(pc, list):
        return {str(c.get("name")): c.get("f1") for c in pc}
    return {str(k): (v.get("f1") if isinstance(v, dict) else v) for k, v in pc.items()}


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_summary(s: Dict[str, Any]) -> None:
    pred, true = s["slide"]["predicted"], s["slide"]["true"]
    print("\n" + "=" * 72)
    print(f"Synthetic slide ({true['tissue_area_mm2']:.2f} mm² of tissue; 10 HPF = "
          f"{10 * s['slide']['hpf_area_mm2']:.2f} mm²)")
    rows = [("", "predicted", "true"),
            ("mitotic figures", _fmt(pred["mitotic_figures"], "d"),
             _fmt(true["mitotic_figures"], "d")),
            ("mitotic count per 10 HPF", _fmt(pred["per_10_hpf"], ".1f"),
             _fmt(true["per_10_hpf"], ".1f")),
            ("mitotic index", _fmt(pred["mitotic_index"], ".3f"),
             _fmt(true["mitotic_index"], ".3f")),
            ("nuclei (non-mitotic)", _fmt(pred["nuclei"], "d"), _fmt(true["nuclei"], "d"))]
    for a, b, c in rows:
        print(f"  {a:<26}{b:>12}{c:>12}")
    ev = s["evaluation"]
    for name, m in ev.items():
        if name == "Mask R-CNN per class":
            if m:
                print("  test fields, Mask R-CNN F1 per class: " + ", ".join(
                    f"{k} {_fmt(v, '.3f')}" for k, v in m.items()))
        elif m:
            print(f"  test fields, {name}: F1 {_fmt(m.get('f1'), '.3f')} (all nuclei, IoU 0.5)")
    p = s["paths"]
    print(f"\nreport:   {p['report']}  (and report.html)")
    print(f"overlay:  {p['overlay']}")
    print(f"GeoJSON:  {p['geojson']}  (QuPath: File > Import objects from file)")
    print(f"summary:  {p['summary']}")
    print(f"demo took {s['seconds']['total'] / 60:.1f} min")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    size = QUICK if args.quick else FULL
    try:
        run_demo(args.out, size, seed=args.seed, device=args.device)
    except DemoError as e:
        print(f"\ndemo: {e}", file=sys.stderr)
        return 1
    except DetectorError as e:  # a bad --out, an unreadable file, ...
        return report(e, "\ndemo")
    except OSError as e:
        print(f"\ndemo: {getattr(e, 'filename', '') or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
