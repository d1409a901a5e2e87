"""Plan -> the profile's scheduler (core.scheduler) -> jobs, plus the run record.

Each step goes to the scheduler in order (`submit_step`), with the job ids of the steps it depends on where the
scheduler has a queue; without one (local) a step whose dependency failed is skipped. `sbatch_texts` renders the
exact scripts the scheduler would submit, for `--dry-run`.

Everything a run produces lives in one run folder (core.run_folder): the record, submitit's scripts, pickles and
logs, and whatever the workload writes.
"""
from __future__ import annotations

import getpass
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core import run_folder, scheduler
from core.plan import Plan, Step
from core.runtime import TaskEntry
from core.tracking import git_commit, package_versions, start_git_status


@dataclass
class Submission:
    run_dir: Path
    record: dict
    jobs: dict[str, list[Any]] = field(default_factory=dict)  # step name -> submitit jobs (one per task)


def _entry(plan: Plan, raw_spec: dict, step: Step, run_dir_template: str) -> TaskEntry:
    return TaskEntry(spec_data=raw_spec, cluster_data=plan.cluster.model_dump(), workload=plan.spec.workload,
                     entry=step.entry, step=step.name, run_dir_template=run_dir_template,
                     last_step=not any(step.name in s.after for s in plan.steps))


def sbatch_texts(plan: Plan) -> dict[str, list[str]]:
    """The job scripts the plan's scheduler would submit for each step (one per array chunk), nothing submitted;
    empty for a scheduler without scripts (local)."""
    return scheduler.for_cluster(plan.cluster).render(plan)


def _local_failed(jobs: list) -> bool:
    for j in jobs:
        j.wait()
    return any(j.state not in ("DONE", "FINISHED", "COMPLETED") or j.exception() is not None for j in jobs)


def submit(plan: Plan, raw_spec: dict, spec_file: str, resume_dir: Optional[Path] = None,
           after_ids: tuple[str, ...] = (), extra_record: Optional[dict] = None) -> Submission:
    """Submit every step of the plan in order and write the run record; returns the submitit jobs.
    With resume_dir, the jobs run in that existing run folder (and find its checkpoints). `after_ids`: Slurm job
    ids of other runs (a study's earlier steps) that the plan's first steps wait for (afterok); `extra_record`
    goes into run.json (a study's folder and step name)."""
    git = start_git_status()  # the checkout's state, read while the jobs are submitted
    try:
        return _submit(plan, raw_spec, spec_file, resume_dir, after_ids, extra_record, git)
    finally:
        if git is not None and git.poll() is None:   # a submission that failed: the git process is not left behind
            git.kill()
            git.communicate()


def _submit(plan: Plan, raw_spec: dict, spec_file: str, resume_dir: Optional[Path], after_ids: tuple[str, ...],
            extra_record: Optional[dict], git) -> Submission:
    sched = scheduler.for_cluster(plan.cluster)
    local = not sched.has_queue  # no queue: each step runs to its end before the next, in this process
    root = run_folder.local_root_id(run_folder.logs_root(plan.spec)) if local else None
    previous = None
    if resume_dir is not None:  # a folder from run_folder.find_run: a run of this spec
        root = resume_dir.name
        previous = run_folder.read_record(resume_dir)
    jobs: dict[str, list] = {}
    steps_record = []
    for step in plan.steps:
        if local and any(_local_failed(jobs[a]) for a in step.after):
            steps_record.append({"name": step.name, "skipped": "a step it depends on failed (afterok)"})
            continue
        deps = [] if local else [j.split("_")[0] for a in step.after for j in _chunk_ids(jobs[a])]
        if not step.after and not local:
            deps = list(dict.fromkeys(after_ids))
        step_jobs, run_dir = sched.submit_step(plan, step, root, deps, lambda st, rd: _entry(plan, raw_spec, st, rd))
        if root is None:
            root = step_jobs[0].job_id.split("_")[0]
        jobs[step.name] = step_jobs
        steps_record.append(_step_record(step, step_jobs, deps))
    run_dir = run_folder.logs_root(plan.spec) / root
    record = {
        "name": plan.spec.name, "workload": plan.spec.workload, "spec_file": str(spec_file),
        "spec": raw_spec, "cluster": plan.cluster.model_dump(), "executor": plan.cluster.executor,
        "git": git_commit(git), "user": getpass.getuser(), "submit_host": socket.gethostname(),
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_dir": str(run_dir), "root_id": root,
        "plan": plan.describe(), "steps": steps_record, "python": sys.executable, **(extra_record or {}),
    }
    record["packages"] = package_versions()   # provenance: the checkout's environment (issue 25)
    record["profile"] = plan.cluster.name
    if previous is not None:  # keep the history of the run: every submission that worked in this folder
        record["submissions"] = previous.get("submissions", [{k: previous[k] for k in ("submitted_at", "steps")
                                                             if k in previous}])
        record["submissions"].append({"submitted_at": record["submitted_at"], "steps": steps_record})
    run_folder.write_record(run_dir, record)
    if local and run_dir.is_dir() and all(j.done() for js in jobs.values() for j in js):
        # the tasks ended (and drew the page) before run.json existed: again, with the plan. A task still running
        # draws its own page at its end, when run.json is there; drawing here too could replace that newer page
        from core.report import write_run_report

        try:
            write_run_report(run_dir)
        except Exception as e:  # a page that cannot be drawn never fails a finished run
            print(f"warning: {run_dir}/report.html not written: {type(e).__name__}: {e}", file=sys.stderr)
    for link in run_dir.parent.glob(".submission_file_*.sh"):  # submitit leaves a link next to the run folder
        if link.is_symlink() and run_dir.resolve() in link.resolve().parents:
            link.unlink()
    return Submission(run_dir, record, jobs)


def _chunk_ids(jobs: list) -> list[str]:
    """One id per Slurm job: '12' for a single job, the array ids of each chunk ('12', '24', ...)."""
    seen: list[str] = []
    for j in jobs:
        base = j.job_id.split("_")[0]
        if base not in seen:
            seen.append(base)
    return seen


def _step_record(step: Step, jobs: list, deps: list[str]) -> dict:
    rec: dict[str, Any] = {"name": step.name, "entry": step.entry, "after": step.after, "dependency": deps,
                           "job_ids": _chunk_ids(jobs), "n_tasks": step.n_tasks}
    if step.is_array:
        rec["chunks"] = [{"job_id": jid, "tasks": [a, b]} for jid, (a, b) in zip(_chunk_ids(jobs), step.chunks)]
    scripts = []
    for jid in rec["job_ids"]:
        first = next(j for j in jobs if j.job_id.split("_")[0] == jid)
        path = first.paths.submission_file
        scripts.append(path.read_text() if path.is_file() else None)
    rec["sbatch"] = scripts
    rec["logs"] = [str(j.paths.stdout) for j in jobs[:1]]
    return rec
