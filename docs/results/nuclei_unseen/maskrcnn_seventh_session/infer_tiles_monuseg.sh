#!/usr/bin/env bash
# infer_tiles.py with the exported checkpoint and no other flag (issue 12 item 8) on the 4 MoNuSeg
# test tiles, evaluated beside the --eval-only TTA predictions of the same model
set -euo pipefail
cd /work/main
R=/tmp/mon_check; rm -rf $R; mkdir -p $R
ls $PWD/../shared/data/monuseg/*.tif > $R/images.txt
/usr/bin/time -f "infer_tiles: %e s wall" .venv/bin/python tools/infer_tiles.py --weights output/nuclei7/maskrcnn.pth --input $R/images.txt --output $R/out --mpp 1 --quiet
.venv/bin/python - <<'PY'
import json, os
R = "/tmp/mon_check"
g = json.load(open("output/nuclei7/data/monuseg_test.json"))
res = []
for im in g["images"]:
    stem = os.path.splitext(im["file_name"])[0]
    for d in json.load(open(f"{R}/out/{stem}/detections.json")):
        d["image_id"] = im["id"]; res.append(d)
    s = json.load(open(f"{R}/out/{stem}/summary.json"))
    print(stem, s["total_detections"], "score_thresh", s["analysis"]["score_thresh"], "tta", s["analysis"]["tta"], "size", s.get("size_normalisation"))
json.dump(res, open(f"{R}/pred.json", "w"))
PY
.venv/bin/python tools/evaluate.py --gt output/nuclei7/data/monuseg_test.json --pred $R/pred.json output/nuclei7/pred/maskrcnn_tta8/predictions_monuseg_test.json --names infer_tiles eval_only_tta8 --score-thresh 0.33 --out $R/eval 2>&1 | grep -v "^evaluate"
