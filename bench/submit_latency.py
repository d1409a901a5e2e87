#!/usr/bin/env python
"""Submit latency on the local Slurm, measured in one run (needs `bash slurm/local_cluster.sh up`).

Prints: bare `sbatch --wrap true` (the floor), a minimal submitit process (import + submit one function), the
whole `launchers/submit.py` process (validate + plan + submit + run record) and their ratio (target <= 1.3x);
then `--dry-run` and a spec error (target < 0.5 s each, no torch import on that path).
"""
from __future__ import annotations

import os
import tempfile

from _util import HOLD_PARTITION, PY, cancel_named, hold_partition, local_cluster_only, wall, wall_and_cpu

N = 15
NAME = f"bench_submit_{os.getpid()}"


def main():
    local_cluster_only()  # it creates a partition and submits and cancels jobs: only on the project's local cluster
    tmp = tempfile.mkdtemp(prefix="bench-submit-")
    try:
        with hold_partition() as profile:
            measure(tmp, profile)
    finally:
        cancel_named(NAME)


def measure(tmp, profile):
    # every submission goes to the bench's own DOWN partition (bench/_util.py hold_partition): the jobs stay PENDING
    # and never compete for the CPU while we time submissions; nobody else's jobs wait. --no-preflight: the
    # preflight rightly refuses a DOWN partition (it costs ~15 ms: three quick scontrol / sbatch --test-only calls)
    bare = wall(["sbatch", "-p", HOLD_PARTITION, "-J", NAME, "-o", "/dev/null", "--wrap", "true"], N)
    minimal, minimal_cpu = wall_and_cpu([PY, "-c", (
        "import submitit; ex = submitit.SlurmExecutor(folder=%r); ex.update_parameters(time=5, job_name=%r, "
        "partition=%r); ex.submit(print, 'hi')" % (f"{tmp}/minimal/%j", NAME, HOLD_PARTITION))], N)
    floor, floor_cpu = wall_and_cpu([PY, "-c", "from pydantic import BaseModel; import yaml, submitit"], N)
    ours, ours_cpu = wall_and_cpu([PY, "launchers/submit.py", "jobs/tiny/smoke.yaml", "-c", str(profile), "--no-preflight",
                 "--set", f"name={NAME}", "--set", f"outputs.logs_dir={tmp}"], N)
    dry = wall([PY, "launchers/submit.py", "jobs/tiny/smoke.yaml", "-c", "local_slurm", "--dry-run"], N)
    err = wall([PY, "launchers/submit.py", "jobs/tiny/smoke.yaml", "--set", "resources.nodes=-1"], N)
    print(f"bare sbatch --wrap true        {bare * 1000:7.0f} ms  (floor)")
    print(f"minimal submitit process       {minimal * 1000:7.0f} ms")
    print(f"import pydantic+yaml+submitit  {floor * 1000:7.0f} ms  (libraries alone: {floor / minimal:.2f}x of minimal)")
    print(f"launchers/submit.py           {ours * 1000:7.0f} ms  ratio vs minimal submitit: "
          f"{ours / minimal:.2f}x (target <= 1.3x)")
    print(f"CPU time: minimal submitit {minimal_cpu * 1000:.0f} ms, the libraries' imports {floor_cpu * 1000:.0f} ms, "
          f"launchers/submit.py {ours_cpu * 1000:.0f} ms = {ours_cpu / minimal_cpu:.2f}x the minimal process, "
          f"{ours_cpu / floor_cpu:.2f}x its libraries' imports (CPU does not count waiting for a busy core)")
    print(f"launchers/submit.py --dry-run  {dry * 1000:7.0f} ms  (target < 500 ms)")
    print(f"spec error (exit 2)            {err * 1000:7.0f} ms  (target < 500 ms)")


if __name__ == "__main__":
    main()
