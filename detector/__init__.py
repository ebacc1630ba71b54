"""detector: find and count cells in microscopy and pathology images."""
__version__ = "0.1.0"
