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
    127.0.0.1). Benches that set a partition DOWN or cancel jobs call this first: on a real cluster they would
    stop a partition other people use. Returns the local cluster's slurm.conf path."""
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
        sys.exit("bench: refusing to run: it sets a partition DOWN and cancels its jobs, which only the project's "
                 "local cluster may see; " + "; ".join(problems))
    return conf


def my_job_ids() -> set[str]:
    """The ids of this user's jobs in the queue now (array tasks folded to their job)."""
    out = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-r", "-o", "%F"], capture_output=True,
                         text=True).stdout
    return {x.strip() for x in out.split() if x.strip()}


def cancel_new_jobs(before: set[str]) -> None:
    """Cancel the jobs this bench submitted (those not in the queue at `before`), nothing else of the user's."""
    new = sorted(my_job_ids() - before)
    if new:
        subprocess.run(["scancel", *new], check=False, capture_output=True)
