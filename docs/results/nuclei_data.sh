#!/usr/bin/env bash
# The nuclei data of docs/results/reproduce_nuclei.sh (its step 1), for every script that trains
# or evaluates on it: DSB2018 stage1_train split by experiment (--experiments auto: groups from
# modality, image size and colour; train/val/test 0.8/0.1/0.1, seed 0), the 13 labelled MoNuSeg
# training tiles (H&E) for training, the 4 ../shared/data/monuseg tiles only for the test.
#   bash docs/results/nuclei_data.sh OUT      -> OUT/data/{dsb_*,monuseg_train,monuseg_test}.json
# A file that exists is not made again.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-output/nuclei}
SHARED=${SHARED:-../shared/data}
PY=${PYTHON:-.venv/bin/python}
D=$OUT/data
mkdir -p "$D"
conv() { "$PY" tools/convert_to_coco.py --quiet "$@" | grep -E "^wrote|^skipped|groups" || true; }
[ -f "$D/dsb_test.json" ] || conv --format dsb --input "$SHARED/dsb2018/stage1_train" \
    --output "$D/dsb.json" --split train=0.8,val=0.1,test=0.1 --experiments auto --seed 0
[ -f "$D/monuseg_train.json" ] || conv --format xml --input "$SHARED/monuseg_train/labelled" \
    --categories nucleus --modality he --output "$D/monuseg_train.json"
[ -f "$D/monuseg_test.json" ] || conv --format xml --input "$SHARED/monuseg" \
    --categories nucleus --modality he --output "$D/monuseg_test.json"
