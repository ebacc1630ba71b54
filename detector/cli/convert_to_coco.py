"""``tools/convert_to_coco.py``: convert annotations (DSB folders, label images, ImageScope XML,
point CSV, AMi-Br crops, COCO files) to COCO instance files, optionally split by slide/patient.

Examples::

    python tools/convert_to_coco.py --format dsb --input ../shared/data/dsb2018/stage1_train \\
        --output output/data/dsb.json --split train=0.8,val=0.1,test=0.1 --seed 0
    python tools/convert_to_coco.py --format dsb --input ../shared/data/dsb2018/stage1_train \\
        --output output/data/dsb.json --split train=0.8,val=0.1,test=0.1 --experiments auto
    python tools/convert_to_coco.py --format xml --input ../shared/data/monuseg \\
        --output output/data/monuseg.json
    python tools/convert_to_coco.py --format amibr --input ../shared/data/amibr \\
        --label-mode phase --output output/data/amibr_phase.json --split train=0.8,val=0.1,test=0.1
    python tools/convert_to_coco.py --format points --input points.csv --images slides/ \\
        --mpp 0.25 --output mitoses.json --folds 5

Exit status: 0 on success, 2 on bad input (one line naming the file and the fix) or when
nothing could be converted.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..data.coco import save_coco_files
from ..data.converters import FORMATS, remap_categories, summary_text, to_polygon_format
from ..data.converters.common import (Conversion, ConversionError, copy_images,
                                      parse_category_spec, to_rle_format)
from ..errors import DetectorError, report
from ..data.splits import image_groups, kfold_groups, parse_fractions, split_coco, split_groups
from ..data.experiments import DEFAULT_DISTANCE, MODALITIES, annotate_images
from ..data.converters.amibr import convert_amibr
from ..data.converters.coco_files import convert_coco
from ..data.converters.dsb import convert_dsb
from ..data.converters.imagescope import convert_xml
from ..data.converters.labels import convert_labels
from ..data.converters.points import convert_points


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_to_coco.py",
        description="Convert cell/nucleus/mitosis annotations to COCO instance files "
                    "(pycocotools-loadable; file_name relative to info.image_root).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="formats:\n"
               "  dsb     DSB2018 folders <id>/images/<id>.png + <id>/masks/*.png\n"
               "  labels  instance label images (0 = background) paired with images by name;\n"
               "          --classes DIR adds class maps (majority class per instance), e.g.\n"
               "          --classes set/classes --categories '1=nucleus,2=mitotic figure'\n"
               "  xml     Aperio ImageScope / MoNuSeg XML polygons next to their images\n"
               "  points  CSV points x,y[,label][,slide] -> boxes of --box-size-um\n"
               "  amibr   AMi-Br mitotic figure crops (AMI-BR.csv + patches/)\n"
               "  images  a folder of images without annotations (negatives: tissue without\n"
               "          figures); --categories lists the positive set's category names\n"
               "  coco    existing COCO file(s): merge, re-split, remap categories\n")
    p.add_argument("--format", required=True, choices=FORMATS, help="input annotation format")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="input folder or file (several COCO files with --format coco)")
    p.add_argument("--output", required=True, metavar="OUT.json",
                   help="output COCO file; with --split/--folds, OUT_<split>.json / "
                        "OUT_fold<i>_<train|val>.json")
    p.add_argument("--mask-format", default=None, choices=("rle", "polygon"),
                   help="segmentation encoding: RLE (default, exact) or polygons along the pixel "
                        "corners (rasterise back to the same pixels, holes aside); --format "
                        "coco keeps the input's encoding unless this is given")
    p.add_argument("--categories", metavar="SPEC",
                   help="name/map classes: NAME (rename a one-class set), or SOURCE=NAME pairs "
                        "separated by commas; NAME '-' drops SOURCE; names listed first get "
                        "the lowest ids")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--split", metavar="NAME=FRAC,...",
                   help="e.g. train=0.8,val=0.1,test=0.1; grouped by experiment "
                        "(--experiments), else slide/patient (by image when the format knows "
                        "none)")
    g.add_argument("--folds", type=int, metavar="K",
                   help="K-fold cross-validation files, grouped like --split")
    p.add_argument("--seed", type=int, default=0, help="seed of --split/--folds (default 0)")
    p.add_argument("--experiments", metavar="auto|GROUPS.csv",
                   help="group images by experiment (stored as each image's 'group', used by "
                        "--split/--folds instead of slide/image): 'auto' clusters them by "
                        "modality, size and colour statistics; or a CSV image,group[,modality] "
                        "(image: file name, base name, stem or DSB sample id). Also sets "
                        "each image's 'modality'")
    p.add_argument("--experiment-distance", type=float, default=DEFAULT_DISTANCE,
                   metavar="D", help="--experiments auto: cut of the colour-statistics "
                                     "clustering; larger merges more (default %(default)s)")
    p.add_argument("--modality", choices=("auto",) + MODALITIES,
                   help="store each image's imaging modality (fluorescence, brightfield, he) "
                        "for per-modality evaluation: detected ('auto', the default with "
                        "--experiments) or the one given for every image")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip corrupt/unreadable images and annotation files, list them at the "
                        "end (exit non-zero only if nothing was converted)")
    p.add_argument("--copy-images", action="store_true",
                   help="copy the images next to the output (OUT_images/) instead of "
                        "referencing them where they are")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes for image reading (default: up to 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    f = p.add_argument_group("format options")
    f.add_argument("--images", metavar="DIR",
                   help="labels/xml/points: folder of the images (default: next to the input)")
    f.add_argument("--labels", metavar="DIR",
                   help="labels: folder of the label images (default: <input>/labels or "
                        "<input>/masks)")
    f.add_argument("--classes", metavar="DIR",
                   help="labels: folder of class-map images paired by name (0 background, "
                        "v > 0 a class, as CoNSeP/PanNuke type maps); each instance gets the "
                        "majority class under its pixels, category id v named class_<v> "
                        "(name them with --categories '1=nucleus,2=mitotic figure')")
    f.add_argument("--mpp", type=float, default=None,
                   help="microns per pixel of the images, stored per image (xml: default from "
                        "the XML; amibr: default per MIDOG 2021 scanner; points: required "
                        "unless --box-size-px or whole slides that state it; labels: none)")
    f.add_argument("--box-size-um", type=float, default=12.5,
                   help="points/amibr: side of the box around each point in microns "
                        "(default 12.5 = MIDOG's 50 px at 0.25 um/px)")
    f.add_argument("--box-size-px", type=float, default=None,
                   help="points/amibr: side of the box in pixels (overrides --box-size-um)")
    f.add_argument("--label-mode", default="mitosis", choices=("mitosis", "phase", "atypical"),
                   help="amibr: one class 'mitosis'; 'phase' (prophase-prometaphase, metaphase, "
                        "anaphase-telophase, atypical); or 'atypical' (normal, atypical)")
    return p


def _run_converter(args: argparse.Namespace) -> Conversion:
    progress = not args.quiet
    fmt = args.format
    if fmt != "coco" and len(args.input) != 1:
        raise ConversionError(" ".join(args.input), f"--format {fmt} takes one --input path",
                              "several inputs are only merged with --format coco")
    inp = args.input[0]
    if getattr(args, "classes", None) and fmt != "labels":
        raise ConversionError(args.classes, f"--classes is an option of --format labels, not "
                              f"--format {fmt}", "drop --classes, or use --format labels")
    if fmt == "dsb":
        return convert_dsb(inp, skip_invalid=args.skip_invalid, workers=args.workers,
                           progress=progress)
    if fmt == "labels":
        return convert_labels(inp, labels_dir=args.labels, images_dir=args.images,
                              classes_dir=args.classes, mpp=args.mpp,
                              skip_invalid=args.skip_invalid,
                              workers=args.workers, progress=progress)
    if fmt == "xml":
        return convert_xml(inp, images_dir=args.images, mpp=args.mpp,
                           skip_invalid=args.skip_invalid, progress=progress)
    if fmt == "points":
        return convert_points(inp, images_dir=args.images, mpp=args.mpp,
                              box_size_um=args.box_size_um, box_size_px=args.box_size_px,
                              skip_invalid=args.skip_invalid, progress=progress)
    if fmt == "amibr":
        return convert_amibr(inp, label_mode=args.label_mode, mpp=args.mpp,
                             box_size_um=args.box_size_um, box_size_px=args.box_size_px,
                             skip_invalid=args.skip_invalid)
    if fmt == "images":
        from ..data.converters.images import convert_images

        return convert_images(inp, categories=args.categories, mpp=args.mpp,
                              skip_invalid=args.skip_invalid, progress=progress)
    if fmt == "coco":
        return convert_coco(args.input, skip_invalid=args.skip_invalid)
    raise ConversionError(fmt, "unknown format", f"choose one of {', '.join(FORMATS)}")


def _output_name(output: str, suffix: str) -> str:
    stem, ext = os.path.splitext(output)
    return f"{stem}_{suffix}{ext or '.json'}"


def convert(args: argparse.Namespace) -> Tuple[Conversion, List[Tuple[str, Dict[str, Any]]]]:
    """Run the whole conversion for parsed arguments; returns the conversion and the
    ``(path, coco)`` files written."""
    fractions = None
    if args.split:
        try:
            fractions = parse_fractions(args.split)
        except ValueError as e:
            raise ConversionError("", str(e)) from None
    if args.categories:
        try:
            parse_category_spec(args.categories)  # syntax now; names once the data is read
        except ValueError as e:
            raise ConversionError("", str(e)) from None
    if args.folds is not None and args.folds < 2:
        raise ConversionError("--folds", f"{args.folds} folds", "k-fold needs --folds 2 or more")
    if not args.output.lower().endswith(".json"):
        raise ConversionError(args.output, "the output must be a .json file",
                              "e.g. --output output/data/dsb.json")

    conv = _run_converter(args)
    coco = conv.coco
    if not coco["images"]:
        where = ", ".join(args.input)
        for path, reason in conv.skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        raise ConversionError(where, "nothing was converted (no valid image"
                              + (f"; {len(conv.skipped)} skipped, listed above)" if conv.skipped
                                 else ")"), "check the input path and --format")
    try:  # --format images takes --categories as its category list, already applied
        dropped = remap_categories(coco, None if args.format == "images" else args.categories)
    except ValueError as e:
        raise ConversionError("", str(e)) from None
    for name, n in dropped.items():
        conv.notes.append(f"dropped {n} instance(s) of class {name!r} (--categories)")
    mask_format = args.mask_format or ("keep" if args.format == "coco" else "rle")
    if mask_format == "polygon":
        to_polygon_format(coco)
    elif mask_format == "rle" and args.format == "coco":
        to_rle_format(coco)
    for i, a in enumerate(coco["annotations"], 1):
        a["id"] = i
    info = coco["info"]
    info["format"] = args.format
    info["input"] = [os.path.abspath(p) for p in args.input]
    info["mask_format"] = mask_format if mask_format != "keep" else \
        (info.get("mask_format") or "as input")
    info["date_created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")
    if args.copy_images:
        stem = os.path.splitext(os.path.basename(args.output))[0]
        dest_rel = f"{stem}_images"
        copy_images(coco, os.path.join(os.path.dirname(os.path.abspath(args.output)), dest_rel),
                    dest_rel)

    if args.experiments or args.modality:
        from ..data.converters.common import default_workers

        per_group = annotate_images(
            coco, args.experiments, args.modality, args.experiment_distance,
            default_workers() if args.workers is None else args.workers, not args.quiet)
        mods: Dict[str, int] = {}
        for im in coco["images"]:
            mods[im["modality"]] = mods.get(im["modality"], 0) + 1
        conv.notes.append("modality: " + ", ".join(f"{n} {m}" for m, n in sorted(mods.items())))
        if per_group:
            sizes = sorted(per_group.values())
            conv.notes.append(f"{len(per_group)} experiment groups ("
                              + ("clustered, " if args.experiments == "auto" else
                                 f"from {args.experiments}, ")
                              + f"{sizes[0]} to {sizes[-1]} images each); splits keep each "
                              "group whole")
        info["experiments"] = args.experiments
        if args.experiments == "auto":
            info["experiment_distance"] = args.experiment_distance

    outputs: List[Tuple[str, Dict[str, Any]]] = []
    groups = image_groups(coco)
    if fractions:
        parts = split_groups(groups, fractions, args.seed)
        for name, gs in parts.items():
            sub = split_coco(coco, gs)
            sub["info"].update(split=name, split_spec=args.split, seed=args.seed)
            outputs.append((_output_name(args.output, name), sub))
    elif args.folds:
        try:
            folds = kfold_groups(groups, args.folds, args.seed)
        except ValueError as e:
            raise ConversionError("", str(e)) from None
        for i, fold in enumerate(folds):
            for name in ("train", "val"):
                sub = split_coco(coco, fold[name])
                sub["info"].update(split=name, fold=i, folds=args.folds, seed=args.seed)
                outputs.append((_output_name(args.output, f"fold{i}_{name}"), sub))
    else:
        outputs.append((args.output, coco))
    save_coco_files(outputs)  # all split files or none
    return conv, outputs


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        conv, outputs = convert(args)
    except DetectorError as e:  # ConversionError, CocoFormatError, ImageReadError, ...
        return report(e)
    except OSError as e:  # disk full, permission denied on the output...
        print(f"error: {getattr(e, 'filename', '') or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(summary_text(conv, outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
