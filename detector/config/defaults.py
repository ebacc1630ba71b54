"""Every config key, its type and its default, documented where the default is set.

The groups follow detectron2 (MODEL, INPUT, DATASETS, DATALOADER, SOLVER, TEST, OUTPUT_DIR,
SEED). Config files (YAML, with ``_BASE_`` inheritance) and command-line ``KEY VALUE`` pairs
override these defaults; OmegaConf checks every override against the types declared here, so
a typo in a key or a value of the wrong type is an error that names the key and the file.

Defaults are chosen for nuclei (5 to 60 px across, hundreds per field) at native resolution,
not for COCO street scenes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


# --------------------------------------------------------------------------------------- MODEL
@dataclass
class BackboneConfig:
    # ResNet depth of the FPN backbone: "resnet18", "resnet34" or "resnet50".
    # resnet50 with the "_v2" heads reproduces torchvision's maskrcnn_resnet50_fpn_v2.
    NAME: str = "resnet50"
    # Normalisation in the backbone: "FrozenBN" (fine-tuning from pretrained weights),
    # "BN", "SyncBN" (several GPUs) or "GN" (GroupNorm; training from scratch, as in
    # He et al., "Rethinking ImageNet Pre-training", 2019).
    NORM: str = "GN"
    # How many ResNet stages (from the top, 0..5) are trained; 5 = all (from scratch).
    TRAINABLE_LAYERS: int = 5
    # Output channels of the FPN and of the RPN/box/mask heads (torchvision: 256).
    OUT_CHANNELS: int = 256


@dataclass
class AnchorConfig:
    # One tuple of anchor sizes (px) per FPN level (P2..P6). Nuclei are 5 to 60 px.
    SIZES: List[List[int]] = field(default_factory=lambda: [[8], [16], [32], [64], [128]])
    # Aspect ratios (h/w) at every level.
    ASPECT_RATIOS: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])


@dataclass
class RPNConfig:
    # Proposals kept per FPN level before NMS, in training and at test time.
    PRE_NMS_TOPK_TRAIN: int = 4000
    PRE_NMS_TOPK_TEST: int = 3000
    # Proposals kept after NMS (per image); a dense field holds several hundred nuclei.
    POST_NMS_TOPK_TRAIN: int = 3000
    POST_NMS_TOPK_TEST: int = 3000
    NMS_THRESH: float = 0.7
    # 3x3 convolutions in the RPN head (torchvision's v2 models: 2).
    CONV_DEPTH: int = 2
    # Anchors sampled per image for the RPN loss, and the positive fraction among them.
    BATCH_SIZE_PER_IMAGE: int = 256
    POSITIVE_FRACTION: float = 0.5


@dataclass
class ROIHeadsConfig:
    # RoIs sampled per image for the box/mask heads, and the positive fraction among them.
    BATCH_SIZE_PER_IMAGE: int = 512
    POSITIVE_FRACTION: float = 0.25
    # Detections below this score are dropped at test time.
    SCORE_THRESH_TEST: float = 0.05
    # Class-wise NMS IoU threshold at test time.
    NMS_THRESH_TEST: float = 0.5
    # Maximum detections per image (dense nuclei fields need many).
    DETECTIONS_PER_IMAGE: int = 1000
    # Threshold on the mask head's probability to binarise masks.
    MASK_THRESHOLD: float = 0.5
    # Box head: 3x3 convolutions (with norm) then fully connected layers of FC_DIM (the v2
    # heads: 4 convs, one FC of 1024). Mask head: MASK_HEAD_CONVS 3x3 convolutions (v2: 4).
    BOX_HEAD_CONVS: int = 4
    FC_DIM: int = 1024
    MASK_HEAD_CONVS: int = 4


@dataclass
class UNetConfig:
    # Number of resolution levels (the paper: 5, i.e. 4 poolings).
    DEPTH: int = 5
    # Channels of the first level; doubled at every level (the paper: 64).
    BASE_CHANNELS: int = 64
    # "valid": the paper's unpadded 3x3 convolutions (output smaller than input);
    # "same": padded convolutions with batch normalisation (a modern variant, not default).
    PADDING: str = "valid"
    # Width in px of the boundary class drawn around (and between touching) nuclei.
    BOUNDARY_WIDTH: int = 2
    # What class 2 marks: "boundary", the band of BOUNDARY_WIDTH px inside every nucleus edge
    # (around and between nuclei); or "contact", only the pixels of a nucleus within
    # BOUNDARY_WIDTH px of another nucleus (the touching borders of the DSB2018 winners), so an
    # isolated nucleus is all class 1. The watershed reads both alike.
    TARGET: str = "boundary"
    # Weight map of the paper: w0 and sigma (px at the training mpp).
    W0: float = 10.0
    SIGMA: float = 5.0
    # Output tile size (px) for overlap-tile prediction; the input tile adds the border.
    TILE_SIZE: int = 256
    # Watershed post-processing (detector/modeling/watershed.py): probabilities are smoothed
    # with a Gaussian of SMOOTH_SIGMA px (0 = off; removes seed fragments that over-split
    # nuclei), seeds are p_interior - p_boundary > SEED_THRESH, the foreground is
    # p_interior + p_boundary > FOREGROUND_THRESH, and the smallest instance kept is
    # MIN_SIZE px.
    SMOOTH_SIGMA: float = 1.0
    SEED_THRESH: float = 0.3
    FOREGROUND_THRESH: float = 0.5
    MIN_SIZE: int = 10


@dataclass
class ClassifierConfig:
    # The patch classifier (MODEL.META_ARCHITECTURE PatchClassifier): the second stage of the
    # mitosis counter, which re-scores every candidate of the detector from a square patch
    # centred on it. Classes: index 0 is "look-alike" (objects of
    # DATASETS.NEGATIVE_CATEGORIES: mined false positives, nuclei), 1..K the data's categories
    # (mitotic figure, or the phases, or normal/atypical).
    # The network: a torchvision classification model name, trained from scratch
    # ("mobilenet_v3_small": 0.06 GFLOPs at 224 px, about 4x the patches per second of
    # "resnet18" on a CPU), with MODEL.BACKBONE.NORM "GN" (default: batch-independent, as the
    # 2 x 2 px last feature maps of a 64 px patch need) or "BN".
    NAME: str = "mobilenet_v3_small"
    # Side of the patch in px at the training mpp (64 px = 16 um at 0.25 um/px: a figure and
    # its immediate surroundings).
    PATCH_SIZE: int = 64
    # Training: the patch centre is moved by up to this many px (annotated centres are not
    # exact; detector boxes neither).
    CENTER_JITTER: int = 6
    # Where a patch leaves the image it is filled with this grey level (255: white, like glass),
    # never mirrored: a mirrored dark nucleus at a border looks like an anaphase.
    BORDER_VALUE: int = 255
    # Training: the chance that one side of a patch is replaced by a band of BORDER_VALUE (up to
    # a quarter of the patch), so that an image border is no cue for either class.
    BORDER_AUG_PROB: float = 0.15
    # Test time: average the class probabilities over the 8 flips and 90-degree rotations
    # of each patch (8x the classifier's work; candidates are few).
    TTA: bool = True


@dataclass
class ClassicalConfig:
    # The classical baseline (MODEL.META_ARCHITECTURE Classical; detector/modeling/classical.py):
    # Otsu threshold + distance-transform watershed, as CellProfiler's IdentifyPrimaryObjects.
    # Nothing is learned; train_net.py writes its checkpoint (config + classes) and evaluates.
    # The nucleus signal: "fluorescence" (the brightest channel), "he" (haematoxylin from
    # skimage.color.rgb2hed), "brightfield" (inverted grey), or "auto" (per image, from its
    # median brightness and saturation: detector.data.experiments.modality_of).
    MODALITY: str = "auto"
    # Gaussian smoothing of the signal before thresholding (px; 0 = none).
    SMOOTH_SIGMA: float = 1.0
    # The Otsu threshold is multiplied by this (CellProfiler's "threshold correction factor").
    THRESHOLD_CORRECTION: float = 1.0
    # A fixed threshold on the smoothed signal instead of Otsu's (0 = Otsu per image; on whole
    # slides Otsu runs per tile, so a fixed one keeps tiles consistent). The signal: 0..1 for
    # fluorescence and brightfield, haematoxylin optical density (about 0..0.3) for H&E.
    THRESHOLD: float = 0.0
    # Seeds: maxima of the distance transform of the foreground that are the largest in a
    # PEAK_FOOTPRINT x PEAK_FOOTPRINT px window (about a nucleus diameter: smaller splits
    # elongated nuclei, larger merges touching ones).
    PEAK_FOOTPRINT: int = 17
    # Holes in the foreground are filled (nuclei with dim centres).
    FILL_HOLES: bool = True
    # Smallest object kept (px).
    MIN_SIZE: int = 20


@dataclass
class ModelConfig:
    # "MaskRCNN", "FasterRCNN", "UNet", "PatchClassifier" (second stage, see CLASSIFIER), or
    # "Classical" (the Otsu + watershed baseline, see CLASSICAL: no weights).
    META_ARCHITECTURE: str = "MaskRCNN"
    # Initial weights: a checkpoint of ours, a torchvision state dict (.pth), a torchvision
    # weights name (e.g. "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1", downloaded only when
    # the network allows) or "" for training from scratch.
    WEIGHTS: str = ""
    # "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...
    DEVICE: str = "auto"
    # Number of foreground classes; 0 = taken from the training data's categories.
    NUM_CLASSES: int = 0
    # Per-channel pixel mean and std (on 0..1 RGB) used to normalise the input.
    PIXEL_MEAN: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    PIXEL_STD: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    BACKBONE: BackboneConfig = field(default_factory=BackboneConfig)
    ANCHOR_GENERATOR: AnchorConfig = field(default_factory=AnchorConfig)
    RPN: RPNConfig = field(default_factory=RPNConfig)
    ROI_HEADS: ROIHeadsConfig = field(default_factory=ROIHeadsConfig)
    UNET: UNetConfig = field(default_factory=UNetConfig)
    CLASSIFIER: ClassifierConfig = field(default_factory=ClassifierConfig)
    CLASSICAL: ClassicalConfig = field(default_factory=ClassicalConfig)


# --------------------------------------------------------------------------------------- INPUT
@dataclass
class AugmentationConfig:
    # Random horizontal/vertical flips and 90-degree rotations (cells have no orientation).
    FLIP: bool = True
    ROT90: bool = True
    # Random scale factor range; [1.0, 1.0] disables scale jitter.
    SCALE_RANGE: List[float] = field(default_factory=lambda: [0.8, 1.25])
    # Probability of elastic deformation as in the U-Net paper (Ronneberger et al. 2015):
    # random displacements on a coarse ELASTIC_GRID x ELASTIC_GRID grid, Gaussian with std
    # ELASTIC_STD px, upsampled bicubically to every pixel (detector.data.transforms.ElasticGrid).
    ELASTIC_PROB: float = 0.0
    ELASTIC_GRID: int = 3
    ELASTIC_STD: float = 10.0
    # Brightness/contrast/saturation/hue jitter amounts (torchvision ColorJitter); 0 = off.
    COLOR_JITTER: List[float] = field(default_factory=lambda: [0.2, 0.2, 0.2, 0.02])
    # H&E stain jitter (per-stain scale/shift in optical density space); 0 = off.
    STAIN_JITTER: float = 0.05


@dataclass
class InputConfig:
    # Side (px) of the random crops that training images are cut to (larger images are
    # cropped, never resized down); smaller images are padded.
    CROP_SIZE: int = 256
    # Where training crops are placed. A CROP_OBJECT_FRACTION of them is centred on an
    # annotated object drawn at random (objects of DATASETS.NEGATIVE_CATEGORIES included), the
    # centre moved by up to CROP_JITTER x the crop side; the rest are placed at random. For
    # large fields with a few figures each (MIDOG: ~7000 x 5000 px), uniform crops would almost
    # never hold one. Random crops are redrawn (up to 10 times) until at least CROP_MIN_TISSUE
    # of the crop is tissue (not white glass or black padding); 0 = any place.
    CROP_OBJECT_FRACTION: float = 0.0
    CROP_JITTER: float = 0.25
    CROP_MIN_TISSUE: float = 0.0
    # Resize policy: images are used at native resolution unless SCALE != 1.0
    # (e.g. 2.0 to upsample very small nuclei). No upscaling to 800 px as for COCO.
    SCALE: float = 1.0
    # Microns per pixel the model is trained at; null = taken from the data when known.
    MPP: Optional[float] = None
    # Size normalisation (nuclei models of many experiments): > 0 resamples every training
    # image so that its median nucleus (equivalent diameter of the annotated areas) is this
    # many px across, and at inference finds each image's (or slide's) scale from a first
    # pass of the model itself (detector/inference/size.py). 0 = images at their own scale.
    NUCLEUS_DIAMETER: float = 0.0
    # Modality normalisation: invert images with a bright background (brightfield, H&E) so
    # that nuclei are bright on dark in every modality, as in fluorescence
    # (detector/modeling/modality.py).
    INVERT_BRIGHT_BACKGROUND: bool = False
    # Modality normalisation: every image replaced by its grey (mean of R, G, B) in all three
    # channels, before the inversion, so colour does not tell modalities apart either.
    GREY: bool = False
    # Modality normalisation: an image with a dark background (fluorescence) replaced by its
    # brightest channel in all three, so that a stain shown in colour (DAPI as blue) looks
    # like grey fluorescence. Changes nothing on grey fluorescence (all of DSB2018's), so a
    # model trained without it may be exported with it (train_net.py --export).
    GREY_FLUORESCENCE: bool = False
    AUG: AugmentationConfig = field(default_factory=AugmentationConfig)


# ------------------------------------------------------------------------------------ DATASETS
@dataclass
class DatasetsConfig:
    # COCO instance files (each names its image root in info.image_root).
    TRAIN: List[str] = field(default_factory=list)
    TEST: List[str] = field(default_factory=list)
    # Relative sampling weight of each TRAIN file's images (one number per file; empty = all
    # 1): e.g. [1, 20] draws an image of the second file 20x as often as one of the first,
    # for a small set (13 H&E tiles) beside a large one (500 DSB2018 images).
    TRAIN_WEIGHTS: List[float] = field(default_factory=list)
    # Categories whose objects are never predicted: they centre negative training crops (hard
    # negatives such as MIDOG's "not mitotic figure", or nuclei in tissue without figures) and
    # are the "look-alike" class of the patch classifier. A file whose annotations are all of
    # these categories (or that has none: plain negatives) may have any category list.
    NEGATIVE_CATEGORIES: List[str] = field(default_factory=list)


@dataclass
class DataloaderConfig:
    # Worker processes that read and augment images while the model trains.
    NUM_WORKERS: int = 2
    # Drop training images without instances; by default they are kept and train as
    # negatives (fields without nuclei, tissue without mitoses).
    FILTER_EMPTY: bool = False
    # Fraction of the training samples drawn from negative images (no object of a predicted
    # class: tissue without figures); the rest from the others. 0 = every image equally often.
    NEGATIVE_FRACTION: float = 0.0
    # Patch classifier: the share of the negative samples drawn from hard negatives (objects
    # of the categories "look-alike", the detector's mined false positives, and "not mitotic
    # figure", MIDOG's imposters); the rest from the other negatives (random nuclei).
    # 0 = every negative object equally often.
    HARD_NEGATIVE_FRACTION: float = 0.0


# -------------------------------------------------------------------------------------- SOLVER
@dataclass
class AMPConfig:
    # Mixed precision on CUDA (ignored on CPU).
    ENABLED: bool = True
    # "bf16" or "fp16" (fp16 uses a gradient scaler).
    DTYPE: str = "bf16"


@dataclass
class ClipConfig:
    ENABLED: bool = True
    # Maximum total gradient norm.
    MAX_NORM: float = 10.0


@dataclass
class SolverConfig:
    # "SGD" or "AdamW".
    OPTIMIZER: str = "SGD"
    BASE_LR: float = 0.01
    MOMENTUM: float = 0.9
    WEIGHT_DECAY: float = 1e-4
    # Images per step over all processes (divided among GPUs / ranks).
    IMS_PER_BATCH: int = 4
    MAX_ITER: int = 20000
    # "step" (multiply by GAMMA at each of STEPS) or "cosine" (down to 0 at MAX_ITER).
    LR_SCHEDULER: str = "cosine"
    STEPS: List[int] = field(default_factory=lambda: [15000, 18000])
    GAMMA: float = 0.1
    # Linear warm-up from WARMUP_FACTOR * BASE_LR over WARMUP_ITERS iterations.
    WARMUP_ITERS: int = 500
    WARMUP_FACTOR: float = 0.001
    CLIP_GRADIENTS: ClipConfig = field(default_factory=ClipConfig)
    AMP: AMPConfig = field(default_factory=AMPConfig)
    # Write model_<iter>.pth every CHECKPOINT_PERIOD iterations (a killed run loses at most
    # one period).
    CHECKPOINT_PERIOD: int = 1000
    # Keep only the newest CHECKPOINTS_KEPT periodic checkpoints model_<iter>.pth (each holds
    # the optimizer state, about 3x the weights); older ones are deleted as new ones are
    # written. model_final.pth, model_best.pth and the checkpoint named in last_checkpoint are
    # never deleted. 0 = keep all.
    CHECKPOINTS_KEPT: int = 3
    # Log losses to console, metrics.json and TensorBoard every LOG_PERIOD iterations.
    LOG_PERIOD: int = 20
    # Stop training after this many minutes (then save model_<iter>.pth and model_final.pth at
    # the iteration reached and evaluate); 0 = no limit. The LR schedule still runs to MAX_ITER
    # (unless SCHEDULE_BY_TIME), and --resume continues from there. For fixed compute budgets
    # (e.g. a 30-minute CPU run).
    TIME_LIMIT_MINUTES: float = 0.0
    # With TIME_LIMIT_MINUTES and the cosine schedule: the schedule's progress is the larger of
    # iteration / MAX_ITER and training time / TIME_LIMIT_MINUTES (time summed over resumed
    # runs), so the learning rate reaches 0 within the budget on however fast a machine. The
    # LR then depends on the machine's speed: a run is reproducible only up to timing.
    SCHEDULE_BY_TIME: bool = False


# ---------------------------------------------------------------------------------------- TEST
@dataclass
class TestAugConfig:
    # Test-time augmentation (detector/inference/predictor.py, predict_tta): the model runs on
    # TRANSFORMS views of every image or tile, 8 (flips and 90-degree rotations: the square
    # grid's symmetries) or 4 (the flips: identity, left-right, up-down, 180 degrees), each
    # turned back and merged: the U-Net averages the probability maps before forming
    # instances; instance models (Mask/Faster R-CNN, the classical baseline) merge the views'
    # detections by mask voting, a detection's score becoming the sum of its views' scores /
    # TRANSFORMS. Costs TRANSFORMS x the model time. Applies to evaluation (training,
    # --eval-only) and, from the checkpoint's config, to infer_tiles.py (also: --tta).
    ENABLED: bool = False
    TRANSFORMS: int = 8


@dataclass
class TestConfig:
    # Evaluate on DATASETS.TEST every EVAL_PERIOD iterations (0 = only at the end); the
    # checkpoint with the best TEST.BEST_METRIC is kept as model_best.pth.
    EVAL_PERIOD: int = 2000
    BEST_METRIC: str = "f1"
    # maxDets for COCO AP (dense nuclei need far more than COCO's 100).
    MAX_DETS: int = 1000
    # IoU threshold for object-level precision/recall/F1.
    IOU_THRESH: float = 0.5
    # Score threshold applied before object-level matching (AP uses all detections).
    SCORE_THRESH: float = 0.5
    AUG: TestAugConfig = field(default_factory=TestAugConfig)


@dataclass
class Config:
    MODEL: ModelConfig = field(default_factory=ModelConfig)
    INPUT: InputConfig = field(default_factory=InputConfig)
    DATASETS: DatasetsConfig = field(default_factory=DatasetsConfig)
    DATALOADER: DataloaderConfig = field(default_factory=DataloaderConfig)
    SOLVER: SolverConfig = field(default_factory=SolverConfig)
    TEST: TestConfig = field(default_factory=TestConfig)
    # Where checkpoints, logs and metrics are written.
    OUTPUT_DIR: str = "output"
    # Random seed (data split order, augmentation, initialisation); -1 = random.
    SEED: int = 42
    # Allowed values checked after merging (see detector.config.config.CHOICES).
