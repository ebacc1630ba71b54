"""Modality normalisation: one appearance for fluorescence, brightfield and H&E.

With ``INPUT.INVERT_BRIGHT_BACKGROUND`` an image whose grey median is above
:data:`BRIGHT_MEDIAN` (a bright background: brightfield, H&E) is inverted, so that nuclei
are brighter than their surroundings in every modality, as in fluorescence (what several
DSB2018 solutions did before training one model on all three). With ``INPUT.GREY`` every image
is first replaced by its grey (the mean of R, G and B in all three channels), so that colour no
longer tells the modalities apart either: a grey brightfield field, an H&E tile and a
fluorescence field then differ only in their intensities. With ``INPUT.GREY_FLUORESCENCE`` an
image whose grey median is at most :data:`BRIGHT_MEDIAN` (a dark background: fluorescence) is
replaced by its brightest channel in all three, so that a stain shown in one colour (DAPI as
blue, as slide scanners write it) looks like the grey fluorescence of DSB2018 (all 541 of its
fluorescence images are grey, on which this changes nothing). Both the R-CNN and the U-Net apply
:func:`normalise_modality` to each image (or tile) before their pixel normalisation, in
training and inference.
"""
from __future__ import annotations

from torch import Tensor

#: Grey median (0..1) above which an image counts as bright-background. Fluorescence fields
#: have medians near 0.05-0.15; brightfield and H&E tissue about 0.5-0.9.
BRIGHT_MEDIAN = 0.35


def is_bright(image: Tensor) -> bool:
    """Whether a ``[3, H, W]`` float image in 0..1 has a bright background (its grey median
    above :data:`BRIGHT_MEDIAN`: brightfield, H&E), not a dark one (fluorescence)."""
    grey = image.float().mean(0)
    return bool(grey.numel()) and float(grey.median()) > BRIGHT_MEDIAN


def normalise_modality(image: Tensor, invert_bright: bool = False, grey: bool = False,
                       grey_fluorescence: bool = False) -> Tensor:
    """``[3, H, W]`` float image in 0..1 with the config's modality normalisation: grey first
    (``INPUT.GREY``), then a dark-background image as its brightest channel
    (``INPUT.GREY_FLUORESCENCE``) or a bright background inverted
    (``INPUT.INVERT_BRIGHT_BACKGROUND``); the image itself when all are off."""
    if grey:
        image = image.mean(0, keepdim=True).expand_as(image)
    if not (invert_bright or grey_fluorescence):
        return image
    if is_bright(image):
        return 1.0 - image if invert_bright else image
    if grey_fluorescence and not grey:
        return image.amax(0, keepdim=True).expand_as(image)
    return image
