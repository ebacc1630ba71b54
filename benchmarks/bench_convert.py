"""Time of the DSB2018 conversion (``--format dsb``) on ../shared/data/dsb2018/stage1_train
(664 images, 28,986 masks) against a naive converter measured in the same run.

    .venv/bin/python benchmarks/bench_convert.py [--baseline-images 100] [--workers 2]

Rows:
- naive (1 process): what one writes first: every image and mask through PIL (``read_array``),
  one ``pycocotools`` encode per mask (``detector.data.coco.mask_annotation``). Run on the first
  ``--baseline-images`` samples (the whole set takes minutes) and extrapolated per image.
- ours, 1 process / ``--workers`` processes: ``convert_dsb``: OpenCV PNG decoding (still refusing
  truncated files), masks copied into one Fortran stack with SIMD transposes and encoded per
  chunk in one pycocotools call, areas counted by OpenCV.
  First on the same subset (the like-for-like ratio), then on the whole set (the < 60 s target).

Both must give the same annotations on the subset (checked). The machine is shared: the load
average is printed with the table, and the CPU seconds (user + system, workers included) say
what the work costs whatever else runs; compare only rows of one run.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from detector.data.coco import mask_annotation  # noqa: E402
from detector.data.converters.dsb import convert_dsb, find_samples  # noqa: E402
from detector.data.image_io import read_array  # noqa: E402

DATA = os.environ.get("DETECTOR_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))


def naive_convert(root: str, names) -> list:
    """Baseline: PIL for every file, one encode per mask, single process."""
    anns = []
    for i, name in enumerate(names, 1):
        folder = os.path.join(root, name)
        img = os.path.join(folder, "images", sorted(os.listdir(os.path.join(folder, "images")))[0])
        read_array(img)
        for mf in sorted(os.listdir(os.path.join(folder, "masks"))):
            m = read_array(os.path.join(folder, "masks", mf))
            if m.ndim == 3:
                m = m[..., 0]
            a = mask_annotation(m > 0, i, 1)
            if a is not None:
                anns.append(a)
    return anns


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the worker processes):
    what the work costs, whatever else the shared machine runs."""
    t = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        t += r.ru_utime + r.ru_stime
    return t


def subset_root(root: str, names, dest: str) -> str:
    """A folder of symlinks to the first samples, so that convert_dsb sees only those."""
    os.makedirs(dest, exist_ok=True)
    for n in names:
        link = os.path.join(dest, n)
        if not os.path.exists(link):
            os.symlink(os.path.join(root, n), link)
    return dest


def main() -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.path.join(DATA, "dsb2018", "stage1_train"))
    ap.add_argument("--baseline-images", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if not os.path.isdir(args.root):
        print(f"{args.root} is absent (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    names = find_samples(args.root)
    sub = names[: args.baseline_images]
    rows = []

    t, c = time.perf_counter(), cpu_seconds()
    base = naive_convert(args.root, sub)
    t_naive = time.perf_counter() - t
    rows.append(("naive, 1 process", len(sub), len(base), t_naive, cpu_seconds() - c))

    with tempfile.TemporaryDirectory() as tmp:
        sroot = subset_root(args.root, sub, os.path.join(tmp, "subset"))
        t, c = time.perf_counter(), cpu_seconds()
        ours = convert_dsb(sroot, workers=1, progress=False).coco
        t1 = time.perf_counter() - t
        c1 = cpu_seconds() - c
    same = len(ours["annotations"]) == len(base) and all(
        a["segmentation"] == b["segmentation"] and a["bbox"] == b["bbox"] and a["area"] == b["area"]
        for a, b in zip(ours["annotations"], base))
    rows.append(("ours, 1 process", len(sub), len(ours["annotations"]), t1, c1))

    t, c = time.perf_counter(), cpu_seconds()
    full = convert_dsb(args.root, workers=args.workers, progress=True).coco
    tf = time.perf_counter() - t
    rows.append((f"ours, {args.workers} processes, whole set", len(full["images"]),
                 len(full["annotations"]), tf, cpu_seconds() - c))

    naive_per_img = t_naive / max(1, len(sub))
    print(f"\nDSB2018 stage1_train -> COCO RLE   (cpus: {os.cpu_count()}, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())})")
    print(f"{'method':<36}{'images':>8}{'masks':>8}{'wall s':>9}{'cpu s':>8}{'img/s':>8}"
          f"{'speed-up vs naive (wall)':>26}")
    for name, n_img, n_ann, sec, cpu in rows:
        ratio = naive_per_img / (sec / max(1, n_img))
        print(f"{name:<36}{n_img:>8}{n_ann:>8}{sec:>9.1f}{cpu:>8.1f}{n_img / sec:>8.1f}"
              f"{ratio:>25.1f}x")
    print(f"naive extrapolated to {len(names)} images: {naive_per_img * len(names):.0f} s; "
          f"identical annotations on the subset: {same}")
    print(f"target: whole set under 60 s -> {'met' if tf < 60 else 'NOT met'} ({tf:.1f} s)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
