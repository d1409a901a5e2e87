#!/usr/bin/env bash
# The prepared device check (issue 27, item 6), for the day a GPU machine is lent: one command, under 8 minutes on
# one H100, that prints ratios and writes $OUT/device_check.json (bench/device_check.py says what it measures).
# Prepare the wheels here first (bash bench/device_wheels.sh), then through the device tool:
#   run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-logs/device_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_check: installing the carried wheels failed"; exit 3; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/nvidia_smi.txt"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
"$PY" bench/device_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
