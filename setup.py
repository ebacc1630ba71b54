"""detector: find and count cells in microscopy and pathology images."""
from setuptools import find_packages, setup

setup(
    name="detector",
    version="0.1.0",
    description="Find and count cells (nuclei, mitotic figures) in microscopy and "
    "whole-slide pathology images: COCO conversion, Mask R-CNN / Faster R-CNN / U-Net "
    "training, tiled slide inference and object-level evaluation.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["detector", "detector.*"]),
    include_package_data=True,
    install_requires=[
        # Users bring their own (CUDA) torch; these ranges are what the code supports.
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.24",
        "pycocotools>=2.0.7",
        "omegaconf>=2.3",
        "PyYAML>=6.0",
        "defusedxml>=0.7",
        "tifffile>=2023.7",
        "imagecodecs>=2023.1",
        "scikit-image>=0.21",
        "scipy>=1.10",
        "opencv-python-headless>=4.8",
        "Pillow>=10.0",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "openslide-python>=1.3",
        "openslide-bin>=4.0",
    ],
    extras_require={
        "dev": ["pytest>=7.4", "shapely>=2.0", "ruff>=0.5", "mypy>=1.10"],
        "bench": ["sahi>=0.11", "psutil>=5.9"],
        "peer": ["cellpose>=3,<4"],
    },
    entry_points={
        "console_scripts": [
            "detector-convert=detector.cli.convert_to_coco:main",
            "detector-train=detector.cli.train_net:main",
            "detector-infer=detector.cli.infer_tiles:main",
            "detector-evaluate=detector.cli.evaluate:main",
        ]
    },
)
