"""Reading images as people have them: RGBA, grayscale, 16-bit, TIFF, with errors that name the file.

Every stage reads images through :func:`read_image` so that a corrupt or truncated file gives the
same clear :class:`ImageReadError` everywhere.
"""
from __future__ import annotations

import os
from typing import Tuple

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
