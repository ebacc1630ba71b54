"""Slide readers: OpenSlide formats, pyramidal / OME TIFF through tifffile, plain images.

Every reader gives the same small interface (:class:`SlideReader`): level sizes and downsamples,
microns per pixel (``mpp``) from the file's metadata, ``read_region`` of any rectangle of any
level as H x W x 3 uint8 RGB (areas outside the slide are white), and a bounded-memory
thumbnail. Coordinates are pixels of the requested level, origin top-left, x right, y down;
level 0 is full resolution. Only the requested region is decoded: a 40k x 40k slide is never
held in memory.
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..data.image_io import ImageReadError, read_image, to_rgb
import tifffile
from defusedxml import ElementTree as ET
from PIL import Image

log = logging.getLogger(__name__)

#: Extensions read through OpenSlide (vendor formats). ``.tif/.tiff`` go to OpenSlide only when
#: it recognises a vendor format in them; other TIFFs (OME, pyramids written by tifffile, plain)
#: are read with tifffile.
OPENSLIDE_EXTS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
TIFF_EXTS = (".tif", ".tiff", ".btf", ".ome.tif", ".ome.tiff")
PLAIN_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
SLIDE_EXTS = OPENSLIDE_EXTS + TIFF_EXTS + PLAIN_EXTS

#: mpp values outside this range are metadata defaults (72 dpi = 353 um/px), not calibration.
MPP_RANGE = (0.01, 50.0)


class SlideReadError(ImageReadError):
    """A slide that cannot be opened or read; the message names the file and what to do."""


class SlideReader:
    """Common interface of the readers. Subclasses set ``path``, ``level_dimensions`` (list of
    ``(width, height)``), ``level_downsamples`` (level-0 px per level px) and ``mpp`` (level 0,
    um/px, or None) and implement :meth:`_read`."""

    path: str
    level_dimensions: List[Tuple[int, int]]
    level_downsamples: List[float]
    mpp: Optional[float]
    kind: str = "?"

    @property
    def dimensions(self) -> Tuple[int, int]:
        """``(width, height)`` of level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> Optional[float]:
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """``(h, w, 3)`` uint8 RGB of the rectangle at ``(x, y)`` (pixels of ``level``); parts
        outside the level are white. Raises :class:`SlideReadError` when the data does not
        decode (a corrupt tile)."""
        lw, lh = self.level_dimensions[level]
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        try:
            part = self._read(level, x0, y0, x1 - x0, y1 - y0)
        except SlideReadError:
            raise
        except Exception as e:  # decoder errors of every library
            raise SlideReadError(self.path, f"cannot decode region x={x0} y={y0} w={x1 - x0} "
                                 f"h={y1 - y0} of level {level} ({type(e).__name__}: {e}); the "
                                 "file may be corrupt or truncated") from None
        out[y0 - y:y1 - y, x0 - x:x1 - x] = part
        return out

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def thumbnail(self, max_side: int = 2048, block: int = 4096) -> Tuple[np.ndarray, float]:
        """A low-resolution RGB image of the whole slide and its scale (level-0 px per thumbnail
        px). Read from the smallest level that is still at least as large as the thumbnail, in
        blocks, so memory stays bounded for single-level giants."""
        w0, h0 = self.dimensions
        scale = max(w0, h0) / float(max_side) if max(w0, h0) > max_side else 1.0
        tw, th = max(1, int(round(w0 / scale))), max(1, int(round(h0 / scale)))
        level = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= scale * 1.0001:
                level = i  # coarser but still fine enough
        lw, lh = self.level_dimensions[level]
        f = scale / self.level_downsamples[level]  # level px per thumbnail px
        thumb = np.full((th, tw, 3), 255, np.uint8)
        # blocks aligned to whole thumbnail pixels so that block seams do not shift
        bs = max(1, int(round(max(1, block // max(f, 1e-6)) * f)))
        for by in range(0, lh, bs):
            for bx in range(0, lw, bs):
                bw, bh = min(bs, lw - bx), min(bs, lh - by)
                tx0, ty0 = int(round(bx / f)), int(round(by / f))
                tx1, ty1 = min(tw, int(round((bx + bw) / f))), min(th, int(round((by + bh) / f)))
                if tx1 <= tx0 or ty1 <= ty0:
                    continue
                try:
                    region = self.read_region(level, bx, by, bw, bh)
                except SlideReadError as e:
                    log.warning("thumbnail: %s (left white)", e)
                    continue
                thumb[ty0:ty1, tx0:tx1] = cv2.resize(region, (tx1 - tx0, ty1 - ty0),
                                                     interpolation=cv2.INTER_AREA)
        return thumb, scale

    def close(self) -> None:
        pass

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, {self.dimensions[0]}x{self.dimensions[1]}, "
                f"{self.level_count} levels, mpp={self.mpp})")


def _valid_mpp(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f) or not MPP_RANGE[0] <= f <= MPP_RANGE[1]:
        return None
    return f


# ------------------------------------------------------------------------------------ OpenSlide
class OpenSlideReader(SlideReader):
    """Vendor formats (svs, ndpi, mrxs, scn, vms, bif, vendor tiff) through openslide-python."""

    kind = "openslide"

    def __init__(self, path: str):
        import openslide

        self.path = str(path)
        try:
            self._slide = openslide.OpenSlide(self.path)
        except Exception as e:
            raise SlideReadError(self.path, f"OpenSlide cannot open it ({type(e).__name__}: {e}); "
                                 "the file may be truncated or not a slide") from None
        s = self._slide
        self.level_dimensions = [(int(d[0]), int(d[1])) for d in s.level_dimensions]
        self.level_downsamples = [float(d) for d in s.level_downsamples]
        props = s.properties
        mx = _valid_mpp(props.get(openslide.PROPERTY_NAME_MPP_X))
        my = _valid_mpp(props.get(openslide.PROPERTY_NAME_MPP_Y))
        self.mpp = (mx + my) / 2 if mx and my else (mx or my)
        bg = props.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR)
        self._bg = tuple(int(bg[i:i + 2], 16) for i in (0, 2, 4)) if bg and len(bg) == 6 else (255, 255, 255)

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        img = self._slide.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
        rgba = np.asarray(img)
        rgb = rgba[..., :3].astype(np.float32)
        a = rgba[..., 3:4].astype(np.float32) / 255.0
        # OpenSlide returns premultiplied-transparent pixels outside scanned areas
        out = rgb + (1.0 - a) * np.asarray(self._bg, np.float32)
        return np.clip(out, 0, 255).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


# ------------------------------------------------------------------------------------ tifffile
class TiffReader(SlideReader):
    """Pyramidal / OME / plain TIFF through tifffile: ``series[0].levels``; regions are read by
    decoding only the tiles (or strips) under them."""

    kind = "tifffile"

    def __init__(self, path: str, mpp_hint: Optional[float] = None):
        self.path = str(path)
        try:
            self._tf = tifffile.TiffFile(self.path)
            series = self._tf.series[0]
            levels = list(series.levels)
            pages = [lvl.keyframe for lvl in levels]
            axes = [lvl.axes for lvl in levels]
            shapes = [lvl.shape for lvl in levels]
        except Exception as e:
            raise SlideReadError(self.path, f"tifffile cannot open it ({type(e).__name__}: {e}); "
                                 "the file may be truncated or not a TIFF") from None
        self._pages = []
        self.level_dimensions = []
        for page, ax, shp in zip(pages, axes, shapes):
            if "X" not in ax or "Y" not in ax:
                raise SlideReadError(self.path, f"unsupported TIFF axes {ax!r}")
            w, h = int(shp[ax.index("X")]), int(shp[ax.index("Y")])
            self._pages.append(page)
            self.level_dimensions.append((w, h))
        w0 = self.level_dimensions[0][0]
        self.level_downsamples = [w0 / float(w) for w, _ in self.level_dimensions]
        self.mpp = self._read_mpp()
        self._full: dict = {}

    def _read_mpp(self) -> Optional[float]:
        tf = self._tf
        if tf.is_ome and tf.ome_metadata:
            try:
                root = ET.fromstring(tf.ome_metadata)
                for el in root.iter():
                    if el.tag.endswith("}Pixels") or el.tag == "Pixels":
                        v = el.get("PhysicalSizeX")
                        unit = el.get("PhysicalSizeXUnit", "µm")
                        factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit)
                        if v is not None and factor is not None:
                            mpp = _valid_mpp(float(v) * factor)
                            if mpp:
                                return mpp
            except Exception as e:  # malformed OME-XML: fall back to the TIFF tags
                log.warning("%s: cannot parse OME metadata (%s)", self.path, e)
        page: Any = tf.pages[0]
        desc = page.description or ""
        m = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", desc)  # Aperio-style description
        if m and _valid_mpp(m.group(1)):
            return _valid_mpp(m.group(1))
        tags = page.tags
        xres, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
        if xres is not None and unit is not None:
            num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
            if num and den:
                ppu = num / float(den)  # pixels per unit
                u = int(unit.value)
                um_per_unit = {2: 25400.0, 3: 10000.0}.get(u)  # inch, centimetre
                if um_per_unit and ppu > 0:
                    return _valid_mpp(um_per_unit / ppu)
        return None

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self._pages[level]
        if page.planarconfig != 1 and page.samplesperpixel > 1 or page.imagedepth > 1:
            return self._read_full(level)[y:y + h, x:x + w]
        if page.is_tiled:
            sh, sw = page.tilelength, page.tilewidth
        else:
            sh, sw = page.rowsperstrip or page.imagelength, page.imagewidth
        lw, lh = self.level_dimensions[level]
        nx = (lw + sw - 1) // sw
        out = np.zeros((h, w, max(1, page.samplesperpixel)), page.dtype)
        fh = self._tf.filehandle
        offsets, counts = page.dataoffsets, page.databytecounts
        for ty in range(y // sh, (y + h - 1) // sh + 1):
            for tx in range(x // sw, (x + w - 1) // sw + 1):
                index = ty * nx + tx
                if counts[index] == 0:
                    data = None
                else:
                    fh.seek(offsets[index])
                    data = fh.read(counts[index])
                    if len(data) < counts[index]:
                        raise SlideReadError(self.path, f"segment {index} of level {level} is "
                                             "truncated (the file is incomplete)")
                seg, idx, _shape = page.decode(data, index, jpegtables=page.jpegtables)
                if seg is None:
                    continue
                seg = seg.reshape(seg.shape[-3:])  # (length, width, samples)
                seg_hw: Tuple[int, ...] = tuple(seg.shape)
                sy0, sx0 = int(idx[-3]), int(idx[-2])
                ay0, ax0 = max(y, sy0), max(x, sx0)
                ay1 = min(y + h, sy0 + seg_hw[0], lh)
                ax1 = min(x + w, sx0 + seg_hw[1], lw)
                if ay1 > ay0 and ax1 > ax0:
                    out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = seg[ay0 - sy0:ay1 - sy0, ax0 - sx0:ax1 - sx0]
        return _to_rgb8(out)

    def _read_full(self, level: int) -> np.ndarray:
        if level not in self._full:
            self._full[level] = self._pages[level].asarray()
            arr = self._full[level]
            if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
                self._full[level] = np.moveaxis(arr, 0, -1)
            self._full[level] = _to_rgb8(self._full[level])
        return self._full[level]

    def close(self) -> None:
        self._tf.close()


def _to_rgb8(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8 and arr.dtype.kind in "ui" and arr.dtype.itemsize == 2:
        arr = (arr >> 8).astype(np.uint8)  # fixed 16->8 bit scaling: tiles must agree
    return to_rgb(arr)


# ------------------------------------------------------------------------------ plain images
class PlainImageReader(SlideReader):
    """A png/jpg/bmp image, decoded once (one level)."""

    kind = "image"

    def __init__(self, path: str):
        self.path = str(path)
        self._img = read_image(self.path)  # raises ImageReadError naming the file
        h, w = self._img.shape[:2]
        self.level_dimensions = [(w, h)]
        self.level_downsamples = [1.0]
        self.mpp = None
        try:
            with Image.open(self.path) as im:
                dpi = im.info.get("dpi")
            if dpi and dpi[0] and dpi[0] not in (72, 96):  # 72/96 are defaults, not calibration
                self.mpp = _valid_mpp(25400.0 / float(dpi[0]))
        except Exception:
            pass

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._img[y:y + h, x:x + w]


def open_slide(path: str) -> SlideReader:
    """The reader for ``path``: OpenSlide for vendor formats (and vendor TIFFs), tifffile for
    other TIFFs, the image reader for png/jpg. Raises :class:`SlideReadError` naming the file."""
    path = str(path)
    if not os.path.isfile(path):
        raise SlideReadError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise SlideReadError(path, "file is empty (0 bytes)")
    low = path.lower()
    if low.endswith(OPENSLIDE_EXTS):
        return OpenSlideReader(path)
    if low.endswith(TIFF_EXTS):
        vendor = None
        try:
            import openslide

            vendor = openslide.OpenSlide.detect_format(path)
        except Exception:
            vendor = None
        if vendor and vendor != "generic-tiff":
            return OpenSlideReader(path)
        return TiffReader(path)
    if low.endswith(PLAIN_EXTS):
        try:
            return PlainImageReader(path)
        except ImageReadError as e:
            raise SlideReadError(path, e.reason) from None
    raise SlideReadError(path, f"unknown slide format; expected one of {', '.join(SLIDE_EXTS)}")


def choose_level(level_mpps: Sequence[float], target_mpp: float, tolerance: float = 1.1
                 ) -> Tuple[int, float]:
    """The pyramid level to analyse at a target resolution, and the resampling factor.

    Args:
        level_mpps: um/px of each level (level 0 first, increasing).
        target_mpp: the model's training um/px.
        tolerance: a level counts as "fine enough" when its mpp <= target * tolerance, and is
            used without resampling when within that factor of the target either way.

    Returns:
        ``(level, scale)``: the coarsest level that is fine enough (level 0 when none is) and
        ``scale`` = analysis px per level px (``level_mpp / target_mpp``; 1.0 when the level
        matches within ``tolerance``; < 1 downsamples).
    """
    if target_mpp <= 0:
        raise ValueError(f"target mpp must be > 0, got {target_mpp}")
    level = 0
    for i, m in enumerate(level_mpps):
        if m <= target_mpp * tolerance:
            level = i if m >= level_mpps[level] else level
    m = float(level_mpps[level])
    scale = m / target_mpp
    if 1.0 / tolerance <= scale <= tolerance:
        scale = 1.0
    return level, scale
