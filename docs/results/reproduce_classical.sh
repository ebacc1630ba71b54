#!/usr/bin/env bash
# Reproduce the README's figures of the classical baseline (Otsu threshold + distance-transform
# watershed, configs/nuclei/classical*.yaml): nothing is trained, a few minutes on 2 CPU cores.
#
#   bash docs/results/reproduce_classical.sh [OUT]        (default OUT=output/classical)
#
# 1. data: DSB2018 stage1_train split by experiment (--experiments auto, train/val/test
#    0.8/0.1/0.1, seed 0); MoNuSeg training tiles (13 labelled) and test tiles (4), modality
#    stored for per-modality evaluation.
# 2. classical.yaml: checkpoint + evaluation on the DSB2018 validation and test splits;
#    classical_he.yaml: checkpoint + evaluation on the MoNuSeg training and test tiles.
# 3. evaluate.py on each: F1@0.5, DSB score, AJI, PQ overall and per modality, 95% bootstrap CIs
#    -> OUT/eval_<set>/metrics.json and report.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-output/classical}
SHARED=${SHARED:-../shared/data}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
D=$OUT/data
mkdir -p "$D"
say() { echo "[$(date +%H:%M:%S)] $*"; }
conv() { "$PY" tools/convert_to_coco.py --quiet "$@" | grep -E "^wrote|^note: (modality|[0-9]+ exp)" ; }

say "1. data -> $D"
[ -f "$D/dsb_test.json" ] || conv --format dsb --input "$SHARED/dsb2018/stage1_train" \
    --output "$D/dsb.json" --split train=0.8,val=0.1,test=0.1 --seed 0 --experiments auto
[ -f "$D/monuseg_train.json" ] || conv --format xml --input "$SHARED/monuseg_train/labelled" \
    --output "$D/monuseg_train.json" --modality auto
[ -f "$D/monuseg.json" ] || conv --format xml --input "$SHARED/monuseg" \
    --output "$D/monuseg.json" --modality auto

say "2. checkpoints and predictions"
run() {  # run NAME CONFIG TRAIN TEST...
    local name=$1 cfg=$2 train=$3; shift 3
    local tests; tests=$(printf '%s,' "$@"); tests="[${tests%,}]"
    [ -f "$OUT/$name/model_final.pth" ] || "$PY" tools/train_net.py --config-file "$cfg" \
        DATASETS.TRAIN "[$train]" DATASETS.TEST "$tests" OUTPUT_DIR "$OUT/$name" MODEL.DEVICE cpu
}
run dsb configs/nuclei/classical.yaml "$D/dsb_train.json" "$D/dsb_val.json" "$D/dsb_test.json"
run he configs/nuclei/classical_he.yaml "$D/monuseg_train.json" "$D/monuseg_train.json" \
    "$D/monuseg.json"

say "3. evaluation (per modality, 95% bootstrap CIs)"
ev() {  # ev SET RUN
    "$PY" tools/evaluate.py --gt "$D/$1.json" --pred "$OUT/$2/predictions_$1.json" \
        --names "classical" --out "$OUT/eval_$1" --examples 1
}
ev dsb_val dsb
ev dsb_test dsb
ev monuseg_train he
ev monuseg he
say "done: $OUT/eval_*/report.md"
