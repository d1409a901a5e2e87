"""Slurm's client commands, run in one place: every squeue / sacct / scancel / scontrol / sinfo / sacctmgr /
sbatch call of the project goes through `run` (stdout or SchedulerUnavailable with the client's own message) or
`call` (exit code and text, never raises)."""
from __future__ import annotations

import codecs
import os
import selectors
import shutil
import subprocess
import tempfile
import time
from typing import Iterator

from core.scheduler.base import SchedulerUnavailable


def have(command: str = "scontrol") -> bool:
    """Slurm's clients are installed on this machine."""
    return shutil.which(command) is not None


def _check_conf() -> None:
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):  # Slurm's clients would retry for 60 s before saying so
        raise SchedulerUnavailable(f"SLURM_CONF={conf} is not a file: unset it or point it at the cluster's "
                                   f"slurm.conf (the local cluster's: bash slurm/local_cluster.sh conf)")


def _missing(cmd: list[str]) -> SchedulerUnavailable:
    return SchedulerUnavailable(f"'{cmd[0]}' not found: is this a Slurm login node? "
                                f"(for the local cluster: bash slurm/local_cluster.sh up)")


def _hung(cmd: list[str], timeout: float) -> SchedulerUnavailable:
    return SchedulerUnavailable(f"{cmd[0]} did not answer within {timeout:g} s: is slurmctld up? "
                                f"(for the local cluster: bash slurm/local_cluster.sh status)")


def _failed(cmd: list[str], said: str) -> SchedulerUnavailable:
    said = "; ".join(ln.strip() for ln in said.splitlines() if ln.strip())
    return SchedulerUnavailable(f"{' '.join(cmd[:2])} failed: {said[:400]}")


def run(cmd: list[str], timeout: int = 60) -> str:
    """Run one Slurm client command and return its stdout; SchedulerUnavailable with the client's own message
    when it is missing, hangs or fails."""
    _check_conf()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise _missing(cmd) from None
    except subprocess.TimeoutExpired:
        raise _hung(cmd, timeout) from None
    if proc.returncode != 0:
        raise _failed(cmd, proc.stderr or proc.stdout)
    return proc.stdout


def lines(cmd: list[str], timeout: int = 60) -> Iterator[str]:
    """run()'s answer line by line, while the client is still writing it: sacct prints a long window's accounting
    over a tenth of a second or more, and a caller that reads each line as it comes does its own work meanwhile,
    on another core. The same errors as run(), raised once the client has ended (a caller that gets one drops what
    it read); the client is killed when the caller stops reading early."""
    _check_conf()
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryFile() as err:   # a file, not a pipe: a talkative stderr can never block the client
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        except FileNotFoundError:
            raise _missing(cmd) from None
        decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        rest = ""
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                while True:
                    if not sel.select(max(0.0, deadline - time.monotonic())):
                        raise _hung(cmd, timeout)
                    chunk = os.read(proc.stdout.fileno(), 1 << 16)
                    if not chunk:
                        break
                    *whole, rest = (rest + decode(chunk)).split("\n")
                    yield from whole
            rest += decode(b"", final=True)
            try:
                code = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise _hung(cmd, timeout) from None
            if code != 0:
                err.seek(0)
                raise _failed(cmd, err.read().decode(errors="replace"))
            if rest:
                yield rest
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


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
