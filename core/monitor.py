"""Job status as a person reads it: the scheduler's rows (core.scheduler: on Slurm one squeue + one sacct call per
refresh, however many jobs and array tasks) grouped by run and by study, as a view (active runs and studies first,
newest first, in full; finished ones folded to one line each), as the full table (--all), as JSON, or refreshed
with back-off. Rows are jobs (an array chunk is one row with its progress: done / running / pending / failed); the
run folder comes from the job comment (`run=...`) that core.submit writes, so a person can go from `squeue` to the
logs. A pending job says why it waits in plain words (the scheduler's explain_reason) and when the scheduler
expects it to start; a failed task shows the error line of its OWN log; device-hours come from core.device_hours.
Cancelling is core.cancel.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from core import device_hours, scheduler
from core.gc_pause import paused_collector
from core.run_folder import RECORD
from core.scheduler import JobRow, SchedulerUnavailable, TaskEnd, category, job_key  # noqa: F401 (launchers catch it)

if TYPE_CHECKING:   # imported where a failure is classified: a view with no failed run shown never needs it
    from core import failures

DEFAULT_SINCE = "2d"
_SINCE = re.compile(r"(\d+)\s*([mhdw])")
_UNITS = {"m": ("minutes", 1), "h": ("hours", 1), "d": ("days", 1), "w": ("days", 7)}


def since_arg(text: str) -> str:
    """--since as the scheduler's query takes it: '2d' -> 'now-2days', '12h' -> 'now-12hours', '30m', '1w';
    a date (2026-12-01 or 2026-12-01T08:00) or a 'now-...' text is passed as it is. ValueError otherwise."""
    text = (text or "").strip()
    m = _SINCE.fullmatch(text)
    if m:
        unit, times = _UNITS[m.group(2)]
        return f"now-{int(m.group(1)) * times}{unit}"
    if re.fullmatch(r"now-\d+(minutes|hours|days|weeks)", text) or \
            re.fullmatch(r"\d{4}-\d\d-\d\d(T\d\d:\d\d(:\d\d)?)?", text):
        return text
    raise ValueError(f"--since {text!r}: give a window like 2d, 12h, 30m, 1w or a date like 2026-12-01")

def query(user: Optional[str] = None, since: str = "now-2days") -> list[JobRow]:
    """This user's jobs from every scheduler with a queue (one squeue + one sacct call on Slurm), newest first."""
    return [r for sched in scheduler.with_queue() for r in sched.query(user, since)]


class Refresher:
    """For --watch: each scheduler's own cheap repeated query (Slurm asks sacct only when its answer can change)."""

    def __init__(self, user: Optional[str] = None, since: str = "now-2days"):
        self.parts = [sched.refresher(user, since) for sched in scheduler.with_queue()]

    def query(self) -> list[JobRow]:
        return [r for part in self.parts for r in part.query()]


def _fmt_seconds(secs: int) -> str:
    d, rem = divmod(secs, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}-" if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def _tail(path: Path, size: int = 65536) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - size))
            return [ln.rstrip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return []


def _logs(row: JobRow, task_id: Optional[str] = None) -> list[Path]:
    return [p for sched in scheduler.with_queue() for p in sched.log_files(row, task_id)]


_BOILERPLATE = re.compile(r"^(\[submitit\]|submitit (INFO|DEBUG|WARNING)\b)")
_SCHEDULER_END = re.compile(r"\*\*\*.*\b(CANCELLED|TIME LIMIT|PREEMPT|NODE FAIL|OUT OF MEMORY)\b(?!.*REQUEUE).*\*\*\*")
_EXCEPTION = re.compile(r"^(\[rank\d+\]:)?\s*([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Failure|Fault)"
                        r"|([a-z_]\w*\.)+[A-Z]\w*|Killed)(:|$)")
_ERRORISH = re.compile(r"error|exception|killed|oom|out of memory|fatal|failed|abort", re.I)
_EXIT_CODE = re.compile(r"^srun: error: .*Exited with exit code")


def error_line(lines: list[str]) -> str:
    """The line of a task's log that says why it failed: the scheduler's own end line (time limit, cancelled,
    out of memory), else the last exception line (`RuntimeError: ...`), else the last line that reads like an
    error; never submitit's own bookkeeping lines; '' when none looks like an error."""
    own = [ln.strip() for ln in lines if not _BOILERPLATE.match(ln.strip())]
    for pattern in (_SCHEDULER_END, _EXCEPTION):
        found = [ln for ln in own if pattern.search(ln)]
        if found:
            return found[-1][:160]
    found = [ln for ln in own if _ERRORISH.search(ln) and not _EXIT_CODE.match(ln)] or \
        [ln for ln in own if _ERRORISH.search(ln)]
    return found[-1][:160] if found else ""


def task_error(row: JobRow, task_id: str) -> str:
    """The error line of this task's own logs (every rank's; local file reads, no scheduler call)."""
    return error_line([ln for p in _logs(row, task_id) for ln in _tail(p)])


def task_failure(row: JobRow, task_id: str) -> failures.Failure:
    """The class and one-line cause of a failed task (core.failures): the scheduler's accounting of it (fields of
    the same sacct call) and its own logs (local file reads, no scheduler call)."""
    from core import failures

    end = row.ends.get(task_id) or TaskEnd(state=row.states.get(task_id, ""), nodes=row.nodes)
    lines = [ln for p in _logs(row, task_id) for ln in _tail(p)]
    queued = scheduler.with_queue()
    return failures.classify(end, lines, queued[0] if queued else None)


def last_log_line(row: JobRow) -> str:
    """For a failed job: its first failed task's own error line; otherwise the last line of its newest log that
    is not submitit's bookkeeping (local file reads, no scheduler call)."""
    failed = _failed_tasks(row)
    if failed:
        return task_error(row, failed[0])
    if not _has_run(row):   # every task still waits for its first start: no log to look for (a big pending array)
        return ""
    logs = _logs(row)
    if not logs:
        return ""
    lines = [ln for ln in _tail(logs[-1], 4096) if not _BOILERPLATE.match(ln.strip())]
    return lines[-1][:100] if lines else ""


def _has_run(row: JobRow) -> bool:
    """Some task of the job has started at some time: it is past pending, or accounting saw an attempt start (a
    requeued task waiting again)."""
    return any(category(s) != "pending" for s in row.states.values()) or any(a.start for a in row.attempts)


def failed_tasks(row: JobRow) -> list[str]:
    """Every task of a job that ended failed (cancelled ones too), in id order."""
    return sorted((t for t, s in row.states.items() if category(s) == "failed"), key=job_key)


def _failed_tasks(row: JobRow) -> list[str]:
    """The tasks that failed on their own (cancelled ones only when nothing else failed), in id order."""
    bad = sorted((t for t, s in row.states.items() if category(s) == "failed"), key=job_key)
    own = [t for t in bad if not row.states[t].startswith("CANCELLED")]
    return own or bad


def by_run(rows: list[JobRow]) -> list[tuple[str, list[JobRow]]]:
    """Rows grouped by their run folder (a run's array chunks, merge and later steps together), newest run first
    (by its newest job); jobs not submitted by us (no run folder) last, each on its own."""
    groups: dict[tuple[str, str], list[JobRow]] = {}
    for r in rows:
        groups.setdefault((r.run_dir, "" if r.run_dir else r.job_id), []).append(r)
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0] != "", _newest(kv[1])), reverse=True)
    return [(key[0], jobs) for key, jobs in ordered]


def _newest(jobs: list[JobRow]) -> tuple:
    return job_key(jobs[0].job_id) if len(jobs) == 1 else max(job_key(r.job_id) for r in jobs)


def _run_state(rows: list[JobRow]) -> str:
    states = {r.state for r in rows}
    for s in ("RUNNING", "PENDING"):
        if s in states:
            return s
    bad = sorted(st for st in states if category(st) == "failed")
    own = [st for st in bad if not st.startswith("CANCELLED")]
    return (own or bad)[0] if bad else "COMPLETED"


_STUDY_OF: dict[str, tuple[Optional[tuple[int, int]], Optional[tuple[str, str, str]]]] = {}


def study_of(run_dir: str) -> Optional[tuple[str, str, str]]:
    """(study folder, study name, step) when the run is a step of a study (its run.json says so), else None.
    Remembered per run.json (its mtime and size, or its absence): a --watch refresh reads only the records that
    changed or appeared."""
    if not run_dir:
        return None
    try:
        st = os.stat(os.path.join(run_dir, RECORD))
        key: Optional[tuple[int, int]] = (st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    known = _STUDY_OF.get(run_dir)
    if known is not None and known[0] == key:
        return known[1]
    found = _read_study(run_dir) if key is not None else None
    _STUDY_OF[run_dir] = (key, found)
    return found


def _read_study(run_dir: str) -> Optional[tuple[str, str, str]]:
    """study_of's read of run.json: parsed only when it mentions a study (most runs are no study's step)."""
    try:
        data = Path(run_dir, RECORD).read_bytes()
        rec = json.loads(data) if b'"study"' in data else None
    except (OSError, ValueError):
        return None
    if isinstance(rec, dict) and rec.get("study"):
        return str(rec["study"]), str(rec.get("study_name") or ""), str(rec.get("study_step") or "")
    return None


def _failed_for_real(jobs: list[JobRow]) -> bool:
    """A run whose own tasks failed (not merely cancelled because an earlier step failed)."""
    return any(category(s) == "failed" and not s.startswith("CANCELLED") for r in jobs for s in r.states.values())


Group = tuple[Optional[tuple[str, str]], list[tuple[str, str, list[JobRow]]]]


def by_study(rows: list[JobRow]) -> list[Group]:
    """by_run's groups, with the runs of one study together: [((study folder, name) | None, [(run folder, step,
    rows)])]; newest group first, a study's steps in the order they were submitted."""
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
        out[index[st[0]]][1].insert(0, (run_dir, st[2], jobs))
    # already newest first: by_run's order, and a study stands where its newest run (the first one met) stood
    return out


def latest_runs(runs: list[tuple[str, str, list[JobRow]]]) -> list[tuple[str, str, list[JobRow]]]:
    """The newest run of each step (a step submitted again by --resume-missing has several), in step order."""
    latest: dict[str, tuple[str, str, list[JobRow]]] = {}
    for run in runs:
        latest.pop(run[1], None)
        latest[run[1]] = run
    return list(latest.values())


def study_state(runs: list[tuple[str, str, list[JobRow]]]) -> tuple[str, list[str]]:
    """(state, failed steps) from each step's newest run: FAILED when a step's own tasks failed (the steps Slurm
    cancelled after it are not named), else RUNNING / PENDING / CANCELLED / COMPLETED as for a run."""
    runs = latest_runs(runs)
    failed = [step for _, step, jobs in runs if _failed_for_real(jobs)]
    state = _run_state([r for _, _, jobs in runs for r in jobs])
    if failed and state not in ("RUNNING", "PENDING"):
        state = "FAILED"
    return state, failed


def _active(runs) -> bool:
    return any(r.active for _, _, jobs in runs for r in jobs)


def _when(jobs: list[JobRow]) -> str:
    """When the run last did something (its newest attempt's end or start), 'MM-DD HH:MM'; '' when unknown."""
    t = max((a.end or a.start for r in jobs for a in r.attempts), default=0.0)
    return time.strftime("%m-%d %H:%M", time.localtime(t)) if t else ""


def _tasks(jobs: list[JobRow]) -> str:
    tasks = {k: sum(r.progress[k] for r in jobs) for k in ("done", "running", "pending", "failed")}
    total = sum(len(r.states) for r in jobs)
    return f"tasks {tasks['done']}/{tasks['running']}/{tasks['pending']}/{tasks['failed']} of {total}"


def first_failure(jobs: list[JobRow]) -> Optional[tuple[JobRow, str, failures.Failure]]:
    """(job, task id, its failure) of a run's first failed task (one that failed on its own before a cancelled
    one); None when none failed."""
    for r in sorted(jobs, key=lambda r: job_key(r.job_id)):
        failed = _failed_tasks(r)
        if failed:
            return r, failed[0], task_failure(r, failed[0])
    return None


def run_error(jobs: list[JobRow]) -> str:
    """'<task id> <STATE>: <class>: <cause>' of a run's first failed task (core.failures); '' when none failed."""
    found = first_failure(jobs)
    if found is None:
        return ""
    r, task, failure = found
    return f"{task} {r.states[task].split()[0]}: {failure.line()}"


def retries_text(run_dir: str) -> str:
    """'retries: <attempt> <class> -> <action>, ...' of the retry decisions recorded in a run folder (core.retry);
    '' when none was taken."""
    from core import retry

    decisions = retry.decisions(Path(run_dir)) if run_dir else []
    if not decisions:
        return ""
    return "retries: " + ", ".join(f"{d['task']} #{d['attempt']} {d['class']} -> {d['action']}"
                                   + (f" ({d['detail']})" if d.get("detail") else "") for d in decisions[-4:])


def _usage_text(jobs: list[JobRow], run_dir: str) -> str:
    text = device_hours.describe(device_hours.usage(jobs, run_dir))
    return f"; {text}" if text else ""


def _folded_run(run_dir: str, jobs: list[JobRow], with_log: bool) -> str:
    label = _short(run_dir) if run_dir else f"{jobs[0].name} (not submitted by medhpc: no run folder)"
    state = _run_state(jobs)
    err = run_error(jobs) if with_log and state != "COMPLETED" else ""
    tried = retries_text(run_dir) if with_log else ""
    return (f"run {label}: {state}, {_tasks(jobs)}, {_when(jobs)}{_usage_text(jobs, run_dir)}"
            + (f"; {err}" if err else "") + (f"; {tried}" if tried else ""))


def _folded_study(study: tuple[str, str], runs, with_log: bool) -> str:
    state, failed = study_state(runs)
    steps = ", ".join(f"{step} {_run_state(jobs)}" for _, step, jobs in latest_runs(runs))
    usage = device_hours.describe(device_hours.add(*(device_hours.usage(jobs, rd) for rd, _, jobs in runs)))
    why = ""
    if failed and with_log:
        jobs = next(j for _, step, j in latest_runs(runs) if step == failed[0])
        why = run_error(jobs)
    head = f"study {study[1]} {_short(study[0])}: {state}" + (f" at step {', '.join(failed)}" if failed else "")
    return head + (f" ({why})" if why else "") + f"; steps: {steps}" + (f"; {usage}" if usage else "")


def _job_line(r: JobRow, with_log: bool) -> list:
    p = r.progress
    prog = f"{p['done']}/{p['running']}/{p['pending']}/{p['failed']} of {len(r.states)}" if r.is_array else "-"
    where = r.reason if r.active else r.nodes
    line = ["  " + r.job_id, r.name[:24], r.state, prog, _fmt_seconds(r.seconds), where[:24]]
    if with_log:  # finished-and-fine jobs' logs are not read: it keeps a refresh cheap with long histories
        line.append(last_log_line(r) if r.active or r.progress["failed"] else "")
    return line


def _waiting(r: JobRow) -> Optional[str]:
    """'        pending: <plain words>; expected to start <time>' under a job with pending tasks."""
    if not r.progress["pending"] or not (r.why or r.expected_start):
        return None
    start = f"; expected to start {r.expected_start.replace('T', ' ')}" if r.expected_start else ""
    return f"        pending: {r.why or r.reason}{start}"


def _run_block(table: list, run_dir: str, jobs: list[JobRow], with_log: bool, step_label: str,
               only_active: bool = False) -> None:
    label = _short(run_dir) if run_dir else f"{jobs[0].name} (not submitted by medhpc: no run folder)"
    table.append(f"run {label}{step_label}: {_run_state(jobs)}, {len(jobs)} job{'s' if len(jobs) > 1 else ''}, "
                 f"{_tasks(jobs)}{_usage_text(jobs, run_dir)}")
    for r in sorted(jobs, key=lambda r: job_key(r.job_id)) if with_log else []:  # each failed task's class
        failed = _failed_tasks(r)
        for t in failed[:3]:
            table.append(f"        {t} {r.states[t].split()[0]}: {task_failure(r, t).line()}"[:220])
        if len(failed) > 3:
            table.append(f"        ... and {len(failed) - 3} more failed tasks (status.py --json has each)")
    tried = retries_text(run_dir) if with_log else ""
    if tried:
        table.append(f"        {tried}")
    for r in sorted(jobs, key=lambda r: job_key(r.job_id)):
        if only_active and not (r.active or r.progress["failed"]):
            continue
        table.append(_job_line(r, with_log))
        waiting = _waiting(r)
        if waiting:
            table.append(waiting)


def _header(with_log: bool) -> list[str]:
    header = ["JOBID", "NAME", "STATE", "DONE/RUN/PEND/FAIL", "ELAPSED", "NODES/REASON"]
    return header + (["LAST LOG LINE"] if with_log else [])


def _aligned(table: list, header: list[str]) -> str:
    cells = [row for row in table if isinstance(row, list)]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(header))]
    return "\n".join(row if isinstance(row, str) else
                     "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


@paused_collector
def format_table(rows: list[JobRow], with_log: bool = True) -> str:
    """Everything (status --all): one block per run, newest first, every job; the runs of a study together under
    a line naming the study, its state and the step that failed; a pending job's reason in plain words."""
    if not rows:
        return "no jobs"
    header = _header(with_log)
    table: list = [header]
    for study, runs in by_study(rows):
        if study is not None:
            table.append(_folded_study(study, runs, with_log))
        for run_dir, step, jobs in runs:
            _run_block(table, run_dir, jobs, with_log, f" (step {step})" if study is not None else "")
    return _aligned(table, header)


@paused_collector
def format_view(rows: list[JobRow], with_log: bool = True, since: str = DEFAULT_SINCE,
                max_finished: int = 20) -> str:
    """The default status: what is active (runs and studies with a pending or running job) first, newest first,
    with their active and failed jobs and why pending ones wait; then the finished runs and studies of the window,
    newest first, one line each (a study: its steps' states and the failed step's error), at most
    `max_finished` of them (the rest counted: --all lists everything)."""
    if not rows:
        return f"no jobs since {since}"
    groups = by_study(rows)
    is_active = [_active(g[1]) for g in groups]
    active = [g for g, a in zip(groups, is_active) if a]
    done = [g for g, a in zip(groups, is_active) if not a]
    header = _header(with_log)
    table: list = []
    if active:
        table.append(f"ACTIVE: {len(active)} (newest first)")
        table.append(header)
    for study, runs in active:
        if study is not None:
            table.append(_folded_study(study, runs, with_log))
            for run_dir, step, jobs in runs:
                if any(r.active or r.progress["failed"] for r in jobs):
                    _run_block(table, run_dir, jobs, with_log, f" (step {step})", only_active=True)
                else:
                    table.append(f"  step {step}: {_folded_run(run_dir, jobs, with_log)}")
        else:
            run_dir, _, jobs = runs[0]
            _run_block(table, run_dir, jobs, with_log, "", only_active=True)
    if done:
        table.append(f"FINISHED since {since}: {len(done)} (newest first, one line each; --all for every job)")
        for study, runs in done[:max_finished]:
            table.append("  " + (_folded_study(study, runs, with_log) if study is not None
                                 else _folded_run(runs[0][0], runs[0][2], with_log)))
        if len(done) > max_finished:
            table.append(f"  ... and {len(done) - max_finished} older (status.py --all)")
    return _aligned(table, header) if active else "\n".join(table)


def _run_json(run_dir: str, jobs: list[JobRow]) -> dict:
    out = {"run_dir": run_dir or None, "name": jobs[0].name if jobs else "", "state": _run_state(jobs),
           "tasks": {k: sum(r.progress[k] for r in jobs) for k in ("done", "running", "pending", "failed")},
           "device_hours": device_hours.usage(jobs, run_dir), "error": run_error(jobs) or None,
           "failure": None, "retries": [], "jobs": []}
    found = first_failure(jobs)
    if found is not None:
        out["failure"] = {"task": found[1], **found[2].as_dict()}
    if run_dir:
        from core import retry

        out["retries"] = retry.decisions(Path(run_dir))
    for r in sorted(jobs, key=lambda r: job_key(r.job_id)):
        failed = _failed_tasks(r)[:20]  # the logs of at most 20 failed tasks per job are read
        out["jobs"].append({
            "job_id": r.job_id, "name": r.name, "state": r.state, "elapsed_s": r.seconds, "nodes": r.nodes,
            "reason": r.reason, "why": r.why, "expected_start": r.expected_start or None, "tasks": dict(r.states),
            "errors": {t: task_error(r, t) for t in failed},
            "failures": {t: task_failure(r, t).as_dict() for t in failed_tasks(r)[:20]},
            "device_hours": device_hours.usage([r], run_dir),
            "attempts": [{"task": a.task_id, "state": a.state, "elapsed_s": a.elapsed_s, "unit": a.unit,
                          "count": a.count, "start": a.start or None, "end": a.end or None} for a in r.attempts]})
    return out


@paused_collector
def as_json(rows: list[JobRow]) -> list[dict]:
    """The same grouping for scripts, every field: one object per run with its state, task counts, device-hours,
    error line and jobs (reasons, expected start, each task's state and error line, every attempt); the runs of a
    study in one object {study_dir, study, state, failed_steps, device_hours, runs: [run object + its step]}.
    Newest first."""
    out = []
    for study, runs in by_study(rows):
        if study is None:
            out += [_run_json(run_dir, jobs) for run_dir, _, jobs in runs]
            continue
        state, failed = study_state(runs)
        objs = [{**_run_json(run_dir, jobs), "step": step} for run_dir, step, jobs in runs]
        newest = {o["step"]: o for o in objs}  # each step's newest run (runs are in submission order)
        classes = {step: (newest[step]["failure"] or {}).get("class") for step in failed if step in newest}
        out.append({"study_dir": study[0], "study": study[1], "state": state, "failed_steps": failed,
                    "failed_classes": classes,
                    "active": _active(runs), "device_hours": device_hours.add(*(o["device_hours"] for o in objs)),
                    "runs": objs})
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


def step_phase(states: dict[str, str]) -> str:
    """One step's jobs as a person follows them: 'pending', 'running', or its end ('COMPLETED', 'FAILED', ...)."""
    cats = [category(s) for s in states.values()]
    if "running" in cats:
        return "running"
    if not cats or "pending" in cats:
        return "pending"
    bad = sorted({s.split()[0] for s in states.values() if category(s) == "failed"})
    own = [b for b in bad if not b.startswith("CANCELLED")]
    return (own or bad)[0] if bad else "COMPLETED"


LOST_AFTER_ROUNDS = 6   # --wait polls every 5 s: half a minute unknown to squeue and sacct alike


def follow(sched, steps: dict[str, list[str]], out, poll_s: float = 5.0, sleep=time.sleep,
           progress=None) -> dict[str, str]:
    """Wait for the jobs of each step (step -> job ids) to end, writing a line each time a step starts or ends;
    one scheduler query (states) per round. `progress(ended) -> lines`: what the run did meanwhile (local file
    reads, core.results.progress.RunProgress), written each round. Returns each step's end state."""
    seen: dict[str, str] = {}
    unseen = {name: 0 for name in steps}
    ids = [j for js in steps.values() for j in js]
    while True:
        states, answered = sched.states(ids)
        phases, said = {}, []   # (ended?, line) in step order
        for name, js in steps.items():
            mine = {t: s for t, s in states.items() if t.split("_")[0] in js}
            # neither the queue nor accounting knows the jobs (purged, or accounting lost them): after a few rounds
            # in which the queue answered, the step is LOST, not pending forever (accounting lags only seconds)
            unseen[name] = 0 if mine else unseen[name] + 1 if answered else unseen[name]
            phases[name] = "LOST" if unseen[name] >= LOST_AFTER_ROUNDS else step_phase(mine)
            if seen.get(name) != phases[name] and (name in seen or phases[name] != "pending"):
                tasks = f" ({len(mine)} tasks)" if len(mine) > 1 else ""
                word = "started" if phases[name] == "running" else f"ended {phases[name]}" \
                    if phases[name] != "pending" else "pending again (requeued)"
                said.append((word.startswith("ended"),
                             f"{time.strftime('%H:%M:%S')} step {name}: {word}{tasks} (job {','.join(js)})"))
            seen[name] = phases[name]
        over = all(p not in ("pending", "running") for p in phases.values())
        # what the run did since the last round goes before the first step that ended in it
        cut = next((i for i, (ended, _) in enumerate(said) if ended), len(said))
        lines = [line for _, line in said]
        for line in lines[:cut] + (progress(over) if progress is not None else []) + lines[cut:]:
            out.write(line + "\n")
            out.flush()
        if over:
            return phases
        sleep(poll_s)
