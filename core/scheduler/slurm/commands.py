"""Slurm's client commands, run in one place: every squeue / sacct / scancel / scontrol / sinfo / sacctmgr /
sbatch call of the project goes through `run` (stdout or SchedulerUnavailable with the client's own message) or
`call` (exit code and text, never raises)."""
from __future__ import annotations

import os
import shutil
import subprocess

from core.scheduler.base import SchedulerUnavailable


def have(command: str = "scontrol") -> bool:
    """Slurm's clients are installed on this machine."""
    return shutil.which(command) is not None


def run(cmd: list[str], timeout: int = 60) -> str:
    """Run one Slurm client command and return its stdout; SchedulerUnavailable with the client's own message
    when it is missing, hangs or fails."""
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):  # Slurm's clients would retry for 60 s before saying so
        raise SchedulerUnavailable(f"SLURM_CONF={conf} is not a file: unset it or point it at the cluster's "
                                   f"slurm.conf (the local cluster's: bash slurm/local_cluster.sh conf)")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SchedulerUnavailable(f"'{cmd[0]}' not found: is this a Slurm login node? "
                                   f"(for the local cluster: bash slurm/local_cluster.sh up)") from None
    except subprocess.TimeoutExpired:
        raise SchedulerUnavailable(f"{cmd[0]} did not answer within {timeout} s: is slurmctld up? "
                                   f"(for the local cluster: bash slurm/local_cluster.sh status)") from None
    if proc.returncode != 0:
        said = "; ".join(ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip())
        raise SchedulerUnavailable(f"{' '.join(cmd[:2])} failed: {said[:400]}")
    return proc.stdout


def call(cmd: list[str], timeout: int = 30, ignore_term: bool = False) -> tuple[int, str]:
    """(exit code, stdout + stderr) of one Slurm client command; never raises. `ignore_term`: the command ignores
    SIGTERM (a task acting on its own job, which that action sends SIGTERM)."""
    name = cmd[0]
    if ignore_term:  # through sh: an ignored signal stays ignored across exec (no preexec_fn in a threaded task)
        cmd = ["sh", "-c", 'trap "" TERM; exec "$@"', "sh", *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 1, f"{name}: {type(e).__name__}"
    return proc.returncode, (proc.stdout + proc.stderr).strip()
