#!/usr/bin/env python
"""Submit latency on the local Slurm, measured in one run (needs `bash slurm/local_cluster.sh up`).

Prints: bare `sbatch --wrap true` (the floor), a minimal submitit process (import + submit one function), the
whole `launchers/submit.py` process (validate + plan + submit + run record) and their ratio (target <= 1.3x);
then `--dry-run` and a spec error (target < 0.5 s each, no torch import on that path).
"""
from __future__ import annotations

import os
import tempfile

from _util import PY, cancel_named, held_env, local_cluster_only, wall

N = 9
NAME = f"bench_submit_{os.getpid()}"


def main():
    local_cluster_only()  # it submits and cancels jobs: only ever on the project's own local cluster
    tmp = tempfile.mkdtemp(prefix="bench-submit-")
    try:
        measure(tmp)
    finally:
        cancel_named(NAME)


def measure(tmp):
    # every submission is held (SBATCH_HOLD): the jobs stay PENDING and never compete for the CPU while we time
    # submissions, and nobody else's jobs wait for a DOWN partition
    env = held_env()
    bare = wall(["sbatch", "-J", NAME, "-o", "/dev/null", "--wrap", "true"], N, env=env)
    minimal = wall([PY, "-c", (
        "import submitit; ex = submitit.SlurmExecutor(folder=%r); ex.update_parameters(time=5, job_name=%r);"
        "ex.submit(print, 'hi')" % (f"{tmp}/minimal/%j", NAME))], N, env=env)
    floor = wall([PY, "-c", "from pydantic import BaseModel; import yaml, submitit"], N)
    ours = wall([PY, "launchers/submit.py", "jobs/tiny/smoke.yaml", "-c", "local_slurm", "--set", f"name={NAME}",
                 "--set", f"outputs.logs_dir={tmp}"], N, env=env)
    dry = wall([PY, "launchers/submit.py", "jobs/tiny/smoke.yaml", "-c", "local_slurm", "--dry-run"], N)
    err = wall([PY, "launchers/submit.py", "jobs/tiny/smoke.yaml", "--set", "resources.nodes=-1"], N)
    print(f"bare sbatch --wrap true        {bare * 1000:7.0f} ms  (floor)")
    print(f"minimal submitit process       {minimal * 1000:7.0f} ms")
    print(f"import pydantic+yaml+submitit  {floor * 1000:7.0f} ms  (libraries alone: {floor / minimal:.2f}x of minimal)")
    print(f"launchers/submit.py           {ours * 1000:7.0f} ms  ratio vs minimal submitit: "
          f"{ours / minimal:.2f}x (target <= 1.3x)")
    print(f"launchers/submit.py --dry-run  {dry * 1000:7.0f} ms  (target < 500 ms)")
    print(f"spec error (exit 2)            {err * 1000:7.0f} ms  (target < 500 ms)")


if __name__ == "__main__":
    main()
