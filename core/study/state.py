"""The study record and its steps' states: the study folder and its study.json (study_root, find_study,
read_record), each step's state through the scheduler (step_states, summary_line, wait), what a submission
submits and keeps (select_steps, Selection: fresh or --resume-missing) and the finished study's table
(final_table)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from core import run_folder, scheduler
from core.study.spec import Study

RECORD = "study.json"


# ---------------------------------------------------------------- the study record
def study_root(study: Study) -> Path:
    p = Path(study.logs_dir)
    return (p if p.is_absolute() else run_folder.REPO / p) / study.spec.study


def read_record(study_dir: Path) -> dict:
    import json

    return json.loads((Path(study_dir) / RECORD).read_text())


def find_study(study: Study, given: Optional[str]) -> Path:
    """The study folder to resume: the one given (its study.json names this study), else the newest."""
    root = study_root(study)
    if given:
        p = Path(given)
        if not (p / RECORD).is_file():
            raise FileNotFoundError(f"--resume-missing {given}: no {RECORD} there; give a study folder "
                                    f"{root}/<id>")
        if read_record(p).get("study") != study.spec.study:
            raise ValueError(f"--resume-missing {given}: not a folder of study '{study.spec.study}'")
        return p.resolve()
    found = sorted((d for d in root.glob("*") if (d / RECORD).is_file()), key=lambda d: (d / RECORD).stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"--resume-missing: no earlier submission of study '{study.spec.study}' under {root}")
    return found[-1]


def _job_ids(record: dict) -> list[str]:
    """Every Slurm job id (array ids for arrays) of a run record's newest submission."""
    return [j for st in record.get("steps", []) for j in st.get("job_ids", [])]


# ---------------------------------------------------------------- states (one sacct + one squeue call)
FAILED_STATES = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


def _queued(record: dict) -> bool:
    """The study's steps went to a scheduler with a queue (their states are asked of it, not read off the record)."""
    try:
        return scheduler.by_name(str(record.get("executor"))).has_queue
    except ValueError:
        return False


def step_states(record: dict) -> dict[str, dict]:
    """Per study step: {'state': done|active|failed|cancelled|lost|not run|existing, 'detail': text}. Slurm
    states from one sacct and one squeue call over every job of the study; local steps from the record. A step
    is `lost` when one of its job ids is neither in the queue nor in accounting (squeue knows a job as soon as
    sbatch returns, so accounting lagging a fresh submission never makes a step lost; when squeue does not
    answer, no step is called lost)."""
    steps = record.get("steps", {})
    ids = sorted({j for st in steps.values() for j in st.get("job_ids", [])}, key=lambda j: int(j) if j.isdigit() else 0)
    queued = _queued(record)
    states, queue_answered = scheduler.by_name(record["executor"]).states(ids) if queued and ids else ({}, True)
    out = {}
    for name, st in steps.items():
        if st.get("existing"):
            out[name] = {"state": "existing", "detail": "an existing run"}
            continue
        if not st.get("job_ids"):
            out[name] = {"state": st.get("state") or "not run", "detail": st.get("detail", "")}
            continue
        if not queued:
            out[name] = {"state": st.get("state", "failed"), "detail": st.get("detail", "")}
            continue
        mine = {t: s for t, s in states.items() if t.split("_")[0] in st["job_ids"]}
        cats = {t: scheduler.category(s) for t, s in mine.items()}
        failed = sorted(t for t, s in mine.items() if s.startswith(FAILED_STATES))
        unknown = [j for j in st["job_ids"] if not any(t.split("_")[0] == j for t in mine)]
        if failed:
            out[name] = {"state": "failed", "detail": ", ".join(f"{t} {mine[t]}" for t in failed[:5])}
        elif unknown and queue_answered:
            # squeue lists a job from the moment sbatch returns, while accounting may lag it: a job that neither
            # the queue nor sacct knows will never run (purged, another cluster's id, a lost controller state)
            out[name] = {"state": "lost", "detail": f"jobs {' '.join(unknown[:5])} neither queued (squeue) nor "
                                                    f"known to accounting (sacct)"}
        elif any(c in ("running", "pending") for c in cats.values()) or len(mine) == 0:
            running = sum(c == "running" for c in cats.values())
            done = sum(c == "done" for c in cats.values())
            out[name] = {"state": "active", "detail": (f"running ({running} of {len(mine)} tasks running, {done} done)"
                                                       if running else "pending")}
        elif all(c == "done" for c in cats.values()):
            out[name] = {"state": "done", "detail": ""}
        else:
            out[name] = {"state": "cancelled", "detail": ", ".join(sorted({mine[t] for t, c in cats.items()
                                                                        if c == "failed"}))}
    return out


def summary_line(record: dict, states: dict[str, dict]) -> str:
    """'FAILED at step prune (123_2 FAILED); cancelled: table; done: dia, scan' and the like."""
    by: dict[str, list[str]] = {}
    for name, s in states.items():
        by.setdefault(s["state"], []).append(name)
    if by.get("failed"):
        head = "FAILED at step " + ", ".join(f"{n} ({states[n]['detail']})" for n in by["failed"])
    elif by.get("active"):
        head = "RUNNING"
    elif by.get("cancelled") or by.get("not run") or by.get("lost"):
        head = "INCOMPLETE"
    else:
        head = "COMPLETED"
    rest = [f"{k}: {', '.join(v)}" for k, v in by.items() if k not in ("failed",) and v]
    return "; ".join([head, *rest])


# ---------------------------------------------------------------- what to submit (fresh or --resume-missing)
@dataclass
class Selection:
    """Which steps a submission submits and which it keeps. `kept`: step -> run folder that stays (run: steps,
    and on --resume-missing the finished and still-queued steps); `queued`: the kept steps whose jobs are still
    queued (later steps wait for them and are promised their outputs); `stale`: job ids still queued of steps
    that are submitted again (an earlier step failed): cancelled before the new submission."""
    resubmit: list[str]
    kept: dict[str, Path]
    queued: set[str] = field(default_factory=set)
    stale: list[str] = field(default_factory=list)
    study_dir: Optional[Path] = None  # the study folder resumed (None: a fresh submission)
    previous: Optional[dict] = None   # its study.json
    states: dict[str, dict] = field(default_factory=dict)  # its steps' states (step_states)


REDO_STATES = ("failed", "cancelled", "not run", "lost")


def select_steps(study: Study, resume_missing: Optional[str] = None) -> Selection:
    """A fresh submission (resume_missing None) submits every spec: step. With resume_missing ('' = the newest
    study folder, or one given): steps that failed, were cancelled or never ran, steps new to the study spec, and
    every step after them are submitted again; the others keep their runs. Raises FileNotFoundError / ValueError
    (no such study folder; nothing to resubmit)."""
    kept = {s.name: s.run for s in study.steps if s.run}
    if resume_missing is None:
        return Selection([s.name for s in study.steps if s.spec_file], kept)
    study_dir = find_study(study, resume_missing or None)
    previous = read_record(study_dir)
    states = step_states(previous)
    redo = {n for n, s in states.items() if s["state"] in REDO_STATES}
    if previous.get("held") and not previous.get("released"):
        # that submission never released its held jobs (the submitter was killed): none of them ran; they are
        # cancelled (stale, below) and their steps submitted again
        redo |= {n for n, st in previous.get("steps", {}).items() if st.get("held")}
    redo |= {s.name for s in study.steps if s.spec_file and s.name not in previous.get("steps", {})}
    redo = {n for n in study.dependants(redo) if study.step(n).spec_file}
    ours = {s.name for s in study.steps}
    queued: set[str] = set()
    stale: list[str] = []
    for name, s in states.items():
        if name in redo or name not in ours:
            if s["state"] == "active":
                stale += previous["steps"][name].get("job_ids", [])
            continue
        if s["state"] in ("done", "active"):
            kept[name] = Path(previous["steps"][name]["run_dir"])
            if s["state"] == "active":
                queued.add(name)
    resubmit = [s.name for s in study.steps if s.name in redo]
    if not resubmit:
        raise ValueError(f"--resume-missing: every step of {study_dir} finished or is still queued "
                         f"({summary_line(previous, states)}); nothing to resubmit")
    return Selection(resubmit, kept, queued, stale, study_dir, previous, states)



def _phase(s: dict) -> str:
    """What a person follows of a step: pending, running, or its end state."""
    if s["state"] == "active":
        return "running" if s["detail"].startswith("running") else "pending"
    return s["state"]


def wait(record: dict, poll_s: float = 5.0, out=None) -> dict[str, dict]:
    """Poll (one sacct + one squeue call per round) until no step of the study is queued; the final states. With
    `out`, one line per change of a step (pending -> running -> done / failed / cancelled), with the time."""
    seen: dict[str, str] = {}
    while True:
        states = step_states(record)
        if out is not None:
            for name, s in states.items():
                phase = _phase(s)
                if seen.get(name) != phase:
                    if name in seen or phase not in ("pending", "existing", "not run"):
                        detail = f" ({s['detail']})" if s["detail"] and phase not in ("running", "pending") else ""
                        out.write(f"{time.strftime('%H:%M:%S')} step {name}: "
                                  f"{'started' if phase == 'running' else phase}{detail}\n")
                        out.flush()
                    seen[name] = phase
        if not any(s["state"] == "active" for s in states.values()):
            return states
        time.sleep(poll_s)


def device_hours_line(record: dict) -> str:
    """'device-hours: 1.20 GPU-h (0.10 lost); dia 1.00 GPU-h, scan 0.20 GPU-h (0.10 lost)' for a study's steps
    from the scheduler's accounting (one call); '' when there is none."""
    from core import device_hours

    steps = {n: st for n, st in record.get("steps", {}).items() if st.get("job_ids") and st.get("run_dir")}
    if not steps or not _queued(record):
        return ""
    try:
        rows = scheduler.by_name(record["executor"]).accounting([j for st in steps.values() for j in st["job_ids"]])
    except scheduler.SchedulerUnavailable:
        return ""
    per = {n: device_hours.usage([r for r in rows if r.job_id in st["job_ids"]], st["run_dir"])
           for n, st in steps.items()}
    total = device_hours.describe(device_hours.add(*per.values()))
    if not total:
        return ""
    return f"device-hours: {total}; " + ", ".join(f"{n} {device_hours.describe(u) or '0'}" for n, u in per.items())


def final_table(record: dict) -> Optional[Path]:
    """The markdown table a finished step reported (the study_table workload's `markdown` result), if any. Read
    from the steps' task records, so the study needs no workload module (nothing outside core/workloads/ does)."""
    from core.run_folder import task_records

    for st in record.get("steps", {}).values():
        if not st.get("run_dir"):
            continue
        for rec in task_records(Path(st["run_dir"])):
            result = rec.get("result")
            md = Path(result["markdown"]) if isinstance(result, dict) and result.get("markdown") else None
            if md is not None and md.is_file():
                return md
    return None
