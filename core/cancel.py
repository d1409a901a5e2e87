"""Cancel jobs by id (a job, a whole array, one array task) or by the name of a run or a study (every step's
jobs), through the scheduler (core.scheduler): one queue listing per kind of target, one cancel call."""
from __future__ import annotations

import getpass
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from core import registry, scheduler
from core.run_folder import record_if_any
from core.scheduler import cancellable

JOB_ID = re.compile(r"\d+(_\d+)?")


@dataclass
class CancelResult:
    cancelled: list[str] = field(default_factory=list)   # ids given to the scheduler's cancel
    problems: list[str] = field(default_factory=list)    # one line per target refused or not found


def belongs_to_run(run: str, job_name: str, comment: str, job_id: str, step_names: Optional[set[str]] = None) -> bool:
    """Whether a queued job is a step of the run named `run`: its name is `run` (the main step) or `run-<step>`,
    and its comment `run=<folder>` (core.submit writes it on every job) names a folder `<logs>/<run>/<id>` whose
    run.json says name == run and lists <step>. So cancelling `smoke` never catches `smoke-test`'s jobs, even
    though `smoke-test` reads like run `smoke` + step `test`. Jobs without a run folder (not submitted by medhpc,
    or run.json not written yet) need `run` or `run-<a step some workload declares>` as their name (the registry's
    step names: merge, baseline, features, ...)."""
    if job_name == run:
        step = "main"
    elif job_name.startswith(run + "-"):
        step = job_name[len(run) + 1:]
    else:
        return False
    known = step == "main" or step in (step_names if step_names is not None else registry.step_names())
    if not comment.startswith("run="):
        return known
    folder = Path(comment.removeprefix("run=").replace("%A", job_id))
    if folder.parent.name != run:  # run folders are <logs_dir>/<name>/<root id>: another run's job
        return False
    rec = record_if_any(folder)
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
    rec = record_if_any(Path(comment.removeprefix("run=").replace("%A", job_id)))
    return bool(rec) and rec.get("study_name") == study


def cancel(targets: list[str], user: Optional[str] = None, any_user: bool = False,
           sched: Optional[scheduler.Scheduler] = None) -> CancelResult:
    """Cancel by id ('12': a job or a whole array, '12_3': one task) or by run or study name (its steps: NAME and
    NAME-<step>, see belongs_to_run; only `user`'s jobs). An id whose job belongs to another user than `user`
    (default: the current one) is refused unless any_user. One queue listing per kind of target, one cancel."""
    sched = sched or scheduler.with_queue()[0]
    me = user or getpass.getuser()
    result = CancelResult()
    ids = list(dict.fromkeys(t for t in targets if JOB_ID.fullmatch(t)))
    names = list(dict.fromkeys(t for t in targets if not JOB_ID.fullmatch(t)))
    chosen: list[str] = []
    if ids:
        rows = sched.queued(ids)
        for t in ids:
            if "_" in t:  # one array task
                mine = [r for r in rows if r.task_id == t]
            else:  # a job, a whole array (its array id) or one task by its own job id
                mine = [r for r in rows if t in (r.array_id, r.own_id)]
            if not [r for r in mine if cancellable(r.state)]:
                why = f"it is already ending: {mine[0].state}" if mine else "finished, or a wrong id"
                result.problems.append(f"no queued job {t} ({why}; see python launchers/status.py)")
                continue
            others = sorted({r.owner for r in mine} - {me})
            if others and not any_user:
                result.problems.append(f"refused {t}: job {t} ({mine[0].name}) belongs to user {', '.join(others)}, "
                                       f"not {me}; add --any-user to cancel another user's job")
                continue
            chosen.append(t)
    if names:
        jobs = [j for j in sched.queued_of(me) if cancellable(j.state)]
        steps = registry.step_names()
        for n in names:
            found = list(dict.fromkeys(j.job_id for j in jobs if belongs_to_run(n, j.name, j.comment, j.job_id, steps)
                                       or belongs_to_study(n, j.comment, j.job_id)))
            if not found:
                result.problems.append(f"no queued job of a run named {n} (user {me}; ids or names as "
                                       f"python launchers/status.py shows them)")
            chosen += [j for j in found if j not in chosen]
    if chosen:
        sched.cancel(chosen)
        result.cancelled = chosen
    return result
