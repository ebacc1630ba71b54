"""Whole-slide inference: slide readers, tiles, merging, counts and exports.

    from detector.modeling.build import load_model
    from detector.inference import InferenceOptions, infer_slide

    model, cfg, classes, mpp = load_model("model_final.pth", "cuda")
    summary = infer_slide(model, classes, mpp, "slide.svs", "results/", InferenceOptions())

Modules: ``slide`` (readers, mpp, level choice), ``tissue`` (Otsu tissue mask, ROI),
``tiling`` (pure tile geometry), ``rle`` (slide-sized RLE from object crops), ``merge`` (edge
rule, batched NMS, mask IoU), ``counting`` (counts, mitotic density, hotspot, index),
``export`` (GeoJSON, COCO results, CSV, PNGs), ``journal`` (resume), ``runner`` (the pipeline).
"""
from .runner import InferenceOptions, SlideError, infer_slide, run_slides, shard
from .slide import SlideReadError, SlideReader, choose_level, open_slide

__all__ = ["InferenceOptions", "SlideError", "infer_slide", "run_slides", "shard",
           "SlideReadError", "SlideReader", "choose_level", "open_slide"]
