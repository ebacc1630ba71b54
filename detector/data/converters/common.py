"""Parts shared by every converter: the result object, errors, categories, mask formats, the
parallel map, reading masks quickly, and the printed summary."""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ...errors import DetectorError
from ...structures.masks import CropMask
from ..coco import (annotation_parts, annotation_to_crop_mask, annotation_to_rle,
                    new_coco, rle_to_json)
from ..image_io import ImageReadError, read_array
import multiprocessing as mp
from tqdm import tqdm

IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
WSI_EXTS = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu")


class ConversionError(ValueError, DetectorError):
    """Input that cannot be converted. ``str(e)`` is one line: the file, the problem, the fix."""

    def __init__(self, path: str, reason: str, fix: str = ""):
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        msg = f"{path}: {reason}" if path else reason
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


@dataclass
class Conversion:
    """What a converter produces.

    Attributes:
        coco: the COCO dict (``info.image_root`` absolute, ``file_name`` relative to it;
            annotations without ids until saved).
        skipped: ``(path, reason)`` of every file left out under ``--skip-invalid``.
        notes: lines for the summary (overlaps, degenerate regions, points outside images...).
        per_file: optional rows ``(file, {column: value})`` printed as a table (e.g. MoNuSeg).
        counters: named counts (``overlap_images``, ``degenerate_regions``, ...).
    """

    coco: Dict[str, Any]
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    per_file: List[Tuple[str, Dict[str, Any]]] = field(default_factory=list)
    counters: Dict[str, int] = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + int(n)

    def fail(self, path: str, reason: str, skip_invalid: bool, fix: str = "") -> None:
        """Record a bad file when skipping invalid input, else raise :class:`ConversionError`."""
        if skip_invalid:
            self.skipped.append((str(path), reason))
        else:
            raise ConversionError(path, reason, fix or "fix or remove the file, or pass "
                                  "--skip-invalid to leave it out")


    def set_categories(self, names: Iterable[str], default: str) -> Dict[str, int]:
        """Make the COCO categories from the class names found in the input (sorted, ``default``
        first when present; ``[default]`` when there are none) and return name -> id."""
        labels = sorted(set(names)) or [default]
        if default in labels:  # the usual single class first
            labels.remove(default)
            labels.insert(0, default)
        cat_id = {n: i + 1 for i, n in enumerate(labels)}
        self.coco["categories"] = [{"id": i, "name": n, "supercategory": "cell"}
                                   for n, i in cat_id.items()]
        return cat_id

    def image_info(self, path: str, skip_invalid: bool) -> Optional[Tuple[int, int, Optional[float]]]:
        """:func:`image_info` of ``path``, or None after recording the unreadable file with
        :meth:`fail` (which raises unless ``skip_invalid``)."""
        try:
            return image_info(path)
        except ConversionError as e:
            self.fail(path, e.reason, skip_invalid)
        except Exception as e:
            self.fail(path, read_error_reason(e), skip_invalid)
        return None


def empty_conversion(categories: Sequence[Dict[str, Any]], image_root: str,
                     description: str) -> Conversion:
    return Conversion(new_coco(categories, os.path.abspath(image_root), description))


def add_image(conv: Conversion, file_name: str, height: int, width: int,
              mpp: Optional[float] = None, slide: Optional[str] = None) -> int:
    """Append an image entry (next id from 1) and return its id."""
    image_id = len(conv.coco["images"]) + 1
    e: Dict[str, Any] = {"id": image_id, "file_name": file_name.replace(os.sep, "/"),
                         "height": int(height), "width": int(width)}
    if mpp is not None:
        e["mpp"] = float(mpp)
    if slide is not None:
        e["slide"] = str(slide)
    conv.coco["images"].append(e)
    return image_id


# ------------------------------------------------------------------------------ reading
def read_label_array(path: str, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """Read a mask, label or image file as stored (RGB(A) channel order), PNGs fast with OpenCV,
    falling back to :func:`read_array` (PIL/tifffile) whose error names the file.

    OpenCV's libpng decoder refuses truncated or CRC-damaged PNGs (``imread`` returns None), so
    the fast path does not hide corrupt files. Other formats go through :func:`read_array`
    (tifffile for TIFF: 32-bit and float labels; PIL otherwise: OpenCV would return a truncated
    JPEG half grey instead of failing).
    """
    if not path.lower().endswith(".png"):
        return read_array(path)
    arr = cv2.imread(path, flags)
    if arr is None:
        arr = read_array(path)  # raises ImageReadError naming the file when it is bad
        if flags == cv2.IMREAD_GRAYSCALE and arr.ndim == 3:
            arr = arr[..., 0]
        return arr
    if arr.ndim == 3 and arr.shape[2] >= 3:
        arr = arr[..., [2, 1, 0] + list(range(3, arr.shape[2]))]  # BGR(A) -> RGB(A)
    return arr


def check_image(path: str) -> Tuple[int, int]:
    """Decode an image completely (corrupt or truncated files raise :class:`ImageReadError`
    naming it) and return its ``(height, width)``. RGBA, gray and 16-bit are all fine."""
    arr = read_label_array(path)
    return int(arr.shape[0]), int(arr.shape[1])


def image_info(path: str) -> Tuple[int, int, Optional[float]]:
    """``(height, width, mpp or None)`` of an image or whole-slide file. Whole slides
    (:data:`WSI_EXTS`) are opened with OpenSlide (size and mpp of level 0, pixels not read);
    other images are decoded completely (:func:`check_image`)."""
    if path.lower().endswith(WSI_EXTS):
        try:
            import openslide

            with openslide.OpenSlide(path) as s:
                w, h = s.dimensions
                mpp = s.properties.get(openslide.PROPERTY_NAME_MPP_X)
            return int(h), int(w), (float(mpp) if mpp else None)
        except Exception as e:
            raise ConversionError(path, f"cannot open as a whole-slide image ({e})") from None
    h, w = check_image(path)
    return h, w, None


# ------------------------------------------------------------------------------ masks
def pixels_to_annotation(rr: np.ndarray, cc: np.ndarray, height: int, width: int
                         ) -> Dict[str, Any]:
    """The JSON parts of one COCO annotation (RLE, bbox XYWH, area) from the row/column indices
    of its pixels, in time proportional to the object (not the image): the of the object's box becomes its :class:`CropMask`."""
    rr, cc = np.asarray(rr, np.int64), np.asarray(cc, np.int64)
    if rr.size == 0:
        raise ValueError("empty object")
    x0, y0 = int(cc.min()), int(rr.min())
    crop = np.zeros((int(rr.max()) - y0 + 1, int(cc.max()) - x0 + 1), bool)
    crop[rr - y0, cc - x0] = True
    return annotation_parts(CropMask.from_crop(crop, x0, y0, (height, width)))


MASK_BUDGET_BYTES = 64 << 20  # largest (H, W, n) uint8 stack built at once


def chunk_size(height: int, width: int, budget: int = MASK_BUDGET_BYTES) -> int:
    """How many full-image uint8 masks fit in ``budget`` bytes (at least 1)."""
    return max(1, budget // max(1, height * width))


def encode_label_image(label: np.ndarray) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """Instance label image ``(H, W)`` ints (0 = background) -> (ids ``(N,)`` sorted, N COCO
    annotation parts as :func:`~detector.data.coco.encode_masks` gives), in one sort of the foreground pixels: no
    full-image mask per object (2,000 objects on a 1000 x 1000 tile would need 2 GB)."""
    ids = np.unique(label)
    ids = ids[ids != 0]
    if len(ids) == 0:
        return ids, []
    h, w = label.shape
    # column-major pixel order, grouped by id
    fg_t = label.T != 0
    xs, ys = np.nonzero(fg_t)
    vals = label.T[fg_t]
    order = np.argsort(vals, kind="stable")
    ys, xs, vals = ys[order], xs[order], vals[order]
    bounds = np.searchsorted(vals, ids, side="left").tolist() + [len(vals)]
    parts = [pixels_to_annotation(ys[a:b], xs[a:b], h, w)
             for a, b in zip(bounds[:-1], bounds[1:])]
    return ids, parts


def to_rle_format(coco: Dict[str, Any]) -> None:
    """Replace every polygon segmentation by its RLE (in place), with the image's size."""
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    for a in coco["annotations"]:
        seg = a.get("segmentation")
        if isinstance(seg, list) and seg:
            h, w = sizes[a["image_id"]]
            a["segmentation"] = rle_to_json(annotation_to_rle(a, h, w))


def to_polygon_format(coco: Dict[str, Any]) -> None:
    """Replace every RLE segmentation by polygons (in place); bbox and area stay those of the
    exact mask. Outlines are traced on the object's crop only."""
    for a in coco["annotations"]:
        seg = a.get("segmentation")
        if isinstance(seg, dict):
            m = annotation_to_crop_mask(a, int(seg["size"][0]), int(seg["size"][1]))
            a["segmentation"] = [[float(v) for pt in poly[0][:-1] for v in pt]
                                 for poly in m.polygons()] if m is not None else []


# ------------------------------------------------------------------------------ categories
def parse_category_spec(spec: str) -> List[Tuple[Optional[str], str]]:
    """``"nucleus"`` or ``"mitotic figure=mitosis,hard negative=-,2=tumour"`` -> pairs
    ``(source or None, target name)``. A target ``-`` drops the source class."""
    pairs: List[Tuple[Optional[str], str]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        src, sep, dst = part.partition("=")
        if sep:
            if not src.strip() or not dst.strip():
                raise ValueError(f"--categories {spec!r}: entry {part!r} must be SOURCE=NAME "
                                 "(NAME '-' drops SOURCE)")
            pairs.append((src.strip(), dst.strip()))
        else:
            pairs.append((None, part))
    if not pairs:
        raise ValueError(f"--categories {spec!r}: give NAME or SOURCE=NAME[,SOURCE=NAME...]")
    return pairs


def remap_categories(coco: Dict[str, Any], spec: Optional[str]) -> Dict[str, int]:
    """Rename, merge, drop or reorder the categories of a COCO dict in place.

    ``spec`` entries are ``SOURCE=NAME`` (SOURCE a category name or id of the input; NAME ``-``
    drops it), or plain ``NAME``s: a single plain name renames a one-class data set; several
    plain names fix the order (ids 1..K) of the output categories. Unlisted categories keep
    their names. Output ids are 1..K in the order the names first appear in ``spec``, then the
    remaining input categories in their id order. Returns ``{name: instances dropped}``.
    """
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    if not spec:
        return {}
    pairs = parse_category_spec(spec)
    by_name = {c["name"]: c for c in cats}
    by_id = {str(c["id"]): c for c in cats}
    plain = [dst for src, dst in pairs if src is None]
    mapping: Dict[int, Optional[str]] = {c["id"]: c["name"] for c in cats}
    order: List[str] = []
    if plain and len(pairs) == 1 and len(cats) == 1 and plain[0] not in by_name:
        mapping[cats[0]["id"]] = plain[0]
        order.append(plain[0])
    else:
        for src, dst in pairs:
            if src is None:
                if dst not in by_name and dst not in {d for s, d in pairs if s is not None}:
                    known = ", ".join(repr(c["name"]) for c in cats)
                    raise ValueError(f"--categories: {dst!r} is not a category of the input "
                                     f"({known}); use SOURCE=NAME to rename")
                if dst not in order:
                    order.append(dst)
                continue
            c = by_name.get(src) or by_id.get(src)
            if c is None:
                known = ", ".join(repr(c["name"]) for c in cats)
                raise ValueError(f"--categories: source class {src!r} is not in the input "
                                 f"(its classes: {known})")
            mapping[c["id"]] = None if dst == "-" else dst
            if dst != "-" and dst not in order:
                order.append(dst)
    for c in cats:
        name = mapping[c["id"]]
        if name is not None and name not in order:
            order.append(name)
    new_ids = {name: i + 1 for i, name in enumerate(order)}
    old_to_new = {cid: (None if name is None else new_ids[name]) for cid, name in mapping.items()}
    dropped: Dict[str, int] = {}
    old_names = {c["id"]: c["name"] for c in cats}
    anns = []
    for a in coco["annotations"]:
        nid = old_to_new.get(a["category_id"])
        if nid is None:
            dropped[old_names[a["category_id"]]] = dropped.get(old_names[a["category_id"]], 0) + 1
            continue
        a["category_id"] = nid
        anns.append(a)
    coco["annotations"] = anns
    supercats = {}
    for c in cats:
        if mapping[c["id"]] is not None and "supercategory" in c:
            supercats.setdefault(mapping[c["id"]], c["supercategory"])
    coco["categories"] = [{"id": i, "name": n, "supercategory": supercats.get(n, "cell")}
                          for n, i in new_ids.items()]
    return dropped


# ------------------------------------------------------------------------------ files
def list_images(folder: str) -> List[str]:
    """Image files directly in ``folder`` (sorted names)."""
    return sorted(f for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."))


def copy_images(coco: Dict[str, Any], dest: str, dest_rel: str) -> None:
    """Copy every referenced image under ``dest`` (keeping relative paths) and point
    ``info.image_root`` at ``dest_rel`` (relative to the JSON file)."""
    root = coco["info"]["image_root"]
    for im in coco["images"]:
        src = os.path.join(root, im["file_name"])
        dst = os.path.join(dest, im["file_name"])
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)
    coco["info"]["image_root"] = dest_rel


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int,
                 desc: str, progress: bool = True) -> Iterator[Any]:
    """``map(fn, items)`` in order, in ``workers`` processes when > 1, with a tqdm bar."""
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        if workers > 1 and len(items) > 1:
            # fork is fastest, but forking a process whose torch (OpenMP) threads have run can
            # deadlock the children: then start them from a clean server process instead
            if hasattr(os, "fork") and "torch" not in sys.modules:
                ctx = mp.get_context("fork")
            else:
                ctx = mp.get_context("forkserver" if hasattr(os, "fork") else "spawn")
            with ctx.Pool(workers, initializer=_worker_init) as pool:
                for r in pool.imap(fn, items, chunksize=4):
                    bar.update(1)
                    yield r
        else:
            for it in items:
                r = fn(it)
                bar.update(1)
                yield r
    finally:
        bar.close()


def _worker_init() -> None:
    cv2.setNumThreads(1)


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


# ------------------------------------------------------------------------------ summary
def summary_text(conv: Conversion, outputs: Iterable[Tuple[str, Dict[str, Any]]] = ()) -> str:
    """The printed summary: images (negatives), instances per class, area distribution (px and
    um^2 where mpp is known), notes, per-file table, skipped files, and output files."""
    coco = conv.coco
    lines: List[str] = []
    n_img = len(coco["images"])
    with_ann = {a["image_id"] for a in coco["annotations"]}
    lines.append(f"images:    {n_img} ({n_img - len(with_ann)} without instances, kept as "
                 "negatives)")
    lines.append(f"instances: {len(coco['annotations'])}")
    counts: Dict[int, int] = {}
    for a in coco["annotations"]:
        counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    lines.append("  id  category                    instances")
    for c in sorted(coco["categories"], key=lambda c: c["id"]):
        lines.append(f"  {c['id']:>2}  {c['name'][:26]:<26} {counts.get(c['id'], 0):>10}")
    if coco["annotations"]:
        areas = np.array([a["area"] for a in coco["annotations"]], dtype=np.float64)
        q = np.percentile(areas, [0, 5, 25, 50, 75, 95, 100])
        lines.append("instance area (px):   min {:.0f}  p5 {:.0f}  p25 {:.0f}  median {:.0f}  "
                     "p75 {:.0f}  p95 {:.0f}  max {:.0f}".format(*q))
        mpp = {im["id"]: im.get("mpp") for im in coco["images"]}
        um = np.array([a["area"] * mpp[a["image_id"]] ** 2 for a in coco["annotations"]
                       if mpp.get(a["image_id"])], dtype=np.float64)
        if len(um):
            q = np.percentile(um, [0, 5, 50, 95, 100])
            lines.append("instance area (um^2): min {:.1f}  p5 {:.1f}  median {:.1f}  p95 {:.1f}"
                         "  max {:.1f}  ({} instances with mpp)".format(*q, len(um)))
    if conv.per_file:
        cols: List[str] = []
        for _, row in conv.per_file:
            cols += [k for k in row if k not in cols]
        width = max(len(f) for f, _ in conv.per_file)
        lines.append("per file:")
        lines.append("  " + "file".ljust(width) + "".join(f"  {c:>12}" for c in cols))
        for f, row in conv.per_file:
            lines.append("  " + f.ljust(width) + "".join(f"  {str(row.get(c, '')):>12}"
                                                         for c in cols))
    for note in conv.notes:
        lines.append(f"note: {note}")
    for path, data in outputs:
        lines.append(f"wrote {path}: {len(data['images'])} images, {len(data['annotations'])} "
                     "instances")
    if conv.skipped:
        lines.append(f"skipped {len(conv.skipped)} invalid file(s):")
        for path, reason in conv.skipped:
            lines.append(f"  {path}: {reason}")
    else:
        lines.append("skipped: none")
    return "\n".join(lines)


def read_error_reason(e: Exception) -> str:
    return e.reason if isinstance(e, ImageReadError) else f"{type(e).__name__}: {e}"
