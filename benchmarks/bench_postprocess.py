"""Host-side throughput of a slide run: everything after the model (per-tile filtering and the
move to slide px, merge, region filter, counts, export), in objects per second.

The "model output" is recorded, not predicted: the ground-truth nuclei of a real, dense H&E
tile (MoNuSeg ``TCGA-2Z-A9J9-01A-01-TS1``, 1000 x 1000 px, converted by the ImageScope
converter) stand in for a model's masks. The tile is repeated over a virtual slide of
``--slide-size`` px per side; the slide is cut into analysis tiles (``--tile-size``,
``--overlap``) and each tile's "prediction" is the ground-truth objects it contains (cut at the
tile border, as a model sees them), with a score per object. Building those per-tile outputs is
not timed; from there on the timed part is what ``infer_slide`` does after ``predict_batch``,
stage by stage (export file by file), in CPU seconds of this process and the processes it
forks (``time.process_time`` and ``RUSAGE_CHILDREN``, so that the other work on a shared
2-core machine does not count) and, in total, wall clock.

    python benchmarks/bench_postprocess.py                        # 6000 px: ~15,000 objects
    python benchmarks/bench_postprocess.py --slide-size 10000     # ~43,000 objects
    python benchmarks/bench_postprocess.py --baseline OLD_TREE    # and an older checkout, one table

``--baseline`` measures an older checkout in a subprocess on the same outputs; a checkout from
before CropMask runs through the pre-CropMask functions (``--api old``: full-tile RLE masks as
Mask R-CNN returned them, ``tile_to_slide`` with slide-sized RLE,
``counting.centroids_and_areas``, the export writers), as ``infer_slide`` did before the stages.
The last line reads ``... N objects/s``.

Timed apart, after the table's total (which stays comparable with earlier runs), is the rest of
the host work of a slide run around the model: Mask R-CNN's mask head output (each object's box
of the label tile resized to 28 x 28, as probabilities) pasted into CropMasks by
``paste_masks_in_boxes``, and the resume journal's records; the last rows add them up.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path and not os.environ.get("BENCH_KEEP_PATH"):
    sys.path.insert(0, ROOT)

DEFAULT_XML = os.path.join(ROOT, "..", "shared", "data", "monuseg", "TCGA-2Z-A9J9-01A-01-TS1.xml")


def label_image(xml: str) -> np.ndarray:
    """``(H, W)`` int32 instance labels of the tile's ground truth (via the project's ImageScope
    converter and COCO decoding, identical in old and new code)."""
    from detector.data.coco import annotation_to_mask
    from detector.data.converters.imagescope import convert_xml

    conv = convert_xml(xml, progress=False)
    coco = conv.coco
    im = coco["images"][0]
    h, w = int(im["height"]), int(im["width"])
    lab = np.zeros((h, w), np.int32)
    for k, a in enumerate(coco["annotations"], start=1):
        m = annotation_to_mask(a, h, w)
        if m is not None:
            lab[m & (lab == 0)] = k
    return lab


def recorded_outputs(lab: np.ndarray, slide_size: int, tile: int, overlap: int, api: str):
    """Per-tile Instances (tile px) of the periodic slide of ``slide_size`` px per side, the
    tile grid and the slide size. Each copy of the recorded tile holds distinct objects."""
    from scipy import ndimage as ndi

    from detector.inference.tiling import grid_shape, tile_grid
    from detector.structures.instances import Instances

    h, w = lab.shape
    H = W = int(slide_size)
    copies = -(-max(H, W) // min(h, w))
    stride = int(lab.max()) + 1
    tiles = tile_grid(W, H, tile, overlap)
    rows, cols = grid_shape(W, H, tile, overlap)
    rng = np.random.default_rng(0)
    out, heads = [], []
    for (x0, y0, x1, y1) in tiles:
        ys, xs = np.arange(y0, y1), np.arange(x0, x1)
        base = lab[np.ix_(ys % h, xs % w)]
        period = (ys // h)[:, None] * copies + (xs // w)[None, :]
        ids = np.where(base > 0, base + period * stride, 0)
        _, t = np.unique(ids, return_inverse=True)  # 1..n in the order of the ids
        t = t.reshape(ids.shape).astype(np.int32)
        objs = ndi.find_objects(t)
        ks = [k for k, sl in enumerate(objs, start=1) if sl is not None]
        boxes = np.asarray([[objs[k - 1][1].start, objs[k - 1][0].start, objs[k - 1][1].stop,
                             objs[k - 1][0].stop] for k in ks], np.float32).reshape(-1, 4)
        scores = rng.uniform(0.3, 1.0, len(ks)).astype(np.float32)
        labels = np.ones(len(ks), np.int64)
        if api == "new":
            from detector.structures.masks import CropMask

            masks = [CropMask.from_crop(t[objs[k - 1]] == k, objs[k - 1][1].start,
                                        objs[k - 1][0].start, t.shape) for k in ks]
        else:  # full-tile RLE, as the old Mask R-CNN wrapper encoded its pasted masks
            import pycocotools.mask as mask_utils

            masks = []
            for k in ks:
                full = np.zeros(t.shape, np.uint8, order="F")
                full[objs[k - 1]] = t[objs[k - 1]] == k
                masks.append(mask_utils.encode(full))
        out.append(Instances(t.shape, boxes, scores, labels, masks))
        if api == "new":  # the mask head's view of each object: its box resized to 28 x 28
            heads.append(mask_head_output(t, ks, objs, boxes))
    return out, tiles, (rows, cols), (H, W), (heads if api == "new" else None)


def mask_head_output(t: np.ndarray, ks, objs, boxes: np.ndarray):
    """``(probs (K, 1, 28, 28), boxes (K, 4))`` tensors standing in for Mask R-CNN's mask head
    on one tile: each object's box of the label tile resized to 28 x 28 (bilinear), which
    :func:`paste_masks_in_boxes` turns back into about the object's mask."""
    import cv2
    import torch

    probs = np.zeros((len(ks), 1, 28, 28), np.float32)
    for j, k in enumerate(ks):
        crop = (t[objs[k - 1]] == k).astype(np.float32)
        probs[j, 0] = cv2.resize(crop, (28, 28), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(probs), torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4))


def run_new(outputs, tiles, shape, size, out_dir, mpp, opts_kw, heads=None):
    from detector.inference import runner
    from detector.inference.runner import (AnalysisGrid, SlideGeometry, TilePredictions,
                                           export_slide, merge_tiles, region_filter,
                                           summarize_slide)
    from detector.inference.merge import drop_cut, tile_to_slide
    from detector.inference.tiling import interior_edges
    from detector.structures.instances import Instances

    opts = runner.InferenceOptions(**opts_kw)
    H, W = size
    thumb_ratio = max(H, W) / 1024.0
    th, tw = int(round(H / thumb_ratio)), int(round(W / thumb_ratio))
    selected = np.ones(len(tiles), bool)
    grid = AnalysisGrid("virtual.tif", (H, W), mpp, "file", mpp, mpp,
                        SlideGeometry(0, 1.0, 1.0, (H, W)), opts.tile_size, opts.overlap,
                        list(tiles), shape, selected, np.full((th, tw, 3), 230, np.uint8),
                        thumb_ratio, np.ones((th, tw), bool), None, H * W * (mpp / 1000.0) ** 2)
    c0, t0 = cpu_seconds(), time.perf_counter()
    parts = []
    for idx, (inst, tile) in enumerate(zip(outputs, tiles)):
        keep = inst.scores >= opts.score_thresh
        keep &= np.asarray([not m.is_empty for m in inst.masks], bool)
        inst = drop_cut(inst[keep], interior_edges(idx, shape[0], shape[1], selected),
                        opts.edge_margin)
        parts.append(tile_to_slide(inst, tile[:2], 1.0, (H, W)))
    preds = TilePredictions([Instances.cat(parts, (H, W))], {}, 0.0)
    c1 = cpu_seconds()
    cands = merge_tiles(preds, grid, opts)
    c2 = cpu_seconds()
    dets = region_filter(cands, grid, opts)
    c3 = cpu_seconds()
    summary = summarize_slide(dets, grid, [{"id": 1, "name": "nucleus"}], opts, preds)
    c4 = cpu_seconds()
    timings: dict = {}
    if "timings" in inspect.signature(export_slide).parameters:
        export_slide(out_dir, dets, grid, [{"id": 1, "name": "nucleus"}], opts, summary,
                     timings=timings)
    else:  # an older checkout: the export as one
        export_slide(out_dir, dets, grid, [{"id": 1, "name": "nucleus"}], opts, summary)
    c5, t5 = cpu_seconds(), time.perf_counter()
    stages = {"tiles": c1 - c0, "merge": c2 - c1, "filter": c3 - c2, "count": c4 - c3,
              "export": c5 - c4}  # CPU seconds
    stages.update({f"export: {k}": v for k, v in timings.items()})
    stages["wall"] = t5 - t0
    stages.update(model_side(outputs, heads, parts, size, out_dir))
    return len(dets.instances), stages


def cpu_seconds() -> float:
    """CPU seconds of this process and of the child processes it waited for (the slide run's
    forked writers of the detection files). The benchmark's own clock, like the runner's
    ``cpu_seconds``: a ``--baseline`` checkout may predate that one."""
    import resource

    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def model_side(outputs, heads, parts, size, out_dir) -> dict:
    """The host work of ``predict_tiles`` around the model that the stages above do not hold,
    timed apart (CPU seconds) so that the rows of earlier runs stay comparable: Mask R-CNN's
    mask head output pasted into CropMasks (``paste_masks_in_boxes``, per tile) and the resume
    journal (``Journal.append``, one durable record per batch of 8 tiles)."""
    out = {}
    try:
        from detector.modeling.rcnn import paste_masks_in_boxes
    except ImportError:
        paste_masks_in_boxes = None
    if heads is not None and paste_masks_in_boxes is not None:
        c = time.process_time()
        for (probs, boxes), inst in zip(heads, outputs):
            paste_masks_in_boxes(probs, boxes, inst.image_size)
        out["paste"] = time.process_time() - c
    try:
        from detector.inference.journal import Journal
        from detector.structures.instances import Instances
    except ImportError:
        return out
    journal = Journal(os.path.join(out_dir, "journal.jsonl"), {"slide_size": list(size)},
                      resume=False)
    c = time.process_time()
    for b in range(0, len(parts), 8):
        journal.append(list(range(b, min(b + 8, len(parts)))),
                       Instances.cat(parts[b:b + 8], size))
    out["journal"] = time.process_time() - c
    return out


def run_old(outputs, tiles, shape, size, out_dir, mpp, opts_kw):
    """The same steps through the functions infer_slide used before the stages (747c7f5)."""
    import cv2

    from detector.inference import counting, export, runner
    from detector.inference.merge import drop_cut, merge_detections, tile_to_slide
    from detector.inference.tiling import interior_edges
    from detector.structures.instances import Instances

    opts = runner.InferenceOptions(**opts_kw)
    H, W = size
    tscale = max(H, W) / 1024.0
    th, tw = int(round(H / tscale)), int(round(W / tscale))
    thumb, tissue = np.full((th, tw, 3), 230, np.uint8), np.ones((th, tw), bool)
    selected = np.ones(len(tiles), bool)
    classes = [{"id": 1, "name": "nucleus"}]
    c0, t0 = time.process_time(), time.perf_counter()
    parts = []
    for idx, (inst, tile) in enumerate(zip(outputs, tiles)):
        inst = drop_cut(inst[inst.scores >= opts.score_thresh],
                        interior_edges(idx, shape[0], shape[1], selected), opts.edge_margin)
        parts.append(tile_to_slide(inst, tile[:2], 1.0, (H, W)))
    c1 = time.process_time()
    merged = merge_detections(Instances.cat(parts, (H, W)), opts.nms_thresh, opts.mask_iou_thresh)
    c2 = time.process_time()
    centroids, areas = counting.centroids_and_areas(merged)
    grown = cv2.dilate(tissue.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    tx = np.clip((centroids[:, 0] / tscale).astype(int), 0, grown.shape[1] - 1)
    ty = np.clip((centroids[:, 1] / tscale).astype(int), 0, grown.shape[0] - 1)
    on = grown[ty, tx]
    merged, centroids, areas = merged[on], centroids[on], areas[on]
    c3 = time.process_time()
    summary = {"analysis": {}}
    summary.update(counting.summarize(merged, classes, mpp, H * W * (mpp / 1000.0) ** 2, [],
                                      opts.hpf_area, centroids, tissue, tscale))
    c4 = time.process_time()
    hs = summary["mitotic_figures"]["hotspot"]
    export.write_geojson(os.path.join(out_dir, "detections.geojson"), merged, classes, mpp, areas, [])
    export.write_coco_results(os.path.join(out_dir, "detections.json"), merged)
    export.write_csv(os.path.join(out_dir, "detections.csv"), merged, classes, mpp, centroids, areas)
    export.write_overlay(os.path.join(out_dir, "overlay.png"), thumb, tscale, merged, classes, [], hs,
                         None, tissue)
    cell_px = np.sqrt(opts.hpf_area) * 1000.0 / mpp
    dens, cell = counting.density_grid(centroids, (H, W), cell_px, mpp)
    export.write_density(os.path.join(out_dir, "density.png"), dens, cell, (H, W), thumb,
                         "detections / mm²", None, tissue, tscale)
    export.write_json(os.path.join(out_dir, "summary.json"), summary)
    c5, t5 = time.process_time(), time.perf_counter()
    return len(merged), {"tiles": c1 - c0, "merge": c2 - c1, "filter": c3 - c2,
                         "count": c4 - c3, "export": c5 - c4, "wall": t5 - t0}


def measure(args) -> dict:
    api = args.api
    if api == "auto":
        try:
            import detector.structures.masks  # noqa: F401
            api = "new"
        except ImportError:
            api = "old"
    lab = label_image(args.xml)
    outputs, tiles, shape, size, heads = recorded_outputs(lab, args.slide_size, args.tile_size,
                                                          args.overlap, api)
    n_in = sum(len(o) for o in outputs)
    # imported once per process by a real run; not part of the per-object cost
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    opts_kw = dict(tile_size=args.tile_size, overlap=args.overlap, score_thresh=0.5,
                   progress=False)
    with tempfile.TemporaryDirectory() as d:
        if api == "new":
            n, parts = run_new(outputs, tiles, shape, size, d, 0.25, opts_kw, heads)
        else:
            n, parts = run_old(outputs, tiles, shape, size, d, 0.25, opts_kw)
    wall = parts.pop("wall")
    side = {k: parts.pop(k) for k in ("paste", "journal") if k in parts}
    cpu = sum(v for k, v in parts.items() if not k.startswith("export: "))
    if side:
        parts.update(side)
        parts["with model side"] = cpu + sum(side.values())
    return {"api": api, "slide_size": list(size), "tiles": len(tiles),
            "tile_detections": n_in, "objects": n, "seconds": cpu, "stages": parts,
            "objects_per_s": n / cpu, "wall_seconds": wall, "objects_per_wall_s": n / wall,
            "load": os.getloadavg()[0],
            "code": os.path.dirname(os.path.dirname(sys.modules["detector"].__file__))}


STAGES = [("tiles", "tiles -> slide px (score, empty, edge rule, offset)"), ("merge", "merge"),
          ("filter", "region filter (centroids, areas)"), ("count", "count / summary"),
          ("export", "export (all files)"),
          ("export: detections", "  detections .geojson, .json, .csv (polygons traced once; "
           "several processes from 4,000 detections)"),
          ("export: outlines", "  polygons (traced once)"),
          ("export: geojson", "  detections.geojson"), ("export: coco", "  detections.json"),
          ("export: csv", "  detections.csv"), ("export: overlay", "  overlay.png"),
          ("export: density", "  density.png"), ("export: summary", "  summary.json")]
# timed apart (not in the total, as in earlier runs): the rest of the host work of a slide run
SIDE_STAGES = [("paste", "mask head output -> CropMasks (paste_masks_in_boxes), apart"),
               ("journal", "resume journal (one record per 8 tiles), apart"),
               ("with model side", "**total with paste and journal** (CPU time)")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--xml", default=DEFAULT_XML, help="ImageScope XML of the recorded tile")
    p.add_argument("--slide-size", type=int, default=6000,
                   help="side of the virtual slide in px (the recorded 1000-px tile repeated; "
                   "6000: about 15,000 objects)")
    p.add_argument("--tile-size", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--api", choices=("auto", "new", "old"), default="auto")
    p.add_argument("--baseline", help="an older checkout of the project: measured in a "
                   "subprocess with the same outputs, shown in the same table")
    p.add_argument("--json", action="store_true", help="print one JSON line (used internally)")
    args = p.parse_args()
    if not os.path.isfile(args.xml):
        sys.exit(f"{args.xml}: not found (MoNuSeg from ../shared/data; pass --xml)")
    rows = []
    if args.baseline:
        cmd = [sys.executable, os.path.abspath(__file__), "--json", "--xml", args.xml,
               "--slide-size", str(args.slide_size), "--tile-size", str(args.tile_size),
               "--overlap", str(args.overlap)]
        env = dict(os.environ, PYTHONPATH=os.path.abspath(args.baseline), BENCH_KEEP_PATH="1")
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    rows.append(measure(args))
    if args.json:
        print(json.dumps(rows[-1]))
        return
    r = rows[-1]
    print(f"virtual slide {r['slide_size'][0]} x {r['slide_size'][1]} px (H x W), {r['tiles']} "
          f"tiles of {args.tile_size} px (overlap {args.overlap}), {r['tile_detections']} tile "
          f"detections -> {r['objects']} objects; load average {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} CPUs")
    print("Seconds are CPU time of this process and of the processes it forks (time.process_time "
          "and RUSAGE_CHILDREN: what other processes on a shared machine take does not count); "
          "the wall-clock row is elapsed time.")
    head = "| stage |" + "".join(f" {x['api']} ({x['code']}) s | objects/s |" for x in rows)
    print(head + (" speed-up |" if len(rows) == 2 else ""))
    print("|---|" + "---|---|" * len(rows) + ("---|" if len(rows) == 2 else ""))
    for key, name in STAGES + [("total", "**total** (CPU time)"),
                               ("wall", "total, wall clock (under the load above)")] + SIDE_STAGES:
        secs = [x["seconds"] if key == "total" else x.get("wall_seconds") if key == "wall"
                else x["stages"].get(key) for x in rows]
        if all(v is None for v in secs):
            continue
        cells = "".join(" - | - |" if v is None else
                        f" {v:.3f} | {x['objects'] / v if v > 0 else float('inf'):,.0f} |"
                        for v, x in zip(secs, rows))
        if len(rows) == 2:
            ok = None not in secs and secs[1] > 0
            cells += f" {secs[0] / secs[1]:.1f}x |" if ok else " - |"
        print(f"| {name} |{cells}")
    if len(rows) == 2:
        print(f"load average during the baseline: {rows[0].get('load', float('nan')):.1f}, "
              f"during this checkout: {rows[1]['load']:.1f}")
    print(f"post-processing (CPU time of this process; wall clock "
          f"{rows[-1]['objects_per_wall_s']:.0f} objects/s at load {rows[-1]['load']:.1f}): "
          f"{rows[-1]['objects_per_s']:.0f} objects/s")


if __name__ == "__main__":
    main()
