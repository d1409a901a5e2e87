"""This user's jobs from Slurm: ONE `squeue` call (live states, array tasks expanded) + ONE `sacct` call (finished
states) per refresh, however many jobs and array tasks there are, so the controller load stays flat; the states of
given job ids (a study's steps); queued jobs for cancelling, and `scancel`."""
from __future__ import annotations

import datetime
import functools
import getpass
import time
from typing import Iterable, Optional, Union

from core.gc_pause import paused_collector
from core.scheduler.base import (PENDING, RUNNING, Attempt, JobRow, QueuedJob, QueueEntry, SchedulerUnavailable,
                                 TaskEnd, category, parse_elapsed)
from core.scheduler.slurm.commands import lines, run
from core.scheduler.slurm.names import expand_task_ids
from core.scheduler.slurm.reasons import explain, start_time

# the comment (free text: run=<folder>) comes last in both; %S is the (expected) start time, in the same call.
# Reason and DerivedExitCode ride in the same sacct call for the failure classes (core.failures): no extra call
SQUEUE_FMT = "%i|%j|%T|%M|%D|%R|%S|%k"
SACCT_FIELDS = ("JobID,JobName,State,ExitCode,Elapsed,NNodes,NodeList,ElapsedRaw,AllocTRES,Start,End,Reason,"
                "DerivedExitCode,Comment")
_N_ACCT = SACCT_FIELDS.count(",") + 1
DEVICE_GRES = ("gpu", "npu")  # generic resources counted as devices (device-hours); otherwise CPU-hours


@functools.lru_cache(maxsize=65536)
def _root(task_id: str) -> str:
    return task_id.split("_")[0].split(".")[0]


def _squeue(user: str) -> str:
    return run(["squeue", "-h", "-r", "-u", user, "-o", SQUEUE_FMT])


def _sacct(user: str, since: str) -> Iterable[str]:
    """This user's accounting of the window, line by line as sacct writes it (parsed meanwhile)."""
    # -D: every attempt of a requeued job too (its earlier runs are device time that was spent, maybe lost)
    return lines(["sacct", "-X", "-D", "-n", "-P", "-u", user, "-S", since, "-o", SACCT_FIELDS])


@functools.lru_cache(maxsize=4096)
def charged(alloc_tres: str) -> tuple[str, int]:
    """(unit, count) a job was charged in from sacct's AllocTRES ('billing=2,cpu=2,gres/gpu=8,gres/gpu:a100=8,...'):
    its GPUs or NPUs when it held some, else its CPUs."""
    tres: dict[str, int] = {}
    for part in alloc_tres.split(","):
        key, _, value = part.partition("=")
        try:
            tres[key.strip()] = int(float(value.rstrip("KMGTP") or 0))
        except ValueError:
            continue
    for dev in DEVICE_GRES:
        if tres.get(f"gres/{dev}"):
            return dev, tres[f"gres/{dev}"]
    return "cpu", tres.get("cpu", 0)


@functools.lru_cache(maxsize=65536)
def _epoch(text: str) -> float:
    """Seconds since the epoch of one of Slurm's local times ('2026-12-06T17:11:20'); 0.0 for 'Unknown', 'None'
    and anything else. Fields sliced by hand (time.strptime costs ~60 us a call: over half a 1,000-task refresh),
    and cached: a refresh sees the same few start and end times many times over."""
    t = text.strip()
    if len(t) != 19 or t[4] != "-" or t[7] != "-" or t[10] != "T" or t[13] != ":" or t[16] != ":":
        return 0.0
    try:
        fields = (int(t[0:4]), int(t[5:7]), int(t[8:10]), int(t[11:13]), int(t[14:16]), int(t[17:19]))
        datetime.datetime(*fields)   # a real date and time, or ValueError (as strptime)
    except ValueError:
        return 0.0
    return time.mktime((*fields, 0, 0, -1))


def query(user: Optional[str] = None, since: str = "now-2days") -> list[JobRow]:
    """This user's jobs from one squeue and one sacct call, newest first."""
    user = user or getpass.getuser()
    # squeue first: a task that ends between the two calls is then still seen (by sacct) instead of by neither
    live = _squeue(user)
    return merge_rows(live, _sacct(user, since))


class Refresher:
    """For --watch: squeue on every refresh, sacct only when its answer can have changed: on the first refresh,
    when a job or task has left the queue since the last one (finished states only change then), and at least
    every `full_every_s` seconds (a job that came and went between two refreshes). Fewer controller and slurmdbd
    calls than one of each per refresh, never more; sacct's answer is parsed once and reused until it is asked
    again (a refresh then only reads squeue's lines)."""

    def __init__(self, user: Optional[str] = None, since: str = "now-2days", full_every_s: float = 60.0,
                 clock=time.time):
        self.user, self.since, self.full_every_s, self.clock = user or getpass.getuser(), since, full_every_s, clock
        self.acct: Optional[dict[str, JobRow]] = None
        self.acct_at = 0.0
        self.live_ids: set[str] = set()

    def query(self) -> list[JobRow]:
        live = _squeue(self.user)
        ids = {t for line in live.splitlines() if "|" in line for t in expand_task_ids(line.split("|", 1)[0])}
        if self.acct is None or (self.live_ids - ids) or self.clock() - self.acct_at >= self.full_every_s:
            self.acct, self.acct_at = accounted_rows(_sacct(self.user, self.since)), self.clock()
        self.live_ids = ids
        return with_live(live, self.acct)


def _folder(comment: str) -> str:
    """The run folder our submissions write in the job comment (run=<folder>); '' for anything else."""
    comment = comment.strip()
    return comment.removeprefix("run=") if comment.startswith("run=") else ""


def merge_rows(live: str, acct: Union[str, Iterable[str]]) -> list[JobRow]:
    """Rows from squeue's live view and sacct's accounting (sacct's terminal states win: they are newer). A pending
    job's reason comes with plain words (reasons.explain) and squeue's expected start; every accounted attempt
    (sacct -D lists each run of a requeued job) with what it held, for device-hours."""
    return with_live(live, accounted_rows(acct))


class AccountedRow(JobRow):
    """A job as sacct's answer tells it, built line by line as the answer comes (add, then done). Its states, name,
    run folder, longest elapsed time and first node list are read at once; its attempts and how each task ended
    (`attempts`, `ends`) are built from its own accounting lines the first time they are read: a view reads them
    only for the runs it shows, not for the thousands of finished jobs of a long window. Not changed after done()
    (with_live copies what it adds to)."""

    def __init__(self, job_id: str, parts: list[str]):
        # the fields not set here keep JobRow's defaults; attempts and ends are built on first read (__getattr__)
        tasks, state = expand_task_ids(parts[0]), parts[2]
        counts = {"done": 0, "running": 0, "pending": 0, "failed": 0}
        counts[category(state)] = len(tasks)
        self.__dict__.update(job_id=job_id, name=parts[1], states=dict.fromkeys(tasks, state),
                             seconds=parse_elapsed(parts[4]), nodes=parts[6], run_dir=_folder(parts[13]),
                             _lines=[parts], _requeued=False, _progress=(len(tasks), counts))

    def add(self, parts: list[str]) -> None:
        """One more accounting line of this job: another array task, or another attempt of a requeued one."""
        self._lines.append(parts)
        if not self.name:
            self.name = parts[1]
        if not self.nodes:
            self.nodes = parts[6]
        if not self.run_dir:
            self.run_dir = _folder(parts[13])
        self.seconds = max(self.seconds, parse_elapsed(parts[4]))
        if self._requeued:
            return
        tasks, states = expand_task_ids(parts[0]), self.states
        if not states.keys().isdisjoint(tasks):   # a task seen before: which attempt is newest is decided in done()
            self._requeued = True
            return
        states.update(dict.fromkeys(tasks, parts[2]))
        n, counts = self._progress
        counts[category(parts[2])] += len(tasks)
        self._progress = (n + len(tasks), counts)

    def done(self) -> None:
        """Every line is in: each task of a requeued job gets its newest attempt's state; %A in the folder the
        first step's comment names is Slurm's id of that job."""
        if self._requeued:
            self.states = {task: self._lines[i][2] for task, i in _newest_lines(self._lines).items()}
            del self.__dict__["_progress"]   # counted again when asked (JobRow.progress)
        if "%A" in self.run_dir:
            self.run_dir = self.run_dir.replace("%A", self.job_id)

    def __getattr__(self, name: str):
        if name not in ("attempts", "ends"):   # called only for what the instance lacks
            raise AttributeError(name)
        lines = self.__dict__["_lines"]
        newest = _newest_lines(lines) if self.__dict__["_requeued"] else \
            {task: i for i, parts in enumerate(lines) for task in expand_task_ids(parts[0])}
        self.__dict__["attempts"], self.__dict__["ends"] = _details(lines, newest)
        return self.__dict__[name]


def _details(lines: list[list[str]], newest: dict[str, int]) -> tuple[list[Attempt], dict[str, TaskEnd]]:
    """Every attempt of a job's tasks (its accounting lines in sacct's order), and how each task's newest attempt
    ended: one TaskEnd per line, shared by the tasks the line accounts together (a range of never-started tasks)."""
    attempts: list[Attempt] = []
    line_ends: list[TaskEnd] = []
    for jid, _, state, exit_code, elapsed, _, nodelist, raw, tres, start, end, reason, derived, _ in lines:
        unit, count = charged(tres)
        began = _epoch(start)
        held = int(raw) if raw.strip().isdigit() else parse_elapsed(elapsed)
        word, ended_at = state.split()[0] if state else "UNKNOWN", _epoch(end)
        attempts.extend(Attempt(t, word, held, unit, count, began, ended_at) for t in expand_task_ids(jid))
        node_text = nodelist.strip()
        line_ends.append(TaskEnd(state.strip(), exit_code.strip(), derived.strip(), reason.strip(),
                                 "" if node_text in ("", "None assigned") else node_text, started=bool(began)))
    return attempts, {task: line_ends[i] for task, i in newest.items()}


def _newest_lines(lines: list[list[str]]) -> dict[str, int]:
    """Task id -> the index of the line that accounts its newest attempt (sacct -D lists every run of a requeued
    task: the one that started last, or one that has not started yet, is the newest; of equal ones the later
    line)."""
    newest: dict[str, int] = {}
    order: dict[str, float] = {}
    for i, parts in enumerate(lines):
        began = _epoch(parts[9])
        at = began if began else float("inf")   # an attempt that has not started (requeued, waiting) is newest
        for task in expand_task_ids(parts[0]):
            if task not in order or at >= order[task]:
                order[task], newest[task] = at, i
    return newest


@paused_collector
def accounted_rows(acct: Union[str, Iterable[str]]) -> dict[str, JobRow]:
    """Job id -> its row as sacct's answer tells it (AccountedRow: states and what a view lists at once, the
    attempts and task ends when first read). `acct`: the answer, or its lines as they come (commands.lines: read
    while sacct still writes). Each line is split once; rows are not changed afterwards, so a --watch refresh can
    reuse them while sacct is not asked again."""
    rows: dict[str, AccountedRow] = {}
    for line in acct.splitlines() if isinstance(acct, str) else acct:
        parts = line.split("|", _N_ACCT - 1)
        if len(parts) < _N_ACCT:
            continue
        root = _root(parts[0])
        r = rows.get(root)
        if r is None:
            rows[root] = AccountedRow(root, parts)
        else:
            r.add(parts)
    for r in rows.values():
        r.done()
    return rows  # type: ignore[return-value]


def with_live(live: str, accounted: dict[str, JobRow]) -> list[JobRow]:
    """squeue's live lines over accounted_rows' answer (left unchanged), newest job first: a job squeue lists gets
    a new row with its live states, reason in plain words and expected start, where its newest accounted attempt's
    state wins only once that attempt has ended (squeue was asked first)."""
    fresh: dict[str, JobRow] = {}
    for line in live.splitlines():
        parts = line.split("|", 7)
        if len(parts) < 8:
            continue
        jid, name, state, elapsed, nnodes, reason, start, comment = parts
        for task in expand_task_ids(jid):
            root = _root(task)
            r = fresh.get(root)
            if r is None:
                r = fresh[root] = JobRow(root)
            r.states[task] = state
            r.name = r.name or name
            r.seconds = max(r.seconds, parse_elapsed(elapsed))
            if state in PENDING:  # a pending task's reason and start estimate win over a running one's node list
                r.reason, r.why = reason, explain(reason)
                r.expected_start = r.expected_start or start_time(start)
            elif state in RUNNING and not r.why:
                r.reason = reason
            r.run_dir = r.run_dir or _folder(comment)
    for root, r in fresh.items():
        r.run_dir = r.run_dir.replace("%A", root)
        known = accounted.get(root)
        if known is None:
            continue
        r.name, r.seconds, r.nodes = r.name or known.name, max(r.seconds, known.seconds), known.nodes
        r.run_dir = r.run_dir or known.run_dir
        r.attempts, r.ends = known.attempts, known.ends   # shared with the accounted row: read, never changed
        for task, state in known.states.items():
            if task not in r.states or category(state) in ("done", "failed"):
                r.states[task] = state
    rows = {**accounted, **fresh}
    return sorted(rows.values(), key=lambda r: int(r.job_id) if r.job_id.isdigit() else 0, reverse=True)


def states(job_ids: list[str]) -> tuple[dict[str, str], bool]:
    """(task or job id -> state for every job and array task of these job ids, whether the queue answered): one
    sacct and one squeue call; the queue's live state wins over accounting's. When squeue does not answer, the
    caller must not call a job lost."""
    numeric = [j for j in job_ids if j.isdigit()]
    out: dict[str, str] = {}
    if not numeric:
        return out, True
    for line in run(["sacct", "-X", "-n", "-P", "-j", ",".join(numeric), "-o", "JobID,State"]).splitlines():
        if "|" in line:
            jid, state = line.split("|")[:2]
            for t in expand_task_ids(jid):
                out[t] = state.split()[0] if state else "UNKNOWN"
    answered = True
    try:
        live = run(["squeue", "-h", "-r", "-j", ",".join(numeric), "-o", "%i|%T"])
    except SchedulerUnavailable as e:
        answered = "Invalid job id" in str(e)  # that one means: every id has left the queue (or never existed)
        live = ""
    for line in live.splitlines():
        if "|" in line:
            jid, state = line.split("|")[:2]
            for t in expand_task_ids(jid.strip()):
                out[t] = state.strip()
    return out, answered


def accounting(job_ids: list[str]) -> list[JobRow]:
    """These jobs as sacct accounts them (one call, every attempt: -D), for device-hours."""
    numeric = [j for j in job_ids if j.isdigit()]
    if not numeric:
        return []
    return merge_rows("", run(["sacct", "-X", "-D", "-n", "-P", "-j", ",".join(numeric), "-o", SACCT_FIELDS]))


def queued(ids: list[str]) -> list[QueueEntry]:
    """The queued jobs and tasks with these ids, of any user."""
    bases = sorted({i.split("_")[0] for i in ids}, key=int)
    try:
        out = run(["squeue", "-h", "-r", "-a", "-j", ",".join(bases), "-o", "%i|%F|%A|%u|%T|%j"])
    except SchedulerUnavailable as e:
        if "Invalid job id" in str(e):  # every id given has left the queue (or never existed)
            return []
        raise
    rows = []
    for line in out.splitlines():
        parts = line.split("|", 5)
        if len(parts) == 6:
            task, array_id, job_id, owner, state, name = parts
            rows.append(QueueEntry(task.strip(), array_id.strip(), job_id.strip(), owner.strip(), state.strip(), name))
    return rows


def queued_of(user: str) -> list[QueuedJob]:
    """This user's queued and running jobs (array jobs once, by their array id) with names and comments."""
    jobs = []
    for line in run(["squeue", "-h", "-u", user, "-o", "%F|%T|%j|%k"]).splitlines():
        jid, _, rest = line.partition("|")
        state, _, rest = rest.partition("|")
        if "|run=" in rest:  # names and comments are free text: split at our own comment's start
            name, _, tail = rest.rpartition("|run=")
            comment = "run=" + tail
        else:
            name, _, comment = rest.rpartition("|")
        jobs.append(QueuedJob(jid.strip(), state.strip(), name, comment))
    return jobs


def cancel(ids: list[str]) -> None:
    run(["scancel", *ids])
