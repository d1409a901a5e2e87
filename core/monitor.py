"""Job status and cancellation from Slurm's own tools.

One refresh = ONE `squeue` call (live states, array tasks expanded) + ONE `sacct` call (finished states),
however many jobs and array tasks there are: the controller load stays flat. Rows are Slurm jobs (an
array chunk is one row with its progress: done / running / pending / failed); the run folder comes from the
job comment (`run=...`) that core.submit writes, so a person can go from `squeue` to the logs.
"""
from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

DONE = {"COMPLETED"}
RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}
PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
# anything else that is terminal counts as failed: FAILED, CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, ...

SQUEUE_FMT = "%i|%j|%T|%M|%D|%R|%k"
SACCT_FIELDS = "JobID,JobName,State,ExitCode,Elapsed,NNodes,NodeList,Comment"


class SlurmUnavailable(RuntimeError):
    pass


def _run(cmd: list[str]) -> str:
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):  # Slurm's clients would retry for 60 s before saying so
        raise SlurmUnavailable(f"SLURM_CONF={conf} is not a file: unset it or point it at the cluster's slurm.conf "
                               f"(the local cluster's: bash slurm/local_cluster.sh conf)")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmUnavailable(f"'{cmd[0]}' not found: is this a Slurm login node? "
                               f"(for the local cluster: bash slurm/local_cluster.sh up)") from None
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"{cmd[0]} did not answer within 60 s: is slurmctld up? "
                               f"(for the local cluster: bash slurm/local_cluster.sh status)") from None
    if proc.returncode != 0:
        said = "; ".join(ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip())
        raise SlurmUnavailable(f"{' '.join(cmd[:2])} failed: {said[:400]}")
    return proc.stdout


def slurm_output(cmd: list[str]) -> str:
    """Run one Slurm client command (sacct, squeue, scancel ...) and return its stdout; SlurmUnavailable with
    the client's own message when it is missing, hangs or fails."""
    return _run(cmd)


def expand_task_ids(job_id: str) -> list[str]:
    """'12_[3-5,9%2]' -> ['12_3', '12_4', '12_5', '12_9']; plain ids come back unchanged."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not m:
        return [job_id]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += [f"{base}_{i}" for i in range(int(a), int(b or a) + 1)]
    return out


def category(state: str) -> str:
    """A Slurm state as done | running | pending | failed (how status.py counts tasks)."""
    return _category(state)


def _category(state: str) -> str:
    state = state.split()[0].rstrip("+") if state else "UNKNOWN"
    if state in DONE:
        return "done"
    if state in RUNNING:
        return "running"
    if state in PENDING:
        return "pending"
    return "failed"


@dataclass
class JobRow:
    job_id: str                  # the Slurm job id (array job id for arrays)
    name: str = ""
    states: dict[str, str] = field(default_factory=dict)  # task id -> state ('12' -> state for a plain job)
    seconds: int = 0             # longest elapsed time of its tasks
    nodes: str = ""
    reason: str = ""
    run_dir: str = ""

    @property
    def is_array(self) -> bool:
        return any("_" in t for t in self.states)

    @property
    def progress(self) -> dict[str, int]:
        counts = {"done": 0, "running": 0, "pending": 0, "failed": 0}
        for s in self.states.values():
            counts[_category(s)] += 1
        return counts

    @property
    def state(self) -> str:
        if not self.is_array:
            return next(iter(self.states.values()), "UNKNOWN").split()[0].rstrip("+")
        p = self.progress
        if p["running"]:
            return "RUNNING"
        if p["pending"]:
            return "PENDING"
        if p["failed"]:
            bad = sorted({s.split()[0] for s in self.states.values() if _category(s) == "failed"})
            return bad[0] if len(bad) == 1 else "FAILED"
        return "COMPLETED"

    @property
    def active(self) -> bool:
        p = self.progress
        return bool(p["running"] or p["pending"])


def _seconds(text: str) -> int:
    """Slurm durations ('5:03', '1:02:03', '2-01:02:03', 'INVALID') -> seconds."""
    days, _, rest = text.rpartition("-") if "-" in text else ("", "", text)
    try:
        parts = [int(x) for x in rest.split(":")]
    except ValueError:
        return 0
    secs = 0
    for p in parts:
        secs = secs * 60 + p
    return secs + int(days or 0) * 86400


def _fmt_seconds(secs: int) -> str:
    d, rem = divmod(secs, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}-" if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def _root(task_id: str) -> str:
    return task_id.split("_")[0].split(".")[0]


def _squeue(user: str) -> str:
    return _run(["squeue", "-h", "-r", "-u", user, "-o", SQUEUE_FMT])


def _sacct(user: str, since: str) -> str:
    return _run(["sacct", "-X", "-n", "-P", "-u", user, "-S", since, "-o", SACCT_FIELDS])


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
    calls than one of each per refresh, never more."""

    def __init__(self, user: Optional[str] = None, since: str = "now-2days", full_every_s: float = 60.0, clock=time.time):
        self.user, self.since, self.full_every_s, self.clock = user or getpass.getuser(), since, full_every_s, clock
        self.acct: Optional[str] = None
        self.acct_at = 0.0
        self.live_ids: set[str] = set()

    def query(self) -> list[JobRow]:
        live = _squeue(self.user)
        ids = {t for line in live.splitlines() if "|" in line for t in expand_task_ids(line.split("|", 1)[0])}
        if self.acct is None or (self.live_ids - ids) or self.clock() - self.acct_at >= self.full_every_s:
            self.acct, self.acct_at = _sacct(self.user, self.since), self.clock()
        self.live_ids = ids
        return merge_rows(live, self.acct)


def merge_rows(live: str, acct: str) -> list[JobRow]:
    """Rows from squeue's live view and sacct's accounting (sacct's terminal states win: they are newer)."""
    rows: dict[str, JobRow] = {}

    def row(task: str) -> JobRow:
        return rows.setdefault(_root(task), JobRow(_root(task)))

    for line in live.splitlines():
        parts = line.split("|", 6)
        if len(parts) < 7:
            continue
        jid, name, state, elapsed, nnodes, reason, comment = parts
        for task in expand_task_ids(jid):
            r = row(task)
            r.states[task] = state
            r.name = r.name or name
            r.seconds = max(r.seconds, _seconds(elapsed))
            if state in PENDING or state in RUNNING:
                r.reason = reason
            r.run_dir = r.run_dir or comment.removeprefix("run=")
    for line in acct.splitlines():
        parts = line.split("|")
        if len(parts) < 8:
            continue
        jid, name, state, _exit, elapsed, nnodes, nodelist, comment = parts[:8]
        for task in expand_task_ids(jid):
            r = row(task)
            if task not in r.states or _category(state) in ("done", "failed"):
                r.states[task] = state  # sacct was asked last: its terminal states are the newest news
            r.name = r.name or name
            r.seconds, r.nodes = max(r.seconds, _seconds(elapsed)), r.nodes or nodelist
            r.run_dir = r.run_dir or comment.removeprefix("run=")
    for r in rows.values():  # the first step's comment names its folder with Slurm's %A (= its own id)
        r.run_dir = r.run_dir.replace("%A", r.job_id)
    return sorted(rows.values(), key=lambda r: int(r.job_id) if r.job_id.isdigit() else 0, reverse=True)


def last_log_line(row: JobRow) -> str:
    """The last non-empty line of the newest submitit log of this job (local file read, no Slurm call)."""
    if not row.run_dir:
        return ""
    folder = Path(row.run_dir) / "submitit"
    try:
        logs = sorted(folder.glob(f"{row.job_id}_*log.out"), key=lambda p: p.stat().st_mtime)
    except OSError:
        return ""
    if not logs:
        return ""
    try:
        with logs[-1].open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:100] if lines else ""


def by_run(rows: list[JobRow]) -> list[tuple[str, list[JobRow]]]:
    """Rows grouped by their run folder (a run's array chunks, merge and later steps together), runs in the order
    of their first job; jobs not submitted by us (no run folder) last."""
    groups: dict[str, list[JobRow]] = {}
    for r in rows:
        groups.setdefault(r.run_dir, []).append(r)
    return sorted(groups.items(), key=lambda kv: (kv[0] == "", min(_job_key(r.job_id) for r in kv[1])))


def _job_key(job_id: str) -> tuple:
    return tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[_\[\]]", job_id) if x)


def _run_state(rows: list[JobRow]) -> str:
    states = {r.state for r in rows}
    for s in ("RUNNING", "PENDING"):
        if s in states:
            return s
    bad = sorted(st for st in states if _category(st) == "failed")
    return bad[0] if bad else "COMPLETED"


def study_of(run_dir: str) -> Optional[tuple[str, str, str]]:
    """(study folder, study name, step) when the run is a step of a study (its run.json says so), else None."""
    if not run_dir:
        return None
    rec = _run_record(Path(run_dir))
    if not rec or not rec.get("study"):
        return None
    return str(rec["study"]), str(rec.get("study_name") or ""), str(rec.get("study_step") or "")


def _failed_for_real(jobs: list[JobRow]) -> bool:
    """A run whose own tasks failed (not merely cancelled because an earlier step failed)."""
    return any(_category(s) == "failed" and not s.startswith("CANCELLED") for r in jobs for s in r.states.values())


def by_study(rows: list[JobRow]) -> list[tuple[Optional[tuple[str, str]], list[tuple[str, str, list[JobRow]]]]]:
    """by_run's groups, with the runs of one study together: [((study folder, name) | None, [(run folder, step,
    rows)])], in the order of each group's first job."""
    out: list = []
    index: dict[str, int] = {}
    for run_dir, jobs in by_run(rows):
        st = study_of(run_dir)
        if st is None:
            out.append((None, [(run_dir, "", jobs)]))
            continue
        if st[0] not in index:
            index[st[0]] = len(out)
            out.append(((st[0], st[1]), []))
        out[index[st[0]]][1].append((run_dir, st[2], jobs))
    return out


def study_state(runs: list[tuple[str, str, list[JobRow]]]) -> tuple[str, list[str]]:
    """(state, failed steps): FAILED when a step's own tasks failed (the steps Slurm cancelled after it are not
    named), else RUNNING / PENDING / CANCELLED / COMPLETED as for a run."""
    failed = [step for _, step, jobs in runs if _failed_for_real(jobs)]
    state = _run_state([r for _, _, jobs in runs for r in jobs])
    if failed and state not in ("RUNNING", "PENDING"):
        state = "FAILED"
    return state, failed


def format_table(rows: list[JobRow], with_log: bool = True) -> str:
    """One block per run: a line naming the run, its state and its task counts, then its jobs. The runs of a
    study come together under a line naming the study, its state and the step that failed."""
    if not rows:
        return "no jobs"
    header = ["JOBID", "NAME", "STATE", "DONE/RUN/PEND/FAIL", "ELAPSED", "NODES/REASON"]
    if with_log:
        header.append("LAST LOG LINE")
    table: list = [header]
    for study, runs in by_study(rows):
        if study is not None:
            state, failed = study_state(runs)
            table.append(f"study {study[1]} {_short(study[0])}: {state}, {len(runs)} step run"
                         f"{'s' if len(runs) > 1 else ''}" + (f"; failed step: {', '.join(failed)}" if failed else ""))
        for run_dir, step, jobs in runs:
            _run_block(table, run_dir, jobs, with_log, f" (step {step})" if study is not None else "")
    cells = [row for row in table if isinstance(row, list)]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(header))]
    return "\n".join(row if isinstance(row, str) else
                     "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def _run_block(table: list, run_dir: str, jobs: list[JobRow], with_log: bool, step_label: str) -> None:
    tasks = {k: sum(r.progress[k] for r in jobs) for k in ("done", "running", "pending", "failed")}
    total = sum(len(r.states) for r in jobs)
    label = _short(run_dir) if run_dir else "(not submitted by medhpc: no run folder)"
    table.append(f"run {label}{step_label}: {_run_state(jobs)}, {len(jobs)} job{'s' if len(jobs) > 1 else ''}, "
                 f"tasks {tasks['done']}/{tasks['running']}/{tasks['pending']}/{tasks['failed']} of {total}")
    for r in sorted(jobs, key=lambda r: _job_key(r.job_id)):
        p = r.progress
        prog = f"{p['done']}/{p['running']}/{p['pending']}/{p['failed']} of {len(r.states)}" if r.is_array else "-"
        where = r.reason if r.active else r.nodes
        line = ["  " + r.job_id, r.name[:24], r.state, prog, _fmt_seconds(r.seconds), where[:24]]
        if with_log:  # finished-and-fine jobs' logs are not read: it keeps a refresh cheap with long histories
            line.append(last_log_line(r) if r.active or r.progress["failed"] else "")
        table.append(line)


def _run_json(run_dir: str, jobs: list[JobRow]) -> dict:
    return {"run_dir": run_dir or None, "state": _run_state(jobs),
            "tasks": {k: sum(r.progress[k] for r in jobs) for k in ("done", "running", "pending", "failed")},
            "jobs": [{"job_id": r.job_id, "name": r.name, "state": r.state, "elapsed_s": r.seconds,
                      "nodes": r.nodes, "reason": r.reason, "tasks": dict(r.states)}
                     for r in sorted(jobs, key=lambda r: _job_key(r.job_id))]}


def as_json(rows: list[JobRow]) -> list[dict]:
    """The same grouping for scripts: one object per run with its state, task counts and jobs; the runs of a study
    in one object {study_dir, study, state, failed_steps, runs: [run object + its step]}."""
    out = []
    for study, runs in by_study(rows):
        if study is None:
            out += [_run_json(run_dir, jobs) for run_dir, _, jobs in runs]
            continue
        state, failed = study_state(runs)
        out.append({"study_dir": study[0], "study": study[1], "state": state, "failed_steps": failed,
                    "runs": [{**_run_json(run_dir, jobs), "step": step} for run_dir, step, jobs in runs]})
    return out


def _short(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def watch(render, interval: float = 2.0, max_interval: float = 60.0, stop_when_idle: bool = True,
          max_refreshes: Optional[int] = None, sleep=time.sleep) -> int:
    """Call render() -> (text, any_active) repeatedly; the wait doubles while nothing changes (back-off)."""
    wait, last, n = interval, None, 0
    while True:
        text, active = render()
        n += 1
        if text != last:
            print(text, flush=True)
            wait = interval
        else:
            wait = min(wait * 2, max_interval)
        last = text
        if (stop_when_idle and not active) or (max_refreshes and n >= max_refreshes):
            return n
        sleep(wait)


# Steps other than `main` that our plans submit, as `<name>-<step>`: core/plan.py's `merge` and a workload's
# pre-step (sensitivity's `baseline`). Only used for jobs without a run folder to ask (not submitted by medhpc,
# or whose run.json is not written yet); otherwise the run record's own step names decide.
STEP_NAMES = ("merge", "baseline")
JOB_ID = re.compile(r"\d+(_\d+)?")


@dataclass
class CancelResult:
    cancelled: list[str] = field(default_factory=list)   # ids given to scancel
    problems: list[str] = field(default_factory=list)    # one line per target refused or not found


def _run_record(run_dir: Path) -> Optional[dict]:
    try:
        rec = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def belongs_to_run(run: str, job_name: str, comment: str, job_id: str) -> bool:
    """Whether a queued job is a step of the run named `run`: its name is `run` (the main step) or `run-<step>`,
    and its comment `run=<folder>` (core.submit writes it on every job) names a folder `<logs>/<run>/<id>` whose
    run.json says name == run and lists <step>. So cancelling `smoke` never catches `smoke-test`'s jobs, even
    though `smoke-test` reads like run `smoke` + step `test`. Jobs without a run folder (not submitted by medhpc,
    or run.json not written yet) need `run` or `run-<one of STEP_NAMES>` as their name."""
    if job_name == run:
        step = "main"
    elif job_name.startswith(run + "-"):
        step = job_name[len(run) + 1:]
    else:
        return False
    known = step == "main" or step in STEP_NAMES
    if not comment.startswith("run="):
        return known
    folder = Path(comment.removeprefix("run=").replace("%A", job_id))
    if folder.parent.name != run:  # run folders are <logs_dir>/<name>/<root id>: another run's job
        return False
    rec = _run_record(folder)
    if rec is None:
        return known
    if rec.get("name") != run:
        return False
    steps = {st.get("name") for sub in [rec, *(rec.get("submissions") or [])] if isinstance(sub, dict)
             for st in (sub.get("steps") or []) if isinstance(st, dict)}
    return step == "main" or step in steps


def belongs_to_study(study: str, comment: str, job_id: str) -> bool:
    """Whether a queued job is a step of the study named `study`: its run folder's run.json (core.study writes
    `study_name` there) says so. Cancelling a study by its name cancels every step's jobs."""
    if not comment.startswith("run="):
        return False
    rec = _run_record(Path(comment.removeprefix("run=").replace("%A", job_id)))
    return bool(rec) and rec.get("study_name") == study


def _cancellable(state: str) -> bool:
    """Still worth a scancel: pending or running, not already ending (COMPLETING) or ended."""
    return _category(state) in ("pending", "running") and not state.startswith("COMPLETING")


def _squeue_jobs(ids: list[str]) -> list[tuple[str, ...]]:
    """(task id, array/job id, own job id, owner, name, state) of the queued jobs and tasks with these ids (any
    user)."""
    bases = sorted({i.split("_")[0] for i in ids}, key=int)
    cmd = ["squeue", "-h", "-r", "-a", "-j", ",".join(bases), "-o", "%i|%F|%A|%u|%T|%j"]
    try:
        out = _run(cmd)
    except SlurmUnavailable as e:
        if "Invalid job id" in str(e):  # every id given has left the queue (or never existed)
            return []
        raise
    rows = []
    for line in out.splitlines():
        parts = line.split("|", 5)
        if len(parts) == 6:
            task, array_id, job_id, owner, state, name = parts
            rows.append((task.strip(), array_id.strip(), job_id.strip(), owner.strip(), name, state.strip()))
    return rows


def cancel(targets: list[str], user: Optional[str] = None, any_user: bool = False) -> CancelResult:
    """Cancel by id ('12': a job or a whole array, '12_3': one task) or by run name (its steps: NAME and
    NAME-<step>, see belongs_to_run; only `user`'s jobs). An id whose job belongs to another user than `user`
    (default: the current one) is refused unless any_user. One squeue per kind of target, one scancel."""
    me = user or getpass.getuser()
    result = CancelResult()
    ids = list(dict.fromkeys(t for t in targets if JOB_ID.fullmatch(t)))
    names = list(dict.fromkeys(t for t in targets if not JOB_ID.fullmatch(t)))
    chosen: list[str] = []
    if ids:
        rows = _squeue_jobs(ids)
        for t in ids:
            if "_" in t:  # one array task
                mine = [r for r in rows if r[0] == t]
            else:  # a job, a whole array (its array id) or one task by its own job id
                mine = [r for r in rows if t in (r[1], r[2])]
            if not [r for r in mine if _cancellable(r[5])]:
                why = f"it is already ending: {mine[0][5]}" if mine else "finished, or a wrong id"
                result.problems.append(f"no queued job {t} ({why}; see python launchers/status.py)")
                continue
            others = sorted({r[3] for r in mine} - {me})
            if others and not any_user:
                result.problems.append(f"refused {t}: job {t} ({mine[0][4]}) belongs to user {', '.join(others)}, "
                                       f"not {me}; add --any-user to cancel another user's job")
                continue
            chosen.append(t)
    if names:
        jobs = []
        for line in _run(["squeue", "-h", "-u", me, "-o", "%F|%T|%j|%k"]).splitlines():
            jid, _, rest = line.partition("|")
            state, _, rest = rest.partition("|")
            if not _cancellable(state.strip()):
                continue
            if "|run=" in rest:  # names and comments are free text: split at our own comment's start
                name, _, tail = rest.rpartition("|run=")
                comment = "run=" + tail
            else:
                name, _, comment = rest.rpartition("|")
            jobs.append((jid.strip(), name, comment))
        for n in names:
            found = list(dict.fromkeys(jid for jid, name, comment in jobs if belongs_to_run(n, name, comment, jid)
                                       or belongs_to_study(n, comment, jid)))
            if not found:
                result.problems.append(f"no queued job of a run named {n} (user {me}; ids or names as "
                                       f"python launchers/status.py shows them)")
            chosen += [j for j in found if j not in chosen]
    if chosen:
        _run(["scancel", *chosen])
        result.cancelled = chosen
    return result
