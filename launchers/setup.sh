#!/usr/bin/env bash
# Create .venv and install the project into it (idempotent: a second run only checks).
#   bash launchers/setup.sh
# torch==2.14.1 + torchvision==0.29.1 go in FIRST (timm needs torchvision, and this pair is the one that lies on
# the project's machines' disk; any other torch spec downloads GBs), then the project and its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
log() { printf '[setup] %s\n' "$*" >&2; }

if ! command -v java >/dev/null 2>&1; then  # pycocoevalcap's METEOR and tokenizer run on Java
  log "installing Java (default-jre-headless) for pycocoevalcap"
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends default-jre-headless >/dev/null
  else
    log "java is missing: ask an admin for default-jre-headless (report metrics need it)"
  fi
fi
[ -x .venv/bin/python ] || { log "creating .venv with $PY"; "$PY" -m venv .venv; }
if ! .venv/bin/python -c "import torch, torchvision, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" 2>/dev/null; then
  log "installing torch==2.14.1 torchvision==0.29.1 (a few minutes)"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 2>&1 \
    | { grep -v -E "^WARNING: Location .* is ignored" || true; } >&2
  .venv/bin/python -c "import torch, torchvision" >/dev/null
fi
stamp=.venv/.medhpc-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing the project (pip install -e '.[test]')"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 \
    | { grep -v -E "^WARNING: Location .* is ignored" || true; } >&2
  .venv/bin/python -c "import core, submitit, pydantic, deepspeed, transformers" >/dev/null
  echo "$want" >"$stamp"
fi
log "ready: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
