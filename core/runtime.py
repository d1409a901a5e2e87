"""Inside the task: from the scheduler's environment to a TaskContext, then the workload.

`TaskEntry` is the callable that submitit pickles and runs on every rank of every task. It re-validates the
spec, resolves `${env:VAR}` references from the job's own environment (secrets never travel in the sbatch
script or the run record), builds the context (run folder, ranks, hosts, array items), calls the workload's
step function (`run`, `merge`, ...) and leaves one small JSON record per rank under `<run_dir>/tasks/`.
Also here, because they are the scheduler's business and nobody else's: rank / world / master from Slurm's
variables (`dist_env`, read once per task into the context), the device and backend, the preemption signal,
the restart count and `scontrol requeue`.
This module imports no torch at import time: the submit path pickles `TaskEntry` from here.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core import run_folder

log = logging.getLogger("runtime")


def fault_point(name: str, value) -> None:
    """Fault injection for the resume and merge tests, off unless MEDHPC_FAULT names this point:
    `kill@<name>:<value>` SIGKILLs the process there, `fail@<name>:<value>` raises."""
    spec = os.environ.get("MEDHPC_FAULT", "")
    if spec == f"kill@{name}:{value}":
        import signal

        logging.getLogger("fault").warning("SIGKILL at %s %s", name, value)
        os.kill(os.getpid(), signal.SIGKILL)
    if spec == f"fail@{name}:{value}":
        raise RuntimeError(f"[fault] injected failure at {name} {value} (MEDHPC_FAULT)")


# Set by the SIGUSR1/SIGUSR2 handler (Slurm's --signal before the time limit, or a preemption notice); the
# training loop acts on it at a step boundary, after the ranks agree (core.engine.Trainer).
PREEMPT: dict = {"signal": None}


def install_preemption_handler() -> None:
    """Installed first thing in every task, replacing submitit's handler (which checkpoints on rank 0 only):
    the signal only sets a flag, so no rank is interrupted in the middle of a collective."""
    import signal

    def handler(signum, frame):
        PREEMPT["signal"] = signal.Signals(signum).name
        log.info("received %s: checkpoint at the next step boundary", PREEMPT["signal"])

    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, handler)


def ignore_preemption_signals() -> None:
    """Once the work is done a late time-limit warning must not kill the task: Python resets its own handlers to
    the default (terminate) while the interpreter shuts down, so the job would end FAILED after succeeding."""
    import signal

    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def job_ref(environ: Optional[dict] = None) -> str:
    """This task's job as Slurm names it: ARRAYID_TASKID for an array task (what scontrol requeue takes), else the
    job id; the local executor's id; else this process."""
    environ = os.environ if environ is None else environ
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID") or environ.get("SUBMITIT_LOCAL_JOB_ID") or str(os.getpid())


def restart_count(environ: Optional[dict] = None) -> int:
    """How often Slurm has requeued this job (SLURM_RESTART_COUNT; 0 for a first run and on the local executor)."""
    environ = os.environ if environ is None else environ
    return int(environ.get("SLURM_RESTART_COUNT", "0") or 0)


def requeue(job_id: str) -> tuple[bool, str]:
    """`scontrol requeue` this job (an array task as ARRAYID_TASKID): Slurm stops the allocation and runs the
    job again later. Returns (accepted, scontrol's message)."""
    proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    return proc.returncode == 0, (proc.stderr or proc.stdout).strip()


# ------------------------------------------------------------------ distributed environment and accelerator
class DistEnvError(RuntimeError):
    """Slurm (or the local executor) handed the task an environment that cannot make a process group."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    job_id: str
    hosts: tuple[str, ...] = ()     # every node of the allocation, in Slurm's order (the master first)

    def export(self, environ: Optional[dict] = None) -> None:
        environ = os.environ if environ is None else environ
        environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                       LOCAL_WORLD_SIZE=str(self.local_world_size), NODE_RANK=str(self.node_rank),
                       MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


MASTER_PORT_BASE, MASTER_PORT_SPAN = 20000, 40000


def master_port_for(job_id: str) -> int:
    """Deterministic per job (every rank computes the same), distinct for any two jobs whose ids differ by less
    than 40000, so jobs sharing a node never collide. Array tasks have their own SLURM_JOB_ID."""
    return MASTER_PORT_BASE + int(re.sub(r"\D", "", job_id) or 0) % MASTER_PORT_SPAN


def _int_var(environ: dict, name: str) -> int:
    value = environ.get(name)
    if value is None or value == "":
        raise DistEnvError(f"{name} is not set: this must run inside a Slurm task (srun), or set it yourself")
    try:
        return int(value)
    except ValueError:
        raise DistEnvError(f"{name}={value!r} is not an integer") from None


def _tasks_per_node(spec: str) -> list[int]:
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
    from submitit.slurm.slurm import _parse_node_list

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
    hosts = _parse_node_list(nodelist)
    if not 0 <= rank < world:
        raise DistEnvError(f"SLURM_PROCID={rank} is outside 0..SLURM_NTASKS-1 ({world})")
    if not 0 <= node < nnodes:
        raise DistEnvError(f"SLURM_NODEID={node} is outside 0..SLURM_JOB_NUM_NODES-1 ({nnodes})")
    if len(hosts) != nnodes:
        raise DistEnvError(f"SLURM_JOB_NODELIST={nodelist!r} names {len(hosts)} hosts but "
                           f"SLURM_JOB_NUM_NODES={nnodes}")
    per_node = _tasks_per_node(environ.get("SLURM_TASKS_PER_NODE") or str(world // nnodes))
    if len(per_node) == 1 and nnodes > 1:
        per_node = per_node * nnodes
    if sum(per_node) != world:
        raise DistEnvError(f"SLURM_TASKS_PER_NODE={environ.get('SLURM_TASKS_PER_NODE')!r} adds up to "
                           f"{sum(per_node)} tasks but SLURM_NTASKS={world}")
    if not 0 <= local < per_node[node]:
        raise DistEnvError(f"SLURM_LOCALID={local} is outside the {per_node[node]} tasks of node {node}")
    port = int(environ["MASTER_PORT"]) if environ.get("MASTER_PORT") else master_port_for(job_id)
    return DistEnv(rank, world, local, per_node[node], node, nnodes, hosts[0], port, job_id, tuple(hosts))


def dist_env(environ: Optional[dict] = None) -> DistEnv:
    """Slurm task -> dist_env_from_slurm; submitit's local executor -> its SUBMITIT_LOCAL_* variables."""
    environ = os.environ if environ is None else environ
    if environ.get("SUBMITIT_EXECUTOR") == "local" or (not environ.get("SLURM_JOB_ID")
                                                       and environ.get("SUBMITIT_LOCAL_JOB_ID")):
        world = int(environ.get("SUBMITIT_LOCAL_NTASKS", "1"))
        rank = int(environ.get("SUBMITIT_LOCAL_GLOBALID", environ.get("SUBMITIT_LOCAL_LOCALID", "0")))
        job_id = environ.get("SUBMITIT_LOCAL_JOB_ID", str(os.getpid()))
        port = int(environ["MASTER_PORT"]) if environ.get("MASTER_PORT") else master_port_for(job_id)
        return DistEnv(rank, world, rank, world, 0, 1, "127.0.0.1", port, job_id, (socket.gethostname(),))
    if environ.get("SLURM_JOB_ID") and environ.get("SLURM_PROCID") is not None:
        return dist_env_from_slurm(environ)
    return single_process()


def single_process() -> DistEnv:
    """One process, no scheduler: rank 0 of 1 on this host."""
    return DistEnv(0, 1, 0, 1, 0, 1, "127.0.0.1", master_port_for(str(os.getpid())), str(os.getpid()),
                   (socket.gethostname(),))


@dataclass
class TaskContext:
    """What a workload's step function gets besides the spec: where to write, who it is, what to do."""
    run_dir: Path
    step: str                       # "main", "merge", or a workload's own step ("baseline")
    job_id: str                     # Slurm job id ("12" or "12_3" for an array task) or local id
    root_id: str                    # the run's id: first job (array job) id; names the run folder
    dist: DistEnv = field(default_factory=lambda: single_process())  # rank, world, hosts: read once per task
    hostname: str = ""
    task_index: Optional[int] = None  # index of this array task in the whole array (across chunks)
    items: Optional[list[Any]] = None  # the array items this task handles
    accelerator: str = "cpu"
    executor: str = "local"
    cluster: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def hostnames(self) -> list[str]:
        return list(self.dist.hosts)

    def path(self, *parts: str) -> Path:
        """A path inside the run folder (its parent created)."""
        p = self.run_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def task_records(self, step: str = "main") -> list[dict]:
        """The records that the tasks of a step left (used by merge steps)."""
        return run_folder.task_records(self.run_dir, step)

    def can_requeue(self) -> bool:
        return self.executor == "slurm" and restart_count() < int(self.cluster.get("max_requeues", 0))


def context_dict(ctx: TaskContext) -> dict:
    """The context as plain JSON (for results and records)."""
    d = ctx.dist
    return {"run_dir": str(ctx.run_dir), "step": ctx.step, "job_id": ctx.job_id, "root_id": ctx.root_id,
            "rank": d.rank, "world_size": d.world_size, "local_rank": d.local_rank, "node_rank": d.node_rank,
            "num_nodes": d.num_nodes, "hostname": ctx.hostname, "hostnames": list(d.hosts),
            "task_index": ctx.task_index, "items": ctx.items, "accelerator": ctx.accelerator,
            "executor": ctx.executor}


def configure_logging() -> None:
    """Task output: one line per message, `[logger] message`, on stdout (Slurm's log file)."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stdout, force=True)
    # DeepSpeed calls torch.distributed's renamed collectives on every step: one FutureWarning each, hundreds of lines
    # burying the job's own log; they say nothing about the job
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


@dataclass
class TaskEntry:
    """The pickled callable: TaskEntry(...)(task_index, items) on every rank."""
    spec_data: dict
    cluster_data: dict
    workload: str
    entry: str
    step: str
    run_dir_template: str

    def context(self, task_index: Optional[int], items: Optional[list]) -> TaskContext:
        run_dir = run_folder.resolve_run_dir(self.run_dir_template)
        return TaskContext(
            run_dir=run_dir, step=self.step, job_id=job_ref(), root_id=run_dir.name,
            dist=dist_env(), hostname=os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
            task_index=task_index, items=items, accelerator=self.cluster_data.get("accelerator", "cpu"),
            executor=self.cluster_data.get("executor", "local"), cluster=self.cluster_data)

    def __call__(self, task_index: Optional[int] = None, items: Optional[list] = None) -> dict:
        from core import workloads
        from core.spec import parse_spec, resolve_refs

        install_preemption_handler()
        configure_logging()
        for key, value in {**self.cluster_data.get("env", {}), **self.spec_data.get("env", {})}.items():
            os.environ[key] = resolve_refs(str(value))
        spec = parse_spec(self.spec_data, "run record spec")
        ctx = self.context(task_index, items)
        started = time.time()
        fn = workloads.get(self.workload).entry(self.entry)
        try:
            result = fn(spec, ctx)
        finally:
            ignore_preemption_signals()
        record = {"step": self.step, "task_index": task_index, "items": items, "rank": ctx.rank,
                  "world_size": ctx.world_size, "job_id": ctx.job_id, "host": ctx.hostname,
                  "started": started, "seconds": round(time.time() - started, 3), "result": result}
        run_folder.write_task_record(ctx.run_dir, record)
        return result


BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


@dataclass(frozen=True)
class Accelerator:
    kind: str              # cuda | npu | cpu
    backend: str           # nccl | hccl | gloo
    device: str            # e.g. "cuda:3", "npu:3", "cpu"
    env: dict              # variables to export before torch touches the device

    def describe(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in sorted(self.env.items()))
        return f"{self.kind} ({self.backend}) device {self.device}" + (f" [{extra}]" if extra else "")


def _visible_devices(environ: dict, devices_per_node: int, own_var: str) -> list[str]:
    for var in (own_var, "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "GPU_DEVICE_ORDINAL"):
        if environ.get(var):
            return [d for d in environ[var].split(",") if d != ""]
    return [str(i) for i in range(max(devices_per_node, 1))]


def resolve_accelerator(kind: str, dist: DistEnv, cluster: Optional[dict] = None,
                        environ: Optional[dict] = None) -> Accelerator:
    """Decide device, backend and environment for this rank. Pure: nothing is imported or initialised here."""
    environ = os.environ if environ is None else environ
    cluster = cluster or {}
    if kind not in BACKENDS:
        raise ValueError(f"accelerator {kind!r} is not one of cuda, npu, cpu (cluster profile 'accelerator')")
    if kind == "cpu":
        return Accelerator("cpu", "gloo", "cpu", {})
    own = "CUDA_VISIBLE_DEVICES" if kind == "cuda" else "ASCEND_RT_VISIBLE_DEVICES"
    visible = _visible_devices(environ, int(cluster.get("devices_per_node") or 0), own)
    # one device per task when Slurm bound it (a single visible device), else the local rank's device
    index = 0 if len(visible) == 1 else dist.local_rank
    if index >= len(visible):
        raise DistEnvError(f"local rank {dist.local_rank} has no device: {own} / Slurm lists {visible}")
    env = {own: ",".join(visible)}
    if kind == "npu":
        env["HCCL_CONNECT_TIMEOUT"] = str(cluster.get("hccl_connect_timeout", 1200))
        env["HCCL_EXEC_TIMEOUT"] = str(cluster.get("hccl_exec_timeout", 1800))
        # HCCL takes 16 ports per device from its base port: each job gets its own 256-port window (16 devices)
        # out of 16 windows, so jobs sharing a node (consecutive ids) do not collide
        base = int(cluster.get("hccl_if_base_port", 60000))
        slot = int(re.sub(r"\D", "", dist.job_id) or 0) % 16
        env["HCCL_IF_BASE_PORT"] = str(base + slot * 256)
    return Accelerator(kind, BACKENDS[kind], f"{kind}:{index}", env)


def activate(acc: Accelerator):
    """Export the accelerator's environment, import its torch backend and bind this process to its device."""
    os.environ.update(acc.env)
    import torch

    if acc.kind == "npu":
        try:
            import torch_npu  # noqa: F401
            from torch_npu.contrib import transfer_to_npu  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"accelerator 'npu' needs torch_npu (pip install -e '.[npu]' on an Ascend node with "
                               f"CANN installed): {e}") from None
        torch.npu.set_device(acc.device)
    elif acc.kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("accelerator 'cuda' but torch sees no CUDA device on this node")
        torch.cuda.set_device(acc.device)
    return torch.device(acc.device)


def bf16_supported(acc: Accelerator) -> bool:
    """Whether this task's device computes in bf16 (CUDA before Ampere does not; CPU and Ascend do)."""
    if acc.kind != "cuda":
        return True
    import torch

    return bool(torch.cuda.is_bf16_supported())


def task_device(ctx: TaskContext):
    """The device of a single-process task (no process group): the profile's accelerator, bound and checked."""
    return activate(resolve_accelerator(ctx.accelerator, ctx.dist, ctx.cluster))


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(precision: str):
    """'fp32' | 'bf16' | 'fp16' (the spec's names) -> the torch dtype."""
    import torch

    return getattr(torch, DTYPES[precision])


def check_rendezvous(dist: DistEnv, cluster: Optional[dict] = None) -> None:
    """A job on several nodes must meet at an address the other nodes can reach: refuse a MASTER_ADDR that resolves
    to a loopback address (a node whose own name maps to 127.0.1.1 in /etc/hosts, say) instead of hanging in the
    rendezvous. Profiles whose nodes all share one host (the local test cluster) allow it."""
    if dist.num_nodes < 2 or (cluster or {}).get("loopback_rendezvous"):
        return
    import ipaddress

    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(dist.master_addr, None)}
    except OSError as e:
        raise DistEnvError(f"MASTER_ADDR {dist.master_addr} (the first node) does not resolve: {e}") from None
    loop = sorted(a for a in addrs if ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if loop:
        raise DistEnvError(f"MASTER_ADDR {dist.master_addr} resolves to the loopback address {loop[0]}: ranks on the "
                           f"other {dist.num_nodes - 1} node(s) could not reach it. Fix the node's entry in "
                           f"/etc/hosts (or DNS); profiles whose nodes share one host set loopback_rendezvous: true")


def init_distributed(dist: DistEnv, acc: Accelerator, timeout_s: int = 600) -> None:
    """Export the rendezvous variables and start the process group through DeepSpeed."""
    import datetime

    import deepspeed

    dist.export()
    deepspeed.init_distributed(dist_backend=acc.backend, timeout=datetime.timedelta(seconds=timeout_s),
                               rank=dist.rank, world_size=dist.world_size)
