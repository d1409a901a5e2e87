#!/usr/bin/env python
"""status.py cost per refresh for 1, 100 and 1000 array tasks spread over 10 submissions (local Slurm).

Counts the real squeue/sacct processes a refresh starts (PATH shims that log and exec the real tools; target:
one of each, whatever the task count) and times a refresh against a bare `squeue` in the same run (target <= 3x).
The partition is set DOWN while measuring so every task stays PENDING, then restored and the jobs cancelled.
"""
from __future__ import annotations

import getpass
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import time

from _util import PY, REPO, wall

sys.path.insert(0, str(REPO))
from core import monitor  # noqa: E402


def shims(folder: Path, log: Path) -> dict:
    for tool in ("squeue", "sacct"):
        real = shutil.which(tool)
        p = folder / tool
        p.write_text(f"#!/bin/sh\necho {tool} >> {log}\nexec {real} \"$@\"\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


def submit_tasks(total: int, logs: str) -> None:
    per = [total // 10 + (1 if i < total % 10 else 0) for i in range(10)]
    for i, n in enumerate(x for x in per if x):
        subprocess.run([PY, "launchers/submit.py", "jobs/tiny/smoke_array.yaml", "-c", "local_slurm",
                        "--set", f"name=bench_status_{i}", "--set", f"resources.array.items={n}",
                        "--set", "resources.array.merge=false", "--set", f"outputs.logs_dir={logs}"],
                       check=True, capture_output=True, cwd=REPO)


def main():
    subprocess.run(["bash", str(REPO / "slurm/local_cluster.sh"), "up"], check=True, capture_output=True)
    user = getpass.getuser()
    tmp = Path(tempfile.mkdtemp(prefix="bench-status-"))
    log = tmp / "calls.log"
    env = shims(tmp, log)
    subprocess.run(["scontrol", "update", "PartitionName=debug", "State=DOWN"], check=True)
    try:
        for total in (1, 100, 1000):
            subprocess.run(["scancel", "-u", user], check=False)
            submit_tasks(total, str(tmp / "logs"))
            log.write_text("")
            subprocess.run([PY, "launchers/status.py", "--no-log"], check=True, capture_output=True, cwd=REPO, env=env)
            calls = log.read_text().split()
            ours = wall([PY, "launchers/status.py", "--no-log"], 5)
            bare = wall(["squeue", "-u", user], 5)
            both = wall(["sh", "-c", f"squeue -u {user}; sacct -X -u {user} -S now-2days"], 5)
            t0 = time.perf_counter()
            for _ in range(5):
                monitor.format_table(monitor.query(user), with_log=True)
            inproc = (time.perf_counter() - t0) / 5
            refresher = monitor.Refresher(user)
            refresher.query()
            counted = []
            real = monitor._run
            monitor._run = lambda cmd: (counted.append(cmd[0]), real(cmd))[1]
            t0 = time.perf_counter()
            for _ in range(5):
                monitor.format_table(refresher.query(), with_log=True)
            steady = (time.perf_counter() - t0) / 5
            monitor._run = real
            print(f"{total:5d} tasks / 10 submissions: squeue x{calls.count('squeue')}, sacct x{calls.count('sacct')} "
                  f"per refresh | bare squeue {bare * 1000:.0f} ms, bare squeue+sacct {both * 1000:.0f} ms | "
                  f"--watch refresh {inproc * 1000:.0f} ms = {inproc / bare:.1f}x squeue, {inproc / both:.2f}x "
                  f"squeue+sacct | whole status.py process {ours * 1000:.0f} ms = {ours / bare:.1f}x squeue")
            print(f"      --watch steady state (nothing left the queue): {counted.count('squeue')} squeue + "
                  f"{counted.count('sacct')} sacct in 5 refreshes, {steady * 1000:.0f} ms per refresh = "
                  f"{steady / bare:.1f}x bare squeue (target <= 3x)")
    finally:
        subprocess.run(["scancel", "-u", user], check=False)
        subprocess.run(["scontrol", "update", "PartitionName=debug", "State=UP"], check=True)


if __name__ == "__main__":
    main()
