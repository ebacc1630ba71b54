#!/usr/bin/env bash
# Reproduce the README's nuclei results: models for experiments they have not seen, on 2 CPU cores.
#
#   bash docs/results/reproduce_nuclei.sh [OUT]        (default OUT=output/nuclei)
#   MODELS=maskrcnn TRAIN_THREADS=2 bash docs/results/reproduce_nuclei.sh OUT   (one model alone)
#   MODELS=cellpose TRAIN_THREADS=2 bash docs/results/reproduce_nuclei.sh OUT   (the peer, alone)
#   MODELS=maskrcnn TTA=4 bash docs/results/reproduce_nuclei.sh OUT   (and with test-time augmentation)
#
# MODELS (default "maskrcnn unet unet_contact") picks the learned models; TRAIN_THREADS (default
# 1) is the torch threads of each training: 1 when three train at once on 2 cores, 2 for one.
# TTA (4 or 8; default off) also predicts and evaluates every learned model with test-time
# augmentation (TEST.AUG: the flips, or the flips and 90-degree rotations, merged), reported as
# <model>_tta<N> beside it (N x the prediction time).
# "maskrcnn_grey" is the Mask R-CNN with the grey modality normalisation (INPUT.GREY), the
# candidate compared with "maskrcnn" on validation; "maskrcnn_pseudo" the same recipe plus the
# 17 semantic-only MoNuSeg tiles with pseudo-instances (the other candidate).
# "cellpose" is the peer (Cellpose 3.x from scratch, benchmarks/bench_cellpose.py; needs
# `pip install -c constraints.txt -e '.[peer]'`): the same data, split, draw weights and 45
# minutes, its predictions evaluated beside the others.
#
# Steps (each skipped when its output exists, so a killed run goes on where it stopped):
#   1. data, by docs/results/nuclei_data.sh: DSB2018 stage1_train split by experiment; 10 of the
#      13 labelled MoNuSeg training tiles (H&E) for training and 3 held out (by slide) beside the
#      DSB2018 validation experiments, so that validation holds 40x H&E (OUT/data/val.json); the
#      4 ../shared/data/monuseg tiles only for the test. (Up to the ninth session all 13 tiles
#      trained and validation was DSB2018 alone; a model of such an OUT folder has seen the
#      validation tiles, and nuclei_data.sh stops the script.)
#   2. training, 45 min cap per model, all three at once (one torch thread each):
#      configs/nuclei/mask_rcnn_R_18_FPN_mixed_cpu.yaml, configs/nuclei/unet_mixed_cpu.yaml
#      (class 2 the boundary band of every nucleus) and configs/nuclei/unet_contact_mixed_cpu.yaml
#      (class 2 only where nuclei touch) -> OUT/maskrcnn.pth, OUT/unet.pth, OUT/unet_contact.pth
#      (what infer_tiles.py --weights takes).
#   3. predictions of every model (and of the classical baseline, when its config exists) on
#      the validation images, the test split and the 4 MoNuSeg test tiles (train_net.py
#      --eval-only: each image at the scale its nuclei give, from a first pass); those of the 3
#      MoNuSeg validation tiles alone are cut out of the validation predictions (val_subset).
#   4. tools/evaluate.py: F1@0.5, DSB score, AJI, PQ per modality with 95% bootstrap CIs, at the
#      score threshold of best validation F1 -> OUT/results/{test,monuseg,val,monuseg_val}/.
#   5. OUT/<model>.pth rewritten with what validation chose (train_net.py --export): the score
#      threshold of best validation F1 and, with TTA, test-time augmentation when it had the
#      better validation F1; infer_tiles.py --weights OUT/<model>.pth then needs no flag.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-output/nuclei}
PY=${PYTHON:-.venv/bin/python}
D=$OUT/data
mkdir -p "$D" "$OUT/results"
start=$(date +%s)
say() { echo "[$(date +%H:%M:%S)] $*"; }

say "1. data -> $D"
bash docs/results/nuclei_data.sh "$OUT"

say "2. training (45 min cap each, all at once)"
train() {  # name config
    local name=$1 cfg=$2
    [ -f "$OUT/$name/model_final.pth" ] || OMP_NUM_THREADS=${TRAIN_THREADS:-1} "$PY" tools/train_net.py --resume \
        --config-file "$cfg" DATASETS.TRAIN "[$D/dsb_train.json, $D/monuseg_fit.json${EXTRA[$name]:-}]" \
        DATASETS.TEST "[$D/val.json]" OUTPUT_DIR "$OUT/$name" > "$OUT/$name.train.log" 2>&1
    cp "$OUT/$name/model_final.pth" "$OUT/$name.pth"
}
cellpose() {  # the peer: same training files, MoNuSeg drawn 10x as in the mixed configs;
    # epochs of 16 images (2 steps) and no validation-loss passes, so that more than 100 epochs
    # fit the 45 minutes (6.6 s a step on 2 cores in the eleventh session: 186) and train_seg's own
    # learning-rate decay (its last 50 epochs) runs within the budget
    [ -f "$OUT/cellpose/cellpose_model" ] || OMP_NUM_THREADS=${TRAIN_THREADS:-1} "$PY" \
        benchmarks/bench_cellpose.py train --train "$D/dsb_train.json" "$D/monuseg_fit.json" \
        --out "$OUT/cellpose" --minutes 45 --threads "${TRAIN_THREADS:-1}" \
        --images-per-epoch 16 --train-weights 1 10 > "$OUT/cellpose.train.log" 2>&1
}
# training files beyond DSB2018 and the 10 labelled MoNuSeg tiles (the config's TRAIN_WEIGHTS)
declare -A EXTRA=([maskrcnn_pseudo]=", $D/monuseg_pseudo.json")
declare -A CFG=([maskrcnn]=configs/nuclei/mask_rcnn_R_18_FPN_mixed_cpu.yaml
                [maskrcnn_grey]=configs/nuclei/mask_rcnn_R_18_FPN_mixed_grey_cpu.yaml
                [maskrcnn_pseudo]=configs/nuclei/mask_rcnn_R_18_FPN_mixed_pseudo_cpu.yaml
                [unet]=configs/nuclei/unet_mixed_cpu.yaml
                [unet_contact]=configs/nuclei/unet_contact_mixed_cpu.yaml)
read -r -a models <<< "${MODELS:-maskrcnn unet unet_contact}"
pids=()
for m in "${models[@]}"; do
    if [ "$m" = cellpose ]; then cellpose & pids+=($!); continue; fi
    [ -n "${CFG[$m]:-}" ] || { echo "MODELS: unknown model $m (maskrcnn, maskrcnn_grey, maskrcnn_pseudo, unet, unet_contact, cellpose)"; exit 2; }
    train "$m" "${CFG[$m]}" &
    pids+=($!)
done
wait "${pids[@]}"
t_train=$(( $(date +%s) - start ))

say "3. predictions"
cfgs=()
for m in "${models[@]}"; do cfgs+=("${CFG[$m]:-}"); done
if [ -f configs/nuclei/classical.yaml ]; then
    models+=(classical); cfgs+=(configs/nuclei/classical.yaml)
    [ -f "$OUT/classical.pth" ] || "$PY" tools/train_net.py --config-file configs/nuclei/classical.yaml \
        OUTPUT_DIR "$OUT/classical" DATASETS.TRAIN "[$D/dsb_train.json]" DATASETS.TEST "[$D/val.json]" \
        > "$OUT/classical.train.log" 2>&1 && cp "$OUT/classical/model_final.pth" "$OUT/classical.pth"
fi
val_subset() {  # DIR: predictions_monuseg_val.json cut out of predictions_val.json (the 3 MoNuSeg
    # validation tiles are in val.json; predicting them twice cost about 5 minutes with TTA)
    [ -f "$1/predictions_monuseg_val.json" ] || "$PY" - "$D/val.json" "$D/monuseg_val.json" \
        "$1/predictions_val.json" "$1/predictions_monuseg_val.json" <<'PYEOF'
import json, os, sys
val, sub, pred, out = sys.argv[1:]
name = {im["id"]: os.path.basename(im["file_name"]) for im in json.load(open(val))["images"]}
ids = {os.path.basename(im["file_name"]): im["id"] for im in json.load(open(sub))["images"]}
missing = set(ids) - set(name.values())
if missing:
    sys.exit(f"{val} lacks images of {sub}: {sorted(missing)}")
res = [dict(r, image_id=ids[name[r["image_id"]]]) for r in json.load(open(pred))
       if name.get(r["image_id"]) in ids]
with open(out + ".tmp", "w") as f:
    json.dump(res, f)
os.replace(out + ".tmp", out)
PYEOF
}
predict() {  # name config model [KEY VALUE ...]: --eval-only predictions of OUT/<model>.pth
    local name=$1 cfg=$2 m=$3
    shift 3
    [ -f "$OUT/pred/$name/predictions_monuseg_test.json" ] || OMP_NUM_THREADS=2 "$PY" \
        tools/train_net.py --config-file "$cfg" --eval-only MODEL.WEIGHTS "$OUT/$m.pth" "$@" \
        DATASETS.TEST "[$D/val.json, $D/dsb_test.json, $D/monuseg_test.json]" \
        OUTPUT_DIR "$OUT/pred/$name" > "$OUT/pred.$name.log" 2>&1
    val_subset "$OUT/pred/$name"
}
for i in "${!models[@]}"; do
    m=${models[$i]}
    if [ "$m" = cellpose ]; then
        [ -f "$OUT/pred/cellpose/predictions_monuseg_test.json" ] || OMP_NUM_THREADS=2 "$PY" \
            benchmarks/bench_cellpose.py predict --model "$OUT/cellpose/cellpose_model" \
            --input "$D/val.json" "$D/dsb_test.json" "$D/monuseg_test.json" \
            --out "$OUT/pred/cellpose" > "$OUT/pred.cellpose.log" 2>&1
        val_subset "$OUT/pred/cellpose"
        continue
    fi
    predict "$m" "${cfgs[$i]}" "$m"
done
if [ -n "${TTA:-}" ]; then  # the learned models again with test-time augmentation, as <model>_tta<N>
    tta=()
    for i in "${!models[@]}"; do
        m=${models[$i]}
        case $m in cellpose|classical) continue ;; esac
        predict "${m}_tta$TTA" "${cfgs[$i]}" "$m" TEST.AUG.ENABLED True TEST.AUG.TRANSFORMS "$TTA"
        tta+=("${m}_tta$TTA")
    done
    models+=("${tta[@]}")
fi

say "4. evaluation -> $OUT/results"
preds() { for m in "${models[@]}"; do echo "$OUT/pred/$m/predictions_$1.json"; done; }
"$PY" tools/evaluate.py --gt "$D/dsb_test.json" --pred $(preds dsb_test) --names "${models[@]}" \
    --val-gt "$D/val.json" --val-pred $(preds val) --bootstrap 1000 --group-by modality \
    --out "$OUT/results/test" | tee "$OUT/results/test.txt"
"$PY" tools/evaluate.py --gt "$D/monuseg_test.json" --pred $(preds monuseg_test) --names "${models[@]}" \
    --val-gt "$D/val.json" --val-pred $(preds val) --bootstrap 1000 \
    --out "$OUT/results/monuseg" | tee "$OUT/results/monuseg.txt"
"$PY" tools/evaluate.py --gt "$D/val.json" --pred $(preds val) --names "${models[@]}" \
    --bootstrap 1000 --group-by modality --out "$OUT/results/val" | tee "$OUT/results/val.txt"
"$PY" tools/evaluate.py --gt "$D/monuseg_val.json" --pred $(preds monuseg_val) --names "${models[@]}" \
    --val-gt "$D/val.json" --val-pred $(preds val) --bootstrap 1000 \
    --out "$OUT/results/monuseg_val" | tee "$OUT/results/monuseg_val.txt"
say "5. deployable checkpoints"
# each learned model's OUT/<model>.pth gets what validation chose: its score threshold of best
# validation F1 and, when TTA ran and won on validation F1, test-time augmentation; so that
# infer_tiles.py --weights OUT/<model>.pth needs no flag (train_net.py --export).
for m in "${models[@]}"; do
    case $m in cellpose|classical|*_tta*) continue ;; esac
    # evaluate.py's threshold_tuning (validation only) of <model> and <model>_tta<N>
    read -r thresh aug < <("$PY" - "$OUT/results/test/metrics.json" "$m" "${TTA:-}" <<'PYEOF'
import json, sys
tuning = {r["name"]: r["threshold_tuning"] for r in json.load(open(sys.argv[1]))["models"]}
m, n = sys.argv[2], sys.argv[3]
variants = [(m, 0)] + ([(f"{m}_tta{n}", int(n))] if n and f"{m}_tta{n}" in tuning else [])
name, aug = max(variants, key=lambda v: tuning[v[0]]["val_f1"])
print(f"{tuning[name]['score_thresh']:.3f} {aug}")
PYEOF
)
    keys=(TEST.SCORE_THRESH "$thresh")
    [ "$aug" = 0 ] || keys+=(TEST.AUG.ENABLED True TEST.AUG.TRANSFORMS "$aug")
    "$PY" tools/train_net.py --config-file "${CFG[$m]}" --export "$OUT/$m.pth" \
        MODEL.WEIGHTS "$OUT/$m/model_final.pth" "${keys[@]}"
done
say "done in $(( ($(date +%s) - start) / 60 )) min (training $(( t_train / 60 )) min); results in $OUT/results/"
