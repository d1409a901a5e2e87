"""Inside the task: from the scheduler's environment to a TaskContext, then the workload.

`TaskEntry` is the callable that submitit pickles and runs on every rank of every task. It re-validates the
spec, resolves `${env:VAR}` references from the job's own environment (secrets never travel in the sbatch
script or the run record), builds the context (run folder, ranks, hosts, array items), calls the workload's
`run` or `merge`, and leaves one small JSON record per rank under `<run_dir>/tasks/`.
This module imports no torch at import time: the submit path pickles `TaskEntry` from here.
"""
from __future__ import annotations

import importlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass
class TaskContext:
    run_dir: Path
    step: str                       # "main" or "merge"
    job_id: str                     # Slurm job id ("12" or "12_3" for an array task) or local id
    root_id: str                    # the run's id: first job (array job) id; names the run folder
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0
    num_nodes: int = 1
    hostname: str = ""
    hostnames: list[str] = field(default_factory=list)
    task_index: Optional[int] = None  # index of this array task in the whole array (across chunks)
    items: Optional[list[Any]] = None  # the array items this task handles
    accelerator: str = "cpu"
    executor: str = "local"

    def path(self, *parts: str) -> Path:
        """A path inside the run folder (created)."""
        p = self.run_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def task_records(self, step: str = "main") -> list[dict]:
        """The records that the tasks of a step left (used by merge steps)."""
        folder = self.run_dir / "tasks"
        return [json.loads(p.read_text()) for p in sorted(folder.glob(f"{step}*.json"))] if folder.is_dir() else []


def resolve_run_dir(template: str, environ: Optional[dict] = None) -> Path:
    """'%A' in the run-folder template is the root job id: the array job id, else the job id."""
    environ = os.environ if environ is None else environ
    if "%A" in template:
        root = environ.get("SLURM_ARRAY_JOB_ID") or environ.get("SLURM_JOB_ID")
        if not root:
            raise RuntimeError("run folder template has %A but neither SLURM_ARRAY_JOB_ID nor SLURM_JOB_ID is set")
        template = template.replace("%A", root)
    return Path(template)


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


@dataclass
class TaskEntry:
    """The pickled callable: TaskEntry(...)(task_index, items) on every rank."""
    spec_data: dict
    cluster_data: dict
    workload_module: str
    entry: str
    step: str
    run_dir_template: str

    def context(self, task_index: Optional[int], items: Optional[list]) -> TaskContext:
        import submitit

        env = submitit.JobEnvironment()
        run_dir = resolve_run_dir(self.run_dir_template)
        root = run_dir.name
        hostnames = list(env.hostnames)
        return TaskContext(
            run_dir=run_dir, step=self.step, job_id=str(env.job_id), root_id=root,
            rank=env.global_rank, world_size=env.num_tasks, local_rank=env.local_rank, node_rank=env.node,
            num_nodes=env.num_nodes, hostname=os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
            hostnames=hostnames, task_index=task_index, items=items,
            accelerator=self.cluster_data.get("accelerator", "cpu"), executor=self.cluster_data.get("executor", "local"))

    def __call__(self, task_index: Optional[int] = None, items: Optional[list] = None) -> dict:
        from core.spec import JobSpec, resolve_env_refs

        for key, value in {**self.cluster_data.get("env", {}), **self.spec_data.get("env", {})}.items():
            os.environ[key] = resolve_env_refs(str(value))
        spec = JobSpec.model_validate(self.spec_data)
        ctx = self.context(task_index, items)
        started = time.time()
        fn = getattr(importlib.import_module(self.workload_module), self.entry)
        result = fn(spec, ctx)
        record = {"step": self.step, "task_index": task_index, "items": items, "rank": ctx.rank,
                  "world_size": ctx.world_size, "job_id": ctx.job_id, "host": ctx.hostname,
                  "started": started, "seconds": round(time.time() - started, 3), "result": result}
        tag = self.step if task_index is None else f"{self.step}-{task_index:06d}"
        _write_json_atomic(ctx.run_dir / "tasks" / f"{tag}.rank{ctx.rank}.json", record)
        return result


def context_dict(ctx: TaskContext) -> dict:
    d = asdict(ctx)
    d["run_dir"] = str(ctx.run_dir)
    return d
