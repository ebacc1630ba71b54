#!/usr/bin/env bash
# U-Net boundary widths on the experiment-wise validation split (issue 12, item 5): the
# boundary-band U-Net of configs/nuclei/unet_mixed_cpu.yaml trained with
# MODEL.UNET.BOUNDARY_WIDTH w for each w of WIDTHS, all at once (one torch thread each), for the
# iterations the width-2 run had (SOLVER.MAX_ITER 3038, the third session's three-at-once run,
# so every width gets the same number of updates; the 45-minute cap still applies), then
# predicted on the validation images (OUT/data/val.json: the DSB2018 validation experiments and
# the 3 held-out 40x MoNuSeg tiles, see docs/results/nuclei_data.sh) and evaluated at each
# model's best validation threshold (optimistic alike, as the width-2 / contact comparison in
# docs/results/README.md); the 3 MoNuSeg tiles are also reported alone.
#
#   bash docs/results/nuclei_unseen/unet_widths.sh OUT            (widths 2 4 6 8)
#   WIDTHS="6 8" bash docs/results/nuclei_unseen/unet_widths.sh OUT   (some of them)
#   ITERS=full WIDTHS="2 6" bash docs/results/nuclei_unseen/unet_widths.sh OUT
#       (the config's own budget instead of 3038 iterations: 45 minutes, the LR annealed by time)
#   TEST=1 ...   also predicts the test split and the 4 MoNuSeg tiles and evaluates them at each
#       model's threshold of best validation F1 (reported beside the choice, never used for it)
#
# Widths already trained in OUT are not trained again (so "6 8" first, then "2 4 6 8", trains
# two at a time and evaluates all four together).
# OUT/data: the files of docs/results/nuclei_data.sh (made when missing). Steps are skipped when
# their output exists, so a killed run goes on.
# Results: OUT/results/unet_widths_{val,monuseg_val}{.txt,/} (with TEST=1 also
# unet_widths_{dsb_test,monuseg_test}).
# On an OUT folder with a model trained on all 13 MoNuSeg tiles (the ninth session and before)
# the script stops (nuclei_data.sh checks): that model has seen the validation tiles.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${1:-output/nuclei}
PY=${PYTHON:-.venv/bin/python}
D=$OUT/data
read -r -a widths <<< "${WIDTHS:-2 4 6 8}"
ITERS=${ITERS:-3038}
sets=(val monuseg_val)
[ -z "${TEST:-}" ] || sets+=(dsb_test monuseg_test)
list=$(printf "$OUT/data/%s.json, " "${sets[@]}")
iters=()
[ "$ITERS" = full ] || iters=(SOLVER.MAX_ITER "$ITERS")
say() { echo "[$(date +%H:%M:%S)] $*"; }
bash docs/results/nuclei_data.sh "$OUT"
CFG=configs/nuclei/unet_mixed_cpu.yaml
say "training widths ${widths[*]} at once ($ITERS iterations each)"
pids=()
for w in "${widths[@]}"; do
    n=unet_w$w
    [ -f "$OUT/$n/model_final.pth" ] || OMP_NUM_THREADS=1 "$PY" tools/train_net.py --resume \
        --config-file "$CFG" MODEL.UNET.BOUNDARY_WIDTH "$w" "${iters[@]}" \
        DATASETS.TRAIN "[$D/dsb_train.json, $D/monuseg_fit.json]" DATASETS.TEST "[$D/val.json]" \
        OUTPUT_DIR "$OUT/$n" > "$OUT/$n.train.log" 2>&1 &
    pids+=($!)
done
wait "${pids[@]}"
say "predictions on ${sets[*]}"
names=()
for w in "${widths[@]}"; do
    n=unet_w$w
    [ -f "$OUT/pred/$n/predictions_${sets[-1]}.json" ] || OMP_NUM_THREADS=2 "$PY" tools/train_net.py \
        --config-file "$CFG" --eval-only MODEL.WEIGHTS "$OUT/$n/model_final.pth" \
        MODEL.UNET.BOUNDARY_WIDTH "$w" DATASETS.TEST "[${list%, }]" OUTPUT_DIR "$OUT/pred/$n" \
        > "$OUT/pred.$n.log" 2>&1
    names+=("$n")
done
preds() { for n in "${names[@]}"; do echo "$OUT/pred/$n/predictions_$1.json"; done; }
mkdir -p "$OUT/results"
for set in "${sets[@]}"; do
    res=unet_widths_$set
    group=(--group-by modality)
    case $set in monuseg_*) group=() ;; esac
    say "evaluation -> $OUT/results/$res"
    "$PY" tools/evaluate.py --gt "$D/$set.json" --pred $(preds "$set") --names "${names[@]}" \
        --val-gt "$D/val.json" --val-pred $(preds val) --bootstrap 1000 "${group[@]}" \
        --out "$OUT/results/$res" | tee "$OUT/results/$res.txt"
done
for w in "${widths[@]}"; do
    grep -h "iterations\|stopped\|time limit" "$OUT/unet_w$w.train.log" | tr '\r' '\n' | tail -2 || true
done
say "done"
