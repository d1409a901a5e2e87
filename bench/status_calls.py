#!/usr/bin/env python
"""status.py cost per refresh for 1, 100 and 1000 queued array tasks spread over 10 submissions (local Slurm).

Counts the real squeue/sacct processes a refresh starts (PATH shims that log and exec the real tools; target:
one of each, whatever the task count, and squeue alone in a --watch refresh when nothing left the queue) and
prints, measured in the same run:
  - a refresh in process (query + the view) / the Slurm calls it makes (target <= 1.3x)
  - the whole `status.py` process / a bare Python process that makes the same two calls (target <= 1.3x)
  - both again for a window as short as the bench (--since its start): a history of a few runs, where the
    default 2-day window holds every job this user ran in two days (on this machine: the test suites' thousands)
  - a --watch steady refresh (squeue only) / a bare squeue, and its own CPU time per refresh
Every submission goes to the bench's own partition, created DOWN for the run (bench/_util.py hold_partition), so
every task stays PENDING without taking the `debug` partition away from anybody; only the project's local cluster
is ever touched (bench/_util.py), and only this bench's own jobs (by name) are cancelled. Other jobs of the same
user in the queue are counted in what status shows, as they would be.
"""
from __future__ import annotations

import getpass
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _util import PY, REPO, cancel_named, hold_partition, in_turns, local_cluster_only, process, wall

sys.path.insert(0, str(REPO))
NAME = f"bench_status_{os.getpid()}"


def shims(folder: Path, log: Path) -> dict:
    for tool in ("squeue", "sacct"):
        real = shutil.which(tool)
        p = folder / tool
        p.write_text(f"#!/bin/sh\necho {tool} >> {log}\nexec {real} \"$@\"\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


def submit_tasks(total: int, logs: str, profile) -> None:
    per = [total // 10 + (1 if i < total % 10 else 0) for i in range(10)]
    for i, n in enumerate(x for x in per if x):
        subprocess.run([PY, "launchers/submit.py", "jobs/tiny/smoke_array.yaml", "-c", str(profile), "--no-preflight",
                        "--set", f"name={NAME}_{i}", "--set", f"resources.array.items={n}",
                        "--set", "resources.array.merge=false", "--set", f"outputs.logs_dir={logs}"],
                       check=True, capture_output=True, cwd=REPO)


def timed(fn, repeat: int = 5) -> tuple[float, float]:
    """(median wall seconds, mean CPU seconds of this process) of fn()."""
    walls, cpu0 = [], time.process_time()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    walls.sort()
    return walls[len(walls) // 2], (time.process_time() - cpu0) / repeat


def ratios(monitor, user: str, since: str, args: list[str]) -> tuple[float, float, float, float, int]:
    """(squeue + sacct, a refresh in process, a bare Python making those calls, the whole status.py, sacct's lines)
    for one window, each ratio's two sides measured in turns (bench/_util.py in_turns: the machine's drift hits
    both). The very calls status makes (core/scheduler/slurm/queue.py), not cheaper ones."""
    from core.scheduler.slurm.queue import SACCT_FIELDS, SQUEUE_FMT

    squeue = ["squeue", "-h", "-r", "-u", user, "-o", SQUEUE_FMT]
    sacct = ["sacct", "-X", "-D", "-n", "-P", "-u", user, "-S", since, "-o", SACCT_FIELDS]
    lines = subprocess.run(sacct, capture_output=True, text=True).stdout.count("\n")
    both, refresh = in_turns(
        process(["sh", "-c", " ".join(shlex.quote(a) for a in squeue) + "; " + " ".join(shlex.quote(a) for a in sacct)]),
        lambda: monitor.format_view(monitor.query(user, since), with_log=True))
    bare_py, whole = in_turns(
        process([PY, "-c", "import subprocess as s; s.run(%r, capture_output=True); "
                           "s.run(%r, capture_output=True)" % (squeue, sacct)]),
        process([PY, "launchers/status.py", "--no-log", *args]))
    return both, refresh, bare_py, whole, lines


def main():
    began = time.time()
    local_cluster_only()
    from core import monitor

    user = getpass.getuser()
    tmp = Path(tempfile.mkdtemp(prefix="bench-status-"))
    log = tmp / "calls.log"
    env = shims(tmp, log)
    from core.scheduler.slurm.queue import SQUEUE_FMT

    with hold_partition() as profile:
        for total in (1, 100, 1000):
            cancel_named(NAME)
            submit_tasks(total, str(tmp / "logs"), profile)
            log.write_text("")
            subprocess.run([PY, "launchers/status.py", "--no-log"], check=True, capture_output=True, cwd=REPO, env=env)
            calls = log.read_text().split()
            since = monitor.since_arg(monitor.DEFAULT_SINCE)
            squeue = ["squeue", "-h", "-r", "-u", user, "-o", SQUEUE_FMT]
            bare_squeue = wall(squeue, 5)
            both, refresh, bare_py, whole, lines = ratios(monitor, user, since, [])
            # the same with a window as short as the bench itself (--since its start): what a lab whose history is
            # its own few runs a day would see, against this machine's thousands of test-suite jobs above
            mine = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(began))
            s_both, s_refresh, s_bare_py, s_whole, s_lines = ratios(monitor, user, mine, ["--since", mine])
            refresher = monitor.Refresher(user, since)
            refresher.query()
            log.write_text("")
            os.environ["PATH"] = env["PATH"]   # the in-process refreshes below go through the shims too
            steady, steady_cpu = timed(lambda: monitor.format_view(refresher.query(), with_log=True))
            steady_calls = log.read_text().split()
            print(f"{total:5d} tasks / 10 submissions: status.py makes squeue x{calls.count('squeue')}, "
                  f"sacct x{calls.count('sacct')} (target 1 + 1)")
            print(f"      2-day window ({lines:,} accounting lines): refresh in process {refresh * 1000:.0f} ms / its "
                  f"squeue+sacct {both * 1000:.0f} ms = {refresh / both:.2f}x (target <= 1.3x)")
            print(f"      whole status.py {whole * 1000:.0f} ms / bare Python making the same calls "
                  f"{bare_py * 1000:.0f} ms = {whole / bare_py:.2f}x (target <= 1.3x)")
            print(f"      the bench's own window ({s_lines:,} lines): refresh {s_refresh * 1000:.0f} / "
                  f"{s_both * 1000:.0f} ms = {s_refresh / s_both:.2f}x; whole status.py {s_whole * 1000:.0f} / "
                  f"{s_bare_py * 1000:.0f} ms = {s_whole / s_bare_py:.2f}x")
            print(f"      --watch steady refresh: squeue x{steady_calls.count('squeue')}, sacct "
                  f"x{steady_calls.count('sacct')} in 5 refreshes, {steady * 1000:.0f} ms = "
                  f"{steady / bare_squeue:.2f}x a bare squeue ({bare_squeue * 1000:.0f} ms); its own CPU "
                  f"{steady_cpu * 1000:.0f} ms per refresh")
        cancel_named(NAME)


if __name__ == "__main__":
    main()
