"""Submitting a study: the steps in order, each with afterok on the steps it waits for (submit_study); a failure
half-way cancels what this submission queued (cancel_jobs, through the profile's scheduler) and says so
(StudySubmitError). The study folder is made here (make_study_dir)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from core import run_folder, scheduler
from core.runtime import fault_point
from core.study.plan import PlannedStep, plan_step
from core.study.spec import Study
from core.study.state import RECORD, step_states, study_root


# ---------------------------------------------------------------- submission
@dataclass
class Outcome:
    study_dir: Path
    record: dict
    submitted: list[str]


def cancel_jobs(job_ids: list[str], cluster) -> Optional[str]:
    """Cancel these ids through the profile's scheduler; None when done, else why not."""
    if not job_ids:
        return None
    return scheduler.for_cluster(cluster).cancel_quietly(job_ids) or None


def submit_study(study: Study, planned: dict[str, PlannedStep], cluster, resubmit: list[str],
                 study_dir: Path, previous: Optional[dict], out,
                 prev_states: Optional[dict[str, dict]] = None) -> Outcome:
    """Submit the steps in `resubmit` (topological order) with afterok on the steps they wait for that are still
    queued; the others keep their run folders from `previous` (or are run: steps). `prev_states`: the states
    the selection was made on (Selection.states; queried again when not given). study.json is rewritten after
    every step, so even a failure half-way leaves the record of what is queued."""
    sched = scheduler.for_cluster(cluster)
    with sched.held() as held:
        outcome = _submit_steps(study, planned, cluster, resubmit, study_dir, previous, out, prev_states, held)
    if sched.holds and held:
        # every job of the study is queued: release them together (all or nothing; a failed release cancels)
        why = sched.release_or_cancel(list(held))
        if why:
            for st in outcome.record["steps"].values():
                if st.get("held"):
                    st.update(state="cancelled", detail="release failed")
            run_folder.write_json_atomic(study_dir / RECORD, outcome.record)
            raise StudySubmitError(why)
        for st in outcome.record["steps"].values():
            st.pop("held", None)
        outcome.record["released"] = True
        run_folder.write_json_atomic(study_dir / RECORD, outcome.record)
        out.write(f"released the {len(held)} held job{'s' if len(held) > 1 else ''} of this submission\n")
    return outcome


def _submit_steps(study: Study, planned: dict[str, PlannedStep], cluster, resubmit: list[str], study_dir: Path,
                  previous: Optional[dict], out, prev_states: Optional[dict[str, dict]],
                  held: list[str]) -> Outcome:
    from core import submit as sub
    from core.results.summary import report_results

    sched = scheduler.for_cluster(cluster)
    queue = sched.has_queue
    record = {"study": study.spec.study, "spec_file": study.source, "cluster": cluster.name,
              "executor": cluster.executor, "study_dir": str(study_dir),
              "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "order": [s.name for s in study.steps],
              "held": bool(sched.holding), "steps": {}}
    if previous:
        record["history"] = previous.get("history", []) + [{"submitted_at": previous.get("submitted_at"),
                                                            "steps": previous.get("steps", {})}]
    folders: dict[str, Path] = {}
    pending_ids: dict[str, list[str]] = {}  # steps whose jobs are queued: their ids
    if prev_states is None:
        prev_states = step_states(previous) if previous else {}
    for s in study.steps:
        if s.name in resubmit:
            continue
        if s.run is not None:
            record["steps"][s.name] = {"existing": True, "run_dir": str(s.run)}
            folders[s.name] = s.run
        else:
            old = previous["steps"][s.name]
            record["steps"][s.name] = {**old, "kept": True}
            folders[s.name] = Path(old["run_dir"])
            if prev_states.get(s.name, {}).get("state") == "active":
                pending_ids[s.name] = list(old["job_ids"])
    for name in resubmit:
        record["steps"][name] = {"spec": study.step(name).spec_file, "state": "not run", "job_ids": []}
    run_folder.write_json_atomic(study_dir / RECORD, record)
    submitted: list[str] = []
    for s in study.steps:
        if s.name not in resubmit:
            continue
        promised = {n: f for n, f in folders.items() if n in pending_ids}  # queued: their outputs are to come
        try:
            p = plan_step(study, s, folders, promised, cluster)
            deps = [j for a in s.after if a in pending_ids for j in pending_ids[a]]
            extra = {"study": str(study_dir), "study_name": study.spec.study, "study_step": s.name}
            submission = sub.submit(p.plan, p.raw, s.spec_file, after_ids=tuple(deps), extra_record=extra)
        except BaseException as e:
            ids = [j for n in submitted for j in record["steps"][n]["job_ids"]]
            ids += [j for j in held if j not in ids]  # a step that failed half-way: its chunks queued so far
            why = cancel_jobs(ids, cluster) if queue else None
            for n in submitted:
                record["steps"][n]["state"] = "cancelled"
                record["steps"][n]["detail"] = f"submission of step {s.name} failed"
            record["steps"][s.name]["detail"] = f"submission failed: {type(e).__name__}: {str(e)[:200]}"
            run_folder.write_json_atomic(study_dir / RECORD, record)
            msg = f"submitting step {s.name} failed: {type(e).__name__}: {str(e)[:300]}"
            if submitted:
                msg += (f"\nsteps submitted before it: {', '.join(submitted)} (jobs {' '.join(ids)}): "
                        + ("cancelled" if why is None else f"NOT cancelled ({why}); cancel them with: "
                                                           f"python launchers/cancel.py {' '.join(ids)}"))
            else:
                msg += "\nno step of this study was submitted by this command"
            raise StudySubmitError(msg) from None
        run_dir = submission.run_dir
        ids = run_folder_ids = [j for st in submission.record["steps"] for j in st.get("job_ids", [])]
        folders[s.name] = run_dir
        submitted.append(s.name)
        state = "submitted"
        detail = ""
        if not queue:  # without a queue there are no dependencies: each step runs to its end before the next
            code = report_results(submission, out=out)
            state = "done" if code == 0 and not any(st.get("skipped") for st in submission.record["steps"]) \
                else "failed"
            detail = "" if state == "done" else f"see {run_dir}"
        else:
            pending_ids[s.name] = run_folder_ids
        record["steps"][s.name] = {"spec": s.spec_file, "run_dir": str(run_dir), "job_ids": ids,
                                   "after": s.after, "dependency": deps, "state": state, "detail": detail,
                                   **({"held": True} if sched.holding else {})}
        run_folder.write_json_atomic(study_dir / RECORD, record)
        fault_point("study_submitted", s.name)  # the tests' SIGKILL between two steps
        dep = f" (afterok:{':'.join(deps)})" if deps else ""
        out.write(f"submitted step {s.name}: {run_dir} jobs {','.join(ids) or '(local)'}{dep}\n")
        out.flush()
        if not queue and state == "failed":
            rest = [n for n in resubmit if n not in submitted]
            for n in rest:
                record["steps"][n].update(state="not run", detail=f"step {s.name} failed")
            run_folder.write_json_atomic(study_dir / RECORD, record)
            out.write(f"step {s.name} failed; not run: {', '.join(rest) or 'none'}\n")
            break
    return Outcome(study_dir, record, submitted)


class StudySubmitError(RuntimeError):
    pass


def make_study_dir(study: Study) -> Path:
    base = study_root(study) / time.strftime("%Y%m%d-%H%M%S")
    d, n = base, 1
    while d.exists():
        n += 1
        d = base.with_name(f"{base.name}-{n}")
    d.mkdir(parents=True)
    return d

