"""The per-slide pipeline: read, find tissue, tile, run the model batch by batch with a
DataLoader reading tiles ahead, merge, count, export.

    model, cfg, classes, train_mpp = load_model(ckpt, device)
    summary = infer_slide(model, classes, train_mpp, "slide.svs", "out/", InferenceOptions())

Tiles are cut from the pyramid level that matches the model's training mpp (resampled with
``cv2.INTER_AREA``/``INTER_LINEAR`` when no level matches). Detections are exported in level-0
pixels. Memory holds one batch of tiles per worker plus the detections (RLE masks), never a
slide raster.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..modeling.unet import mirror_indices
from ..structures.instances import Instances
from . import counting, export, predictor
from .journal import JOURNAL_NAME, Journal
from .merge import drop_cut, merge_detections, tile_to_slide
from .slide import SlideReadError, SlideReader, choose_level, open_slide
from .tiling import Tile, grid_shape, interior_edges, tile_cores, tile_grid, tiles_in_mask
from .tissue import parse_roi, points_in_roi, roi_mask, tissue_mask

log = logging.getLogger(__name__)

OUTPUT_FILES = ("summary.json", "detections.geojson", "detections.json", "detections.csv",
                "overlay.png", "density.png")


class SlideError(RuntimeError):
    """A slide that cannot be analysed (unreadable, no mpp, ...); the message says why."""


@dataclass
class InferenceOptions:
    """Parameters of a slide run (the CLI flags)."""

    # Tile side and overlap in analysis px (at the model's training mpp). The overlap must be at
    # least the largest object, so every object lies whole in some tile.
    tile_size: int = 512
    overlap: int = 96
    batch_size: int = 4
    # DataLoader workers reading and preparing tiles while the model runs (0: in this process).
    num_workers: int = 2
    # Slide mpp when the file has none (or to override it).
    mpp: Optional[float] = None
    # Region of interest: "x0,y0,x1,y1" (level-0 px) or a GeoJSON file of polygons.
    roi: Optional[str] = None
    # Area of one high-power field in mm^2 (10 HPF = 10 x this).
    hpf_area: float = counting.DEFAULT_HPF_AREA_MM2
    # Classes counted as mitotic figures (names or ids, comma-separated); None: by name.
    mitotic_classes: Optional[str] = None
    # Detections below this score are dropped.
    score_thresh: float = 0.5
    # Box IoU for duplicate removal across tiles, and the mask IoU that confirms it.
    nms_thresh: float = 0.5
    mask_iou_thresh: float = 0.5
    # Skip background tiles (Otsu tissue detection on a thumbnail).
    tissue_detection: bool = True
    # Mixed precision (bf16 autocast) on CUDA and on CPUs with native bf16 (see predictor.py).
    amp: bool = True
    resume: bool = False
    # Longest side of the thumbnail used for tissue detection and overlay.png.
    thumbnail_size: int = 2048
    # A detection within this many px of an interior tile edge is taken from the neighbour.
    edge_margin: float = 2.0
    # Show a progress bar.
    progress: bool = True


# ------------------------------------------------------------------------------- tile reading
@dataclass
class SlideGeometry:
    """Where the analysis grid sits in the slide: tiles are cut from ``level`` and resampled by
    ``scale`` (analysis px per level px); ``factor`` = level-0 px per analysis px."""

    level: int
    scale: float
    factor: float
    size: Tuple[int, int]  # analysis grid (width, height)


def slide_geometry(reader: SlideReader, slide_mpp: float, model_mpp: Optional[float]
                   ) -> SlideGeometry:
    """Level and resampling that put the slide at the model's training mpp (level 0 as is when
    the checkpoint has no mpp)."""
    if model_mpp is None:
        level, scale = 0, 1.0
    else:
        mpps = [slide_mpp * ds for ds in reader.level_downsamples]
        level, scale = choose_level(mpps, model_mpp)
    lw, lh = reader.level_dimensions[level]
    size = (max(1, int(round(lw * scale))), max(1, int(round(lh * scale))))
    factor = reader.level_downsamples[level] / scale
    return SlideGeometry(level, scale, factor, size)


def read_tile(reader: SlideReader, geom: SlideGeometry, tile: Tile) -> np.ndarray:
    """``(h, w, 3)`` uint8 RGB of one analysis-grid tile ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = tile
    if geom.scale == 1.0:
        return reader.read_region(geom.level, x0, y0, x1 - x0, y1 - y0)
    s = geom.scale
    lx0, ly0 = int(math.floor(x0 / s)), int(math.floor(y0 / s))
    lx1, ly1 = int(math.ceil(x1 / s)), int(math.ceil(y1 / s))
    region = reader.read_region(geom.level, lx0, ly0, lx1 - lx0, ly1 - ly0)
    # affine resampling that maps analysis px exactly onto level px (no drift between tiles)
    m = np.array([[1.0 / s, 0, x0 / s - lx0], [0, 1.0 / s, y0 / s - ly0]], np.float64)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    if s < 1:
        # INTER_AREA is only meaningful through resize: resize the whole region, then crop
        rw, rh = max(1, int(round((lx1 - lx0) * s))), max(1, int(round((ly1 - ly0) * s)))
        small = cv2.resize(region, (rw, rh), interpolation=interp)
        ox, oy = int(round((x0 / s - lx0) * s)), int(round((y0 / s - ly0) * s))
        out = np.full((y1 - y0, x1 - x0, 3), 255, np.uint8)
        part = small[oy:oy + (y1 - y0), ox:ox + (x1 - x0)]
        out[:part.shape[0], :part.shape[1]] = part
        return out
    return cv2.warpAffine(region, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def read_tile_with_context(reader: SlideReader, geom: SlideGeometry, tile: Tile, context: int
                           ) -> np.ndarray:
    """``(h + 2 context, w + 2 context, 3)`` uint8 RGB: the tile and ``context`` px of the real
    neighbouring pixels on every side, mirrored (numpy ``reflect``) only beyond the edge of the
    analysis grid, at the same positions whatever the tiling (:func:`mirror_indices`)."""
    if context <= 0:
        return read_tile(reader, geom, tile)
    x0, y0, x1, y1 = tile
    iy = mirror_indices(geom.size[1], y0 - context, y1 + context)
    ix = mirror_indices(geom.size[0], x0 - context, x1 + context)
    ry0, rx0 = int(iy.min()), int(ix.min())
    region = read_tile(reader, geom, (rx0, ry0, int(ix.max()) + 1, int(iy.max()) + 1))
    if region.shape[0] == len(iy) and region.shape[1] == len(ix):
        return region  # nothing mirrored
    return region[(iy - ry0)[:, None], (ix - rx0)[None, :]]


class TileDataset(Dataset):
    """Tiles of one slide for a DataLoader. Each worker opens the slide once (lazily, in the
    worker process), reads and converts its tiles; a tile that fails to decode comes back with
    ``image`` None and the error, so that the run logs it and goes on. With ``context`` > 0
    each image holds that many px of the tile's surroundings on every side
    (:func:`read_tile_with_context`)."""

    def __init__(self, path: str, geom: SlideGeometry, tiles: Sequence[Tile], indices: Sequence[int],
                 context: int = 0):
        self.path = path
        self.context = int(context)
        self.geom = geom
        self.tiles = list(tiles)
        self.indices = list(indices)
        self._reader: Optional[SlideReader] = None
        self._pid: Optional[int] = None

    def __len__(self) -> int:
        return len(self.indices)

    def _get_reader(self) -> SlideReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader = open_slide(self.path)
            self._pid = os.getpid()
        return self._reader

    def close(self) -> None:
        """Close the slide opened in this process (workers' copies end with them)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __getitem__(self, k: int) -> Dict[str, Any]:
        idx = self.indices[k]
        tile = self.tiles[idx]
        try:
            rgb = read_tile_with_context(self._get_reader(), self.geom, tile, self.context)
        except (SlideReadError, OSError, ValueError) as e:
            return {"index": idx, "tile": tile, "image": None, "error": str(e)}
        img = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)  # uint8 (3, h, w)
        return {"index": idx, "tile": tile, "image": img, "error": None}


def _collate(batch: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return batch


def resolve_device(device: str) -> torch.device:
    if device in ("auto", "", None):
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device(f"cuda:{local}")
        return torch.device("cpu")
    return torch.device(device)


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def predict_batch(model: torch.nn.Module, images: List[torch.Tensor], amp: bool = True,
                  tiles: Optional[Sequence[Tile]] = None, cores: Optional[Sequence[Tile]] = None,
                  context: int = 0, score_thresh: float = 0.0) -> List[Instances]:
    """Run the model on uint8 ``(3, H, W)`` tiles: float 0..1 on the model's device, bf16
    autocast on CUDA and bf16 CPUs (:mod:`.predictor`), no gradients. Returns one Instances per tile (tile px). With ``context``
    (a model with ``slide_context``, the U-Net) the images hold that many px around each tile
    and the model keeps the objects whose centroid lies in the tile's core (analysis px, like
    ``tiles``; :func:`tile_cores`)."""
    dev = model_device(model)
    x = [im.to(dev, non_blocking=True).float().div_(255.0) for im in images]
    with torch.inference_mode(), predictor.autocast(dev, amp):
        out = _forward(model, x, tiles, cores, context, score_thresh)
    return list(out)


def _forward(model: torch.nn.Module, x: List[torch.Tensor], tiles: Optional[Sequence[Tile]],
             cores: Optional[Sequence[Tile]], context: int, score_thresh: float
             ) -> List[Instances]:
    if not context:
        # R-CNN: low-scoring detections dropped before the mask head
        return model.predict(x, score_thresh) if hasattr(model, "predict") else model(x)
    assert tiles is not None and cores is not None
    local = [(c[0] - t[0], c[1] - t[1], c[2] - t[0], c[3] - t[1]) for t, c in zip(tiles, cores)]
    return model.predict_slide_tiles(x, [t[:2] for t in tiles], local, context)


# ----------------------------------------------------------------------------- one slide
def slide_stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def is_finished(out_dir: str) -> bool:
    """A slide folder whose run completed (summary.json present, no journal)."""
    return (os.path.isfile(os.path.join(out_dir, "summary.json"))
            and not os.path.exists(os.path.join(out_dir, JOURNAL_NAME)))


def infer_slide(model: torch.nn.Module, classes: List[Dict[str, Any]], model_mpp: Optional[float],
                slide_path: str, output_dir: str, opts: InferenceOptions,
                weights_name: str = "") -> Dict[str, Any]:
    """Analyse one slide and write its folder ``output_dir/<slide stem>/``.

    Returns the summary (also written to ``summary.json``). Raises :class:`SlideError` when the
    slide cannot be analysed at all (unreadable, no mpp); tiles that fail to decode are logged,
    skipped and listed in the summary.
    """
    t_start = time.time()
    out_dir = os.path.join(output_dir, slide_stem(slide_path))
    try:
        reader = open_slide(slide_path)
    except SlideReadError as e:
        raise SlideError(str(e)) from None
    with reader:
        slide_mpp = opts.mpp if opts.mpp else reader.mpp
        if slide_mpp is None:
            raise SlideError(f"{slide_path}: the file has no microns-per-pixel metadata; pass "
                             "--mpp (e.g. --mpp 0.25 for a 40x scan, 0.5 for 20x)")
        mpp_source = "--mpp" if opts.mpp else "file"
        W0, H0 = reader.dimensions
        geom = slide_geometry(reader, slide_mpp, model_mpp)
        if model_mpp is None:
            log.warning("%s: the checkpoint has no training mpp; analysing level 0 as is",
                        slide_path)
        tiles = tile_grid(geom.size[0], geom.size[1], opts.tile_size, opts.overlap)
        rows, cols = grid_shape(geom.size[0], geom.size[1], opts.tile_size, opts.overlap)
        # tissue and ROI on the thumbnail
        thumb, tscale = reader.thumbnail(opts.thumbnail_size)
        roi_polys = parse_roi(opts.roi) if opts.roi else None
        if opts.tissue_detection:
            tissue = tissue_mask(thumb)
        else:
            tissue = np.ones(thumb.shape[:2], bool)
        if roi_polys is not None:
            tissue &= roi_mask(roi_polys, thumb.shape[:2], tscale)
        tissue_area_mm2 = float(tissue.sum()) * (tscale * slide_mpp / 1000.0) ** 2
        selected = tiles_in_mask(tiles, tissue, tscale / geom.factor)
    sel_idx = [int(i) for i in np.flatnonzero(selected)]

    header = {"slide": os.path.abspath(slide_path), "weights": weights_name,
              "slide_size": [H0, W0], "tile_size": opts.tile_size, "overlap": opts.overlap,
              "score_thresh": opts.score_thresh, "mpp": slide_mpp, "roi": opts.roi,
              "level": geom.level, "scale": geom.scale, "tissue": opts.tissue_detection}
    os.makedirs(out_dir, exist_ok=True)
    journal = Journal(os.path.join(out_dir, JOURNAL_NAME), header, resume=opts.resume)
    todo = [i for i in sel_idx if i not in journal.done]

    # a model that reads real neighbouring pixels (the U-Net) owns the objects in tile cores
    predictor.prepare_model(model)
    context = int(getattr(model, "slide_context", 0) or 0)
    cores = (tile_cores(geom.size[0], geom.size[1], opts.tile_size, opts.overlap, selected)
             if context else None)
    ds = TileDataset(slide_path, geom, tiles, todo, context)
    on_cuda = model_device(model).type == "cuda"
    loader = DataLoader(ds, batch_size=max(1, opts.batch_size), shuffle=False,
                        num_workers=opts.num_workers if len(todo) > opts.batch_size else 0,
                        collate_fn=_collate, pin_memory=on_cuda,
                        prefetch_factor=2 if opts.num_workers > 0 and len(todo) > opts.batch_size else None)
    bar = tqdm(total=len(sel_idx), initial=len(sel_idx) - len(todo), unit="tile",
               desc=slide_stem(slide_path), disable=not opts.progress, dynamic_ncols=True)
    has_masks: Optional[bool] = None
    t_model = time.time()
    for batch in loader:
        good = [b for b in batch if b["image"] is not None]
        failed = {b["index"]: b["error"] for b in batch if b["image"] is None}
        for k, v in failed.items():
            log.warning("tile %d of %s skipped: %s", k, slide_path, v)
        parts: List[Instances] = []
        if good:
            preds = predict_batch(model, [b["image"] for b in good], opts.amp,
                                  [b["tile"] for b in good],
                                  [cores[b["index"]] for b in good] if cores else None, context,
                                  opts.score_thresh)
            for b, inst in zip(good, preds):
                inst = inst[inst.scores >= opts.score_thresh]
                if not context:  # else each object came from the tile owning its centroid
                    edges = interior_edges(b["index"], rows, cols, selected)
                    inst = drop_cut(inst, edges, opts.edge_margin)
                parts.append(tile_to_slide(inst, b["tile"][:2], geom.factor, (H0, W0)))
                if has_masks is None:
                    has_masks = inst.masks is not None
        batch_inst = Instances.cat(parts, (H0, W0)) if parts else _empty((H0, W0), has_masks)
        journal.append([b["index"] for b in batch], batch_inst, failed)
        bar.update(len(batch))
    bar.close()
    ds.close()
    model_seconds = time.time() - t_model

    parts = [p for p in journal.instances() if len(p)]
    if parts:
        mask_kinds = {p.masks is not None for p in parts}
        if len(mask_kinds) > 1:  # an empty batch recorded before the first mask came back
            parts = [p for p in parts if p.masks is not None]
        merged = merge_detections(Instances.cat(parts, (H0, W0)), opts.nms_thresh,
                                  opts.mask_iou_thresh)
    else:
        merged = Instances((H0, W0))
    centroids, areas = counting.centroids_and_areas(merged)
    if roi_polys is not None and len(merged):
        inside = points_in_roi(centroids, roi_polys)
        merged, centroids, areas = merged[inside], centroids[inside], areas[inside]
    outside_tissue = 0
    if opts.tissue_detection and len(merged):
        # counts and the tissue area they are divided by come from the same region: drop
        # detections on glass (centroid outside the tissue mask, dilated by 2 thumbnail px)
        grown = cv2.dilate(tissue.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        tx = np.clip((centroids[:, 0] / tscale).astype(int), 0, grown.shape[1] - 1)
        ty = np.clip((centroids[:, 1] / tscale).astype(int), 0, grown.shape[0] - 1)
        on = grown[ty, tx]
        outside_tissue = int((~on).sum())
        merged, centroids, areas = merged[on], centroids[on], areas[on]

    mitotic_ids = counting.resolve_class_ids(opts.mitotic_classes, classes)
    summary: Dict[str, Any] = {
        "slide": os.path.abspath(slide_path),
        "weights": weights_name,
        "slide_size_px": [W0, H0],
        "mpp": slide_mpp,
        "mpp_source": mpp_source,
        "analysis": {
            "model_mpp": model_mpp, "level": geom.level,
            "level_mpp": slide_mpp * reader.level_downsamples[geom.level],
            "scale": geom.scale, "level0_px_per_analysis_px": geom.factor,
            "tile_size": opts.tile_size, "overlap": opts.overlap,
            "tiles_total": len(tiles), "tiles_analysed": len(sel_idx) - len(journal.failed),
            "tiles_failed": [{"tile": int(k), "box": list(tiles[int(k)]), "error": v}
                             for k, v in sorted(journal.failed.items())],
            "score_thresh": opts.score_thresh, "roi": opts.roi,
            "tissue_detection": opts.tissue_detection,
            "detections_outside_tissue_dropped": outside_tissue,
            "seconds": round(time.time() - t_start, 2),
            "model_seconds": round(model_seconds, 2),
        },
    }
    summary.update(counting.summarize(merged, classes, slide_mpp, tissue_area_mm2, mitotic_ids,
                                      opts.hpf_area, centroids, tissue, tscale))
    hs = summary["mitotic_figures"]["hotspot"]

    export.write_geojson(os.path.join(out_dir, "detections.geojson"), merged, classes, slide_mpp,
                         areas, mitotic_ids)
    export.write_coco_results(os.path.join(out_dir, "detections.json"), merged)
    export.write_csv(os.path.join(out_dir, "detections.csv"), merged, classes, slide_mpp,
                     centroids, areas)
    export.write_overlay(os.path.join(out_dir, "overlay.png"), thumb, tscale, merged, classes,
                         mitotic_ids, hs, roi_polys, tissue)
    is_mit = np.isin(merged.labels, np.asarray(mitotic_ids, np.int64))
    cell_px = math.sqrt(opts.hpf_area) * 1000.0 / slide_mpp  # one HPF per cell
    if mitotic_ids:
        dens, cell = counting.density_grid(centroids[is_mit], (H0, W0), cell_px, slide_mpp)
        title = "mitotic figures / mm²"
    else:
        dens, cell = counting.density_grid(centroids, (H0, W0), cell_px, slide_mpp)
        title = "detections / mm² (no mitotic class)"
    export.write_density(os.path.join(out_dir, "density.png"), dens, cell, (H0, W0), thumb,
                         title, hs if mitotic_ids else None, tissue, tscale)
    summary["analysis"]["seconds"] = round(time.time() - t_start, 2)
    export.write_json(os.path.join(out_dir, "summary.json"), summary)
    journal.remove()
    return summary


def _empty(size: Tuple[int, int], has_masks: Optional[bool]) -> Instances:
    return Instances(size, masks=[] if has_masks else None)


# ------------------------------------------------------------------------------ many slides
def shard(slides: Sequence[str], rank: Optional[int] = None, world: Optional[int] = None
          ) -> List[str]:
    """The slides of this process under ``torchrun`` (``RANK``/``WORLD_SIZE``): every
    ``world``-th slide from ``rank``."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    return list(slides[rank::world])


def run_slides(model: torch.nn.Module, classes: List[Dict[str, Any]], model_mpp: Optional[float],
               slides: Sequence[str], output_dir: str, opts: InferenceOptions,
               weights_name: str = "") -> Dict[str, Any]:
    """Analyse ``slides`` one after another; a slide that fails is reported and the others
    still run. With ``opts.resume`` finished slides are skipped. Returns
    ``{"done": [...], "skipped": [...], "failed": {slide: message}}``."""
    result: Dict[str, Any] = {"done": [], "skipped": [], "failed": {}}
    for path in slides:
        out = os.path.join(output_dir, slide_stem(path))
        if opts.resume and is_finished(out):
            log.info("%s: finished before (resume), skipped", path)
            result["skipped"].append(path)
            continue
        try:
            infer_slide(model, classes, model_mpp, path, output_dir, opts, weights_name)
            result["done"].append(path)
        except (SlideError, ValueError, OSError) as e:
            log.error("%s", e)
            result["failed"][path] = str(e)
        except Exception as e:  # a model or worker failure on one slide: the others still run
            log.exception("%s: failed (%s); the journal keeps the finished tiles for --resume",
                          path, type(e).__name__)
            result["failed"][path] = f"{type(e).__name__}: {e}"
    return result
