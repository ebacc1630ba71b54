"""Models: Mask R-CNN / Faster R-CNN (torchvision) and the U-Net baseline, built from a config."""
