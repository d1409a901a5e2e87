"""Job status as a person reads it: the scheduler's rows (core.scheduler: on Slurm one squeue + one sacct call per
refresh, however many jobs and array tasks) grouped by run and by study, as a table, as JSON, or refreshed with
back-off. Rows are jobs (an array chunk is one row with its progress: done / running / pending / failed); the run
folder comes from the job comment (`run=...`) that core.submit writes, so a person can go from `squeue` to the
logs. Cancelling is core.cancel.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from core import scheduler
from core.run_folder import record_if_any
from core.scheduler import JobRow, SchedulerUnavailable, category, job_key  # noqa: F401 (launchers catch it)

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


def last_log_line(row: JobRow) -> str:
    """The last non-empty line of the newest log of this job (local file read, no scheduler call)."""
    logs = [p for sched in scheduler.with_queue() for p in sched.log_files(row)]
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
    return sorted(groups.items(), key=lambda kv: (kv[0] == "", min(job_key(r.job_id) for r in kv[1])))


def _run_state(rows: list[JobRow]) -> str:
    states = {r.state for r in rows}
    for s in ("RUNNING", "PENDING"):
        if s in states:
            return s
    bad = sorted(st for st in states if category(st) == "failed")
    return bad[0] if bad else "COMPLETED"


def study_of(run_dir: str) -> Optional[tuple[str, str, str]]:
    """(study folder, study name, step) when the run is a step of a study (its run.json says so), else None."""
    if not run_dir:
        return None
    rec = record_if_any(Path(run_dir))
    if not rec or not rec.get("study"):
        return None
    return str(rec["study"]), str(rec.get("study_name") or ""), str(rec.get("study_step") or "")


def _failed_for_real(jobs: list[JobRow]) -> bool:
    """A run whose own tasks failed (not merely cancelled because an earlier step failed)."""
    return any(category(s) == "failed" and not s.startswith("CANCELLED") for r in jobs for s in r.states.values())


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
    for r in sorted(jobs, key=lambda r: job_key(r.job_id)):
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
                     for r in sorted(jobs, key=lambda r: job_key(r.job_id))]}


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
