"""Plan -> submitit -> Slurm (or the local executor), plus the run record.

Only submitit executors submit (SlurmExecutor for Slurm profiles, LocalExecutor for `local`): arrays through
`map_array` (one call per chunk under MaxArraySize), dependencies through submitit's `dependency` parameter.
`sbatch_texts` renders the exact scripts submitit would write, for `--dry-run`.

Everything a run produces lives in one run folder (core.run_folder): the record, submitit's scripts, pickles and
logs, and whatever the workload writes.
"""
from __future__ import annotations

import getpass
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from core import run_folder, workloads
from core.plan import Plan, Step
from core.run_folder import REPO
from core.runtime import TaskEntry


@dataclass
class Submission:
    run_dir: Path
    record: dict
    jobs: dict[str, list[Any]] = field(default_factory=dict)  # step name -> submitit jobs (one per task)


def _slurm_parameters(plan: Plan, step: Step, dependency: Optional[str], run_dir: str) -> dict:
    c, spec = plan.cluster, plan.spec
    params: dict[str, Any] = {
        "job_name": spec.name if step.name == "main" else f"{spec.name}-{step.name}",
        "time": step.minutes, "nodes": step.nodes, "ntasks_per_node": step.tasks_per_node,
        "cpus_per_task": step.cpus_per_task, "signal_delay_s": c.signal_s_before_timeout,
        "stderr_to_stdout": True, "comment": f"run={run_dir}",
    }
    mem = step.mem_gb or c.mem_gb_per_node
    if mem:
        params["mem"] = f"{int(mem)}GB" if float(mem).is_integer() else f"{int(mem * 1024)}MB"
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(c, key):
            params[key] = getattr(c, key)
    if c.gres and c.accelerator != "cpu" and step.device:
        params["gres"] = c.gres.format(devices=step.tasks_per_node)
    if c.setup:
        params["setup"] = list(c.setup)
    if step.parallelism:
        params["array_parallelism"] = step.parallelism
    # what the jobs rely on goes in their own options, not in the site's slurm.conf: a dependent job whose
    # dependency failed is cancelled instead of pending forever; only a workload that resumes may be requeued
    extra = {"requeue" if workloads.get(spec.workload).can_resume else "no_requeue": True}
    if dependency:
        params["dependency"] = dependency
        extra["kill_on_invalid_dep"] = "yes"
    params["additional_parameters"] = extra
    return params


class _RenderingSlurmExecutor(submitit.SlurmExecutor):
    """submitit's SlurmExecutor for rendering scripts only (--dry-run): it does not insist on finding srun, so a
    plan can be checked on a laptop before logging in to the cluster. It never submits."""

    @classmethod
    def affinity(cls) -> int:
        return 1

    def _submit_command(self, command: str):
        raise RuntimeError("a rendering executor never submits")


def _executor(plan: Plan, step: Step, folder: Path, dependency: Optional[str], run_dir: str, render: bool = False):
    c = plan.cluster
    if c.executor == "local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=c.max_requeues, python=c.python)
        ex.update_parameters(timeout_min=step.minutes, tasks_per_node=step.tasks_per_node, nodes=1,
                             signal_delay_s=c.signal_s_before_timeout, stderr_to_stdout=True)
        return ex
    kind = _RenderingSlurmExecutor if render else submitit.SlurmExecutor
    ex = kind(folder=folder, max_num_timeout=c.max_requeues, python=c.python)
    ex.update_parameters(**_slurm_parameters(plan, step, dependency, run_dir))
    return ex


def _entry(plan: Plan, raw_spec: dict, step: Step, run_dir_template: str) -> TaskEntry:
    return TaskEntry(spec_data=raw_spec, cluster_data=plan.cluster.model_dump(), workload=plan.spec.workload,
                     entry=step.entry, step=step.name, run_dir_template=run_dir_template)


def sbatch_texts(plan: Plan) -> dict[str, list[str]]:
    """The sbatch scripts submitit would write for each step (one per Slurm array chunk), nothing submitted.

    Steps after the first depend on job ids that do not exist yet: their scripts show `%A` for the run's
    root id and `afterok:<step>` for the dependency.
    """
    if plan.cluster.executor != "slurm":
        return {}
    run_dir = run_folder.run_dir_template(plan.spec)
    out: dict[str, list[str]] = {}
    for step in plan.steps:
        dependency = ":".join(["afterok"] + [f"<{a}>" for a in step.after]) if step.after else None
        ex = _executor(plan, step, Path(run_dir) / "submitit", dependency, run_dir, render=True)
        sizes = [b - a for a, b in step.chunks] if step.is_array else [None]
        out[step.name] = [
            _make_sbatch_string(command=ex._submitit_command_str, folder=ex.folder,
                                **{**ex.parameters, **({"map_count": n} if n else {})})
            for n in sizes]
    return out


def git_commit() -> dict:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head or None, "dirty": bool(dirty)}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


def _submit_step(plan: Plan, raw_spec: dict, step: Step, root: Optional[str], deps: list[str]) -> tuple[list, str]:
    """Submit one step; returns (jobs, run folder template used)."""
    run_dir = run_folder.run_dir_template(plan.spec, root)
    dependency = "afterok:" + ":".join(deps) if deps else None
    ex = _executor(plan, step, Path(run_dir) / "submitit", dependency, run_dir)
    entry = _entry(plan, raw_spec, step, run_dir)
    if not step.is_array:
        return [ex.submit(entry)], run_dir
    jobs: list = []
    for a, b in step.chunks:
        idx = list(range(a, b))
        if plan.cluster.executor == "slurm":
            jobs += ex.map_array(entry, idx, [step.task_items[i] for i in idx])
        else:  # local: no scheduler to throttle, so run `parallelism` tasks at a time
            width = step.parallelism or os.cpu_count() or 1
            for s in range(0, len(idx), width):
                batch = ex.map_array(entry, idx[s:s + width], [step.task_items[i] for i in idx[s:s + width]])
                for j in batch:
                    j.wait()
                jobs += batch
        if root is None and plan.cluster.executor == "slurm":
            root = jobs[0].job_id.split("_")[0]
            run_dir = run_folder.run_dir_template(plan.spec, root)
            ex = _executor(plan, step, Path(run_dir) / "submitit", dependency, run_dir)
            entry = _entry(plan, raw_spec, step, run_dir)
    return jobs, run_dir


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
    local = plan.cluster.executor == "local"
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
        step_jobs, run_dir = _submit_step(plan, raw_spec, step, root, deps)
        if root is None:
            root = step_jobs[0].job_id.split("_")[0]
        jobs[step.name] = step_jobs
        steps_record.append(_step_record(step, step_jobs, deps))
    run_dir = run_folder.logs_root(plan.spec) / root
    record = {
        "name": plan.spec.name, "workload": plan.spec.workload, "spec_file": str(spec_file),
        "spec": raw_spec, "cluster": plan.cluster.model_dump(), "executor": plan.cluster.executor,
        "git": git_commit(), "user": getpass.getuser(), "submit_host": socket.gethostname(),
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_dir": str(run_dir), "root_id": root,
        "plan": plan.describe(), "steps": steps_record, "python": sys.executable, **(extra_record or {}),
    }
    if previous is not None:  # keep the history of the run: every submission that worked in this folder
        record["submissions"] = previous.get("submissions", [{k: previous[k] for k in ("submitted_at", "steps")
                                                             if k in previous}])
        record["submissions"].append({"submitted_at": record["submitted_at"], "steps": steps_record})
    run_folder.write_record(run_dir, record)
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


def report_results(submission: Submission, out=None) -> int:
    """Wait for every job of a submission and print a short summary a person reads: per step its state and time,
    for training the steps, first and last loss and throughput, the result files and the headline metrics in a
    small table. The full results stay in the run folder (tasks/*.json, results/). Exit code 1 if any failed."""
    out = out or sys.stdout
    failed = 0
    run_dir = submission.run_dir
    for step, jobs in submission.jobs.items():
        results = []
        for j in jobs:
            try:
                results.append(j.results()[0])
            except Exception as e:  # the job's own traceback is in its log
                failed += 1
                out.write(f"{step} {j.job_id}: FAILED ({type(e).__name__}); log: {j.paths.stdout}\n")
        if not results:
            continue
        records = [r for r in run_folder.task_records(run_dir, step) if r["rank"] == 0]
        seconds = max((r["seconds"] for r in records), default=None)
        took = f" in {seconds:.0f} s" if seconds is not None else ""
        out.write(f"{step}: {len(results)} task{'s' if len(results) > 1 else ''} done{took} "
                  f"(job {', '.join(dict.fromkeys(j.job_id.split('_')[0] for j in jobs))})\n")
        for line in _summary_lines(results, run_dir):
            out.write(f"  {line}\n")
    out.write(f"full results and logs under {run_dir}\n")
    return 1 if failed else 0


SCALARS_LEFT_OUT = {"checksum", "resumed_checksum", "saved_checksum", "frozen_checksum_before", "frozen_checksum_after",
                    "restart_count", "start_step", "final_loss", "pid", "rank", "world_size", "steps", "losses"}


def _summary_lines(results: list, run_dir: Path) -> list[str]:
    first = results[0] if isinstance(results[0], dict) else {"result": results[0]}
    lines = []
    metrics_csv = run_dir / "metrics.csv"
    if "steps" in first and metrics_csv.is_file():
        import csv

        rows = list(csv.DictReader(metrics_csv.open()))
        if rows:
            step_s = sum(float(r.get("seconds") or 0) for r in rows)
            rate = f", {len(rows) / step_s:.2f} steps/s in the train loop" if step_s else ""
            resumed = f" (resumed at step {first['start_step']})" if first.get("start_step") else ""
            lines.append(f"training: {first['steps']} steps{resumed}, loss {float(rows[0]['loss']):.4f} -> "
                         f"{float(rows[-1]['loss']):.4f}{rate}")
    files = [(k, v) for r in results for k, v in _output_files(r)]
    for name, path in dict.fromkeys(files):
        lines.append(f"{name}: {path}")
    table = _headline(first.get("evaluation")) if isinstance(first.get("evaluation"), dict) else \
        _headline({k: v for k, v in first.items() if k not in SCALARS_LEFT_OUT})
    before = dict(_headline(first["untrained"])) if isinstance(first.get("untrained"), dict) else {}
    if table and before:  # the workload also scored the untrained model: both side by side
        width = max(len(k) for k, _ in table)
        cols = max(9, *(len(v) for _, v in table))
        lines.append(f"{'':<{width}}  {'untrained':>{cols}}  {'trained':>{cols}}")
        lines += [f"{k:<{width}}  {before.get(k, ''):>{cols}}  {v:>{cols}}" for k, v in table]
    elif table:
        width = max(len(k) for k, _ in table)
        lines += [f"{k:<{width}}  {v}" for k, v in table]
    return lines


def _headline(values: dict) -> list[tuple[str, str]]:
    """Short scalar results as (name, text): numbers to 4 decimals, short strings as they are."""
    out = []
    for key, value in values.items():
        if isinstance(value, bool) or key in SCALARS_LEFT_OUT:
            continue
        if isinstance(value, float):
            out.append((key, f"{value:.4f}"))
        elif isinstance(value, int):
            out.append((key, str(value)))
        elif isinstance(value, str) and len(value) <= 60 and not value.endswith((".csv", ".json", ".png")) \
                and "/" not in value:
            out.append((key, value))
    return out[:16]


def _output_files(result, prefix: str = ""):
    """(key, path) of the result files a workload reports (CSV, JSON, PNG), however deep in its result dict."""
    if isinstance(result, dict):
        for key, value in result.items():
            yield from _output_files(value, f"{prefix}{key}.")
    elif isinstance(result, str) and result.endswith((".csv", ".json", ".png")):
        yield prefix.rstrip("."), result
