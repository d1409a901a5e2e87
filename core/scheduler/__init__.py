"""The scheduler: one interface (core/scheduler/base.py) between the project and a batch system, one backend per
system (core/scheduler/slurm/, core/scheduler/local/). The rest of the project asks `for_cluster(profile)` (or
`in_task()` inside a job) for its scheduler and never compares scheduler names or runs a scheduler's commands.
Adding a scheduler: a package here with a `Scheduler` subclass, one line in BACKENDS, and its name allowed in the
cluster profile's `executor` field.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

from core.scheduler.base import (Attempt, JobRow, Preflight, QueuedJob, QueueEntry, Scheduler,  # noqa: F401
                                 SchedulerUnavailable, TaskEnd, cancellable, category, job_key)
from core.scheduler.task_env import DistEnv, DistEnvError, master_port_for, single_process  # noqa: F401

BACKENDS: dict[str, str] = {
    "slurm": "core.scheduler.slurm:Slurm",
    "local": "core.scheduler.local:Local",
}
_CACHE: dict[str, Scheduler] = {}


def by_name(name: str) -> Scheduler:
    """The scheduler a profile's `executor` names."""
    if name not in _CACHE:
        if name not in BACKENDS:
            raise ValueError(f"no scheduler named {name!r} (known: {', '.join(BACKENDS)})")
        module, cls = BACKENDS[name].split(":")
        _CACHE[name] = getattr(importlib.import_module(module), cls)()
    return _CACHE[name]


def for_cluster(cluster) -> Scheduler:
    """The scheduler of a cluster profile (a Cluster or its dict)."""
    return by_name(cluster["executor"] if isinstance(cluster, dict) else cluster.executor)


def in_task(environ: Optional[dict] = None) -> Optional[Scheduler]:
    """The scheduler that started this process (from its variables), None outside any job."""
    environ = os.environ if environ is None else environ
    for name in ("local", "slurm"):  # submitit's local executor first: its tasks may inherit Slurm variables
        if by_name(name).detect(environ):
            return by_name(name)
    return None


def dist_env(environ: Optional[dict] = None) -> DistEnv:
    """Who this task is (rank, world, hosts, rendezvous), from the variables of the scheduler that started it; a
    single process outside any job."""
    environ = os.environ if environ is None else environ
    sched = in_task(environ)
    return sched.dist_env(environ) if sched is not None else single_process()


def job_ref(environ: Optional[dict] = None) -> str:
    """This task's job as its scheduler names it (an array task as ARRAYID_TASKID on Slurm); else this process."""
    environ = os.environ if environ is None else environ
    sched = in_task(environ)
    return sched.job_ref(environ) if sched is not None else str(os.getpid())


def restart_count(environ: Optional[dict] = None) -> int:
    """How often the scheduler has requeued this task (0 for a first run and outside any job)."""
    environ = os.environ if environ is None else environ
    sched = in_task(environ)
    return sched.restart_count(environ) if sched is not None else 0


def node_name(environ: Optional[dict] = None) -> Optional[str]:
    environ = os.environ if environ is None else environ
    sched = in_task(environ)
    return sched.node_name(environ) if sched is not None else None


def with_queue() -> list[Scheduler]:
    """The schedulers whose jobs wait in a queue and outlive the submit command (what status and cancel ask)."""
    return [s for s in (by_name(n) for n in BACKENDS) if s.has_queue]


def device_vars() -> tuple[str, ...]:
    """Variables in which a scheduler lists the devices it bound to a task (Slurm's SLURM_STEP_GPUS, ...)."""
    return tuple(v for n in BACKENDS for v in by_name(n).device_vars())


def array_index(environ: Optional[dict] = None) -> Optional[str]:
    """This task's index in its array job (None outside an array or any job)."""
    environ = os.environ if environ is None else environ
    sched = in_task(environ)
    return sched.array_index(environ) if sched is not None else None


def root_job_id(environ: Optional[dict] = None) -> Optional[str]:
    """The job id that names this task's run folder (the array job id of an array task); None outside a job."""
    environ = os.environ if environ is None else environ
    sched = in_task(environ)
    return sched.root_job_id(environ) if sched is not None else None


def task_variables(environ: Optional[dict] = None) -> dict[str, str]:
    """The variables the scheduler that runs this task set (empty outside any job)."""
    environ = os.environ if environ is None else environ
    sched = in_task(environ)
    return sched.variables(environ) if sched is not None else {}


def prepare_clients(environ: Optional[dict] = None) -> None:
    """Before a launcher runs any scheduler command: let every backend point its clients at the right cluster."""
    environ = os.environ if environ is None else environ
    for name in BACKENDS:
        by_name(name).client_env(environ)
