"""GPU readiness check: train the R50 Mask R-CNN config briefly in bf16, then run
``infer_tiles.py`` on a large synthetic pyramidal slide; print one table.

    benchmarks/gpu_check.sh            # on a machine with one GPU: under 8 minutes
    GPU_CHECK_TINY=1 benchmarks/gpu_check.sh   # dry run on CPU at tiny sizes (minutes)

Steps (every figure comes from this run; nothing is read from elsewhere):
1. data: synthetic H&E fields (``detector.data.synthetic``, no download, no ../shared) ->
   ``convert_to_coco.py --format labels`` (two classes: nucleus, mitotic figure);
2. training: ``train_net.py --config-file configs/nuclei/mask_rcnn_R_50_FPN.yaml`` for
   ``GPU_CHECK_ITERS`` iterations (200) with bf16 autocast (``SOLVER.AMP``): images/s over the
   iterations after the first 20 % (warm-up excluded) and peak GPU memory, from ``metrics.json``;
3. a ``GPU_CHECK_SLIDE`` px square pyramidal TIFF (20000; JPEG tiles, every tile tissue) written
   with tifffile tile by tile from a synthetic field;
4. on a ``GPU_CHECK_NAIVE_SLIDE`` px slide (4096) of the same tissue, this tool against the
   naive per-tile loop of ``bench_infer.py`` (one tile at a time, torchvision's forward, fp32)
   in this process after one warm-up forward; then ``infer_tiles.py`` on the big slide (Mpx/s
   of slide). Each figure is logged as soon as it is measured, so a run cut short by its time
   limit still leaves the earlier ones.

Environment: ``GPU_CHECK_DEVICE`` (cuda, or cpu with GPU_CHECK_TINY), ``GPU_CHECK_ITERS``,
``GPU_CHECK_SLIDE``, ``GPU_CHECK_NAIVE_SLIDE``, ``GPU_CHECK_BATCH`` (training images per step,
8), ``GPU_CHECK_WORKERS`` (the training's data workers; the config's 4 when unset),
``GPU_CHECK_TILE`` (512), ``GPU_CHECK_OUT`` (a temporary folder), ``GPU_CHECK_PROFILE`` (a
folder: cProfile listings of 40 more training iterations (at most GPU_CHECK_ITERS) and of this
tool on the small slide, ``train_profile.txt`` and ``infer_profile.txt``, to see where the host
spends the time).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
TINY = os.environ.get("GPU_CHECK_TINY", "") not in ("", "0")


def env_int(name: str, full: int, tiny: int) -> int:
    return int(os.environ.get(name, tiny if TINY else full))


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: List[str]) -> float:
    log(" ".join(cmd))
    # the tools import this checkout's detector, as this script does (not another install)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return time.perf_counter() - t


def write_tissue_slide(path: str, size: int, texture: np.ndarray, mpp: float) -> None:
    """A ``size`` x ``size`` pyramidal TIFF (JPEG, 256 px tiles) whose every tile is tissue:
    ``texture`` repeated; written tile by tile (the slide is never in memory)."""
    import cv2

    levels = max(1, int(np.ceil(np.log2(max(size, 1024) / 1024))) + 1)

    def tiles(level: int):
        f = 2 ** level
        small = cv2.resize(texture, (max(1, texture.shape[1] // f), max(1, texture.shape[0] // f)),
                           interpolation=cv2.INTER_AREA)
        reps = (-(-512 // small.shape[0]) + 1, -(-512 // small.shape[1]) + 1, 1)
        big = np.tile(small, reps)
        n = -(-(size // f) // 256)
        for j in range(n):
            for i in range(n):
                y0, x0 = (j * 256) % small.shape[0], (i * 256) % small.shape[1]
                yield np.ascontiguousarray(big[y0:y0 + 256, x0:x0 + 256])

    import bench_infer

    bench_infer.write_tiled_pyramid(path, size, tiles, levels, mpp)


def write_listing(prof: str, path: str) -> None:
    """The cProfile listing of ``prof`` by own time and by cumulative time, as text."""
    import io
    import pstats

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(45)
    st.sort_stats("cumulative").print_stats(60)
    with open(path, "w") as f:
        f.write(buf.getvalue())
    log(f"profile: {path}")


def profile_listing(fn, path: str) -> None:
    import cProfile

    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    pr.dump_stats(path + ".prof")
    write_listing(path + ".prof", path)


def training_figures(out_dir: str, batch: int) -> Dict[str, float]:
    recs = []
    with open(os.path.join(out_dir, "metrics.json")) as f:
        for line in f:
            r = json.loads(line)
            if "time" in r:
                recs.append(r)
    if not recs:
        raise SystemExit(f"no timed iterations in {out_dir}/metrics.json")
    last = recs[-1]["iteration"] if "iteration" in recs[-1] else len(recs)
    steady = [r for r in recs if r.get("iteration", 0) >= 0.2 * last] or recs
    t = float(np.median([r["time"] for r in steady]))
    return {"images_per_s": batch / t, "s_per_iter": t,
            "memory_mb": max(float(r.get("memory_mb", 0)) for r in recs)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args()
    device = os.environ.get("GPU_CHECK_DEVICE", "cpu" if TINY else "cuda")
    iters = env_int("GPU_CHECK_ITERS", 200, 2)
    slide_px = env_int("GPU_CHECK_SLIDE", 20000, 512)
    naive_px = env_int("GPU_CHECK_NAIVE_SLIDE", 4096, 256)
    batch = env_int("GPU_CHECK_BATCH", 8, 1)
    tile = env_int("GPU_CHECK_TILE", 512, 256)
    fields = env_int("GPU_CHECK_FIELDS", 48, 4)
    out = os.environ.get("GPU_CHECK_OUT") or tempfile.mkdtemp(prefix="gpu_check_")
    prof_dir = os.environ.get("GPU_CHECK_PROFILE")
    py = sys.executable
    t_all = time.perf_counter()
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (set GPU_CHECK_TINY=1 for a CPU dry run)")
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU (dry run)"
    log(f"{gpu}; torch {torch.__version__}; out {out}; tiny={TINY}")
    # an earlier check's outputs in the same folder would stop the training (it refuses to
    # overwrite a run) and let the slide run skip a finished slide: start afresh
    for old in ("train", "tool", "tool_p", "infer"):
        shutil.rmtree(os.path.join(out, old), ignore_errors=True)

    # 1. data
    from detector.data.synthetic import render_field, write_dataset

    data = os.path.join(out, "fields")
    write_dataset(data, n_images=fields, size=(256, 256), seed=0, mpp=0.5)
    coco = os.path.join(out, "synthetic.json")
    run([py, "tools/convert_to_coco.py", "--format", "labels", "--input", data, "--classes",
         os.path.join(data, "classes"), "--categories", "1=nucleus,2=mitotic figure",
         "--mpp", "0.5", "--workers", "1", "--quiet", "--output", coco])

    # 2. training, bf16
    train_dir = os.path.join(out, "train")
    opts = ["DATASETS.TRAIN", f"[{coco}]", "DATASETS.TEST", "[]", "MODEL.DEVICE", device,
            "SOLVER.MAX_ITER", str(iters), "SOLVER.IMS_PER_BATCH", str(batch),
            "SOLVER.WARMUP_ITERS", str(max(1, iters // 10)), "SOLVER.CHECKPOINT_PERIOD", str(iters),
            "SOLVER.LOG_PERIOD", str(max(1, iters // 20)), "SOLVER.AMP.ENABLED", "true",
            "SOLVER.AMP.DTYPE", "bf16", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", train_dir]
    if TINY:
        opts += ["INPUT.CROP_SIZE", "96", "DATALOADER.NUM_WORKERS", "0"]
    elif os.environ.get("GPU_CHECK_WORKERS"):  # data workers of the training (config: 4)
        opts += ["DATALOADER.NUM_WORKERS", str(int(os.environ["GPU_CHECK_WORKERS"]))]
    t_train = run([py, "tools/train_net.py", "--config-file",
                   "configs/nuclei/mask_rcnn_R_50_FPN.yaml", *opts])
    tr = training_figures(train_dir, batch)
    if prof_dir:
        prof = os.path.join(out, "train.prof")
        run([py, "-m", "cProfile", "-o", prof, "tools/train_net.py", "--config-file",
             "configs/nuclei/mask_rcnn_R_50_FPN.yaml", *opts, "SOLVER.MAX_ITER", str(min(40, iters)),
             "OUTPUT_DIR", train_dir + "_prof"])
        write_listing(prof, os.path.join(prof_dir, "train_profile.txt"))
    weights = os.path.join(train_dir, "model_final.pth")

    log(f"training: {tr['images_per_s']:.1f} images/s ({tr['s_per_iter']:.3f} s/it), "
        f"{tr['memory_mb']:.0f} MB peak, {t_train:.0f} s with start-up")

    # 3. slides
    texture = render_field(np.random.default_rng(1), size=(1024, 1024), kind="he").image
    big = os.path.join(out, f"slide_{slide_px}.tif")
    small = os.path.join(out, f"slide_{naive_px}.tif")
    t = time.perf_counter()
    write_tissue_slide(small, naive_px, texture, 0.5)
    write_tissue_slide(big, slide_px, texture, 0.5)
    log(f"slides written in {time.perf_counter() - t:.0f} s")

    # 4. this tool against the naive loop on the small slide first (in this process, after a
    # warm-up forward: allocator, cuDNN autotune), then the CLI on the big slide
    import bench_infer as B

    from detector.modeling.build import load_model

    workers = "2" if TINY else "4"
    model, _cfg, classes, mpp = load_model(weights, device)
    with torch.inference_mode():
        model([torch.rand(3, tile, tile, device=device)])
    args = argparse.Namespace(tile_size=tile, overlap=64, batch_size=8 if not TINY else 2,
                              num_workers=int(workers), streams=None, score_thresh=0.3,
                              fp32=False)
    dt_tool, boxes_tool, tissue_mpx = B.run_tool(model, classes, mpp, small,
                                                 os.path.join(out, "tool"), args)
    dt_naive, boxes_naive = B.run_naive(model, classes, mpp, small, args)
    if prof_dir:
        profile_listing(lambda m=model: B.run_tool(m, classes, mpp, small, os.path.join(out, "tool_p"),
                                           args), os.path.join(prof_dir, "infer_profile.txt"))
    f1 = B.box_f1(boxes_naive, boxes_tool)
    mpx_small = naive_px * naive_px / 1e6
    log(f"{naive_px} px slide: this tool {mpx_small / dt_tool:.3g} Mpx/s, naive loop "
        f"{mpx_small / dt_naive:.3g} Mpx/s ({dt_naive / dt_tool:.2f}x), F1 vs naive {f1:.3f}, "
        f"{len(boxes_tool)} detections ({len(boxes_tool) / mpx_small:.0f} per Mpx)")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    t_big = run([py, "tools/infer_tiles.py", "--weights", weights, "--input", big, "--output",
                 os.path.join(out, "infer"), "--device", device, "--tile-size", str(tile),
                 "--batch-size", "8" if not TINY else "2", "--overlap", "64",
                 "--num-workers", workers, "--quiet"])
    stem = os.path.splitext(os.path.basename(big))[0]
    with open(os.path.join(out, "infer", stem, "summary.json")) as f:
        summary = json.load(f)
    model_s = summary["analysis"]["seconds"]
    # summary.json's seconds: the tiles through the model (model_seconds), then merge, region
    # filter and counts; the files are written after it (start-up and export: the rest)
    tiles_s = float(summary["analysis"].get("model_seconds", model_s))
    log(f"{slide_px} px slide: {t_big:.0f} s with start-up = {tiles_s:.0f} s tiles through the "
        f"model + {model_s - tiles_s:.0f} s merge, filter and counts + {t_big - model_s:.0f} s "
        f"start-up and export; {summary['total_detections']} detections")

    mpx_big = slide_px * slide_px / 1e6
    total = time.perf_counter() - t_all
    print(f"\nGPU check on {gpu} (device {device}), torch {torch.__version__}"
          + (" -- CPU DRY RUN AT TINY SIZES, not a GPU measurement" if TINY else ""))
    print("| step | size | seconds | rate | memory |")
    print("|---|---|---|---|---|")
    print(f"| train R50 Mask R-CNN, bf16 | {iters} it x {batch} img | {t_train:.0f} | "
          f"{tr['images_per_s']:.1f} images/s ({tr['s_per_iter']:.3f} s/it) | "
          f"{tr['memory_mb']:.0f} MB peak |")
    print(f"| infer_tiles.py (CLI, incl. start-up) | {slide_px} x {slide_px} px | {t_big:.0f} | "
          f"{mpx_big / t_big:.3g} Mpx/s ({tiles_s:.0f} s tiles, {model_s - tiles_s:.0f} s merge "
          f"and counts, {t_big - model_s:.0f} s start-up and export) | "
          f"{summary['total_detections']} detections "
          f"({summary['total_detections'] / mpx_big:.0f} per Mpx) |")
    print(f"| infer_slide (library) | {naive_px} x {naive_px} px | {dt_tool:.1f} | "
          f"{mpx_small / dt_tool:.3g} Mpx/s, {dt_naive / dt_tool:.2f}x naive | F1 vs naive "
          f"{f1:.3f} |")
    print(f"| naive per-tile loop (fp32) | {naive_px} x {naive_px} px | {dt_naive:.1f} | "
          f"{mpx_small / dt_naive:.3g} Mpx/s | {len(boxes_naive)} detections "
          f"({len(boxes_naive) / mpx_small:.0f} per Mpx) |")
    print(f"(whole check: {total / 60:.1f} min; outputs in {out})")
    for path in glob.glob(os.path.join(out, "slide_*.tif")):
        os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
