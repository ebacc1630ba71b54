#!/usr/bin/env bash
# GPU readiness in one table (under 8 minutes on one GPU): R50 Mask R-CNN trained 200
# iterations in bf16 (images/s, memory), infer_tiles.py on a 20k x 20k synthetic pyramidal
# slide (Mpx/s) and against the naive per-tile loop. See benchmarks/gpu_check.py.
#   benchmarks/gpu_check.sh
#   GPU_CHECK_TINY=1 benchmarks/gpu_check.sh     # CPU dry run at tiny sizes
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -n "${GPU_CHECK_TINY:-}" ] && [ "${GPU_CHECK_TINY}" != 0 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout "${GPU_CHECK_TIMEOUT:-900}" "$PY" benchmarks/gpu_check.py "$@"
