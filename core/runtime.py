"""Inside the task: from the scheduler's environment to a TaskContext, then the workload.

`TaskEntry` is the callable that submitit pickles and runs on every rank of every task. It re-validates the
spec, resolves `${env:VAR}` references from the job's own environment (secrets never travel in the sbatch
script or the run record), builds the context (run folder, ranks, hosts, array items), calls the workload's
step function (`run`, `merge`, ...) and leaves one small JSON record per rank under `<run_dir>/tasks/`.
Rank / world / master, the restart count and the requeue come from the scheduler that runs the task
(core.scheduler: `dist_env` is read once per task into the context); the device and backend, and the preemption
signal are here.
This module imports no torch at import time: the submit path pickles `TaskEntry` from here.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core import run_folder, scheduler
from core.errors import FieldError
from core.scheduler import DistEnv, DistEnvError, master_port_for, single_process  # noqa: F401 (the task's names)

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
    """This task's job as its scheduler names it (an array task as ARRAYID_TASKID on Slurm); else this process."""
    return scheduler.job_ref(environ)


def restart_count(environ: Optional[dict] = None) -> int:
    """How often the scheduler has requeued this task (0 for a first run and on the local executor)."""
    return scheduler.restart_count(environ)


def requeue(ctx: "TaskContext") -> tuple[bool, str]:
    """Ask the task's scheduler to requeue this job: it stops the allocation and runs the job again later.
    Returns (accepted, the scheduler's message)."""
    return scheduler.by_name(ctx.executor).requeue(ctx.job_id)


def dist_env(environ: Optional[dict] = None) -> DistEnv:
    """Who this task is, from the variables of the scheduler that started it (a single process outside a job)."""
    return scheduler.dist_env(environ)


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

    @property
    def requeues(self) -> bool:
        """The scheduler that runs this task can requeue it (and it resumes)."""
        return scheduler.by_name(self.executor).requeues

    def can_requeue(self) -> bool:
        return scheduler.by_name(self.executor).can_requeue(self.cluster)


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
    last_step: bool = False  # no later step of the plan waits for this one (e.g. an array without a merge)

    def context(self, task_index: Optional[int], items: Optional[list]) -> TaskContext:
        run_dir = run_folder.resolve_run_dir(self.run_dir_template)
        return TaskContext(
            run_dir=run_dir, step=self.step, job_id=job_ref(), root_id=run_dir.name,
            dist=dist_env(), hostname=scheduler.node_name() or socket.gethostname(),
            task_index=task_index, items=items, accelerator=self.cluster_data.get("accelerator", "cpu"),
            executor=self.cluster_data.get("executor", "local"), cluster=self.cluster_data)

    def __call__(self, task_index: Optional[int] = None, items: Optional[list] = None) -> dict:
        from core import registry
        from core.config import parse_spec, resolve_refs

        install_preemption_handler()
        configure_logging()
        for key, value in {**self.cluster_data.get("env", {}), **self.spec_data.get("env", {})}.items():
            os.environ[key] = resolve_refs(str(value))
        spec = parse_spec(self.spec_data, "run record spec")
        ctx = self.context(task_index, items)
        started = time.time()
        fn = registry.get(self.workload).entry(self.entry)
        from core import watchdog

        try:
            with watchdog.in_task():  # a hang watchdog the step starts (core.watchdog) ends with it
                result = fn(spec, ctx)
        except FieldError as e:  # bad input (DatasetError too): the failure mark says so (core.failures: class data)
            from core import failure_mark

            failure_mark.report("data", f"{type(e).__name__}: {e}")
            _finish_tracking(ctx.run_dir, failed=True)
            raise
        except BaseException as e:
            if isinstance(e, Exception):  # a communication failure: the profile's retry policy decides in the task
                from core import retry

                retry.caught(ctx, e)
            _finish_tracking(ctx.run_dir, failed=True)
            raise
        finally:
            ignore_preemption_signals()
        _finish_tracking(ctx.run_dir)
        record = {"step": self.step, "task_index": task_index, "items": items, "rank": ctx.rank,
                  "world_size": ctx.world_size, "job_id": ctx.job_id, "host": ctx.hostname,
                  "started": started, "seconds": round(time.time() - started, 3), "result": result}
        run_folder.write_task_record(ctx.run_dir, record)
        if ctx.rank == 0 and (task_index is None or self.last_step):
            _write_report(ctx.run_dir)  # an array's page comes from its merge step, or without one from each task
        return result


def _finish_tracking(run_dir: Path, failed: bool = False) -> None:
    """Close the W&B / MLflow runs the task opened (core.tracking), with its evaluation in their summary."""
    from core import tracking

    tracking.finish_task(run_dir, failed)


def _write_report(run_dir: Path) -> None:
    """The run's report.html (core.report); a page that cannot be drawn never fails the finished task."""
    try:
        from core.report import write_run_report

        write_run_report(run_dir)
    except Exception as e:
        log.warning("report.html not written: %s: %s", type(e).__name__, e)


BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


@dataclass(frozen=True)
class Accelerator:
    kind: str              # cuda | npu | cpu
    backend: str           # nccl | hccl | gloo
    device: str            # e.g. "cuda:3", "npu:3", "cpu"
    env: dict              # variables to export before torch touches the device
    port_wait_s: int = 0   # npu: seconds to wait for HCCL's host ports to be free before HCCL starts (core.hccl_ports)

    def describe(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in sorted(self.env.items()))
        return f"{self.kind} ({self.backend}) device {self.device}" + (f" [{extra}]" if extra else "")


def _visible_devices(environ: dict, devices_per_node: int, own_var: str) -> list[str]:
    for var in (own_var, *scheduler.device_vars()):
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
        return Accelerator(kind, BACKENDS[kind], f"{kind}:{index}", env, int(cluster.get("hccl_port_wait_s", 120)))
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


def device_check(acc: Accelerator) -> str:
    """The node health check's device part (core.health): bind this rank's device and compute one small sum on it.
    What was found, or an exception naming what failed; a CPU profile has no device to check."""
    if acc.kind == "cpu":
        return "cpu: no device to check"
    import torch

    device = activate(acc)
    backend = torch.cuda if acc.kind == "cuda" else torch.npu
    got = float((torch.arange(1024, dtype=torch.float32, device=device) * 2).sum().item())
    backend.synchronize()
    if got != 1047552.0:
        raise RuntimeError(f"2 x sum(0..1023) on {acc.device} gave {got}, not 1047552")
    free, total = backend.mem_get_info()
    return f"{acc.device} {backend.get_device_name()}: {free / 2 ** 30:.1f} of {total / 2 ** 30:.1f} GiB free"


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
    """Export the rendezvous variables and start the process group through DeepSpeed. On Ascend, first wait (up to
    the profile's hccl_port_wait_s) until HCCL's host ports on this node are free: a requeue on the same node keeps
    the job id, so the same port window, which HCCP may still hold from the attempt that was killed."""
    if acc.kind == "npu" and acc.port_wait_s > 0 and "HCCL_IF_BASE_PORT" in acc.env:
        from core.hccl_ports import wait_for_ports

        wait_for_ports(int(acc.env["HCCL_IF_BASE_PORT"]), 16, timeout_s=acc.port_wait_s,
                       log=log.warning if dist.local_rank == 0 else (lambda line: None))
    import datetime

    import deepspeed

    dist.export()
    deepspeed.init_distributed(dist_backend=acc.backend, timeout=datetime.timedelta(seconds=timeout_s),
                               rank=dist.rank, world_size=dist.world_size)
