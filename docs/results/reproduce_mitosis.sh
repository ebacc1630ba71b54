#!/usr/bin/env bash
# Reproduce the README's mitosis results: the two-stage mitotic-figure counter on 2 CPU cores.
#
#   bash docs/results/reproduce_mitosis.sh [OUT]        (default OUT=output/mitosis)
#
# Steps (each skipped when its output exists, so a killed run goes on where it stopped):
#   1. data: AMi-Br figure crops split by slide (train/val/test 0.8/0.1/0.1, seed 0), as one class
#      and as phases; MoNuSeg training tiles (TCGA H&E, no figure annotated) as tissue without
#      figures: 9 labelled tiles (with their nuclei) for training, 4 for validation (split by
#      patient), the 17 unlabelled ones for training. The 4 ../shared/data/monuseg tiles are
#      never used before step 6.
#   2. stage 1, the detector: configs/mitosis/faster_rcnn_R_18_FPN_tissue_cpu.yaml (20 min cap).
#   3. one round of hard-negative mining: the detector's detections (score >= MINE_SCORE, the
#      candidate threshold) on the training tissue and away from the figures of the training
#      crops become "look-alike" objects. Besides, the ordinary nuclei of the training crops
#      (found by the classical H&E nucleus model, configs/nuclei/classical_he.yaml, farther than
#      10 um from every figure) become "nucleus" negatives: without them every negative but a
#      few dozen comes from the MoNuSeg (TCGA) slides and every figure from the MIDOG scanners,
#      and the classifier can tell the two apart by scanner and stain instead of by morphology.
#   4. stage 2, the patch classifier: configs/mitosis/patch_classifier_cpu.yaml (25 min cap).
#   5. the bundle OUT/mitosis.pth: thresholds chosen on validation (recall on the AMi-Br val
#      crops, at most MAX_FP false positives per mm² on the 4 validation tiles).
#   6. evaluation: train_net.py --eval-only on the AMi-Br test crops, and
#      benchmarks/bench_mitosis.py (test crops before/after stage 2, detections per mm² on the 4
#      MoNuSeg tiles through infer_tiles.py, phase accuracy) -> OUT/results/.
# OUT/mitosis.pth is what `tools/infer_tiles.py --weights` takes.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-output/mitosis}
SHARED=${SHARED:-../shared/data}
PY=${PYTHON:-.venv/bin/python}
# the goal's bound: at most 5 false positives per mm² (on the validation tissue)
MAX_FP=${MAX_FP:-5.0}
# mining keeps every detection the bundle will hand to stage 2 (its candidate threshold)
MINE_SCORE=${MINE_SCORE:-0.05}
# torch threads per process: the cores (2 here); on a machine shared with other jobs set it to
# cores / jobs (e.g. OMP_NUM_THREADS=1), or every job slows down several times over
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
D=$OUT/data
mkdir -p "$D"
start=$(date +%s)
say() { echo "[$(date +%H:%M:%S)] $*"; }

say "1. data -> $D"
conv() { "$PY" tools/convert_to_coco.py --quiet "$@" | grep -E "^wrote|^skipped" ; }
[ -f "$D/amibr_mitosis_test.json" ] || conv --format amibr --input "$SHARED/amibr" \
    --label-mode mitosis --categories "mitotic figure" --output "$D/amibr_mitosis.json" \
    --split train=0.8,val=0.1,test=0.1 --seed 0
[ -f "$D/amibr_phase_test.json" ] || conv --format amibr --input "$SHARED/amibr" \
    --label-mode phase --output "$D/amibr_phase.json" --split train=0.8,val=0.1,test=0.1 --seed 0
[ -f "$D/monuseg_nuclei_val.json" ] || conv --format xml --input "$SHARED/monuseg_train/labelled" \
    --categories nucleus --output "$D/monuseg_nuclei.json" --split train=0.7,val=0.3 --seed 0
# the MoNuSeg training tiles are 0.2527 um/px (the labelled tiles' XML says so; PNGs carry none)
[ -f "$D/monuseg_tiles_val.json" ] || conv --format images --input "$SHARED/monuseg_train/labelled" \
    --categories "mitotic figure" --mpp 0.2527 --output "$D/monuseg_tiles.json" \
    --split train=0.7,val=0.3 --seed 0
[ -f "$D/monuseg_unlabelled.json" ] || conv --format images \
    --input "$SHARED/monuseg_train/unlabelled" --categories "mitotic figure" --mpp 0.2527 \
    --output "$D/monuseg_unlabelled.json"
[ -f "$D/classifier_val.json" ] || conv --format coco --input "$D/amibr_phase_val.json" \
    "$D/monuseg_nuclei_val.json" --output "$D/classifier_val.json" \
    --categories "prophase-prometaphase,metaphase,anaphase-telophase,atypical,nucleus"

# the classical H&E nucleus model (nothing to learn: the checkpoint holds its config)
[ -f "$OUT/nuclei_classical/model_final.pth" ] || "$PY" tools/train_net.py \
    --config-file configs/nuclei/classical_he.yaml DATASETS.TRAIN "[$D/monuseg_nuclei_train.json]" \
    DATASETS.TEST "[]" OUTPUT_DIR "$OUT/nuclei_classical" MODEL.DEVICE cpu > /dev/null

say "2. stage 1: detector -> $OUT/detector"
t0=$(date +%s)
[ -f "$OUT/detector/model_final.pth" ] || "$PY" tools/train_net.py --resume \
    --config-file configs/mitosis/faster_rcnn_R_18_FPN_tissue_cpu.yaml \
    DATASETS.TRAIN "[$D/amibr_mitosis_train.json, $D/monuseg_nuclei_train.json, $D/monuseg_unlabelled.json]" \
    DATASETS.TEST "[$D/amibr_mitosis_val.json]" OUTPUT_DIR "$OUT/detector"
t_det=$(( $(date +%s) - t0 ))

say "3. hard-negative mining"
for src in monuseg_unlabelled monuseg_tiles_train amibr_mitosis_train; do
    [ -f "$D/mined_$src.json" ] || "$PY" tools/mitosis_stage2.py mine \
        --weights "$OUT/detector/model_final.pth" --input "$D/$src.json" --output "$D/mined_$src.json" \
        --score-thresh "$MINE_SCORE"
done
[ -f "$D/nuclei_amibr_mitosis_train.json" ] || "$PY" tools/mitosis_stage2.py mine \
    --weights "$OUT/nuclei_classical/model_final.pth" --input "$D/amibr_mitosis_train.json" \
    --output "$D/nuclei_amibr_mitosis_train.json" --score-thresh 0 --category nucleus --exclude-um 10

say "4. stage 2: patch classifier -> $OUT/classifier"
t0=$(date +%s)
[ -f "$OUT/classifier/model_final.pth" ] || "$PY" tools/train_net.py --resume \
    --config-file configs/mitosis/patch_classifier_cpu.yaml \
    DATASETS.TRAIN "[$D/amibr_phase_train.json, $D/monuseg_nuclei_train.json, $D/mined_monuseg_unlabelled.json, $D/mined_monuseg_tiles_train.json, $D/mined_amibr_mitosis_train.json, $D/nuclei_amibr_mitosis_train.json]" \
    DATASETS.TEST "[$D/classifier_val.json]" OUTPUT_DIR "$OUT/classifier"
t_cls=$(( $(date +%s) - t0 ))

say "5. bundle -> $OUT/mitosis.pth"
[ -f "$OUT/mitosis.pth" ] || "$PY" tools/mitosis_stage2.py bundle \
    --detector "$OUT/detector/model_final.pth" --classifier "$OUT/classifier/model_final.pth" \
    --val-positives "$D/amibr_mitosis_val.json" --val-negatives "$D/monuseg_tiles_val.json" \
    --max-fp-per-mm2 "$MAX_FP" --output "$OUT/mitosis.pth" > "$OUT/bundle.json"

say "6. evaluation -> $OUT/results"
"$PY" tools/train_net.py --config-file configs/mitosis/faster_rcnn_R_18_FPN_tissue_cpu.yaml --eval-only \
    MODEL.WEIGHTS "$OUT/mitosis.pth" DATASETS.TEST "[$D/amibr_mitosis_test.json, $D/amibr_phase_test.json]" \
    OUTPUT_DIR "$OUT/eval"
"$PY" benchmarks/bench_mitosis.py --weights "$OUT/mitosis.pth" --test "$D/amibr_mitosis_test.json" \
    --phase-test "$D/amibr_phase_test.json" --monuseg "$SHARED/monuseg" --out "$OUT/results" \
    --train-seconds "$t_det" "$t_cls"
say "done in $(( ($(date +%s) - start) / 60 )) min; results in $OUT/results/results.md"
