"""The per-slide pipeline as named stages with typed hand-offs, each testable alone:

1. :func:`analysis_grid` (slide path, options) -> :class:`AnalysisGrid`: the pyramid level
   and resampling at the model's training mpp, the tile grid, the tissue/ROI mask, the
   thumbnail;
2. :func:`predict_tiles` (model, grid, journal) -> :class:`TilePredictions`: the model batch
   by batch with a DataLoader reading tiles ahead; each tile's detections moved to level-0
   slide px and journalled (resume);
3. :func:`merge_tiles` -> :class:`Candidates`: duplicates from overlapping tiles removed;
4. (optional) ``candidate_stages``: functions ``(Candidates, AnalysisGrid) -> Candidates``;
5. :func:`region_filter` -> :class:`Detections`: detections outside the ROI or on glass
   dropped, centroids and areas computed once;
5b. (two-stage mitosis bundles) :func:`second_stage_filter` -> :class:`Detections`: the
   candidates re-scored by the patch classifier from image patches, kept at
   ``opts.score_thresh``;
6. :func:`summarize_slide` -> the ``summary.json`` dict;
7. :func:`export_slide`: GeoJSON, COCO results, CSV, overlay.png, density.png, summary.json.

    model, cfg, classes, train_mpp = load_model(ckpt, device)
    summary = infer_slide(model, classes, train_mpp, "slide.svs", "out/", InferenceOptions())

Tiles are cut from the pyramid level that matches the model's training mpp (resampled with
``cv2.INTER_AREA``/``INTER_LINEAR`` when no level matches). Detections are exported in level-0
pixels. Memory holds one batch of tiles per worker plus the detections (RLE masks), never a
slide raster.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import (Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence,
                    Tuple)

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..device import get_rank, get_world_size
from ..errors import DetectorError
from ..modeling.unet import mirror_indices
from ..structures.instances import Instances
from . import counting, export, predictor
from .journal import JOURNAL_NAME, WEIGHTS_KEY, Journal, finished_weights, weights_identity
from .merge import cut_by_edges, drop_cut, merge_detections, tile_to_slide
from .second_stage import SecondStage
from .size import equivalent_mpp, model_nucleus_diameter, slide_scale
from .slide import SlideReadError, SlideReader, choose_level, open_slide
from .tiling import (Tile, bounded_tile_size, check_tile_memory, grid_shape, interior_edges,
                     region_size, tile_cores, tile_grid, tiles_in_mask)
from .tissue import parse_roi, points_in_roi, roi_mask, tissue_mask

log = logging.getLogger(__name__)

OUTPUT_FILES = ("summary.json", "detections.geojson", "detections.json", "detections.csv",
                "overlay.png", "density.png")


#: A nuclei model run beside a mitosis model: (model, classes, training mpp).
NucleiModel = Tuple[torch.nn.Module, List[Dict[str, Any]], Optional[float]]


class SlideError(RuntimeError, DetectorError):
    """A slide that cannot be analysed (unreadable, no mpp, ...); the message says why."""


@dataclass
class InferenceOptions:
    """Parameters of a slide run (the CLI flags)."""

    # Tile side and overlap in analysis px (at the model's training mpp). The overlap must be at
    # least the largest object, so every object lies whole in some tile.
    tile_size: int = 512
    overlap: int = 96
    # Tiles per model call, and DataLoader workers reading tiles while the model runs (0: in
    # this process). None: by device (:func:`loader_layout`): 4 tiles and 2 workers on CUDA;
    # 1 tile and no worker on a CPU, where the model's threads use every core and a reader
    # process takes one from them.
    batch_size: Optional[int] = None
    num_workers: Optional[int] = None
    # Batches predicted at once on a CPU, each in its own thread with the process's torch
    # threads shared out between them (None: 2 where torch has 2 or more threads, else 1;
    # always 1 on CUDA): one batch's one-core parts (NMS, Python) overlap the other's
    # convolutions. See :func:`loader_layout`.
    streams: Optional[int] = None
    # Slide mpp when the file has none (or to override it).
    mpp: Optional[float] = None
    # Region of interest: "x0,y0,x1,y1" (level-0 px) or a GeoJSON file of polygons.
    roi: Optional[str] = None
    # Area of one high-power field in mm^2 (10 HPF = 10 x this).
    hpf_area: float = counting.DEFAULT_HPF_AREA_MM2
    # Hotspot window: "square" or "circle", of this area in mm^2 (None: 10 HPF = 10 x hpf_area;
    # 2.0 for the 2 mm^2 of current guidelines).
    hotspot_shape: str = "square"
    hotspot_area: Optional[float] = None
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
    # Test-time augmentation: the model on this many flipped / rotated views of every tile,
    # merged (4 or 8; 0 = off; TEST.AUG of the checkpoint's config, or --tta). See
    # predictor.predict_tta.
    tta: int = 0
    # Processes that write the detection files of a slide with many detections (None: the CPUs
    # this process may use, at most 8; see export.write_detections).
    export_workers: Optional[int] = None


def checkpoint_defaults(cfg: Any) -> Dict[str, Any]:
    """What a checkpoint's config sets for a slide run when the caller does not (the CLI and
    :meth:`detector.api.Detector.predict_slide`): ``score_thresh`` from ``TEST.SCORE_THRESH``
    (the threshold it was validated at; 0.5 in every shipped config) and ``tta`` from
    ``TEST.AUG`` (``train_net.py --export`` writes both into a checkpoint)."""
    aug = cfg.TEST.AUG
    return {"score_thresh": float(cfg.TEST.SCORE_THRESH),
            "tta": int(aug.TRANSFORMS) if aug.ENABLED else 0}


# ------------------------------------------------------------------------------- tile reading
@dataclass
class SlideGeometry:
    """Where the analysis grid sits in the slide: tiles are cut from pyramid ``level`` and
    resampled by ``analysis_per_level`` (analysis px per level px); ``level0_per_analysis``
    is level-0 px per analysis px; ``size`` is the analysis grid's ``(height, width)``."""

    level: int
    analysis_per_level: float
    level0_per_analysis: float
    size: Tuple[int, int]  # analysis grid (height, width)


def slide_geometry(reader: SlideReader, slide_mpp: float, model_mpp: Optional[float]
                   ) -> SlideGeometry:
    """Level and resampling that put the slide at the model's training mpp (level 0 as is when
    the checkpoint has no mpp)."""
    if model_mpp is None:
        level, ratio = 0, 1.0
    else:
        mpps = [slide_mpp * ds for ds in reader.level_downsamples]
        level, ratio = choose_level(mpps, model_mpp)
    lw, lh = reader.level_dimensions[level]  # openslide order (width, height)
    size = (max(1, int(round(lh * ratio))), max(1, int(round(lw * ratio))))
    level0_per_analysis = reader.level_downsamples[level] / ratio
    return SlideGeometry(level, ratio, level0_per_analysis, size)


def read_tile(reader: SlideReader, geom: SlideGeometry, tile: Tile) -> np.ndarray:
    """``(h, w, 3)`` uint8 RGB of one analysis-grid tile ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = tile
    if geom.analysis_per_level == 1.0:
        return reader.read_region(geom.level, x0, y0, x1 - x0, y1 - y0)
    s = geom.analysis_per_level
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
    iy = mirror_indices(geom.size[0], y0 - context, y1 + context)
    ix = mirror_indices(geom.size[1], x0 - context, x1 + context)
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


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def predict_batch(model: torch.nn.Module, images: List[torch.Tensor], amp: bool = True,
                  tiles: Optional[Sequence[Tile]] = None, cores: Optional[Sequence[Tile]] = None,
                  context: int = 0, score_thresh: float = 0.0, tta: int = 0,
                  drop: Optional[Sequence[Optional[Callable[..., np.ndarray]]]] = None
                  ) -> List[Instances]:
    """Run the model on uint8 ``(3, H, W)`` tiles: float 0..1 on the model's device, bf16
    autocast on CUDA and bf16 CPUs (:mod:`.predictor`), no gradients. Returns one Instances
    per tile (tile px). With ``context``
    (a model with ``slide_context``, the U-Net) the images hold that many px around each tile
    and the model keeps the objects whose centroid lies in the tile's core (analysis px, like
    ``tiles``; :func:`tile_cores`). ``tta`` (4 or 8) runs the model on that many flipped /
    rotated views and merges them (:func:`predictor.predict_tta`). ``drop``: per image, a
    function of the boxes and the image size giving detections to leave out before the mask
    head, for a model whose ``predict`` takes it (the R-CNN; :meth:`RCNN.predict`); others
    return them and the caller drops them after."""
    dev = model_device(model)
    x = [im.to(dev, non_blocking=True).float().div_(255.0) for im in images]
    with torch.inference_mode(), predictor.autocast(dev, amp):
        out = _forward(model, x, tiles, cores, context, score_thresh, tta, drop)
    return list(out)


def _forward(model: torch.nn.Module, x: List[torch.Tensor], tiles: Optional[Sequence[Tile]],
             cores: Optional[Sequence[Tile]], context: int, score_thresh: float, tta: int = 0,
             drop: Optional[Sequence[Optional[Callable[..., np.ndarray]]]] = None
             ) -> List[Instances]:
    local = None
    if context:
        assert tiles is not None and cores is not None
        local = [(c[0] - t[0], c[1] - t[1], c[2] - t[0], c[3] - t[1]) for t, c in zip(tiles, cores)]
    if tta:
        return predictor.predict_tta(model, x, tta, score_thresh, tiles, local, context)
    if not context:
        # R-CNN: low-scoring detections dropped before the mask head
        predict = getattr(model, "predict", None)
        if not callable(predict):
            return model(x)
        if drop is not None and "drop" in inspect.signature(predict).parameters:
            return predict(x, score_thresh, drop=drop)
        return predict(x, score_thresh)
    assert tiles is not None and local is not None
    return getattr(model, "predict_slide_tiles")(x, [t[:2] for t in tiles], local, context)


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


# ------------------------------------------------------------------------------ the stages
@dataclass
class AnalysisGrid:
    """Stage 1's hand-off: what is analysed where. Positions are level-0 px unless named
    otherwise; sizes ``(height, width)``."""

    slide_path: str
    slide_size: Tuple[int, int]  # level 0 (height, width)
    mpp: float  # level-0 microns per pixel
    mpp_source: str  # "file" or "--mpp"
    model_mpp: Optional[float]
    level_mpp: float  # mpp of the pyramid level tiles are cut from
    geometry: SlideGeometry
    tile_size: int  # analysis px: opts.tile_size, no larger than the region analysed
    overlap: int
    tiles: List[Tile]  # analysis-grid px, XYXY
    grid_shape: Tuple[int, int]  # tile rows, cols
    selected: np.ndarray  # (n_tiles,) bool: tiles with tissue (and inside the ROI)
    thumbnail: np.ndarray  # (h, w, 3) uint8
    level0_per_thumbnail: float  # level-0 px per thumbnail px
    region: np.ndarray  # (h, w) bool on the thumbnail: analysed tissue (and ROI)
    roi: Optional[List[np.ndarray]]  # ROI polygons in level-0 px
    tissue_area_mm2: float

    @property
    def selected_indices(self) -> List[int]:
        return [int(i) for i in np.flatnonzero(self.selected)]


@dataclass
class TilePredictions:
    """Stage 2's hand-off: every analysed tile's detections in level-0 slide px (one
    Instances per journalled batch, including batches of earlier runs on resume)."""

    parts: List[Instances]
    failed: Dict[int, str]  # tile index -> why it could not be read
    model_seconds: float


@dataclass
class Candidates:
    """Stage 3's hand-off (and that of any candidate stage): the slide's detections in level-0
    px without duplicates, before the region filter."""

    instances: Instances


@dataclass
class Detections:
    """Stage 5's hand-off: the detections that count, with ``(N, 2)`` centroids and ``(N,)``
    areas (level-0 px; mask centroid and pixel count, or box centre and area)."""

    instances: Instances
    centroids: np.ndarray
    areas: np.ndarray
    outside_tissue: int = 0  # detections dropped for lying on glass


#: A stage between merge and region filter, e.g. a second-stage classifier re-scoring the
#: candidates from image patches (``grid.slide_path`` and ``grid.geometry`` say where to read).
CandidateStage = Callable[[Candidates, AnalysisGrid], Candidates]


def analysis_grid(slide_path: str, model_mpp: Optional[float], opts: InferenceOptions,
                  gpu_free: Optional[int] = None, size_normalised: bool = False,
                  tissue_of: Optional[AnalysisGrid] = None) -> AnalysisGrid:
    """Stage 1: open the slide, choose the level and resampling for the model's mpp, lay the
    tile grid (tiles no larger than the region analysed; their memory checked against the free
    host memory, and ``gpu_free`` bytes of a GPU model, before any tile is read), find tissue
    (Otsu on a thumbnail) and the ROI, and select the tiles to analyse. Raises
    :class:`SlideError` when the slide cannot be read, has no mpp, or its tiles would not fit
    in memory. ``tissue_of``, a grid of the same slide and options laid at another mpp, lends
    its thumbnail, tissue and ROI (they do not depend on the mpp), so they are not read again."""
    try:
        reader = open_slide(slide_path)
    except SlideReadError as e:
        raise SlideError(str(e)) from None
    with reader:
        slide_mpp = opts.mpp if opts.mpp else reader.mpp
        if slide_mpp is None:
            raise SlideError(f"{slide_path}: the file has no microns-per-pixel metadata; pass "
                             "--mpp (e.g. --mpp 0.25 for a 40x scan, 0.5 for 20x)")
        W0, H0 = reader.dimensions
        geom = slide_geometry(reader, slide_mpp, model_mpp)
        if model_mpp is None and not size_normalised:
            log.warning("%s: the checkpoint has no training mpp; analysing level 0 as is",
                        slide_path)
        ah, aw = geom.size
        roi_polys = parse_roi(opts.roi) if opts.roi else None
        tile_size = bounded_tile_size(opts.tile_size, region_size(geom.size, roi_polys,
                                                                  geom.level0_per_analysis))
        overlap = min(opts.overlap, tile_size - 1)
        try:
            batch, workers, streams = loader_layout(opts, gpu_free is not None)
            check_tile_memory(tile_size, batch, workers, 1.0 / geom.analysis_per_level,
                              gpu_available=gpu_free, streams=streams)
        except ValueError as e:
            raise SlideError(f"{slide_path}: {e}") from None
        tiles = tile_grid(aw, ah, tile_size, overlap)
        shape = grid_shape(aw, ah, tile_size, overlap)
        if tissue_of is not None:
            thumb, level0_per_thumb = tissue_of.thumbnail, tissue_of.level0_per_thumbnail
            region = tissue_of.region
        else:
            thumb, level0_per_thumb = reader.thumbnail(opts.thumbnail_size)
            region = (tissue_mask(thumb) if opts.tissue_detection
                      else np.ones(thumb.shape[:2], bool))
            if roi_polys is not None:
                region &= roi_mask(roi_polys, thumb.shape[:2], level0_per_thumb)
        tissue_area_mm2 = float(region.sum()) * (level0_per_thumb * slide_mpp / 1000.0) ** 2
        selected = np.asarray(tiles_in_mask(tiles, region,
                                            level0_per_thumb / geom.level0_per_analysis), bool)
        level_mpp = slide_mpp * reader.level_downsamples[geom.level]
    return AnalysisGrid(os.path.abspath(slide_path), (H0, W0), slide_mpp,
                        "--mpp" if opts.mpp else "file", model_mpp, level_mpp, geom, tile_size,
                        overlap, tiles,
                        shape, selected, thumb, level0_per_thumb, region, roi_polys,
                        tissue_area_mm2)


#: Tiles of the slide read for the size estimate (evenly spread over the tissue).
SIZE_SAMPLE_TILES = 4


def size_normalised_grid(model: torch.nn.Module, grid: AnalysisGrid, opts: InferenceOptions,
                         gpu_free: Optional[int] = None
                         ) -> Tuple[AnalysisGrid, Dict[str, Any]]:
    """Stage 1b, for a size-normalised model without a training mpp (``INPUT.NUCLEUS_DIAMETER``
    > 0; :mod:`.size`): the median nucleus diameter from a first pass of the model over a few
    tissue tiles at the slide's own px, and the grid laid again at the scale that brings it to
    the canonical diameter. Returns the grid and what was found (for ``summary.json``)."""
    canonical = model_nucleus_diameter(model)
    sel = grid.selected_indices or list(range(len(grid.tiles)))
    picks = [sel[int(i)] for i in np.unique(np.linspace(0, len(sel) - 1, SIZE_SAMPLE_TILES)
                                             .round().astype(int))] if sel else []
    predictor.prepare_model(model)
    try:
        reader = open_slide(grid.slide_path)
    except SlideReadError as e:
        raise SlideError(str(e)) from None
    with reader:
        images = [torch.from_numpy(np.ascontiguousarray(read_tile(reader, grid.geometry,
                                                                  grid.tiles[i])))
                  .permute(2, 0, 1) for i in picks]
    scale, diameter = slide_scale(
        lambda im: predict_batch(model, [im], opts.amp)[0], images, canonical)
    info = {"canonical_diameter_px": canonical, "tiles_sampled": len(images),
            "nucleus_diameter_px": None if diameter is None else round(diameter, 2),
            "scale": round(scale, 4)}
    if diameter is None:
        log.warning("%s: too few nuclei in %d sample tiles to estimate their size; analysing "
                    "at the slide's own scale", grid.slide_path, len(images))
        return grid, info
    log.info("%s: median nucleus %.1f px -> analysed at x%.3f (canonical %.0f px)",
             grid.slide_path, diameter, scale, canonical)
    if scale == 1.0:
        return grid, info
    regrid = analysis_grid(grid.slide_path, equivalent_mpp(grid.level_mpp, scale), opts,
                           gpu_free, True, tissue_of=grid)
    return regrid, info


def loader_layout(opts: InferenceOptions, on_cuda: bool) -> Tuple[int, int, int]:
    """Tiles per model call, reader workers and CPU streams: ``opts.batch_size`` /
    ``opts.num_workers`` / ``opts.streams``, or where None by device: 4, 2 and 1 on CUDA
    (reading overlaps the GPU); 1, 0 and 2 on a CPU with 2 or more torch threads. There a
    reader worker and batches of 4 made ``benchmarks/bench_infer.py`` 1.56x and 1.27x the
    naive loop on 2 cores, against 1.74x for 1 and 0 (the model's threads use every core);
    two streams of one torch thread each instead of one of two made the model 1.2x faster
    (one tile's NMS, RoIAlign and Python, which run on one core, overlap the other's
    convolutions)."""
    batch = opts.batch_size if opts.batch_size is not None else (4 if on_cuda else 1)
    workers = opts.num_workers if opts.num_workers is not None else (2 if on_cuda else 0)
    if on_cuda:
        streams = 1
    elif opts.streams is not None:
        streams = max(1, int(opts.streams))
    else:
        streams = 2 if torch.get_num_threads() >= 2 else 1
    return int(batch), int(workers), streams


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block (each stream's share)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _in_streams(fn: Callable[[Any], Any], items: Iterable[Any], streams: int) -> Iterator[Any]:
    """``map(fn, items)`` in order, with up to ``streams`` calls running at once in threads,
    each with its share of torch's threads; ``items`` is read in this thread (the slide
    reader stays in the thread that opened it)."""
    if streams <= 1:
        yield from map(fn, items)
        return
    with _torch_threads(torch.get_num_threads() // streams), \
            ThreadPoolExecutor(streams, thread_name_prefix="stream") as pool:
        pending: Deque[Future] = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= streams:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def predict_tiles(model: torch.nn.Module, grid: AnalysisGrid, opts: InferenceOptions,
                  journal: Journal, slide_path: Optional[str] = None) -> TilePredictions:
    """Stage 2: run the model on the selected tiles that ``journal`` does not hold yet. In
    each tile, detections below ``opts.score_thresh`` or with an empty mask are dropped, as
    are those cut by an interior tile edge (:func:`drop_cut`); the rest move to level-0 px
    (:func:`tile_to_slide`) and are journalled batch by batch."""
    path = slide_path or grid.slide_path
    sel_idx = grid.selected_indices
    todo = [i for i in sel_idx if i not in journal.done]
    H0, W0 = grid.slide_size
    rows, cols = grid.grid_shape
    geom = grid.geometry
    selected = grid.selected.tolist()
    # a model that reads real neighbouring pixels (the U-Net) owns the objects in tile cores
    predictor.prepare_model(model)
    context = int(getattr(model, "slide_context", 0) or 0)
    cores = (tile_cores(geom.size[1], geom.size[0], grid.tile_size, grid.overlap, selected)
             if context else None)
    ds = TileDataset(path, geom, grid.tiles, todo, context)
    on_cuda = model_device(model).type == "cuda"
    batch_size, workers, streams = loader_layout(opts, on_cuda)
    ahead = workers > 0 and len(todo) > batch_size
    # no pin_memory: a batch of uint8 tiles is a few MB (a pageable copy is about a ms), and
    # with the loader's pinning thread the end of each slide's loop waited 4.9 s on an H200
    loader = DataLoader(ds, batch_size=max(1, batch_size), shuffle=False,
                        num_workers=workers if len(todo) > batch_size else 0,
                        collate_fn=_collate, prefetch_factor=2 if ahead else None)
    bar = tqdm(total=len(sel_idx), initial=len(sel_idx) - len(todo), unit="tile",
               desc=slide_stem(path), disable=not opts.progress, dynamic_ncols=True)
    t_model = time.time()

    def run(batch: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], List[Instances]]:
        """One batch through the model; its tiles' detections in slide px."""
        good = [b for b in batch if b["image"] is not None]
        if not good:
            return batch, []
        # detections cut by an interior tile edge are the neighbour's: dropped before the
        # mask head by a model that can (drop_cut drops them below for the others)
        edges = [interior_edges(b["index"], rows, cols, selected) for b in good]
        cut = None if context else [
            functools.partial(cut_by_edges, edges=e, margin=opts.edge_margin) for e in edges]
        preds = predict_batch(model, [b["image"] for b in good], opts.amp,
                              [b["tile"] for b in good],
                              [cores[b["index"]] for b in good] if cores else None, context,
                              opts.score_thresh, opts.tta, drop=cut)
        parts = []
        for b, e, inst in zip(good, edges, preds):
            keep = inst.scores >= opts.score_thresh
            if inst.masks is not None:  # an empty mask is not an object
                keep &= np.asarray([not m.is_empty for m in inst.masks], bool)
            inst = inst[keep]
            if not context:  # else each object came from the tile owning its centroid
                inst = drop_cut(inst, e, opts.edge_margin)
            parts.append(tile_to_slide(inst, b["tile"][:2], geom.level0_per_analysis, (H0, W0)))
        return batch, parts

    has_masks: Optional[bool] = None
    for batch, parts in _in_streams(run, loader, streams):
        failed = {b["index"]: b["error"] for b in batch if b["image"] is None}
        for k, v in failed.items():
            log.warning("tile %d of %s skipped: %s", k, path, v)
        if parts and has_masks is None:
            has_masks = parts[0].masks is not None
        batch_inst = Instances.cat(parts, (H0, W0)) if parts else _empty((H0, W0), has_masks)
        journal.append([b["index"] for b in batch], batch_inst, failed)
        bar.update(len(batch))
    bar.close()
    ds.close()
    return TilePredictions(journal.instances(), dict(journal.failed), time.time() - t_model)


def merge_tiles(preds: TilePredictions, grid: AnalysisGrid, opts: InferenceOptions
                ) -> Candidates:
    """Stage 3: one set of slide detections without the duplicates of overlapping tiles
    (:func:`merge_detections`)."""
    parts = [p for p in preds.parts if len(p)]
    if not parts:
        return Candidates(Instances(grid.slide_size))
    if len({p.masks is not None for p in parts}) > 1:  # an empty batch before the first mask
        parts = [p for p in parts if p.masks is not None]
    return Candidates(merge_detections(Instances.cat(parts, grid.slide_size), opts.nms_thresh,
                                       opts.mask_iou_thresh))


def region_filter(cands: Candidates, grid: AnalysisGrid, opts: InferenceOptions) -> Detections:
    """Stage 5: keep detections whose centroid lies in the ROI and, with tissue detection, on
    tissue (the tissue mask dilated by 2 thumbnail px), so that counts and the tissue area
    they are divided by come from the same region."""
    inst = cands.instances
    centroids, areas = counting.centroids_and_areas(inst)
    if grid.roi is not None and len(inst):
        inside = points_in_roi(centroids, grid.roi)
        inst, centroids, areas = inst[inside], centroids[inside], areas[inside]
    outside_tissue = 0
    if opts.tissue_detection and len(inst):
        grown = cv2.dilate(grid.region.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        t = grid.level0_per_thumbnail
        tx = np.clip((centroids[:, 0] / t).astype(int), 0, grown.shape[1] - 1)
        ty = np.clip((centroids[:, 1] / t).astype(int), 0, grown.shape[0] - 1)
        on = grown[ty, tx]
        outside_tissue = int((~on).sum())
        inst, centroids, areas = inst[on], centroids[on], areas[on]
    return Detections(inst, centroids, areas, outside_tissue)


def second_stage_filter(dets: Detections, grid: AnalysisGrid, second: SecondStage,
                        opts: InferenceOptions) -> Tuple[Detections, Dict[str, Any]]:
    """Stage 5b: re-score the candidates that count (after the region filter) with the patch
    classifier, reading a patch centred on each from the analysis level, and keep those at
    ``opts.score_thresh``. Returns the kept detections (labels: the classifier's classes) and
    the ``second_stage`` block of ``summary.json`` (candidates before, figures after)."""
    geom = grid.geometry
    with open_slide(grid.slide_path) as reader:
        inst, _ = second.apply(
            dets.instances, lambda t, l, h, w: read_tile(reader, geom, (l, t, l + w, t + h)),
            geom.size, geom.level0_per_analysis)
    keep = inst.scores >= opts.score_thresh
    area = grid.tissue_area_mm2
    info = {"candidates": int(len(inst)), "candidate_threshold": second.candidate_threshold,
            "candidates_per_mm2": len(inst) / area if area else 0.0,
            "threshold": opts.score_thresh, "fusion": second.fusion, "kept": int(keep.sum())}
    return Detections(inst[keep], dets.centroids[keep], dets.areas[keep],
                      dets.outside_tissue), info


def summarize_slide(dets: Detections, grid: AnalysisGrid, classes: List[Dict[str, Any]],
                    opts: InferenceOptions, preds: TilePredictions, weights_name: str = "",
                    seconds: float = 0.0, weights_id: Optional[str] = None) -> Dict[str, Any]:
    """Stage 6: the ``summary.json`` dict (slide, analysis parameters, counts, mitotic figures
    per mm^2 and per 10 HPF, hotspot, mitotic index)."""
    geom = grid.geometry
    n_sel = int(grid.selected.sum())
    mitotic_ids = counting.resolve_class_ids(opts.mitotic_classes, classes)
    summary: Dict[str, Any] = {
        "slide": grid.slide_path,
        "weights": weights_name, WEIGHTS_KEY: weights_id,
        "slide_size": list(grid.slide_size),
        "mpp": grid.mpp,
        "mpp_source": grid.mpp_source,
        "analysis": {
            "model_mpp": grid.model_mpp, "level": geom.level,
            "level_mpp": grid.level_mpp,
            "analysis_per_level": geom.analysis_per_level,
            "level0_per_analysis": geom.level0_per_analysis,
            "tile_size": grid.tile_size, "overlap": grid.overlap,
            "tiles_total": len(grid.tiles), "tiles_analysed": n_sel - len(preds.failed),
            "tiles_failed": [{"tile": int(k), "box": list(grid.tiles[int(k)]), "error": v}
                             for k, v in sorted(preds.failed.items())],
            "score_thresh": opts.score_thresh, "roi": opts.roi, "tta": opts.tta,
            "tissue_detection": opts.tissue_detection,
            "detections_outside_tissue_dropped": dets.outside_tissue,
            "seconds": round(seconds, 2),
            "model_seconds": round(preds.model_seconds, 2),
        },
    }
    summary.update(counting.summarize(dets.instances, classes, grid.mpp, grid.tissue_area_mm2,
                                      mitotic_ids, opts.hpf_area, dets.centroids, grid.region,
                                      grid.level0_per_thumbnail, opts.hotspot_shape,
                                      opts.hotspot_area))
    if len(mitotic_ids) > 1:  # phases (or normal / atypical): figures per class
        summary["mitotic_figures"]["by_class"] = {
            str(c["name"]): int((dets.instances.labels == int(c["id"])).sum()) for c in classes
            if int(c["id"]) in set(mitotic_ids)}
    return summary


def export_slide(out_dir: str, dets: Detections, grid: AnalysisGrid,
                 classes: List[Dict[str, Any]], opts: InferenceOptions, summary: Dict[str, Any],
                 timings: Optional[Dict[str, float]] = None) -> None:
    """Stage 7: write ``detections.geojson``, ``detections.json``, ``detections.csv``,
    ``overlay.png``, ``density.png`` and, last, ``summary.json`` into ``out_dir``. Every mask
    is traced once (:func:`mask_outlines`), for the GeoJSON and the overlay; a slide with many
    detections has the three detection files written by several processes
    (:func:`export.write_detections`, ``opts.export_workers``). ``timings``, when given,
    receives the CPU seconds of each part ("detections", "overlay", "density", "summary"):
    of this process and of the processes it forked (``time.process_time`` and
    ``RUSAGE_CHILDREN``: other work on a shared machine does not count)."""
    merged, centroids, areas = dets.instances, dets.centroids, dets.areas
    mpp, thumb, t = grid.mpp, grid.thumbnail, grid.level0_per_thumbnail
    H0, W0 = grid.slide_size
    mitotic_ids = counting.resolve_class_ids(opts.mitotic_classes, classes)
    hs = summary["mitotic_figures"]["hotspot"]
    clock = [cpu_seconds()]

    def lap(name: str) -> None:
        now = cpu_seconds()
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + now - clock[0]
        clock[0] = now

    outlines = export.write_detections(out_dir, merged, classes, mpp, centroids, areas,
                                       mitotic_ids, export_workers(opts))
    lap("detections")
    export.write_overlay(os.path.join(out_dir, "overlay.png"), thumb, t, merged, classes,
                         mitotic_ids, hs, grid.roi, grid.region, outlines)
    lap("overlay")
    is_mit = np.isin(merged.labels, np.asarray(mitotic_ids, np.int64))
    cell_px = math.sqrt(opts.hpf_area) * 1000.0 / mpp  # one HPF per cell
    if mitotic_ids:
        dens, cell = counting.density_grid(centroids[is_mit], (H0, W0), cell_px, mpp)
        title = "mitotic figures / mm²"
    else:
        dens, cell = counting.density_grid(centroids, (H0, W0), cell_px, mpp)
        title = "detections / mm² (no mitotic class)"
    export.write_density(os.path.join(out_dir, "density.png"), dens, cell, (H0, W0), thumb,
                         title, hs if mitotic_ids else None, grid.region, t)
    lap("density")
    export.write_json(os.path.join(out_dir, "summary.json"), summary)
    lap("summary")


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that ended (forked writers)."""
    try:
        import resource  # POSIX only
    except ImportError:
        return time.process_time()
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def export_workers(opts: InferenceOptions) -> int:
    """``opts.export_workers``, or the CPUs this process may use, at most 8."""
    if opts.export_workers is not None:
        return max(1, int(opts.export_workers))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def journal_header(grid: AnalysisGrid, opts: InferenceOptions, weights_id: str
                   ) -> Dict[str, Any]:
    """The run parameters a resumed journal must share, the weights identified by content."""
    return {"slide": grid.slide_path, WEIGHTS_KEY: weights_id,
            "slide_size": list(grid.slide_size), "tile_size": grid.tile_size,
            "overlap": grid.overlap, "score_thresh": opts.score_thresh, "mpp": grid.mpp,
            "roi": opts.roi, "level": grid.geometry.level, "tta": opts.tta,
            "analysis_per_level": grid.geometry.analysis_per_level,
            "tissue": opts.tissue_detection}


def infer_slide(model: torch.nn.Module, classes: List[Dict[str, Any]], model_mpp: Optional[float],
                slide_path: str, output_dir: str, opts: InferenceOptions,
                weights_name: str = "",
                candidate_stages: Sequence[CandidateStage] = (),
                second_stage: Optional[SecondStage] = None,
                nuclei: Optional[NucleiModel] = None, folder: Optional[str] = None,
                weights_id: Optional[str] = None) -> Dict[str, Any]:
    """Analyse one slide and write its folder ``output_dir/<slide stem>/`` (or
    ``output_dir/<folder>/``): the stages above in order, ``candidate_stages`` between merge and
    region filter.

    With ``second_stage`` (a two-stage mitosis bundle), tiles keep the detector's candidates
    above its candidate threshold, :func:`second_stage_filter` re-scores them and
    ``opts.score_thresh`` applies to the new scores; the classes are then the classifier's (the
    phases), all counted as mitotic figures. With ``nuclei`` (a nuclei model run over the same
    slide and tissue, its output in ``<slide>/nuclei/``), the mitotic index is mitotic figures /
    nuclei found. ``weights_id`` identifies the weights by content (default
    :func:`weights_identity` of ``model``): a journal of other weights is not resumed.

    Returns the summary (also written to ``summary.json``). Raises :class:`SlideError` when the
    slide cannot be analysed at all (unreadable, no mpp); tiles that fail to decode are logged,
    skipped and listed in the summary.
    """
    t_start = time.time()
    out_dir = os.path.join(output_dir, folder or slide_stem(slide_path))
    sized = model_mpp is None and model_nucleus_diameter(model) > 0
    grid = analysis_grid(slide_path, model_mpp, opts, _gpu_free(model), sized)
    sizing = None
    if sized:
        grid, sizing = size_normalised_grid(model, grid, opts, _gpu_free(model))
    weights_id = weights_id or weights_identity(model, classes, model_mpp)
    os.makedirs(out_dir, exist_ok=True)
    tile_opts = opts if second_stage is None else \
        dataclasses.replace(opts, score_thresh=second_stage.candidate_threshold)
    journal = Journal(os.path.join(out_dir, JOURNAL_NAME),
                      journal_header(grid, tile_opts, weights_id), resume=opts.resume)
    preds = predict_tiles(model, grid, tile_opts, journal, slide_path)
    cands = merge_tiles(preds, grid, opts)
    for stage in candidate_stages:
        cands = stage(cands, grid)
    dets = region_filter(cands, grid, opts)
    stage2 = None
    if second_stage is not None:
        dets, stage2 = second_stage_filter(dets, grid, second_stage, opts)
        classes = second_stage.classes
        opts = dataclasses.replace(opts, mitotic_classes=",".join(str(c["id"]) for c in classes))
    summary = summarize_slide(dets, grid, classes, opts, preds, weights_name,
                              time.time() - t_start, weights_id)
    if sizing is not None:
        summary["size_normalisation"] = sizing
    if stage2 is not None:
        stage2["mitotic_figures_before"] = stage2["candidates"]
        stage2["mitotic_figures_after"] = summary["mitotic_figures"]["total"]
        summary["second_stage"] = stage2
    if nuclei is not None:
        n_model, n_classes, n_mpp = nuclei
        n_opts = dataclasses.replace(opts, score_thresh=InferenceOptions.score_thresh,
                                     mitotic_classes="none")
        n_sum = infer_slide(n_model, n_classes, n_mpp, slide_path, out_dir, n_opts,
                            weights_name=f"{weights_name} (nuclei)", folder="nuclei")
        n_nuclei = int(n_sum["total_detections"])
        summary["nuclei"] = {"count": n_nuclei, "folder": os.path.join(out_dir, "nuclei"),
                             "tissue_area_mm2": n_sum["tissue_area_mm2"]}
        summary["mitotic_index"] = (summary["mitotic_figures"]["total"] / n_nuclei
                                    if n_nuclei else None)
    summary["analysis"]["seconds"] = round(time.time() - t_start, 2)
    export_slide(out_dir, dets, grid, classes, opts, summary)
    journal.remove()
    return summary


def _gpu_free(model: torch.nn.Module) -> Optional[int]:
    dev = model_device(model)
    return torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None


def _empty(size: Tuple[int, int], has_masks: Optional[bool]) -> Instances:
    return Instances(size, masks=[] if has_masks else None)


# ------------------------------------------------------------------------------ many slides
def shard(slides: Sequence[str], rank: Optional[int] = None, world: Optional[int] = None
          ) -> List[str]:
    """The slides of this process under ``torchrun`` (``RANK``/``WORLD_SIZE``): every
    ``world``-th slide from ``rank``."""
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    return list(slides[rank::world])


def run_slides(model: torch.nn.Module, classes: List[Dict[str, Any]], model_mpp: Optional[float],
               slides: Sequence[str], output_dir: str, opts: InferenceOptions,
               weights_name: str = "", second_stage: Optional[SecondStage] = None,
               nuclei: Optional[NucleiModel] = None, weights_id: Optional[str] = None
               ) -> Dict[str, Any]:
    """Analyse ``slides`` one after another (see :func:`infer_slide` for ``second_stage``,
    ``nuclei`` and ``weights_id``); a slide that fails is reported and the others still run.
    With ``opts.resume`` slides finished with the same weights are skipped (those of other
    weights are redone). Returns
    ``{"done": [...], "skipped": [...], "failed": {slide: message}}``."""
    result: Dict[str, Any] = {"done": [], "skipped": [], "failed": {}}
    weights_id = weights_id or weights_identity(model, classes, model_mpp)
    for path in slides:
        out = os.path.join(output_dir, slide_stem(path))
        if opts.resume and is_finished(out) and finished_weights(out) != weights_id:
            log.warning("%s: finished before with other weights; analysed again", path)
        elif opts.resume and is_finished(out):
            log.info("%s: finished before (resume), skipped", path)
            result["skipped"].append(path)
            continue
        try:
            infer_slide(model, classes, model_mpp, path, output_dir, opts, weights_name,
                        second_stage=second_stage, nuclei=nuclei, weights_id=weights_id)
            result["done"].append(path)
        except (DetectorError, ValueError, OSError) as e:
            log.error("%s", e)
            result["failed"][path] = str(e)
        except Exception as e:  # a model or worker failure on one slide: the others still run
            log.exception("%s: failed (%s); the journal keeps the finished tiles for --resume",
                          path, type(e).__name__)
            result["failed"][path] = f"{type(e).__name__}: {e}"
    return result
