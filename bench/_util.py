"""Small helpers for the bench scripts: wall-time of whole processes, medians, the local-cluster guard."""
from __future__ import annotations

import contextlib
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


def one_rank() -> None:
    """This process as rank 0 of a world of 1 for deepspeed.init_distributed (the memory benches)."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(20000 + os.getpid() % 20000),
                      OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))


def peak_rss_mb() -> float:
    """The larger of the resident memory now and the peak so far, in MiB: the base a measured growth starts from."""
    import resource

    return max(rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def growth_gib(base_mb: float) -> float:
    """Peak resident memory since `base_mb` (peak_rss_mb() before the model existed), in GiB."""
    import resource

    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_mb) / 1024


def print_estimate(est, measured_gib: float, what: str = "peak RSS growth") -> float:
    """The plan's estimate in parts, the measured figure and their ratio (target 0.75 .. 1.25); returns the
    estimate in GiB."""
    gib = 2 ** 30
    total = est.total / gib
    print(f"estimate: model states {est.model_states / gib:.3f} GiB + frozen {est.frozen / gib:.3f} GiB + activations "
          f"{est.activations / gib:.3f} GiB = {total:.3f} GiB")
    print(f"measured {what}: {measured_gib:.3f} GiB")
    print(f"estimate / measured = {total / measured_gib:.2f} (target 0.75 .. 1.25)")
    return total


def as_users_run() -> dict:
    """The environment a user's processes have: Python writes and reuses its bytecode cache. Some shells (this
    project's sandbox among them) export PYTHONDONTWRITEBYTECODE=1, which makes every process compile our ~60
    modules from source and would be measured as our cost."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def wall(cmd, repeat: int = 5, **kw) -> float:
    """Median wall time in seconds of running `cmd` as a fresh process (after one untimed run that fills the
    bytecode cache, as a user's second submission finds it)."""
    return wall_and_cpu(cmd, repeat, **kw)[0]


def in_turns(*fns, rounds: int = 9) -> list[float]:
    """Median wall seconds of each of `fns`, run in turns (a, b, a, b, ...) after one untimed call each: a change in
    the machine's speed during the bench (another tenant, a CPU clock) then falls on every figure of a ratio alike,
    where separate runs of medians would put it on one side only."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for spent, fn in zip(times, fns):
            t0 = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def process(cmd, **kw):
    """A function that runs `cmd` as a fresh process in the repository, as a user's shell would (in_turns)."""
    kw.setdefault("env", as_users_run())
    return lambda: subprocess.run(cmd, check=False, capture_output=True, cwd=REPO, **kw)


def wall_and_cpu(cmd, repeat: int = 5, **kw) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of the process and its children) of running `cmd` fresh, after one
    untimed run. The CPU time is the steadier figure on a shared machine: it does not count waiting for a core."""
    import resource

    kw.setdefault("env", as_users_run())
    subprocess.run(cmd, check=False, capture_output=True, cwd=REPO, **kw)
    walls, cpus = [], []
    for _ in range(repeat):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=False, capture_output=True, cwd=REPO, **kw)
        walls.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


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


HOLD_PARTITION = "bench_hold"


@contextlib.contextmanager
def hold_partition(profile_src: Path = REPO / "cluster_configs" / "local_slurm.yaml"):
    """A partition of the bench's own, created DOWN on the local cluster's nodes (`scontrol create`), that the
    measured jobs are submitted to: they stay PENDING (PartitionDown) and never run, while the `debug` partition
    and everybody's jobs in it go on. Yields a copy of the local_slurm profile that submits there; the bench's jobs
    are cancelled and the partition deleted on the way out. (sbatch 22.05 honours no SBATCH_HOLD / SBATCH_BEGIN.)"""
    import tempfile

    import yaml

    nodes = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%N"], capture_output=True, text=True).stdout.strip()
    _cancel_held()   # an earlier bench that was killed may have left its partition with jobs in it
    subprocess.run(["scontrol", "delete", f"PartitionName={HOLD_PARTITION}"], capture_output=True)
    subprocess.run(["scontrol", "create", f"PartitionName={HOLD_PARTITION}", f"Nodes={nodes or 'ALL'}", "State=DOWN",
                    "MaxTime=60"], check=True, capture_output=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    data = yaml.safe_load(profile_src.read_text())
    data["name"] = "local_slurm_bench_hold"
    data.setdefault("slurm", {})["partition"] = HOLD_PARTITION
    profile = folder / "local_slurm_bench_hold.yaml"
    profile.write_text(yaml.safe_dump(data))
    try:
        yield profile
    finally:
        _cancel_held()
        for _ in range(50):   # a partition with jobs in it cannot be deleted
            if subprocess.run(["scontrol", "delete", f"PartitionName={HOLD_PARTITION}"],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.2)


def _cancel_held() -> None:
    """Cancel this user's jobs in the bench's own partition (nothing else is ever there)."""
    out = subprocess.run(["squeue", "-h", "-p", HOLD_PARTITION, "-u", getpass.getuser(), "-o", "%F"],
                         capture_output=True, text=True).stdout.split()
    if out:
        subprocess.run(["scancel", *sorted(set(out))], capture_output=True)
        for _ in range(50):   # wait until they have left: a partition with jobs in it cannot be deleted
            if not subprocess.run(["squeue", "-h", "-p", HOLD_PARTITION, "-u", getpass.getuser(), "-o", "%F"],
                                  capture_output=True, text=True).stdout.split():
                break
            time.sleep(0.2)


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
