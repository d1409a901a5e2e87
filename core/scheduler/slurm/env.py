"""Inside a Slurm task: who this process is, from Slurm's own variables (SLURM_PROCID, SLURM_NTASKS, ...), checked
for consistency; this task's job id as scontrol takes it; how often Slurm requeued it."""
from __future__ import annotations

import os
import re
from typing import Optional

from core.scheduler.slurm.names import parse_node_list
from core.scheduler.task_env import DistEnv, DistEnvError, master_port_for


def in_slurm_task(environ: dict) -> bool:
    return bool(environ.get("SLURM_JOB_ID")) and environ.get("SLURM_PROCID") is not None


def _int_var(environ: dict, name: str) -> int:
    value = environ.get(name)
    if value is None or value == "":
        raise DistEnvError(f"{name} is not set: this must run inside a Slurm task (srun), or set it yourself")
    try:
        return int(value)
    except ValueError:
        raise DistEnvError(f"{name}={value!r} is not an integer") from None


def tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE '2(x3),1' -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise DistEnvError(f"SLURM_TASKS_PER_NODE={spec!r} is not in Slurm's 'N(xM),...' format")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def dist_env_from_slurm(environ: Optional[dict] = None) -> DistEnv:
    """Rank, world, local rank, node rank and master from Slurm's own variables, checked for consistency."""
    environ = os.environ if environ is None else environ
    rank, world = _int_var(environ, "SLURM_PROCID"), _int_var(environ, "SLURM_NTASKS")
    local, node = _int_var(environ, "SLURM_LOCALID"), _int_var(environ, "SLURM_NODEID")
    nnodes = _int_var(environ, "SLURM_JOB_NUM_NODES") if environ.get("SLURM_JOB_NUM_NODES") else \
        _int_var(environ, "SLURM_NNODES")
    job_id = environ.get("SLURM_JOB_ID") or ""
    if not job_id:
        raise DistEnvError("SLURM_JOB_ID is not set")
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or ""
    if not nodelist:
        raise DistEnvError("SLURM_JOB_NODELIST is not set: cannot tell which host is the master")
    hosts = parse_node_list(nodelist)
    if not 0 <= rank < world:
        raise DistEnvError(f"SLURM_PROCID={rank} is outside 0..SLURM_NTASKS-1 ({world})")
    if not 0 <= node < nnodes:
        raise DistEnvError(f"SLURM_NODEID={node} is outside 0..SLURM_JOB_NUM_NODES-1 ({nnodes})")
    if len(hosts) != nnodes:
        raise DistEnvError(f"SLURM_JOB_NODELIST={nodelist!r} names {len(hosts)} hosts but "
                           f"SLURM_JOB_NUM_NODES={nnodes}")
    per_node = tasks_per_node(environ.get("SLURM_TASKS_PER_NODE") or str(world // nnodes))
    if len(per_node) == 1 and nnodes > 1:
        per_node = per_node * nnodes
    if sum(per_node) != world:
        raise DistEnvError(f"SLURM_TASKS_PER_NODE={environ.get('SLURM_TASKS_PER_NODE')!r} adds up to "
                           f"{sum(per_node)} tasks but SLURM_NTASKS={world}")
    if not 0 <= local < per_node[node]:
        raise DistEnvError(f"SLURM_LOCALID={local} is outside the {per_node[node]} tasks of node {node}")
    port = int(environ["MASTER_PORT"]) if environ.get("MASTER_PORT") else master_port_for(job_id)
    return DistEnv(rank, world, local, per_node[node], node, nnodes, hosts[0], port, job_id, tuple(hosts))


def job_ref(environ: dict) -> str:
    """ARRAYID_TASKID for an array task (what scontrol requeue takes), else the job id."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID") or str(os.getpid())


def restart_count(environ: dict) -> int:
    """How often Slurm has requeued this job (SLURM_RESTART_COUNT; 0 for a first run)."""
    return int(environ.get("SLURM_RESTART_COUNT", "0") or 0)


# what a task records of its Slurm allocation (the smoke workload reports them)
RECORDED_VARS = {"SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURMD_NODENAME", "SLURM_RESTART_COUNT"}


def use_local_cluster_conf(environ: dict) -> None:
    """The project's local Slurm (slurm/local_cluster.sh) keeps its slurm.conf in its own state folder, never in
    /etc/slurm. Slurm's clients (sbatch via submitit, squeue, sacct, scancel, scontrol; jobs inherit it from sbatch)
    find it through SLURM_CONF: set it when nothing else is configured, so the README's commands work without
    exporting it."""
    from pathlib import Path

    local = Path(environ.get("SLURM_LOCAL_STATE") or "/var/lib/slurm-local") / "etc" / "slurm.conf"
    if not environ.get("SLURM_CONF") and not Path("/etc/slurm/slurm.conf").exists() and local.is_file():
        environ["SLURM_CONF"] = str(local)


# the devices Slurm bound to this task, after the accelerator's own variable (core.runtime reads them in order)
DEVICE_VARS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "GPU_DEVICE_ORDINAL")
