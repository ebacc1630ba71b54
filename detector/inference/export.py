"""Slide outputs: GeoJSON for QuPath, COCO results, CSV, overlay.png and density.png.

Everything is in level-0 slide pixels (origin top-left, x right, y down); micrometres through
the slide's ``mpp``. Files are written atomically (temporary file, then rename) so a killed run
never leaves a half-written output that looks finished.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import numpy.typing as npt

from ..errors import DetectorError
from ..fileio import atomic_write
from ..structures.instances import Instances
from ..structures.masks import Outlines, coco_counts_strings, mask_outlines

log = logging.getLogger(__name__)

# matplotlib's tab10, as RGB 0..255: class i (by position in the checkpoint's classes) gets
# colour i; mitotic figures stand out in red.
_PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


#: zlib level 1 for the pictures: a 2000 x 2000 px H&E picture encodes in 0.26 instead of
#: 0.36 s (OpenCV's default, 3) for a file 1 % larger
PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 1]


def class_colours(classes: Sequence[Dict[str, Any]], mitotic_ids: Sequence[int] = ()
                  ) -> Dict[int, Tuple[int, int, int]]:
    """RGB colour of each class id: red for mitotic classes, the palette for the others."""
    out, k = {}, 0
    for c in classes:
        cid = int(c["id"])
        if cid in mitotic_ids:
            out[cid] = (214, 39, 40)
        else:
            out[cid] = _PALETTE[[0, 2, 3, 4, 5, 6, 7, 8, 9][k % 9]]
            k += 1
    return out


def write_json(path: str, obj: Any) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def _box_ring(box: np.ndarray) -> List[List[float]]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def instance_polygons(inst: Instances, i: int) -> Sequence[Sequence[Sequence[float]]]:
    """Every ring (outer boundaries and holes) of detection ``i`` in level-0 px as closed
    ``[[x, y], ...]`` lists along pixel corners; the box's rectangle for box-only detections."""
    if inst.masks is None:
        return [_box_ring(inst.boxes[i])]
    return [ring for poly in inst.masks[i].polygons() for ring in poly]


def instance_geometry(inst: Instances, i: int) -> Optional[Dict[str, Any]]:
    """The GeoJSON geometry of detection ``i`` (level-0 px): a Polygon (exterior ring, then
    holes) per mask, a MultiPolygon when the mask has parts that touch at most at a corner,
    the box's rectangle for box-only detections; None for an empty mask. Valid for shapely
    (``is_valid``), and its area is the mask's pixel count (:meth:`CropMask.polygons`)."""
    if inst.masks is None:
        return {"type": "Polygon", "coordinates": [_box_ring(inst.boxes[i])]}
    polys = inst.masks[i].polygons()
    if not polys:
        return None
    if len(polys) == 1:
        return {"type": "Polygon", "coordinates": polys[0]}
    return {"type": "MultiPolygon", "coordinates": polys}


def _float_text(values: np.ndarray) -> List[str]:
    """How ``json`` writes each float of ``values`` (``repr``; NaN/Infinity as json does)."""
    vals = np.asarray(values, np.float64).tolist()
    if all(math.isfinite(v) for v in vals):
        return [repr(v) for v in vals]
    return [json.dumps(v) for v in vals]


def _points_text(pts: np.ndarray) -> Tuple[bytes, np.ndarray]:
    """``[x,y],`` for every row of the int ``(P, 2)`` ``pts``, as one ASCII buffer, and where each
    point's text starts (``P + 1`` offsets): json's compact text of integer points, written by
    numpy for all points at once: one fixed-width row of bytes per point (``[``, sign, digits,
    ``,``, sign, digits, ``]``, ``,``), the unused sign and leading-zero places 0, then the
    zeros dropped."""
    v = np.asarray(pts, np.int64).reshape(-1, 2)
    neg = v < 0
    a = np.abs(v)
    width = len(str(int(a.max(initial=0))))  # digits of the largest number
    x: npt.NDArray[np.unsignedinteger] = (a.astype(np.uint32) if width <= 9
                                           else a.astype(np.uint64))
    rows = np.zeros((len(v), 2 * width + 6), np.uint8)
    rows[:, 0], rows[:, 2 + width], rows[:, 4 + 2 * width], rows[:, 5 + 2 * width] = 91, 44, 93, 44
    rows[:, 1], rows[:, 3 + width] = 45 * neg[:, 0], 45 * neg[:, 1]  # "-"
    nd = np.ones(v.shape, np.int64)  # digits of each number
    for k in range(width):  # the k-th digit from the right; a leading zero stays 0
        d = (x % 10).astype(np.uint8) + 48
        if k:
            more = x > 0
            nd += more
            d[~more] = 0
        rows[:, 1 + width - k], rows[:, 3 + 2 * width - k] = d[:, 0], d[:, 1]
        x //= 10
    plen = 4 + (nd + neg).sum(1)
    return rows[rows != 0].tobytes(), np.r_[0, np.cumsum(plen)]


def geometry_texts(outlines: Outlines) -> List[Optional[str]]:
    """Each mask's GeoJSON geometry as compact JSON text (what ``json.dumps`` with
    ``separators=(",", ":")`` writes for :func:`instance_geometry`), None for an empty mask,
    from the outlines of all masks at once."""
    pts, rstart = outlines.closed_points()
    buf, off = _points_text(pts)
    text = buf.decode("ascii")
    poff = off[rstart].tolist()
    rings = ["[" + text[a:b - 1] + "]" for a, b in zip(poff[:-1], poff[1:])]
    ps = outlines.poly_start.tolist()
    polys = ["[" + ",".join(rings[a:b]) + "]" for a, b in zip(ps[:-1], ps[1:])]
    out: List[Optional[str]] = []
    ms = outlines.mask_start.tolist()
    for a, b in zip(ms[:-1], ms[1:]):
        if b == a:
            out.append(None)
        elif b == a + 1:
            out.append('{"type":"Polygon","coordinates":' + polys[a] + "}")
        else:
            out.append('{"type":"MultiPolygon","coordinates":[' + ",".join(polys[a:b]) + "]}")
    return out


def write_geojson(path: str, inst: Instances, classes: Sequence[Dict[str, Any]], mpp: float,
                  areas_px: Optional[np.ndarray] = None, mitotic_ids: Sequence[int] = (),
                  outlines: Optional[Outlines] = None) -> None:
    """``detections.geojson``: a FeatureCollection QuPath imports as detections (File > Import
    objects): a Polygon per mask with its holes as interior rings (MultiPolygon when the mask has
    several parts) or per box, with ``classification`` {name, color} and ``measurements``
    {score, area_um2}. Every geometry is valid (shapely ``is_valid``); a detection with an empty
    mask has no feature (the slide run drops such detections before counting). ``outlines``:
    :func:`mask_outlines` of ``inst.masks`` when the caller has them already."""
    text, skipped = geojson_features(inst, classes, mpp, areas_px, mitotic_ids, outlines)
    with atomic_write(path, "wb") as f:
        f.write(GEOJSON_HEAD + text[1:] + GEOJSON_TAIL)
    if skipped:
        log.warning("%s: %d detections with an empty mask left out", path, skipped)


GEOJSON_HEAD = b'{"type": "FeatureCollection", "features": [\n'
GEOJSON_TAIL = b"]}\n"


def geojson_features(inst: Instances, classes: Sequence[Dict[str, Any]], mpp: float,
                     areas_px: Optional[np.ndarray] = None, mitotic_ids: Sequence[int] = (),
                     outlines: Optional[Outlines] = None, first_id: int = 1
                     ) -> Tuple[bytes, int]:
    """The features of :func:`write_geojson`, one line each, every line starting with a comma
    (the file's first drops it), ids from ``first_id`` (``det-<id>``), and the number of
    detections left out (empty masks)."""
    names = {int(c["id"]): str(c["name"]) for c in classes}
    colours = class_colours(classes, mitotic_ids)
    if areas_px is None:
        areas_px = np.array([0.0] * len(inst))
    geoms: List[Optional[str]]
    if inst.masks is None:
        geoms = [json.dumps(instance_geometry(inst, i), separators=(",", ":"))
                 for i in range(len(inst))]
    else:
        if outlines is None:
            outlines = mask_outlines(inst.masks)
        geoms = geometry_texts(outlines)
    labels = inst.labels.tolist()
    classification = {lab: json.dumps({"name": names.get(lab, str(lab)),
                                       "color": list(colours.get(lab, (127, 127, 127)))},
                                      separators=(",", ":")) for lab in set(labels)}
    scores = _float_text(np.asarray([round(v, 5) for v in inst.scores.astype(np.float64).tolist()]))
    areas = _float_text(np.asarray([round(v, 3) for v in
                                    (np.asarray(areas_px, np.float64) * mpp * mpp).tolist()]))
    lines = []
    skipped = 0
    for i, geom in enumerate(geoms):
        if geom is None:  # an empty mask: nothing to draw, no feature
            skipped += 1
            continue
        lines.append(',{"type":"Feature","id":"det-' + str(i + first_id) + '","geometry":' + geom
                     + ',"properties":{"objectType":"detection","classification":'
                     + classification[labels[i]] + ',"measurements":{"score":' + scores[i]
                     + ',"area_um2":' + areas[i] + '}}}\n')
    return "".join(lines).encode("utf-8"), skipped


def write_coco_results(path: str, inst: Instances, image_id: int = 1) -> None:
    """``detections.json``: COCO results (bbox XYWH, score, category_id, segmentation RLE of
    the level-0 slide size) for ``image_id``: the text ``json.dump`` writes for
    :meth:`Instances.to_coco_results`, written from arrays of all detections at once."""
    with atomic_write(path, "wb") as f:
        f.write(b"[" + coco_results_text(inst, image_id) + b"]")


def coco_results_text(inst: Instances, image_id: int = 1) -> bytes:
    """The results of :func:`write_coco_results` without the enclosing brackets, ``", "``
    between them."""
    b = inst.boxes.astype(np.float64).reshape(-1, 4)
    x0, y0 = _float_text(b[:, 0]), _float_text(b[:, 1])
    w, h = _float_text(b[:, 2] - b[:, 0]), _float_text(b[:, 3] - b[:, 1])
    scores = _float_text(inst.scores.astype(np.float64))
    labels = inst.labels.tolist()
    head = '{"image_id": ' + str(int(image_id)) + ', "category_id": '
    if inst.masks is not None:
        sizes = {m.image_size: '"size": [' + str(m.image_size[0]) + ", " + str(m.image_size[1])
                 + "]" for m in inst.masks}
        segs = [', "segmentation": {' + sizes[m.image_size] + ', "counts": '
                + json.dumps(c.decode("ascii")) + "}}"
                for m, c in zip(inst.masks, coco_counts_strings(inst.masks))]
    else:
        segs = ["}"] * len(inst)
    items = [head + str(int(labels[i])) + ', "bbox": [' + x0[i] + ", " + y0[i] + ", " + w[i]
             + ", " + h[i] + '], "score": ' + scores[i] + segs[i] for i in range(len(inst))]
    return ", ".join(items).encode("utf-8")


CSV_HEADER = ("id,class,score,x_px,y_px,x_um,y_um,area_px,area_um2,box_x0,box_y0,box_x1,"
              "box_y1\r\n").encode("utf-8")


def write_csv(path: str, inst: Instances, classes: Sequence[Dict[str, Any]], mpp: float,
              centroids: np.ndarray, areas_px: np.ndarray) -> None:
    """``detections.csv``: id, class, score, centroid (px and um), area (px and um^2), box."""
    with atomic_write(path, "wb") as f:
        f.write(CSV_HEADER + csv_rows(inst, classes, mpp, centroids, areas_px))


def csv_rows(inst: Instances, classes: Sequence[Dict[str, Any]], mpp: float,
             centroids: np.ndarray, areas_px: np.ndarray, first_id: int = 1) -> bytes:
    """The rows of :func:`write_csv` (ids from ``first_id``), formatted as the f-strings of
    one row did, each class name as ``csv`` quotes it."""
    names = {int(c["id"]): str(c["name"]) for c in classes}
    cell = io.StringIO()
    quoted = {}
    for lab in set(inst.labels.tolist()):
        cell.seek(0)
        cell.truncate()
        csv.writer(cell, lineterminator="").writerow([names.get(lab, lab)])
        quoted[lab] = cell.getvalue().replace("%", "%%")
    c = np.asarray(centroids, np.float64).reshape(-1, 2)
    a = np.asarray(areas_px, np.float64).reshape(-1)
    cols = zip(range(first_id, len(inst) + first_id), inst.labels.tolist(), inst.scores.tolist(),
               c[:, 0].tolist(), c[:, 1].tolist(), (c[:, 0] * mpp).tolist(),
               (c[:, 1] * mpp).tolist(), a.tolist(), (a * mpp * mpp).tolist(),
               *inst.boxes.reshape(-1, 4).T.tolist())
    tail = ",%.5f,%.2f,%.2f,%.3f,%.3f,%.0f,%.3f,%.1f,%.1f,%.1f,%.1f\r\n"
    fmt = {lab: "%d," + q + tail for lab, q in quoted.items()}
    return "".join([fmt[r[1]] % (r[0], *r[2:]) for r in cols]).encode("utf-8")


# The three detection files of a large slide are written by several processes: fewer
# detections than this go through one (forking costs more than it saves).
PARALLEL_MIN_DETECTIONS = 4000


class ExportError(RuntimeError, DetectorError):
    """Writing a slide's files failed; the message names them."""


def write_detections(out_dir: str, inst: Instances, classes: Sequence[Dict[str, Any]],
                     mpp: float, centroids: np.ndarray, areas_px: np.ndarray,
                     mitotic_ids: Sequence[int] = (), workers: int = 1) -> Optional[Outlines]:
    """``detections.geojson``, ``detections.json`` and ``detections.csv`` of ``inst`` in
    ``out_dir`` (:func:`write_geojson`, :func:`write_coco_results`, :func:`write_csv`).

    With ``workers`` > 1 and at least :data:`PARALLEL_MIN_DETECTIONS` detections, that many
    processes (this one and forked children) each trace and format a contiguous part of the
    detections into part files, joined in order into the same bytes one process writes: the
    masks' outlines, the JSON and CSV text are per detection, so a slide's 10^5-10^6 of them
    spread over the cores. Returns the outlines of every mask (None for box-only detections),
    traced once, also when several processes traced them."""
    n = len(inst)
    paths = [os.path.join(out_dir, f) for f in
             ("detections.geojson", "detections.json", "detections.csv")]
    workers = min(int(workers), n // (PARALLEL_MIN_DETECTIONS // 2) or 1)
    if workers < 2 or n < PARALLEL_MIN_DETECTIONS or not can_fork():
        outlines = mask_outlines(inst.masks) if inst.masks is not None else None
        write_geojson(paths[0], inst, classes, mpp, areas_px, mitotic_ids, outlines)
        write_coco_results(paths[1], inst)
        write_csv(paths[2], inst, classes, mpp, centroids, areas_px)
        return outlines
    bounds = np.linspace(0, n, workers + 1).round().astype(np.int64).tolist()
    areas = np.asarray(areas_px, np.float64).reshape(-1)
    cents = np.asarray(centroids, np.float64).reshape(-1, 2)
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".parts-") as tmp:
        def part(k: int) -> None:
            lo, hi = bounds[k], bounds[k + 1]
            sub = inst[lo:hi]
            outl = mask_outlines(sub.masks) if sub.masks is not None else None
            geo, skipped = geojson_features(sub, classes, mpp, areas[lo:hi], mitotic_ids, outl,
                                            first_id=lo + 1)
            if outl is not None:  # for the overlay
                np.savez(os.path.join(tmp, f"{k}.npz"), points=outl.points,
                         ring_start=outl.ring_start, poly_start=outl.poly_start,
                         mask_start=outl.mask_start)
            for ext, data in (("geojson", geo), ("json", coco_results_text(sub)),
                              ("csv", csv_rows(sub, classes, mpp, cents[lo:hi], areas[lo:hi],
                                               first_id=lo + 1)),
                              ("skipped", str(skipped).encode())):
                with open(os.path.join(tmp, f"{k}.{ext}"), "wb") as f:
                    f.write(data)

        run_forked(part, workers, "writing " + ", ".join(paths))
        files = {ext: [os.path.join(tmp, f"{k}.{ext}") for k in range(workers)]
                 for ext in ("geojson", "json", "csv")}
        _join_parts(paths[0], files["geojson"], GEOJSON_HEAD, b"", GEOJSON_TAIL, skip_first=1)
        _join_parts(paths[1], files["json"], b"[", b", ", b"]")
        _join_parts(paths[2], files["csv"], CSV_HEADER, b"", b"")
        skipped = 0
        for k in range(workers):
            with open(os.path.join(tmp, f"{k}.skipped"), "rb") as f:
                skipped += int(f.read())
        outlines = None
        if inst.masks is not None:
            parts = []
            for k in range(workers):
                with np.load(os.path.join(tmp, f"{k}.npz")) as z:
                    parts.append(Outlines(z["points"], z["ring_start"], z["poly_start"],
                                          z["mask_start"]))
            outlines = Outlines.cat(parts)
    if skipped:
        log.warning("%s: %d detections with an empty mask left out", paths[0], skipped)
    return outlines


def can_fork() -> bool:
    """Whether this process may fork children: a POSIX system, and not itself a daemonic
    multiprocessing worker (those may not have children)."""
    return ("fork" in multiprocessing.get_all_start_methods()
            and not multiprocessing.current_process().daemon)


def run_forked(task: Callable[[int], None], n: int, what: str) -> None:
    """``task(0)`` in this process and ``task(1)`` .. ``task(n - 1)`` in forked child processes
    at the same time (they share this process's memory as it was, copy-on-write: nothing is
    pickled); raises :class:`ExportError` naming ``what`` when any of them fails."""
    ctx = multiprocessing.get_context("fork")
    for stream in (sys.stdout, sys.stderr):  # else a child flushes their buffered text again
        stream.flush()
    with warnings.catch_warnings():  # fork with threads alive: the children run numpy/OpenCV only
        warnings.simplefilter("ignore", DeprecationWarning)
        procs = [ctx.Process(target=task, args=(k,), daemon=True) for k in range(1, n)]
        for p in procs:
            p.start()
    try:
        task(0)
    finally:
        for p in procs:
            p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise ExportError(f"{what}: {len(failed)} of {n} processes failed (exit codes {failed}; "
                          "their error is printed above). The slide's journal is kept: run "
                          "again with --resume to write the files without predicting again")


def _join_parts(path: str, parts: Sequence[str], head: bytes, sep: bytes, tail: bytes,
                skip_first: int = 0) -> None:
    """``head``, the non-empty part files in order with ``sep`` between them (the first
    without its first ``skip_first`` bytes), ``tail``, into ``path`` (atomically)."""
    with atomic_write(path, "wb") as f:
        f.write(head)
        first = True
        for p in parts:
            if os.path.getsize(p) == 0:
                continue
            with open(p, "rb") as g:
                if first:
                    g.seek(skip_first)
                else:
                    f.write(sep)
                shutil.copyfileobj(g, f, 1 << 22)
            first = False
        f.write(tail)


def _dot_offsets() -> Tuple[np.ndarray, np.ndarray]:
    """The pixels ``cv2.circle(img, centre, 1, colour, -1)`` fills, relative to the centre."""
    probe = np.zeros((7, 7), np.uint8)
    cv2.circle(probe, (3, 3), 1, 255, -1)
    dy, dx = np.nonzero(probe)
    return dy - 3, dx - 3


def write_overlay(path: str, thumb: np.ndarray, scale: float, inst: Instances,
                  classes: Sequence[Dict[str, Any]], mitotic_ids: Sequence[int] = (),
                  hotspot: Optional[Dict[str, Any]] = None,
                  roi: Optional[Sequence[np.ndarray]] = None,
                  tissue: Optional[np.ndarray] = None,
                  outlines: Optional[Outlines] = None) -> None:
    """``overlay.png``: the thumbnail (one px = ``scale`` level-0 px) with every detection
    drawn in its class colour (outline when it is at least 4 thumbnail px across, else a dot),
    mitotic figures as circles on top, the tissue outline, the ROI and the hotspot rectangle.
    ``outlines``: :func:`mask_outlines` of ``inst.masks`` when the caller has them already.
    Detections are drawn in that order, consecutive ones of one kind and colour in one call."""
    img = np.ascontiguousarray(thumb[..., :3].copy())
    colours = class_colours(classes, mitotic_ids)
    if tissue is not None and tissue.any():
        cs, _ = cv2.findContours(tissue.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, cs, -1, (0, 170, 0), 1)
    is_mit = np.isin(inst.labels, np.asarray(list(mitotic_ids), np.int64))
    order = np.concatenate([np.flatnonzero(~is_mit), np.flatnonzero(is_mit)])
    b = inst.boxes[order] / scale
    span = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    big = span >= 4
    cxs = np.rint((b[:, 0] + b[:, 2]) / 2).astype(np.int64)
    cys = np.rint((b[:, 1] + b[:, 3]) / 2).astype(np.int64)
    mit = is_mit[order]
    # 0 dot, 1 outline, 2 box, 3 mitotic circle
    kind = np.where(mit, 3, np.where(big, 1 if inst.masks is not None else 2, 0))
    labels = inst.labels[order]
    rings: List[np.ndarray] = []
    obj_rings = n_rings = np.zeros(len(inst), np.int64)
    if inst.masks is not None and (kind == 1).any():
        if outlines is None:  # trace only the masks drawn as outlines
            drawn = np.sort(order[kind == 1])
            outlines = mask_outlines([inst.masks[i] for i in drawn.tolist()])
            at = np.zeros(len(inst), np.int64)  # each detection's mask among the traced ones
            at[drawn] = np.arange(len(drawn))
        else:
            at = np.arange(len(inst))
        pts, rstart = outlines.closed_points()
        thumb_pts = np.round(pts / scale).astype(np.int32)
        rings = np.split(thumb_pts.reshape(-1, 1, 2), rstart[1:-1])
        first_ring = outlines.poly_start[outlines.mask_start]
        # rings of detection i: obj_rings[i]:obj_rings[i] + n_rings[i]
        obj_rings = first_ring[at]
        n_rings = (first_ring[1:] - first_ring[:-1])[at]
    dy, dx = _dot_offsets()
    h, w = img.shape[:2]
    # within a run of one colour the order of outlines, boxes and dots does not change a pixel;
    # antialiased mitotic circles are drawn one by one, in order
    col_key = np.asarray([colours.get(v, (127, 127, 127)) for v in labels.tolist()],
                         np.int64).reshape(-1, 3) @ np.array([1 << 16, 1 << 8, 1])
    cut = np.flatnonzero((col_key[1:] != col_key[:-1]) | (mit[1:] != mit[:-1])) + 1
    runs = zip(np.r_[0, cut].tolist(), np.r_[cut, len(order)].tolist()) if len(order) else ()
    for a, e in runs:
        col = colours.get(int(labels[a]), (127, 127, 127))
        k = kind[a:e]
        if mit[a]:
            for j in range(a, e):
                r = int(np.clip(span[j] / 2 + 3, 4, 40))
                cv2.circle(img, (int(cxs[j]), int(cys[j])), r, col, 2, cv2.LINE_AA)
            continue
        if (k == 1).any():
            cv2.polylines(img, [rings[r] for i in order[a:e][k == 1].tolist()
                                for r in range(int(obj_rings[i]), int(obj_rings[i] + n_rings[i]))],
                          True, col, 1)
        for j in (a + np.flatnonzero(k == 2)).tolist():
            bj = b[j]
            cv2.rectangle(img, (int(bj[0]), int(bj[1])), (int(bj[2]), int(bj[3])), col, 1)
        dots = a + np.flatnonzero(k == 0)
        if len(dots):
            ys = (cys[dots, None] + dy[None, :]).reshape(-1)
            xs = (cxs[dots, None] + dx[None, :]).reshape(-1)
            ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
            img[ys[ok], xs[ok]] = col
    if roi is not None:
        for p in roi:
            pts = np.round(np.asarray(p) / scale).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(img, [pts], True, (0, 0, 255), 2)
    if hotspot and hotspot.get("x0") is not None:
        colour = (255, 200, 0)
        thick = max(2, int(round(max(img.shape[:2]) / 500)))
        if "radius" in hotspot:
            cv2.circle(img, (int(round(hotspot["cx"] / scale)), int(round(hotspot["cy"] / scale))),
                       max(1, int(round(hotspot["radius"] / scale))), colour, thick, cv2.LINE_AA)
        else:
            p0 = (int(hotspot["x0"] / scale), int(hotspot["y0"] / scale))
            p1 = (int(hotspot["x1"] / scale) - 1, int(hotspot["y1"] / scale) - 1)
            cv2.rectangle(img, p0, p1, colour, thick)
        draw_caption(img, hotspot_caption(hotspot),
                     (hotspot["x0"] / scale, hotspot["y0"] / scale, hotspot["x1"] / scale,
                      hotspot["y1"] / scale), colour)
    with atomic_write(path, "wb") as f:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), PNG_FAST)
        f.write(buf.tobytes())


def hotspot_caption(hotspot: Dict[str, Any]) -> str:
    """The hotspot's caption: "hotspot: 12 MF / 10 HPF", or, when the analysed tissue is
    smaller than one window, the tissue the count comes from ("hotspot: 12 MF in 0.0625 mm²
    of tissue (< 10 HPF)")."""
    label = (hotspot.get("window") or {}).get("label", "10 HPF")
    if hotspot.get("tissue_smaller_than_window"):
        area = hotspot.get("tissue_area_mm2", hotspot.get("area_mm2"))
        where = f" in {area:.3g} mm² of tissue" if area is not None else " in all the tissue"
        return f"hotspot: {hotspot['count']} MF{where} (< {label})"
    return f"hotspot: {hotspot['count']} MF / {label}"


def draw_caption(img: np.ndarray, text: str, anchor: Tuple[float, float, float, float],
                 colour: Tuple[int, int, int] = (255, 200, 0)) -> None:
    """Write ``text`` on ``img`` (RGB, in place) next to the box ``anchor`` (x0, y0, x1, y1,
    image px): one pass of text on an opaque dark label, its height about 2.5 % of the image's
    longer side (at least 13 px), above the box when there is room, else below it or inside,
    always whole inside the image. Hershey fonts only know ASCII: "²" is written "2"."""
    text = text.replace("²", "2")
    h, w = img.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw1, th1), _ = cv2.getTextSize(text, font, 1.0, 1)
    fs = max(13.0, 0.025 * max(h, w)) / th1
    fs = min(fs, 0.96 * w / (tw1 + 8))  # the whole caption fits across the image
    thick = max(1, int(round(fs * 1.6)))
    (tw, th), base = cv2.getTextSize(text, font, fs, thick)
    pad = max(2, int(round(th * 0.3)))
    bw, bh = tw + 2 * pad, th + base + 2 * pad
    x0, y0, x1, y1 = anchor
    bx = int(np.clip(round(x0), 0, max(0, w - bw)))
    if y0 - bh >= 0:
        by = int(round(y0)) - bh  # above the box
    elif y1 + bh <= h:
        by = int(round(y1))  # below
    else:
        by = int(np.clip(round(y0), 0, max(0, h - bh)))  # inside, at the top
    cv2.rectangle(img, (bx, by), (bx + bw - 1, by + bh - 1), (20, 20, 20), -1)
    cv2.putText(img, text, (bx + pad, by + pad + th), font, fs, colour, thick, cv2.LINE_AA)


def write_density(path: str, density: np.ndarray, cell_px: float, slide_size: Tuple[int, int],
                  thumb: Optional[np.ndarray] = None, title: str = "mitotic figures / mm²",
                  hotspot: Optional[Dict[str, Any]] = None,
                  tissue: Optional[np.ndarray] = None, tissue_scale: float = 1.0) -> None:
    """``density.png``: a heat map (points per mm^2 on cells of ``cell_px`` level-0 px) over the
    greyed thumbnail, with a colour bar in mm^-2 and the hotspot rectangle. Cells without
    tissue are transparent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    H, W = slide_size
    d = density.astype(float)
    if tissue is not None:
        # a cell counts as tissue when any of its thumbnail pixels is tissue
        ny, nx = d.shape
        has = np.zeros_like(d, bool)
        for j in range(ny):
            for i in range(nx):
                a0, b0 = int(i * cell_px / tissue_scale), int(j * cell_px / tissue_scale)
                a1 = int((i + 1) * cell_px / tissue_scale) + 1
                b1 = int((j + 1) * cell_px / tissue_scale) + 1
                has[j, i] = tissue[b0:b1, a0:a1].any()
        d = np.ma.masked_where(~has & (d == 0), d)
    aspect = W / float(max(H, 1))
    fig_w = 8.0
    fig, ax = plt.subplots(figsize=(fig_w, max(3.0, fig_w / aspect * 0.85)), dpi=100)
    extent = (0, W, H, 0)
    if thumb is not None:
        gray = cv2.cvtColor(thumb[..., :3], cv2.COLOR_RGB2GRAY)
        # no larger than the figure: matplotlib's own resampling of a 2048-px thumbnail took
        # most of this picture's time
        f = fig_w * fig.dpi / max(gray.shape)
        if f < 1:
            gray = cv2.resize(gray, (max(1, round(gray.shape[1] * f)),
                                     max(1, round(gray.shape[0] * f))), interpolation=cv2.INTER_AREA)
        ax.imshow(gray, cmap="gray", extent=extent, vmin=0, vmax=255)
    vmax = float(np.max(d)) if np.ma.count(d) else 1.0
    im = ax.imshow(d, cmap="inferno", extent=(0, d.shape[1] * cell_px, d.shape[0] * cell_px, 0),
                   alpha=0.75, vmin=0, vmax=max(vmax, 1e-9), interpolation="nearest")
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label(title)
    if hotspot and hotspot.get("x0") is not None:
        if "radius" in hotspot:
            from matplotlib.patches import Circle

            ax.add_patch(Circle((hotspot["cx"], hotspot["cy"]), hotspot["radius"], fill=False,
                                ec="cyan", lw=2))
        else:
            ax.add_patch(Rectangle((hotspot["x0"], hotspot["y0"]), hotspot["x1"] - hotspot["x0"],
                                   hotspot["y1"] - hotspot["y0"], fill=False, ec="cyan", lw=2))
        ax.text(hotspot["x0"], hotspot["y0"], f" hotspot {hotspot['count']}", color="cyan",
                va="bottom", fontsize=9)
    ax.set_title(f"{title} (cells of {cell_px:.0f} px)")
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    # fixed margins in inches (tick labels of up to 6 digits, the colour bar's label):
    # tight_layout measured every text by drawing the figure once more (0.25 s of 0.4 s)
    fw, fh = fig.get_size_inches()
    fig.subplots_adjust(left=0.85 / fw, right=1 - 0.9 / fw, bottom=0.55 / fh, top=1 - 0.35 / fh)
    # the pixels savefig writes, drawn once (savefig draws a second time to lay out) and
    # encoded by OpenCV
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())  # type: ignore[attr-defined]  # Agg
    plt.close(fig)
    with atomic_write(path, "wb") as f:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA), PNG_FAST)
        f.write(buf.tobytes())
