"""A synthetic nuclei / mitosis data set, realistic enough to exercise the whole pipeline.

Fields are rendered in optical-density space with the Beer-Lambert law (as a bright-field H&E
scanner sees stain) or as fluorescence (DAPI-like nuclei on black). Nuclei are ellipses of varied
size and eccentricity with wobbly outlines and chromatin texture; some touch. A minority are
mitotic figures: smaller, very dark, condensed and irregular (a clump of chromosome blobs or a
metaphase plate).

Outputs, in the formats ``tools/convert_to_coco.py`` reads:

- ``images/<name>.png``: RGB field;
- ``labels/<name>.png``: 16-bit instance label image (0 = background);
- ``classes/<name>.png``: 8-bit class map (0 background, 1 nucleus, 2 mitotic figure);
- ``mitoses.csv``: ``x,y,label,slide`` of every mitotic figure (points format);
- a pyramidal TIFF "slide" with known mitotic figure positions and mpp (:func:`write_slide`).

Written here because no library makes annotated H&E-like fields with mitotic figures.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage as ndi
import tifffile
from PIL import Image
from tqdm import tqdm

# Stain optical-density vectors (rows: hematoxylin, eosin), Ruifrok & Johnston, as in skimage.
_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]], dtype=np.float32)
_STAINS /= np.linalg.norm(_STAINS, axis=1, keepdims=True)

NUCLEUS, MITOSIS = 1, 2
CLASS_NAMES = {NUCLEUS: "nucleus", MITOSIS: "mitotic figure"}


@dataclass
class Field:
    """One rendered field: image (H, W, 3) uint8 RGB, instance labels (H, W) int32,
    class of each instance id (dict id -> 1 nucleus / 2 mitotic figure)."""

    image: np.ndarray
    labels: np.ndarray
    classes: Dict[int, int]

    def class_map(self) -> np.ndarray:
        lut = np.zeros(int(self.labels.max()) + 1, np.uint8)
        for i, c in self.classes.items():
            lut[i] = c
        return lut[self.labels]

    def mitosis_centres(self) -> List[Tuple[float, float]]:
        ids = [i for i, c in self.classes.items() if c == MITOSIS]
        if not ids:
            return []
        cms = ndi.center_of_mass(np.ones_like(self.labels), self.labels, ids)
        return [(float(x), float(y)) for y, x in cms]


def _smooth_noise(rng: np.random.Generator, shape: Tuple[int, int], sigma: float) -> np.ndarray:
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / (n.std() + 1e-6)


def _nucleus_shape(rng: np.random.Generator, mitotic: bool, scale: float) -> np.ndarray:
    """A binary patch of one nucleus (or mitotic figure), roughly centred."""
    if not mitotic:
        a = rng.uniform(5.0, 11.0) * scale
        b = a * rng.uniform(0.55, 1.0)
        r = int(np.ceil(a * 1.35)) + 2
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float32)
        t = rng.uniform(0, np.pi)
        u = xx * np.cos(t) + yy * np.sin(t)
        v = -xx * np.sin(t) + yy * np.cos(t)
        ang = np.arctan2(v, u)
        wobble = 1 + sum(rng.uniform(-0.08, 0.08) * np.cos(k * ang + rng.uniform(0, 6.3))
                         for k in (2, 3, 5))
        return (u / a) ** 2 + (v / b) ** 2 <= wobble ** 2
    # mitotic figure: a metaphase plate (dense bar) or a clump of chromosome blobs
    r = int(np.ceil(9 * scale)) + 3
    patch = np.zeros((2 * r + 1, 2 * r + 1), bool)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float32)
    if rng.random() < 0.4:
        t = rng.uniform(0, np.pi)
        u = xx * np.cos(t) + yy * np.sin(t)
        v = -xx * np.sin(t) + yy * np.cos(t)
        length, width = rng.uniform(6, 9) * scale, rng.uniform(1.8, 3.0) * scale
        patch |= (np.abs(u) <= length) & (np.abs(v) <= width + np.sin(u * 1.3) * 0.8)
    else:
        for _ in range(rng.integers(4, 9)):
            cx, cy = rng.normal(0, 2.6 * scale, 2)
            rad = rng.uniform(1.6, 3.2) * scale
            patch |= (xx - cx) ** 2 + (yy - cy) ** 2 <= rad ** 2
    return ndi.binary_closing(patch, iterations=1)


def render_field(
    rng: np.random.Generator,
    size: Tuple[int, int] = (256, 256),
    kind: str = "he",
    density: float = 0.0025,
    mitotic_fraction: float = 0.08,
    touching: float = 0.3,
    tissue: Optional[np.ndarray] = None,
    scale: float = 1.0,
) -> Field:
    """Render one field of ``size`` (h, w).

    Args:
        kind: "he" (bright-field H&E) or "fluo" (DAPI-like fluorescence).
        density: nuclei per px^2 of tissue.
        mitotic_fraction: fraction of nuclei that are mitotic figures.
        touching: fraction of nuclei placed right against a previous one.
        tissue: optional (h, w) bool mask where nuclei may lie (default: everywhere).
        scale: nucleus size factor (1.0: nuclei 10 to 22 px across, i.e. 5 to 11 um at 0.5 um/px).
    """
    h, w = size
    if tissue is None:
        tissue = np.ones((h, w), bool)
    n = rng.poisson(density * float(tissue.sum()))
    labels = np.zeros((h, w), np.int32)
    classes: Dict[int, int] = {}
    centres: List[Tuple[int, int]] = []
    ys, xs = np.nonzero(tissue)
    if len(ys) == 0:
        n = 0
    next_id = 1
    for _ in range(n):
        mitotic = rng.random() < mitotic_fraction
        shape = _nucleus_shape(rng, mitotic, scale)
        ph, pw = shape.shape
        if centres and rng.random() < touching:
            cy, cx = centres[rng.integers(len(centres))]
            ang = rng.uniform(0, 2 * np.pi)
            dist = (ph + pw) / 4 * rng.uniform(0.75, 0.95)
            cy, cx = int(cy + dist * np.sin(ang)), int(cx + dist * np.cos(ang))
        else:
            k = rng.integers(len(ys))
            cy, cx = int(ys[k]), int(xs[k])
        y0, x0 = cy - ph // 2, cx - pw // 2
        sy0, sx0 = max(0, -y0), max(0, -x0)
        y0c, x0c = max(0, y0), max(0, x0)
        y1c, x1c = min(h, y0 + ph), min(w, x0 + pw)
        if y1c <= y0c or x1c <= x0c:
            continue
        sub = shape[sy0:sy0 + (y1c - y0c), sx0:sx0 + (x1c - x0c)]
        region = labels[y0c:y1c, x0c:x1c]
        free = sub & (region == 0)  # nuclei do not overlap: later ones fill only free pixels
        if free.sum() < 0.6 * max(sub.sum(), 1) or free.sum() < 12:
            continue
        # keep one connected piece
        lab, nlab = ndi.label(free)
        if nlab > 1:
            sizes = ndi.sum(free, lab, range(1, nlab + 1))
            free = lab == (1 + int(np.argmax(sizes)))
        region[free] = next_id
        classes[next_id] = MITOSIS if mitotic else NUCLEUS
        centres.append((cy, cx))
        next_id += 1
    image = _paint(rng, labels, classes, tissue, kind)
    return Field(image, labels, classes)


def _paint(rng: np.random.Generator, labels: np.ndarray, classes: Dict[int, int],
           tissue: np.ndarray, kind: str) -> np.ndarray:
    h, w = labels.shape
    lut_h = np.zeros(int(labels.max()) + 1, np.float32)
    for i, c in classes.items():
        lut_h[i] = rng.uniform(1.9, 2.4) if c == MITOSIS else rng.uniform(0.55, 1.05)
    nuc = lut_h[labels]
    inside = labels > 0
    chrom = _smooth_noise(rng, (h, w), 1.2)
    is_mit = np.isin(labels, [i for i, c in classes.items() if c == MITOSIS]) if classes else inside & False
    texture = np.where(is_mit, 0.08, 0.22) * chrom
    # soft nuclear edge
    nuc = ndi.gaussian_filter(np.where(inside, nuc * (1 + texture), 0.0).astype(np.float32), 0.7)
    if kind == "fluo":
        signal = np.clip(nuc / 2.2, 0, 1) ** 0.8 * 230 + 8 + rng.normal(0, 3, (h, w))
        signal = np.clip(signal, 0, 255).astype(np.uint8)
        return np.stack([signal // 6, signal // 4, signal], axis=2)
    stroma = tissue.astype(np.float32) * (0.35 + 0.12 * _smooth_noise(rng, (h, w), 6)
                                           + 0.08 * _smooth_noise(rng, (h, w), 1.5))
    fibres = np.clip(_smooth_noise(rng, (h, w), 2.5), 0, None) * 0.1 * tissue
    e_dens = np.clip(stroma + fibres, 0, None)
    h_dens = nuc + 0.04 * tissue
    od = h_dens[..., None] * _STAINS[0] + e_dens[..., None] * _STAINS[1]
    od += rng.normal(0, 0.015, od.shape).astype(np.float32)
    rgb = 255.0 * np.exp(-np.clip(od, 0, None))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _imwrite(path: str, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def write_dataset(out_dir: str, n_images: int = 24, size: Tuple[int, int] = (256, 256),
                  seed: int = 0, kind: str = "he", mitotic_fraction: float = 0.08,
                  mpp: float = 0.5, progress: bool = False,
                  edge_fraction: float = 0.0) -> Dict[str, object]:
    """Write ``n_images`` fields (images/, labels/, classes/, mitoses.csv, dataset.json).

    Each image is its own "slide" (group id) for splitting. Returns a summary dict with the
    number of images, nuclei and mitotic figures. ``progress``: a tqdm bar over the images.
    ``edge_fraction``: fraction of the fields (H&E) crossed by the border of the tissue, with
    bare glass beyond it, as at the edges of a slide's tissue (a model that never saw glass
    and tissue borders finds objects there).
    """
    rng = np.random.default_rng(seed)
    rows = []
    n_nuc = n_mit = 0
    for k in tqdm(range(n_images), desc="generate", unit="img", disable=not progress,
                  leave=False):
        name = f"synth_{k:03d}"
        tissue = None
        if edge_fraction > 0 and kind == "he" and rng.random() < edge_fraction:
            tissue = _field_edge(rng, *size)
        f = render_field(rng, size, kind=kind, mitotic_fraction=mitotic_fraction, tissue=tissue)
        if tissue is not None:
            f = _glass_outside(rng, f, tissue)
        _imwrite(os.path.join(out_dir, "images", name + ".png"), f.image)
        _imwrite(os.path.join(out_dir, "labels", name + ".png"), f.labels.astype(np.uint16))
        _imwrite(os.path.join(out_dir, "classes", name + ".png"), f.class_map())
        for x, y in f.mitosis_centres():
            rows.append((f"{x:.1f}", f"{y:.1f}", "mitotic figure", name))
        n_mit += sum(1 for c in f.classes.values() if c == MITOSIS)
        n_nuc += sum(1 for c in f.classes.values() if c == NUCLEUS)
    with open(os.path.join(out_dir, "mitoses.csv"), "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["x", "y", "label", "slide"])
        wr.writerows(rows)
    summary = {"images": n_images, "nuclei": n_nuc, "mitotic_figures": n_mit, "mpp": mpp,
               "kind": kind, "seed": seed, "classes": CLASS_NAMES}
    with open(os.path.join(out_dir, "dataset.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    return summary


def _field_edge(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Tissue on one side of a wavy border crossing an (h, w) field."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = rng.uniform(0, 2 * np.pi)
    ramp = ((xx - w / 2) * np.cos(t) + (yy - h / 2) * np.sin(t)) / max(h, w)
    wave = 0.08 * _smooth_noise(rng, (h, w), max(h, w) / 10)
    return ramp + wave < rng.uniform(-0.1, 0.3)


def _glass_outside(rng: np.random.Generator, f: Field, tissue: np.ndarray) -> Field:
    """Bare glass beyond 4 px outside ``tissue``; objects (parts) drawn there are removed from
    the labels, so the annotations still agree with the picture."""
    white = ~ndi.binary_dilation(tissue, iterations=4)
    img = f.image.copy()
    img[white] = (np.array([242, 240, 244]) + rng.normal(0, 2, (int(white.sum()), 3))).clip(0, 255)
    labels = f.labels.copy()
    labels[white] = 0
    present = set(np.unique(labels).tolist())
    return Field(img, labels, {i: c for i, c in f.classes.items() if i in present})


def _tissue_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One or two irregular blobs of tissue covering roughly half of the slide."""
    small = _smooth_noise(rng, (max(h // 32, 8), max(w // 32, 8)), 3)
    yy, xx = np.mgrid[0:small.shape[0], 0:small.shape[1]].astype(np.float32)
    cy, cx = small.shape[0] / 2, small.shape[1] / 2
    radial = 1 - np.hypot((yy - cy) / cy, (xx - cx) / cx)
    blob = (radial + 0.35 * small) > 0.35
    from skimage.transform import resize

    return resize(blob.astype(np.float32), (h, w), order=1) > 0.5


def write_slide(path: str, size: Tuple[int, int] = (3072, 3072), mpp: float = 0.5,
                seed: int = 1, mitotic_fraction: float = 0.04, tile: int = 256,
                levels: int = 3) -> Dict[str, object]:
    """Write a pyramidal, tiled, JPEG-compressed TIFF "slide" with tissue, nuclei and known
    mitotic figures, and ``<path>.truth.json`` with their positions (level-0 px), the mpp
    and the true counts. Returns that truth dict."""
    rng = np.random.default_rng(seed)
    h, w = size
    tissue = _tissue_mask(rng, h, w)
    f = render_field(rng, size, kind="he", mitotic_fraction=mitotic_fraction, tissue=tissue)
    white = ~ndi.binary_dilation(tissue, iterations=4)
    img = f.image.copy()
    img[white] = (np.array([242, 240, 244]) + rng.normal(0, 2, (int(white.sum()), 3))).clip(0, 255)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    res = 1e4 / mpp  # pixels per cm
    opts = dict(tile=(tile, tile), compression="jpeg", photometric="rgb")
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        tw.write(img, subifds=levels - 1, resolution=(res, res), resolutionunit="CENTIMETER",
                 description=f"synthetic H&E slide, mpp={mpp}", **opts)
        lvl = img
        for k in range(1, levels):
            lvl = lvl[: lvl.shape[0] // 2 * 2, : lvl.shape[1] // 2 * 2]
            lvl = lvl.reshape(lvl.shape[0] // 2, 2, lvl.shape[1] // 2, 2, 3).mean((1, 3)).astype(np.uint8)
            tw.write(lvl, subfiletype=1, resolution=(res / 2 ** k, res / 2 ** k),
                     resolutionunit="CENTIMETER", **opts)
    centres = f.mitosis_centres()
    n_nuc = sum(1 for c in f.classes.values() if c == NUCLEUS)
    tissue_mm2 = float(tissue.sum()) * (mpp / 1000.0) ** 2
    truth = {
        "path": os.path.abspath(path), "width": w, "height": h, "mpp": mpp,
        "tissue_area_mm2": tissue_mm2,
        "mitotic_figures": len(centres), "nuclei": n_nuc,
        "mitotic_index": len(centres) / max(len(centres) + n_nuc, 1),
        "mitoses_per_mm2": len(centres) / tissue_mm2 if tissue_mm2 else 0.0,
        "mitoses_per_10hpf_0.237": len(centres) / tissue_mm2 * 2.37 if tissue_mm2 else 0.0,
        "mitoses_xy": [[round(x, 1), round(y, 1)] for x, y in centres],
    }
    with open(path + ".truth.json", "w") as fh:
        json.dump(truth, fh, indent=1)
    return truth
