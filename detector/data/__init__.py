"""Data: annotation converters, COCO files, image reading, datasets and augmentation."""
