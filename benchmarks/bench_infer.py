"""Whole-slide inference speed and memory: this tool vs a naive tile loop vs SAHI.

    python benchmarks/bench_infer.py [--weights CKPT] [--size 2000] [--tile-size 512]
        [--overlap 64] [--batch-size N] [--num-workers N] [--device auto]
        [--memory-sizes 10000,40000] [--repeats 3] [--skip-sahi] [--skip-memory]

Part 1 (one table): megapixels of tissue per second on the same image (a mosaic of real MoNuSeg
H&E tiles written as a pyramidal TIFF) and the same model, for
  - ``infer_tiles``: this tool (DataLoader workers reading tiles ahead, batches, merge);
  - ``naive loop``: the same tiles read and predicted one at a time in one process by
    torchvision's own eval forward (every mask pasted into a full-tile raster, then encoded),
    fp32, the same merge (no prefetch, no batching, no crop masks);
  - ``SAHI``: ``sahi.predict.get_sliced_prediction`` with the same torchvision model
    (``pip install sahi``; the benchmark extra), same slice size and overlap, NMS 0.5.
Each is compared with one-piece inference of the whole image (F1 of one-to-one box matching at
IoU 0.5): tiling should not change what is found.

Part 2: peak resident memory (this process and its DataLoader workers) of ``infer_slide`` on
two pyramidal TIFF slides of very different sizes (default 10k x 10k and 40k x 40k px) holding
the same tissue (one H&E mosaic, the rest glass), each run in a fresh process: memory must not
grow with the slide's pixel count.

The model: ``--weights`` (a checkpoint of ours), else a randomly initialised Mask R-CNN
(ResNet-18 FPN): its speed is that of a trained one, but its detections are arbitrary, so the
F1 column then only shows that tiling is consistent, not accuracy.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.environ.get("DETECTOR_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- inputs
def he_mosaic(size: int) -> np.ndarray:
    """``size`` x ``size`` RGB made of the four MoNuSeg H&E tiles (mirrored to fill)."""
    import tifffile

    folder = os.path.join(SHARED, "monuseg")
    tiles = [tifffile.imread(os.path.join(folder, f))[..., :3]
             for f in sorted(os.listdir(folder)) if f.endswith(".tif")]
    if not tiles:
        sys.exit(f"no MoNuSeg tiles in {folder} (see ../shared/data/README.md)")
    t = tiles[0].shape[0]
    n = -(-size // t)
    rows = []
    for j in range(n):
        row = []
        for i in range(n):
            tile = tiles[(i + 2 * j) % len(tiles)]
            if (i + j) % 2:
                tile = tile[:, ::-1]
            row.append(tile)
        rows.append(np.concatenate(row, 1))
    return np.ascontiguousarray(np.concatenate(rows, 0)[:size, :size])


def write_pyramid(path: str, img: np.ndarray, mpp: float, levels: int = 3) -> None:
    import tifffile

    kw = dict(tile=(256, 256), compression="jpeg", photometric="rgb")
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(img, subifds=levels - 1, resolution=(1e4 / mpp, 1e4 / mpp),
                 resolutionunit="CENTIMETER", **kw)
        for k in range(1, levels):
            tw.write(img[:: 2 ** k, :: 2 ** k], subfiletype=1, **kw)


def write_big_slide(path: str, size: int, tissue: np.ndarray, mpp: float) -> None:
    """A ``size`` x ``size`` pyramidal TIFF, glass everywhere except ``tissue`` placed near the
    centre; written tile by tile (never the whole slide in memory)."""
    import cv2

    th, tw_ = tissue.shape[:2]
    oy, ox = (size - th) // 2 // 256 * 256, (size - tw_) // 2 // 256 * 256
    glass = np.full((256, 256, 3), 242, np.uint8)
    levels = max(1, int(np.ceil(np.log2(size / 1024))) + 1)

    def tiles(level: int):
        f = 2 ** level
        n = -(-(size // f) // 256)
        small = cv2.resize(tissue, (max(1, tw_ // f), max(1, th // f)), interpolation=cv2.INTER_AREA)
        sy, sx = oy // f, ox // f
        for j in range(n):
            for i in range(n):
                y0, x0 = j * 256, i * 256
                if y0 + 256 <= sy or y0 >= sy + small.shape[0] or x0 + 256 <= sx or x0 >= sx + small.shape[1]:
                    yield glass
                    continue
                t = glass.copy()
                a0, b0 = max(y0, sy), max(x0, sx)
                a1, b1 = min(y0 + 256, sy + small.shape[0]), min(x0 + 256, sx + small.shape[1])
                t[a0 - y0:a1 - y0, b0 - x0:b1 - x0] = small[a0 - sy:a1 - sy, b0 - sx:b1 - sx]
                yield t

    write_tiled_pyramid(path, size, tiles, levels, mpp)


def write_tiled_pyramid(path: str, size: int, tiles: Any, levels: int, mpp: float) -> None:
    """A ``size`` x ``size`` pyramidal BigTIFF (JPEG, 256 px tiles, ``levels`` levels halving
    each time) from ``tiles(level)``, a generator of the level's 256 px tiles in row order: the
    slide is written tile by tile, never held in memory."""
    import tifffile

    kw = dict(tile=(256, 256), compression="jpeg", photometric="rgb", dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(tiles(0), shape=(size, size, 3), subifds=levels - 1,
                 resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", **kw)
        for k in range(1, levels):
            s = size // 2 ** k
            tw.write(tiles(k), shape=(s, s, 3), subfiletype=1, **kw)


# ------------------------------------------------------------------------------------ model
def get_model(weights: str, device: str) -> Tuple[Any, List[Dict[str, Any]], float, str]:
    import torch

    from detector.modeling.build import build_model, load_model

    if weights:
        model, _cfg, classes, mpp = load_model(weights, device)
        return model, classes, mpp or 0.25, os.path.basename(weights)
    from detector.config.config import get_cfg

    torch.manual_seed(0)
    cfg = get_cfg(None, ["MODEL.BACKBONE.NAME", "resnet18",
                         "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", "100",
                         "MODEL.RPN.POST_NMS_TOPK_TEST", "1000"])
    classes = [{"id": 1, "name": "nucleus"}, {"id": 2, "name": "mitotic figure"}]
    model = build_model(cfg, classes).to(device).eval()
    return model, classes, 0.25, "Mask R-CNN R18-FPN (random init)"


def box_f1(ref, other, thr: float = 0.5) -> float:
    """F1 of a one-to-one box matching at IoU >= thr: the project's sparse matching
    (``evaluation.matching``: overlapping pairs only, Hungarian per conflicting group), so that
    tens of thousands of detections need no dense IoU matrix."""
    from detector.evaluation.matching import iou_pairs, match_pairs

    if len(ref) == 0 and len(other) == 0:
        return 1.0
    if len(ref) == 0 or len(other) == 0:
        return 0.0
    r, c, iou = iou_pairs(np.asarray(ref, np.float64), np.asarray(other, np.float64))
    tp = len(match_pairs(r, c, iou, iou >= thr))
    return 2 * tp / (len(ref) + len(other))


# ------------------------------------------------------------------------------- methods
@contextlib.contextmanager
def plain_torchvision(model):
    """The baselines run torchvision's own modules: the R-CNN's RoIAlign split over threads
    (``ParallelRoIAlign``) and its GroupNorm's channels-last CPU path (``layers.GroupNorm``)
    are switched back to torch's and torchvision's own kernels (their ``fast`` flag)."""
    mods = [m for m in model.modules() if hasattr(m, "fast")]
    for m in mods:
        m.fast = False
    try:
        yield
    finally:
        for m in mods:
            m.fast = True


def tool_options(args):
    """This tool's :class:`InferenceOptions` from the benchmark's flags (speed and memory runs)."""
    from detector.inference.runner import InferenceOptions

    return InferenceOptions(tile_size=args.tile_size, overlap=args.overlap,
                            batch_size=args.batch_size, num_workers=args.num_workers,
                            streams=args.streams, score_thresh=args.score_thresh,
                            progress=False, amp=not args.fp32)


def run_tool(model, classes, mpp, path, out, args) -> Tuple[float, np.ndarray, float]:
    from detector.inference.runner import infer_slide

    opts = tool_options(args)
    t = time.perf_counter()
    s = infer_slide(model, classes, mpp, path, out, opts)
    dt = time.perf_counter() - t
    with open(os.path.join(out, os.path.splitext(os.path.basename(path))[0], "detections.json")) as f:
        dets = json.load(f)
    boxes = np.array([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2],
                       d["bbox"][1] + d["bbox"][3]] for d in dets]).reshape(-1, 4)
    tissue_mpx = s["tissue_area_mm2"] / (s["mpp"] / 1000.0) ** 2 / 1e6
    return dt, boxes, tissue_mpx


def run_naive(model, classes, mpp, path, args) -> Tuple[float, np.ndarray]:
    """The same tiles, one at a time, read in this process right before the model, by
    torchvision's own modules (:func:`plain_torchvision`)."""
    with plain_torchvision(model):
        return _run_naive(model, mpp, path, args)


def _run_naive(model, mpp, path, args) -> Tuple[float, np.ndarray]:
    import torch

    from detector.inference.merge import drop_cut, merge_detections, tile_to_slide
    from detector.inference.runner import read_tile, slide_geometry
    from detector.inference.slide import open_slide
    from detector.inference.tiling import grid_shape, interior_edges, tile_grid, tiles_in_mask
    from detector.inference.tissue import tissue_mask
    from detector.structures.instances import Instances

    t = time.perf_counter()
    reader = open_slide(path)
    W0, H0 = reader.dimensions
    geom = slide_geometry(reader, reader.mpp, mpp)
    tiles = tile_grid(geom.size[1], geom.size[0], args.tile_size, args.overlap)
    rows, cols = grid_shape(geom.size[1], geom.size[0], args.tile_size, args.overlap)
    thumb, tscale = reader.thumbnail(2048)
    selected = tiles_in_mask(tiles, tissue_mask(thumb), tscale / geom.level0_per_analysis)
    parts = []
    for i in np.flatnonzero(selected):
        img = torch.from_numpy(read_tile(reader, geom, tiles[i])).permute(2, 0, 1)
        inst = torchvision_forward(model, img)
        inst = inst[inst.scores >= args.score_thresh]
        inst = drop_cut(inst, interior_edges(int(i), rows, cols, selected))
        parts.append(tile_to_slide(inst, tiles[i][:2], geom.level0_per_analysis, (H0, W0)))
    merged = merge_detections(Instances.cat(parts, (H0, W0)))
    return time.perf_counter() - t, merged.boxes


class PastedMasks:
    """The torchvision model as a plain loop and SAHI use it: masks as full-image probability
    rasters (torchvision's ``paste_masks_in_image``).
    Our transform leaves the mask head's 28 x 28 probabilities unpasted (the tool pastes each
    into its box's crop); SAHI reads ``masks`` as slice rasters, so without this wrapper it
    turns 28 x 28 maps into nonsense outlines and keeps a few dozen detections."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.transform = inner.transform  # SAHI sets its min/max size when given image_size

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def eval(self):  # SAHI keeps what eval() and to() return
        self.inner.eval()
        return self

    def to(self, device):
        self.inner.to(device)
        return self

    def __call__(self, images):
        from torchvision.models.detection.roi_heads import paste_masks_in_image

        outs = self.inner(images)
        for o, im in zip(outs, images):
            if "masks" in o and o["masks"].shape[-2:] != im.shape[-2:]:
                o["masks"] = paste_masks_in_image(o["masks"], o["boxes"], tuple(im.shape[-2:]))
        return outs


def torchvision_forward(model, img):
    """One uint8 tile through torchvision's eval forward (full-tile mask rasters, fp32), as
    :class:`Instances` with masks made from the full-tile rasters: what a plain per-tile loop
    does."""
    import torch

    from detector.structures.instances import Instances
    from detector.structures.masks import CropMask

    inner = getattr(model, "model", None)
    if inner is None:  # not an R-CNN: its own forward
        with torch.inference_mode():
            return model([img.float() / 255.0])[0]
    dev = next(model.parameters()).device
    with torch.inference_mode():  # masks pasted into full-tile rasters, as a plain loop does
        out = PastedMasks(inner)([img.to(dev).float() / 255.0])[0]
    masks = None
    if "masks" in out:
        m = (out["masks"][:, 0] > model.mask_threshold).cpu().numpy()
        masks = [CropMask.from_full(x) for x in m]
    labels = model.label_to_id[out["labels"]].cpu().numpy()
    return Instances(tuple(img.shape[-2:]), out["boxes"].cpu().numpy(),
                     out["scores"].cpu().numpy(), labels, masks)


def run_sahi(model, img, args) -> Tuple[float, np.ndarray]:
    from sahi.models.torchvision import TorchVisionDetectionModel
    from sahi.predict import get_sliced_prediction

    inner = getattr(model, "model", model)  # our RCNN wraps the torchvision model
    dev = str(next(model.parameters()).device)
    sm = TorchVisionDetectionModel(model=PastedMasks(inner), device=dev, confidence_threshold=args.score_thresh,
                                   category_mapping={"1": "nucleus", "2": "mitotic figure"},
                                   load_at_init=True)
    ratio = args.overlap / args.tile_size
    with plain_torchvision(model):
        t = time.perf_counter()
        res = get_sliced_prediction(img, sm, slice_height=args.tile_size, slice_width=args.tile_size,
                                    overlap_height_ratio=ratio, overlap_width_ratio=ratio,
                                    perform_standard_pred=False, postprocess_type="NMS",
                                    postprocess_match_metric="IOU", postprocess_match_threshold=0.5,
                                    verbose=0)
        dt = time.perf_counter() - t
    boxes = np.array([p.bbox.to_xyxy() for p in res.object_prediction_list]).reshape(-1, 4)
    return dt, boxes


def one_piece(model, img, args) -> np.ndarray:
    import torch

    from detector.inference.runner import predict_batch

    inst = predict_batch(model, [torch.from_numpy(img).permute(2, 0, 1)])[0]
    return inst[inst.scores >= args.score_thresh].boxes


# -------------------------------------------------------------------------------- memory
def memory_child(args) -> None:
    """Run in a fresh process: infer one slide, print peak RSS as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    from detector.inference.runner import infer_slide

    model, classes, mpp, _ = get_model(args.weights, args.device)
    opts = tool_options(args)
    t = time.perf_counter()
    s = infer_slide(model, classes, mpp, args.memory_child, args.out, opts)
    dt = time.perf_counter() - t
    print(json.dumps({
        "seconds": dt,
        "tiles": s["analysis"]["tiles_analysed"], "tiles_total": s["analysis"]["tiles_total"],
        "detections": s["total_detections"],
        "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="", help="checkpoint of ours (default: random Mask R-CNN)")
    p.add_argument("--size", type=int, default=2000, help="side of the speed-test image (px)")
    p.add_argument("--tile-size", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=None,
                   help="tiles per model call of this tool (default: the tool's, by device)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="reader workers of this tool (default: the tool's, by device)")
    p.add_argument("--streams", type=int, default=None,
                   help="CPU streams of this tool (default: the tool's, by device)")
    p.add_argument("--score-thresh", type=float, default=0.3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--memory-sizes", default="10000,40000")
    p.add_argument("--memory-tissue", type=int, default=1024,
                   help="side (px) of the tissue placed on the memory-test slides")
    p.add_argument("--fp32", action="store_true",
                   help="this tool in fp32 (default: bf16 autocast where the device has it)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of the speed test (the methods in turn); the median of each")
    p.add_argument("--skip-sahi", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    from detector.device import resolve_device

    args.device = str(resolve_device(args.device))
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return 0

    tmp = tempfile.mkdtemp(prefix="bench_infer_")
    model, classes, mpp, name = get_model(args.weights, args.device)
    if not args.skip_speed:
        speed_table(model, classes, mpp, name, tmp, args)
    if not args.skip_memory:
        memory_table(mpp, tmp, args)
    log(f"(temporary files in {tmp})")
    return 0


def speed_table(model, classes, mpp, name, tmp, args) -> None:
    import torch

    img = he_mosaic(args.size)
    path = os.path.join(tmp, "mosaic.tif")
    write_pyramid(path, img, mpp)
    from detector.inference.predictor import autocast_dtype

    from detector.inference.runner import loader_layout

    amp = autocast_dtype(torch.device(args.device), not args.fp32)
    batch, workers, streams = loader_layout(tool_options(args),
                                            torch.device(args.device).type == "cuda")
    log(f"model: {name}; image {args.size}x{args.size} px at {mpp} um/px; device {args.device}; "
        f"{args.threads} torch threads; tiles {args.tile_size} overlap {args.overlap}; "
        f"this tool: batches of {batch}, {workers} reader workers, {streams} streams; "
        f"this tool in {amp or 'fp32'}; load {os.getloadavg()[0]:.1f}")
    with torch.inference_mode():  # warm-up (allocator, cuDNN autotune)
        model([torch.rand(3, args.tile_size, args.tile_size, device=args.device)])

    log("one-piece reference ...")
    ref = one_piece(model, img, args)
    try:
        import sahi
    except ImportError:
        sahi = None
        if not args.skip_sahi:
            log("sahi is not installed (pip install 'detector[bench]'); SAHI row skipped")
    use_sahi = sahi is not None and not args.skip_sahi
    # the methods one after the other, --repeats rounds: each time is the median of its rounds,
    # so that a slow spell of a shared machine does not fall on one method only
    times: Dict[str, List[float]] = {"naive": [], "tool": [], "sahi": []}
    for r in range(max(1, args.repeats)):
        tag = f" (round {r + 1} of {args.repeats})" if args.repeats > 1 else ""
        log("naive loop ..." + tag)
        dt, naive = run_naive(model, classes, mpp, path, args)
        times["naive"].append(dt)
        log("infer_tiles ..." + tag)
        dt, boxes, tissue_mpx = run_tool(model, classes, mpp, path,
                                         os.path.join(tmp, f"tool{r}"), args)
        times["tool"].append(dt)
        if use_sahi:
            log("SAHI ..." + tag)
            dt, sahi_boxes = run_sahi(model, img, args)
            times["sahi"].append(dt)
    med = {k: float(np.median(v)) for k, v in times.items() if v}
    if args.repeats > 1:
        log("seconds of each round: " + "; ".join(
            f"{k} " + ", ".join(f"{t:.1f}" for t in v) for k, v in times.items() if v))
    rows = [("infer_tiles (this tool)", med["tool"], box_f1(ref, boxes), len(boxes),
             box_f1(naive, boxes)),
            ("naive loop (1 tile, no prefetch)", med["naive"], box_f1(ref, naive), len(naive),
             1.0)]
    if use_sahi:
        rows.append((f"SAHI {sahi.__version__} get_sliced_prediction", med["sahi"],
                     box_f1(ref, sahi_boxes), len(sahi_boxes), box_f1(naive, sahi_boxes)))
    base = rows[1][1]
    rounds = f", median of {args.repeats} rounds" if args.repeats > 1 else ""
    print(f"\nSpeed{rounds}: {name}, {args.size}x{args.size} px image, {tissue_mpx:.2f} Mpx of tissue, "
          f"device {args.device}, this tool in {amp or 'fp32'} (batches of {batch}, {workers} "
          f"reader workers, {streams} streams), one-piece reference: "
          f"{len(ref)} detections, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    sahi_dt = rows[2][1] if len(rows) > 2 else None
    print("| method | seconds | tissue Mpx/s | x naive | x SAHI | F1 vs one-piece | F1 vs naive "
          "| detections |")
    print("|---|---|---|---|---|---|---|---|")
    for label, dt, f1, n, f1n in rows:
        xs = f"{sahi_dt / dt:.2f}" if sahi_dt else "-"
        print(f"| {label} | {dt:.1f} | {tissue_mpx / dt:.3f} | {base / dt:.2f} | {xs} | {f1:.3f} | "
              f"{f1n:.3f} | {n} |")
    print("(F1: one-to-one box matching at IoU 0.5. One-piece differs from any tiling when the "
          "model is not local, e.g. GroupNorm normalises over the whole input; the naive loop "
          "uses the same tiles and merge as this tool, so 'F1 vs naive' isolates the pipeline.)")


def memory_table(mpp, tmp, args) -> None:
    if True:
        sizes = [int(s) for s in args.memory_sizes.split(",") if s.strip()]
        tissue = he_mosaic(args.memory_tissue)
        print(f"\nPeak memory: the same {args.memory_tissue} px square of tissue on slides of growing size "
              f"(pyramidal TIFF, JPEG tiles)")
        print("| slide (px) | Gpx | tiles analysed / total | detections | seconds | "
              "peak RSS main (MB) | peak RSS worker (MB) |")
        print("|---|---|---|---|---|---|---|")
        for size in sizes:
            sp = os.path.join(tmp, f"slide_{size}.tif")
            log(f"writing {size}x{size} slide ...")
            write_big_slide(sp, size, tissue, mpp)
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", sp,
                   "--out", os.path.join(tmp, f"mem_{size}"), "--tile-size", str(args.tile_size),
                   "--overlap", str(args.overlap), "--score-thresh", str(args.score_thresh),
                   "--device", args.device, "--threads", str(args.threads)]
            for flag, v in (("--batch-size", args.batch_size), ("--num-workers", args.num_workers)):
                if v is not None:
                    cmd += [flag, str(v)]
            if args.fp32:
                cmd.append("--fp32")
            if args.weights:
                cmd += ["--weights", args.weights]
            log(f"inference on {size}x{size} ...")
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {size} x {size} | {size * size / 1e9:.2f} | {r['tiles']} / {r['tiles_total']} | "
                  f"{r['detections']} | {r['seconds']:.1f} | {r['rss_main_mb']:.0f} | "
                  f"{r['rss_workers_mb']:.0f} |")
            os.unlink(sp)


if __name__ == "__main__":
    sys.exit(main())
