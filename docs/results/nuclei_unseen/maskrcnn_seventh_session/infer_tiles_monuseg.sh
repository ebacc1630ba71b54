#!/usr/bin/env bash
# The issue's check of reproduce_nuclei.sh's checkpoint: infer_tiles.py with no flag but --mpp on
# the 4 MoNuSeg test tiles (plain TIFFs), evaluated beside the --eval-only TTA predictions.
#   bash docs/results/nuclei_unseen/maskrcnn_seventh_session/infer_tiles_monuseg.sh [OUT]
# OUT: the folder reproduce_nuclei.sh filled (default output/nuclei; run with TTA=8 for the
# second column). Results in OUT/infer_monuseg/.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
OUT=${1:-output/nuclei}
PY=${PYTHON:-.venv/bin/python}
R=$OUT/infer_monuseg
rm -rf "$R"; mkdir -p "$R"
ls "$PWD"/../shared/data/monuseg/*.tif > "$R/images.txt"
start=$(date +%s)
"$PY" tools/infer_tiles.py --weights "$OUT/maskrcnn.pth" --input "$R/images.txt" --output "$R/out" --mpp 1 --quiet
echo "infer_tiles: $(( $(date +%s) - start )) s wall"
"$PY" - "$OUT" "$R" <<'PY'
import json, os, sys
out, r = sys.argv[1:3]
g = json.load(open(f"{out}/data/monuseg_test.json"))
res = []
for im in g["images"]:  # detections.json per slide -> one COCO results file with the GT's ids
    stem = os.path.splitext(im["file_name"])[0]
    for d in json.load(open(f"{r}/out/{stem}/detections.json")):
        d["image_id"] = im["id"]
        res.append(d)
    s = json.load(open(f"{r}/out/{stem}/summary.json"))
    print(stem, s["total_detections"], "score_thresh", s["analysis"]["score_thresh"], "tta",
          s["analysis"]["tta"], "size", s.get("size_normalisation"))
json.dump(res, open(f"{r}/pred.json", "w"))
PY
thresh=$("$PY" -c "import torch,re,sys; print(re.search(r'SCORE_THRESH: ([0-9.]+)', torch.load(sys.argv[1], weights_only=True)['config'].split('TEST:')[-1]).group(1))" "$OUT/maskrcnn.pth")
preds=("$R/pred.json"); names=(infer_tiles)
[ -f "$OUT/pred/maskrcnn_tta8/predictions_monuseg_test.json" ] && \
    preds+=("$OUT/pred/maskrcnn_tta8/predictions_monuseg_test.json") && names+=(eval_only_tta8)
"$PY" tools/evaluate.py --gt "$OUT/data/monuseg_test.json" --pred "${preds[@]}" --names "${names[@]}" \
    --score-thresh "$thresh" --out "$R/eval"
