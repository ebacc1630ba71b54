"""Data structures shared by every stage."""
from .instances import Instances
from .masks import CropMask, rle_from_json, rle_to_json

__all__ = ["CropMask", "Instances", "rle_from_json", "rle_to_json"]
