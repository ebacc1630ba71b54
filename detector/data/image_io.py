"""Reading images as people have them: RGBA, grayscale, 16-bit, TIFF, with errors that name the file.

Every stage reads images through :func:`read_image` so that a corrupt or truncated file gives the
same clear :class:`ImageReadError` everywhere.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DetectorError
import tifffile

TIFF_EXTS = (".tif", ".tiff")


class ImageReadError(OSError, DetectorError):
    """An image or mask file that is missing, corrupt, truncated or of an unusable kind."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def read_array(path: str) -> np.ndarray:
    """Read an image file as stored (any dtype, 2-D or H x W x C), checking it decodes whole."""
    path = str(path)
    if not os.path.isfile(path):
        raise ImageReadError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    try:
        if path.lower().endswith(TIFF_EXTS):
            arr = tifffile.imread(path, key=0)
        else:
            with Image.open(path) as im:
                im.load()  # raises on truncated data
                if im.mode in ("P", "PA"):
                    im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
                elif im.mode == "I;16B":
                    im = im.convert("I;16")
                arr = np.asarray(im)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(path, f"cannot decode image ({type(e).__name__}: {e}); the file "
                             "may be corrupt or truncated: re-export or re-download it") from None
    except Exception as e:  # tifffile raises its own classes
        raise ImageReadError(path, f"cannot decode image ({type(e).__name__}: {e})") from None
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ImageReadError(path, f"unexpected image shape {arr.shape}")
    return arr


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale any numeric image to uint8. 16-bit and float images are stretched to their own
    0.1..99.9 percentile range (fluorescence images rarely fill the 16-bit range)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    a = arr.astype(np.float32)
    lo, hi = np.percentile(a, (0.1, 99.9))
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB from grayscale, gray+alpha, RGB or RGBA of any depth."""
    arr = to_uint8(arr)
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    c = arr.shape[2]
    if c == 1:
        return np.repeat(arr, 3, axis=2)
    if c == 2:  # gray + alpha
        return np.repeat(arr[:, :, :1], 3, axis=2)
    if c >= 3:
        return np.ascontiguousarray(arr[:, :, :3])
    raise ValueError(f"unexpected channel count {c}")


def read_image(path: str) -> np.ndarray:
    """Read an image as H x W x 3 uint8 RGB (alpha dropped, gray repeated, 16-bit scaled)."""
    arr = read_array(path)
    try:
        return to_rgb(arr)
    except ValueError as e:
        raise ImageReadError(path, str(e)) from None


def image_size(path: str) -> Tuple[int, int]:
    """``(height, width)`` of an image file without decoding the pixels when possible."""
    path = str(path)
    if not os.path.isfile(path):
        raise ImageReadError(path, "file not found")
    try:
        if path.lower().endswith(TIFF_EXTS):
            with tifffile.TiffFile(path) as tf:
                shape = tf.pages[0].shape
            return int(shape[0]), int(shape[1])
        with Image.open(path) as im:
            w, h = im.size
        return int(h), int(w)
    except Exception as e:
        raise ImageReadError(path, f"cannot read image header ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------ windows
#: Files whose windows are read through the slide readers (only the window is decoded):
#: whole-slide formats, and TIFFs larger than this many pixels (tiled pyramids, MIDOG fields).
WINDOW_READ_EXTS = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu")
WINDOW_READ_MIN_PX = 4096 * 4096


class WindowCache:
    """Reads ``(top, left, size_h, size_w)`` windows of training images, keeping the most recently
    used files: a whole-slide file or a large TIFF open as a slide reader (only the window is
    decoded; at most ``max_open`` of them), an ordinary image decoded once and cached (up to
    ``max_bytes`` of pixels per process). One per DataLoader worker process (it is created
    lazily in each)."""

    def __init__(self, max_bytes: int = 1 << 30, max_open: int = 16) -> None:
        self.max_bytes, self.max_open = int(max_bytes), int(max_open)
        self._items: Dict[str, Any] = {}   # path -> ndarray or slide reader (LRU order)
        self._bytes = 0
        self._open_readers = 0

    def _open(self, path: str) -> Any:
        low = path.lower()
        big_tiff = False
        if low.endswith((".tif", ".tiff")):
            try:
                h, w = image_size(path)
                big_tiff = h * w >= WINDOW_READ_MIN_PX
            except ImageReadError:
                big_tiff = False
        if low.endswith(WINDOW_READ_EXTS) or big_tiff:
            # the slide readers live with inference (OpenSlide, tiled TIFF); imported here only
            # because ``detector.inference`` imports the data package itself
            from ..inference.slide import open_slide

            return open_slide(path)
        return read_image(path)

    def get(self, path: str) -> Any:
        item = self._items.pop(path, None)
        if item is None:
            item = self._open(path)
            if isinstance(item, np.ndarray):
                self._bytes += item.nbytes
            else:
                self._open_readers += 1
        self._items[path] = item
        while len(self._items) > 1 and (self._bytes > self.max_bytes
                                        or self._open_readers > self.max_open):
            old_path = next(iter(self._items))
            old = self._items.pop(old_path)
            if isinstance(old, np.ndarray):
                self._bytes -= old.nbytes
            else:
                self._open_readers -= 1
                old.close()
        return item

    def size(self, path: str) -> Tuple[int, int]:
        """``(height, width)`` of the file (level 0)."""
        item = self.get(path)
        if isinstance(item, np.ndarray):
            return int(item.shape[0]), int(item.shape[1])
        w, h = item.level_dimensions[0]
        return int(h), int(w)

    def read(self, path: str, top: int, left: int, height: int, width: int) -> np.ndarray:
        """``height x width x 3`` uint8 RGB window with its top-left corner at ``(top, left)``
        (may lie partly outside the image: zeros there)."""
        item = self.get(path)
        if isinstance(item, np.ndarray):
            h, w = item.shape[:2]
        else:
            w, h = item.level_dimensions[0]
        out = np.zeros((height, width, 3), np.uint8)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + height, h), min(left + width, w)
        if y1 > y0 and x1 > x0:
            if isinstance(item, np.ndarray):
                part = item[y0:y1, x0:x1]
            else:
                part = item.read_region(0, x0, y0, x1 - x0, y1 - y0)
            out[y0 - top:y1 - top, x0 - left:x1 - left] = part
        return out


def tissue_fraction(rgb: np.ndarray) -> float:
    """Fraction of a window's pixels that look like stained tissue (or cells): neither near-white
    glass (all channels > 215) nor black padding (all channels < 5). A cheap per-crop test for
    placing random training crops; slides use the Otsu mask of ``detector.inference.tissue``."""
    if rgb.size == 0:
        return 0.0
    hi = (rgb > 215).all(axis=-1)
    lo = (rgb < 5).all(axis=-1)
    return float(1.0 - (hi | lo).mean())
