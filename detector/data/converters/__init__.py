"""Annotation converters: every common format to COCO instance files.

One module per format; each exposes ``convert_<format>(input, ...) -> Conversion``. The CLI
(``tools/convert_to_coco.py``) then remaps categories, converts masks to polygons if asked,
splits by slide/patient, and writes the files.

Formats: ``dsb`` (DSB2018 folders), ``labels`` (instance label images), ``xml`` (Aperio
ImageScope / MoNuSeg polygons), ``points`` (CSV points -> boxes), ``amibr`` (AMi-Br mitosis
crops), ``images`` (images without annotations: negatives), ``coco`` (existing COCO files:
merge, re-split, remap).
"""
from .common import Conversion, ConversionError, remap_categories, summary_text, to_polygon_format

FORMATS = ("dsb", "labels", "xml", "points", "amibr", "images", "coco")

__all__ = ["Conversion", "ConversionError", "FORMATS", "remap_categories", "summary_text",
           "to_polygon_format"]
