#!/usr/bin/env bash
# Wheels the prepared device check needs that the lent machine's image lacks (its Python is 3.12 with torch,
# transformers, peft, timm, numpy, pandas, pyarrow, matplotlib, safetensors, pyyaml, tifffile, scikit-image, ...;
# see /work/.library/device/KINDS.md), downloaded HERE (the device reaches no package index) into .whl/, which
# .git/info/exclude keeps out of git and the device tool's `carry: [".whl"]` sends along (64 MiB at most).
#   bash bench/device_wheels.sh && du -sh .whl
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64)
# binary wheels for CPython 3.12 (the device's), no dependencies resolved: each one named
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
  -d .whl submitit==1.5.4 "pydantic==$("$PY" -c 'import pydantic; print(pydantic.VERSION)')" \
  "pydantic-core==$("$PY" -c 'import pydantic_core; print(pydantic_core.__version__)')" annotated-types \
  typing-inspection hjson nibabel pydicom "datasets==$("$PY" -c 'import datasets; print(datasets.__version__)')" \
  dill multiprocess imagecodecs
# DeepSpeed publishes only a source archive; its wheel is pure Python (ops are built on the device, JIT)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -1 .whl && du -sh .whl
