#!/usr/bin/env bash
# The nuclei data of docs/results/reproduce_nuclei.sh (its step 1), for every script that trains
# or evaluates on it:
# - DSB2018 stage1_train split by experiment (--experiments auto: groups from modality, image
#   size and colour; train/val/test 0.8/0.1/0.1, seed 0) -> dsb_{train,val,test}.json;
# - the 13 labelled MoNuSeg training tiles (H&E, 40x, one patient each) split by slide, seed 0:
#   10 for training (monuseg_fit.json) and 3 held out as the 40x H&E validation
#   (monuseg_val.json: TCGA-50-5931, TCGA-AR-A1AK, TCGA-E2-A1B5), which the DSB2018 validation
#   does not hold; all 13 in monuseg_train.json (the recipe up to the ninth session);
# - val.json: dsb_val + monuseg_val, the validation every choice is made on;
# - the 4 ../shared/data/monuseg tiles only for the test (monuseg_test.json);
# - the 17 semantic-only MoNuSeg training tiles with pseudo-instances (monuseg_pseudo.json).
#   bash docs/results/nuclei_data.sh OUT   -> OUT/data/{dsb_*,monuseg_{fit,val,train,test,pseudo},val}.json
# A file that exists is not made again. A model already in OUT that was trained on all 13 tiles
# (monuseg_train.json: OUT folders of the ninth session and before) has seen the validation
# tiles: the script stops, and with it every script that calls it, rather than evaluate it.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-output/nuclei}
SHARED=${SHARED:-../shared/data}
PY=${PYTHON:-.venv/bin/python}
D=$OUT/data
mkdir -p "$D"
for c in "$OUT"/*/config.yaml; do
    ! grep -qs monuseg_train.json "$c" || {
        echo "${c%/config.yaml} was trained on all 13 MoNuSeg tiles, the validation tiles among them: use a new OUT" >&2
        exit 2; }
done
conv() { "$PY" tools/convert_to_coco.py --quiet "$@" | grep -E "^wrote|^skipped|groups" || true; }
[ -f "$D/dsb_test.json" ] || conv --format dsb --input "$SHARED/dsb2018/stage1_train" \
    --output "$D/dsb.json" --split train=0.8,val=0.1,test=0.1 --experiments auto --seed 0
[ -f "$D/monuseg_train.json" ] || conv --format xml --input "$SHARED/monuseg_train/labelled" \
    --categories nucleus --modality he --output "$D/monuseg_train.json"
[ -f "$D/monuseg_val.json" ] || conv --format coco --input "$D/monuseg_train.json" \
    --output "$D/monuseg.json" --split fit=0.77,val=0.23 --seed 0
[ -f "$D/val.json" ] || conv --format coco --input "$D/dsb_val.json" "$D/monuseg_val.json" \
    --output "$D/val.json"
[ -f "$D/monuseg_test.json" ] || conv --format xml --input "$SHARED/monuseg" \
    --categories nucleus --modality he --output "$D/monuseg_test.json"
# the 17 semantic-only MoNuSeg training tiles, their masks split into pseudo-instances
# (configs/nuclei/mask_rcnn_R_18_FPN_mixed_pseudo_cpu.yaml)
[ -f "$D/monuseg_pseudo.json" ] || { "$PY" docs/results/monuseg_pseudo_instances.py \
    "$SHARED/monuseg_train/unlabelled" "$D/monuseg_pseudo" | tail -1
    conv --format labels --input "$D/monuseg_pseudo" --modality he --mpp 0.2527 \
        --output "$D/monuseg_pseudo.json"; }
