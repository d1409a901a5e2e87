#!/usr/bin/env bash
# The test command (README, CI): set up .venv, start the local Slurm cluster, run every test.
#   bash tests/run.sh            # extra arguments go to pytest, e.g. bash tests/run.sh -k spec
set -euo pipefail
cd "$(dirname "$0")/.."
bash launchers/setup.sh
bash slurm/local_cluster.sh up
# the local cluster keeps its own slurm.conf (never /etc/slurm): every Slurm client of the tests uses it
SLURM_CONF=$(bash slurm/local_cluster.sh conf)
export SLURM_CONF
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
