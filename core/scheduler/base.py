"""The one scheduler interface: everything the rest of the project asks of a batch system.

A scheduler renders a plan's job scripts, reads the cluster's limits, checks a plan against the cluster
(preflight), submits steps (with dependencies where it has a queue), lists and cancels jobs, and, inside a task,
says who this process is (rank, world, hosts), how often it was requeued and how to requeue it. Job states use one
vocabulary (Slurm's names: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...), which every backend maps
its own states onto. Backends live in their own packages (core/scheduler/slurm/, core/scheduler/local/); nothing
outside core/scheduler/ knows which one it talks to.
"""
from __future__ import annotations

import collections
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from core.scheduler.task_env import DistEnv, single_process

if TYPE_CHECKING:  # only for annotations: the scheduler sits below the plan and imports nothing of it at load
    from core.plan import Plan, Step

DONE = {"COMPLETED"}
RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}
PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
# anything else that is terminal counts as failed: FAILED, CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, ...


class SchedulerUnavailable(RuntimeError):
    """The scheduler's clients are missing, hang or fail; the message is theirs plus what to check."""


@functools.lru_cache(maxsize=1024)
def category(state: str) -> str:
    """A job state as done | running | pending | failed (how status counts tasks; remembered per state text: a
    refresh of 1,000 tasks asks tens of thousands of times about a handful of states)."""
    state = state.split()[0].rstrip("+") if state else "UNKNOWN"
    if state in DONE:
        return "done"
    if state in RUNNING:
        return "running"
    if state in PENDING:
        return "pending"
    return "failed"


def cancellable(state: str) -> bool:
    """Still worth cancelling: pending or running, not already ending (COMPLETING) or ended."""
    return category(state) in ("pending", "running") and not state.startswith("COMPLETING")


@functools.lru_cache(maxsize=8192)
def parse_elapsed(text: str) -> int:
    """'1-02:03:04', '02:03:04', '03:04' -> seconds (0 when unreadable)."""
    text = text.strip()
    if not text:
        return 0
    days, _, rest = text.rpartition("-") if "-" in text else ("", "", text)
    try:
        parts = [int(x) for x in rest.split(":")]
    except ValueError:
        return 0
    secs = 0
    for p in parts:
        secs = secs * 60 + p
    return secs + int(days or 0) * 86400


@functools.lru_cache(maxsize=65536)
def job_key(job_id: str) -> tuple:
    """Sort key of a job or task id ('12', '12_3', '12_[0-4]'); remembered (a view sorts the same ids many times)."""
    if job_id.isdigit():
        return (int(job_id),)
    return tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[_\[\]]", job_id) if x)


@dataclass
class Attempt:
    """One run of a job or array task as accounting saw it (a requeued task has several): what it held and for how
    long, for device-hours. `unit` is what it was charged in: 'gpu' / 'npu' (its generic resources) or 'cpu'."""
    task_id: str
    state: str
    elapsed_s: int = 0
    unit: str = "cpu"
    count: int = 0               # devices (or CPUs) it held
    start: float = 0.0           # epoch seconds, 0 when it never started
    end: float = 0.0             # epoch seconds, 0 while it runs

    @property
    def hours(self) -> float:
        return self.elapsed_s * self.count / 3600.0


@dataclass
class TaskEnd:
    """How one job or array task ended, as accounting tells it (its newest attempt): what the failure classifier
    (core.failures) reads besides the task's own log. Fields are the scheduler's words, '' when unknown."""
    state: str = ""              # with the scheduler's detail: 'CANCELLED by 1000', 'TIMEOUT', 'NODE_FAIL', ...
    exit_code: str = ""          # 'code:signal' of the job's script ('1:0', '0:9')
    derived_exit_code: str = ""  # the highest exit code of the job's steps ('code:signal')
    reason: str = ""             # the scheduler's reason ('DependencyNeverSatisfied', 'None', ...)
    nodes: str = ""              # the nodes it ran on ('n[1-2]'; '' or 'None assigned' when it never ran)
    started: bool = True         # it ever ran (False: cancelled while pending)


@dataclass
class JobRow:
    """One job of the queue or the accounting: a plain job, or an array job with its tasks."""
    job_id: str                  # the job id (the array job id for arrays)
    name: str = ""
    states: dict[str, str] = field(default_factory=dict)  # task id -> state ('12' -> state for a plain job)
    seconds: int = 0             # longest elapsed time of its tasks
    nodes: str = ""
    reason: str = ""             # the scheduler's own word for why it waits (Slurm: Priority, Dependency, ...)
    run_dir: str = ""
    why: str = ""                # the reason in plain words (the scheduler's explain_reason)
    expected_start: str = ""     # when the scheduler expects a pending job to start (ISO time), '' when unknown
    attempts: list[Attempt] = field(default_factory=list)  # every run of every task, oldest first (accounting)
    ends: dict[str, TaskEnd] = field(default_factory=dict)  # task id -> how its newest attempt ended (accounting)

    @property
    def is_array(self) -> bool:
        return any("_" in t for t in self.states)

    @property
    def progress(self) -> dict[str, int]:
        """Tasks per category (a copy: the caller may change it)."""
        return dict(self._counts())

    def _counts(self) -> dict[str, int]:
        """progress, counted once per row (rows are built whole by the scheduler's query and not changed after; a
        view asks many times), counted again should the number of tasks change."""
        known = self.__dict__.get("_progress")
        if known is not None and known[0] == len(self.states):
            return known[1]
        counts = {"done": 0, "running": 0, "pending": 0, "failed": 0}
        for s, n in collections.Counter(self.states.values()).items():
            counts[category(s)] += n
        self.__dict__["_progress"] = (len(self.states), counts)
        return counts

    @property
    def state(self) -> str:
        if not self.is_array:
            return next(iter(self.states.values()), "UNKNOWN").split()[0].rstrip("+")
        p = self._counts()
        if p["running"]:
            return "RUNNING"
        if p["pending"]:
            return "PENDING"
        if p["failed"]:
            bad = sorted({s.split()[0] for s in self.states.values() if category(s) == "failed"})
            return bad[0] if len(bad) == 1 else "FAILED"
        return "COMPLETED"

    @property
    def active(self) -> bool:
        p = self._counts()
        return bool(p["running"] or p["pending"])


@dataclass
class QueuedJob:
    """A job of this user still queued or running, as cancel-by-name sees it."""
    job_id: str       # the job id (the array job id for arrays)
    state: str
    name: str
    comment: str      # what the submission wrote in the job's comment (run=<run folder>)


@dataclass
class QueueEntry:
    """A queued job or task by id, as cancel-by-id sees it (any user)."""
    task_id: str      # '12' or '12_3'
    array_id: str     # the array job id ('12'), the job id for a plain job
    own_id: str       # the task's own job id
    owner: str
    state: str
    name: str


@dataclass
class Preflight:
    problems: list[tuple[str, str]] = field(default_factory=list)   # (field, why)
    notes: list[str] = field(default_factory=list)                  # expected start times, skipped checks


class Scheduler:
    """What a batch system offers the project. Subclasses: core.scheduler.slurm.Slurm, core.scheduler.local.Local.

    has_queue:    jobs wait in a queue and run detached from the submitting process; steps chain with dependencies
                  (afterok). Without one (local) every step runs to its end, in order, inside the submit command.
    single_host:  every task's processes run on this machine (the plan folds nodes into processes and caps them).
    requeues:     a job can be put back in the queue and run again (preemption, time limit) and resume.
    """
    name = "base"
    has_queue = False
    single_host = False
    requeues = False
    holds = False        # can submit jobs held (they wait until released): all-or-nothing submissions

    def __init__(self):
        self.holding = False           # submit_step submits held while set (see held())
        self.held_ids: list[str] = []  # the job ids submitted held since held() began

    # ---------------------------------------------------------------- planning and submission
    def limits(self, cluster) -> dict[str, int]:
        """Limits the cluster enforces on arrays and queues (MaxArraySize, MaxJobCount), read from the cluster that
        answers when it is the one the profile names; empty when unknown (the profile's own values are used)."""
        return {}

    def render(self, plan: "Plan") -> dict[str, list[str]]:
        """The job scripts each step would be submitted with (one per array chunk); empty without scripts."""
        return {}

    def preflight(self, plan: "Plan", scripts: dict[str, list[str]]) -> Preflight:
        """The plan checked against the live cluster (partitions, nodes, accounts, the scheduler's own test)."""
        return Preflight()

    def submit_step(self, plan: "Plan", step: "Step", root: Optional[str], deps: list[str],
                    make_entry) -> tuple[list, str]:
        """Submit one step; returns (jobs, run folder template used). `make_entry(step, run_dir_template)` builds
        the callable the tasks run."""
        raise NotImplementedError

    def held(self):
        """A context in which every submit_step submits its jobs held (nothing of them can start), their ids
        collected in `held_ids`; the caller releases them all (release) once every job is queued, or cancels them.
        A scheduler that cannot hold (no queue) submits as always."""
        return _Holding(self)

    def release(self, ids: list[str]) -> None:
        """Release held jobs (SchedulerUnavailable when the scheduler refuses); nothing to do without holds."""

    def release_or_cancel(self, ids: list[str]) -> str:
        """Release the held jobs of one submission; when the scheduler refuses, cancel them (all or nothing).
        '' when released, else what happened, for a person."""
        try:
            self.release(ids)
            return ""
        except (SchedulerUnavailable, OSError) as e:
            why = self.cancel_quietly(ids)
            return (f"releasing the held jobs {' '.join(ids)} failed ({e}); "
                    + ("they were cancelled: nothing of this submission runs" if not why else
                       f"cancelling them failed too ({why}): release or cancel them by hand"))

    def write_profile(self, name: Optional[str], partition: Optional[str], repo: Path) -> str:
        """A cluster profile (YAML text) read from the cluster itself, a comment on every value saying where it
        came from (launchers/cluster_profile.py)."""
        raise SchedulerUnavailable(f"the {self.name} scheduler has no cluster to read a profile from")

    # ---------------------------------------------------------------- jobs in the queue and in accounting
    def query(self, user: Optional[str] = None, since: str = "now-2days") -> list[JobRow]:
        """This user's jobs, live and finished, newest first."""
        return []

    def refresher(self, user: Optional[str] = None, since: str = "now-2days"):
        """An object whose query() returns rows like query(), cheaper on repeated calls (status --watch)."""
        return _Requery(self, user, since)

    def states(self, job_ids: list[str]) -> tuple[dict[str, str], bool]:
        """(job or task id -> state, whether the queue answered) for these job ids of any user: the live state of
        queued jobs, the accounting's of finished ones. A job id in neither is unknown to the scheduler."""
        return {}, True

    def accounting(self, job_ids: list[str]) -> list[JobRow]:
        """Rows of these jobs (any state) with every accounted attempt, for device-hours; empty without
        accounting."""
        return []

    def queued(self, ids: list[str]) -> list[QueueEntry]:
        """The queued jobs and tasks with these ids (any user)."""
        return []

    def queued_of(self, user: str) -> list[QueuedJob]:
        """This user's queued and running jobs, with their names and comments."""
        return []

    def cancel(self, ids: list[str]) -> None:
        """Cancel these jobs / array tasks (SchedulerUnavailable when the scheduler refuses)."""

    def cancel_quietly(self, ids: list[str]) -> str:
        """Cancel; '' when it worked, else what the scheduler said (never raises)."""
        try:
            self.cancel(ids)
        except (SchedulerUnavailable, OSError) as e:
            return str(e)[:300]
        return ""

    def log_files(self, row: JobRow, task_id: Optional[str] = None) -> list[Path]:
        """The log files of this job's tasks (of one task when task_id is given: '12_3' of an array, '12' of a plain
        job; every rank's file), oldest first (local file reads)."""
        if not row.run_dir:
            return []
        folder = Path(row.run_dir) / "submitit"
        if task_id is None:
            pattern = f"{row.job_id}_*log.out"
        elif "_" in task_id:
            pattern = f"{task_id}_*_log.out"   # submitit: <array id>_<index>_<rank>_log.out
        else:
            pattern = f"{task_id}_*_log.out"   # submitit: <job id>_<rank>_log.out
        try:
            found = [p for p in folder.glob(pattern)
                     if task_id is None or "_" in task_id or p.name.count("_") == 2]
            return sorted(found, key=lambda p: p.stat().st_mtime)
        except OSError:
            return []

    def explain_reason(self, reason: str) -> str:
        """Why a job waits, in plain words (the scheduler's own code when it has no words for it)."""
        return reason

    def classify_end(self, end: TaskEnd, lines: list[str]) -> Optional[tuple]:
        """(failure class, cause) of a finished task as the scheduler's own record says it (time limit, preempted,
        node failure, host out of memory, cancelled by whom, dependency never satisfied), from its accounting and
        the lines the scheduler wrote into the task's log, plus a third item, the failed node, where the scheduler
        names one within a multi-node allocation; None when it only says 'failed' (core.failures)."""
        return None

    def exit_text(self, end: TaskEnd) -> str:
        """'exit code 3' / 'killed by signal 9' of a finished task, '' when unknown or 0."""
        return ""

    def unhealthy(self, nodes: str) -> str:
        """Those of these nodes the scheduler holds down or draining now ('' when none or unknown): after a node
        failure of a multi-node job, which node to keep the retry off."""
        return ""

    def nodes_left(self, job_id: str, exclude: str) -> Optional[tuple[int, list[str]]]:
        """(how many nodes the job needs, the usable nodes of its partition other than `exclude`): whether a requeue
        kept off `exclude` can still run. None when the scheduler cannot say (the requeue is then tried)."""
        return None

    def requeue_excluding(self, job_id: str, nodes: str) -> tuple[bool, str]:
        """Put a job (running or finished) back in the queue, kept off `nodes` (the node that failed) when given:
        the retry policy's `requeue` (core.retry). Returns (accepted, the scheduler's message)."""
        return False, f"the {self.name} scheduler cannot requeue"

    # ---------------------------------------------------------------- inside a task
    @classmethod
    def detect(cls, environ: dict) -> bool:
        """This process runs as a task of this scheduler (its variables are in the environment)."""
        return False

    def dist_env(self, environ: dict) -> "DistEnv":
        """Rank, world, local rank, node rank, hosts and rendezvous of this task, from the scheduler's variables."""
        return single_process()

    def job_ref(self, environ: dict) -> str:
        """This task's job id as the scheduler names it (what requeue takes)."""
        import os

        return str(os.getpid())

    def restart_count(self, environ: dict) -> int:
        """How often the scheduler has requeued this task (0 for a first run)."""
        return 0

    def node_name(self, environ: dict) -> Optional[str]:
        return None

    def array_index(self, environ: dict) -> Optional[str]:
        """This task's index in its array job, as the scheduler set it (None outside an array)."""
        return None

    def root_job_id(self, environ: dict) -> Optional[str]:
        """The id that names the run folder: the array job id of an array task, else the job id."""
        return None

    def variables(self, environ: dict) -> dict[str, str]:
        """The scheduler's own variables of this task (for a record of where and how it ran)."""
        return {}

    def client_env(self, environ: dict) -> None:
        """Point the scheduler's client commands at the right cluster before any runs (called by the launchers)."""

    def device_vars(self) -> tuple[str, ...]:
        """Variables in which the scheduler lists the devices it bound to this task (after the accelerator's own)."""
        return ()

    def can_requeue(self, cluster: dict, environ: Optional[dict] = None) -> bool:
        """This task may put itself back in the queue (the scheduler requeues, and requeues are left)."""
        return False

    def requeue(self, job_id: str) -> tuple[bool, str]:
        return False, f"the {self.name} scheduler cannot requeue"


class _Holding:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def __enter__(self) -> list[str]:
        self.scheduler.holding = self.scheduler.holds
        self.scheduler.held_ids = []
        return self.scheduler.held_ids

    def __exit__(self, *exc) -> None:
        self.scheduler.holding = False


class _Requery:
    def __init__(self, scheduler: Scheduler, user: Optional[str], since: str):
        self.scheduler, self.user, self.since = scheduler, user, since

    def query(self) -> list[JobRow]:
        return self.scheduler.query(self.user, self.since)
