"""Whole-slide inference: slide readers, tiles, merging, counts and exports.

    from detector import api

    summary = api.load("model_final.pth").predict_slide("slide.svs", "results/")

Modules: ``slide`` (readers, mpp, level choice), ``tissue`` (Otsu tissue mask, ROI),
``tiling`` (pure tile geometry), ``merge`` (edge rule, batched NMS, mask IoU), ``counting``
(counts, mitotic density, hotspot, index), ``export`` (GeoJSON, COCO results, CSV, PNGs),
``journal`` (resume), ``runner`` (the pipeline as named stages).
"""
from .runner import InferenceOptions, SlideError, infer_slide, run_slides, shard
from .slide import SlideReadError, SlideReader, choose_level, open_slide

__all__ = ["InferenceOptions", "SlideError", "infer_slide", "run_slides", "shard",
           "SlideReadError", "SlideReader", "choose_level", "open_slide"]
