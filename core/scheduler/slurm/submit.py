"""Plan steps -> submitit's SlurmExecutor -> sbatch: the #SBATCH options of a step, the exact scripts for a dry
run, and the submission of a step (arrays through `map_array`, one call per chunk under MaxArraySize;
dependencies through submitit's `dependency` parameter)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from core import registry, run_folder
from core.scheduler.task_env import without_rank_variables

if TYPE_CHECKING:
    from core.plan import Plan, Step


def parameters(plan: "Plan", step: "Step", dependency: Optional[str], run_dir: str, hold: bool = False) -> dict:
    c, spec = plan.cluster, plan.spec
    params: dict[str, Any] = {
        "job_name": spec.name if step.name == "main" else f"{spec.name}-{step.name}",
        "time": step.minutes, "nodes": step.nodes, "ntasks_per_node": step.tasks_per_node,
        "cpus_per_task": step.cpus_per_task, "signal_delay_s": c.signal_s_before_timeout,
        "stderr_to_stdout": True, "comment": f"run={run_dir}",
    }
    # one task that ends with an error ends the step: a rank the hang watchdog or the node health check stopped
    # (core/watchdog.py, core/health.py) takes the others with it instead of leaving them blocked in a collective
    params["srun_args"] = ["--kill-on-bad-exit=1"]
    mem = step.mem_gb or c.mem_gb_per_node
    if mem:
        params["mem"] = f"{int(mem)}GB" if float(mem).is_integer() else f"{int(mem * 1024)}MB"
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(c.slurm, key):
            params[key] = getattr(c.slurm, key)
    if c.slurm.gres and c.accelerator != "cpu" and step.device:
        params["gres"] = c.slurm.gres.format(devices=step.tasks_per_node)
    if c.setup:
        params["setup"] = list(c.setup)
    if step.parallelism:
        params["array_parallelism"] = step.parallelism
    # what the jobs rely on goes in their own options, not in the site's slurm.conf: a dependent job whose
    # dependency failed is cancelled instead of pending forever; only a workload that resumes may be requeued
    extra = {"requeue" if registry.get(spec.workload).can_resume else "no_requeue": True}
    if dependency:
        params["dependency"] = dependency
        extra["kill_on_invalid_dep"] = "yes"
    if hold:  # all or nothing: released (scontrol release) once every job of the plan or study is queued
        extra["hold"] = True
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


def executor(plan: "Plan", step: "Step", folder: Path, dependency: Optional[str], run_dir: str, render: bool = False,
             hold: bool = False):
    c = plan.cluster
    kind = _RenderingSlurmExecutor if render else submitit.SlurmExecutor
    ex = kind(folder=folder, max_num_timeout=c.max_requeues, python=c.python)
    ex.update_parameters(**parameters(plan, step, dependency, run_dir, hold))
    return ex


def render(plan: "Plan") -> dict[str, list[str]]:
    """The sbatch scripts submitit would write for each step (one per Slurm array chunk), nothing submitted.

    Steps after the first depend on job ids that do not exist yet: their scripts show `%A` for the run's
    root id and `afterok:<step>` for the dependency. A plan of several steps is submitted held (`--hold`) and
    released once every job is queued: its scripts say so.
    """
    run_dir = run_folder.run_dir_template(plan.spec)
    out: dict[str, list[str]] = {}
    for step in plan.steps:
        dependency = ":".join(["afterok"] + [f"<{a}>" for a in step.after]) if step.after else None
        ex = executor(plan, step, Path(run_dir) / "submitit", dependency, run_dir, render=True,
                      hold=len(plan.steps) > 1)
        sizes = [b - a for a, b in step.chunks] if step.is_array else [None]
        out[step.name] = [
            _make_sbatch_string(command=ex._submitit_command_str, folder=ex.folder,
                                **{**ex.parameters, **({"map_count": n} if n else {})})
            for n in sizes]
    return out


def submit_step(plan: "Plan", step: "Step", root: Optional[str], deps: list[str], make_entry, hold: bool = False,
                held: Optional[list[str]] = None) -> tuple[list, str]:
    """Submit one step; returns (jobs, run folder template used). The first chunk's array id names the run folder
    of a run that has none yet: the later chunks are submitted with it. With `hold`, every job is submitted held
    and its id appended to `held` as soon as sbatch returns it (so a failure later can cancel it)."""
    run_dir = run_folder.run_dir_template(plan.spec, root)
    dependency = "afterok:" + ":".join(deps) if deps else None
    ex = executor(plan, step, Path(run_dir) / "submitit", dependency, run_dir, hold=hold)
    entry = make_entry(step, run_dir)
    held = held if held is not None else []
    if not step.is_array:
        with without_rank_variables():
            job = ex.submit(entry)
        held += [job.job_id] if hold else []
        return [job], run_dir
    jobs: list = []
    for a, b in step.chunks:
        idx = list(range(a, b))
        with without_rank_variables():
            chunk = ex.map_array(entry, idx, [step.task_items[i] for i in idx])
        jobs += chunk
        held += [chunk[0].job_id.split("_")[0]] if hold and chunk else []
        if root is None:
            root = jobs[0].job_id.split("_")[0]
            run_dir = run_folder.run_dir_template(plan.spec, root)
            ex = executor(plan, step, Path(run_dir) / "submitit", dependency, run_dir, hold=hold)
            entry = make_entry(step, run_dir)
    return jobs, run_dir
