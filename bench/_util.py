"""Small helpers for the bench scripts: wall-time of whole processes, medians, the local-cluster guard."""
from __future__ import annotations

import getpass
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
LOCAL_CLUSTER = REPO / "slurm/local_cluster.sh"


def rss_mb() -> float:
    """This process's resident memory now, in MiB (/proc/self/status VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def as_users_run() -> dict:
    """The environment a user's processes have: Python writes and reuses its bytecode cache. Some shells (this
    project's sandbox among them) export PYTHONDONTWRITEBYTECODE=1, which makes every process compile our ~60
    modules from source and would be measured as our cost."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def wall(cmd, repeat: int = 5, **kw) -> float:
    """Median wall time in seconds of running `cmd` as a fresh process (after one untimed run that fills the
    bytecode cache, as a user's second submission finds it)."""
    kw.setdefault("env", as_users_run())
    subprocess.run(cmd, check=False, capture_output=True, cwd=REPO, **kw)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=False, capture_output=True, cwd=REPO, **kw)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def local_cluster_only() -> str:
    """Start the project's local Slurm, point this process's Slurm clients at it, and refuse to go on unless the
    controller answering is that cluster (ClusterName and slurm.conf of slurm/local_cluster.sh, controller on
    127.0.0.1). Benches that submit and cancel jobs call this first: they are meant for the project's own test
    cluster, never a real one. Returns the local cluster's slurm.conf path."""
    up = subprocess.run(["bash", str(LOCAL_CLUSTER), "up"], capture_output=True, text=True)
    conf = subprocess.run(["bash", str(LOCAL_CLUSTER), "conf"], capture_output=True, text=True).stdout.strip()
    if up.returncode != 0 or not conf:
        sys.exit(f"bench: the project's local Slurm did not start (bash slurm/local_cluster.sh up):\n{up.stderr[-800:]}")
    os.environ["SLURM_CONF"] = conf
    shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    fields = {}
    for line in shown.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    want_name = next((ln.split("=", 1)[1] for ln in Path(conf).read_text().splitlines()
                      if ln.startswith("ClusterName=")), "")
    controller = fields.get("SlurmctldHost[0]", "")
    problems = []
    if fields.get("SLURM_CONF") != conf:
        problems.append(f"the controller reports SLURM_CONF={fields.get('SLURM_CONF')!r}, not {conf}")
    if not want_name or fields.get("ClusterName") != want_name:
        problems.append(f"ClusterName is {fields.get('ClusterName')!r}, the local cluster's is {want_name!r}")
    if "127.0.0.1" not in controller and "localhost" not in controller:
        problems.append(f"the controller is {controller!r}, not this machine")
    if problems:
        sys.exit("bench: refusing to run: it submits and cancels jobs, which only the project's local cluster may "
                 "see; " + "; ".join(problems))
    return conf


def held_env(env: dict | None = None) -> dict:
    """The environment for a bench's submissions: sbatch holds every job it submits (SBATCH_HOLD, sbatch's own
    input variable), so measured jobs stay PENDING without taking a partition DOWN under other people's jobs."""
    return {**(env if env is not None else as_users_run()), "SBATCH_HOLD": "1"}


def cancel_named(prefix: str) -> int:
    """Cancel this user's jobs whose Slurm job name starts with `prefix` (a bench's own, nothing else); returns
    how many were cancelled."""
    out = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%F|%j"], capture_output=True,
                         text=True).stdout
    ids = sorted({line.split("|", 1)[0] for line in out.splitlines()
                  if "|" in line and line.split("|", 1)[1].startswith(prefix)})
    if ids:
        subprocess.run(["scancel", *ids], check=False, capture_output=True)
    return len(ids)
