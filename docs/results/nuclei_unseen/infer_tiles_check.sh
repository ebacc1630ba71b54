#!/usr/bin/env bash
# Issue 12's check of reproduce_nuclei.sh's checkpoint: tools/infer_tiles.py with no flag but
# --mpp over the images of a test set (plain images without mpp), evaluated beside the
# --eval-only TTA predictions of the same checkpoint, at the checkpoint's score threshold.
#   bash docs/results/nuclei_unseen/infer_tiles_check.sh [OUT] [SET]
# OUT: the folder reproduce_nuclei.sh filled (default output/nuclei; run with TTA=8 for the
# second column). SET: monuseg_test (default: the 4 MoNuSeg tiles) or dsb_test (the 77 DSB2018
# test images, reported per modality). Results in OUT/infer_<SET>/.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${1:-output/nuclei}
SET=${2:-monuseg_test}
PY=${PYTHON:-.venv/bin/python}
R=$OUT/infer_$SET
rm -rf "$R"; mkdir -p "$R"
# the set's images, in the order of its COCO file
"$PY" - "$OUT/data/$SET.json" > "$R/images.txt" <<'PY'
import json, os, sys
g = json.load(open(sys.argv[1]))
root = g["info"]["image_root"]
print("\n".join(os.path.join(root, im["file_name"]) for im in g["images"]))
PY
start=$(date +%s)
"$PY" tools/infer_tiles.py --weights "$OUT/maskrcnn.pth" --input "$R/images.txt" --output "$R/out" --mpp 1 --quiet
echo "infer_tiles: $(( $(date +%s) - start )) s wall for $(wc -l < "$R/images.txt") images"
"$PY" - "$OUT/data/$SET.json" "$R" <<'PY'
import collections, json, os, sys
gt, r = sys.argv[1:3]
g = json.load(open(gt))
res, seen = [], collections.Counter()
for im in g["images"]:  # detections.json per image -> one COCO results file with the GT's ids
    stem = os.path.splitext(os.path.basename(im["file_name"]))[0]
    for d in json.load(open(f"{r}/out/{stem}/detections.json")):
        d["image_id"] = im["id"]
        res.append(d)
    s = json.load(open(f"{r}/out/{stem}/summary.json"))
    seen[(s["analysis"]["score_thresh"], s["analysis"]["tta"])] += 1
    if len(g["images"]) <= 10:
        print(stem, s["total_detections"], "size", s.get("size_normalisation"))
print("images by (score threshold, TTA) the tool took from the checkpoint:", dict(seen))
json.dump(res, open(f"{r}/pred.json", "w"))
if len(seen) != 1:
    sys.exit(f"the images were analysed at different settings: {dict(seen)}")
print(next(iter(seen))[0], file=open(f"{r}/score_thresh", "w"))
PY
thresh=$(cat "$R/score_thresh")  # the threshold the tool took from the checkpoint
preds=("$R/pred.json"); names=(infer_tiles)
[ -f "$OUT/pred/maskrcnn_tta8/predictions_$SET.json" ] && \
    preds+=("$OUT/pred/maskrcnn_tta8/predictions_$SET.json") && names+=(eval_only_tta8)
group=(); [ "$SET" = monuseg_test ] || group=(--group-by modality)
"$PY" tools/evaluate.py --gt "$OUT/data/$SET.json" --pred "${preds[@]}" --names "${names[@]}" \
    --score-thresh "$thresh" --bootstrap 1000 "${group[@]}" --out "$R/eval"
