"""Whole-slide inference: slide readers, tiles, merging, counts and exports."""
