#!/usr/bin/env bash
# The test command (README, CI): set up .venv, start the local Slurm cluster, run every test.
#   bash tests/run.sh            # extra arguments go to pytest, e.g. bash tests/run.sh -k spec
set -euo pipefail
cd "$(dirname "$0")/.."
bash launchers/setup.sh
# the report pages (report.html) are checked in headless Chromium; the jobs themselves do not need it
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "[tests] installing chromium (headless checks of report.html)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null
  else
    echo "[tests] chromium is missing: ask an admin for it (the report.html tests need it)" >&2
  fi
fi
bash slurm/local_cluster.sh up
# the local cluster keeps its own slurm.conf (never /etc/slurm): every Slurm client of the tests uses it
SLURM_CONF=$(bash slurm/local_cluster.sh conf)
export SLURM_CONF
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
