"""Data structures shared by every stage."""
from .instances import Instances, rle_from_json, rle_to_json

__all__ = ["Instances", "rle_from_json", "rle_to_json"]
