"""JobSpec + Cluster -> Plan: what will run where, before anything is submitted.

A plan is a list of steps. A step is a single task (possibly multi-node: nodes x tasks per node) or an array
(one task per item, or several items per task), split into several Slurm arrays when it has more tasks than
the cluster's MaxArraySize allows. A merge step waits for every array chunk with `afterok`. DeepSpeed specs
also get a per-device memory estimate, and a plan that cannot fit the device is refused unless forced.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core import registry, scheduler
from core.config import FILE_REF, Cluster, FieldError, JobSpec, SpecError, secret_file_problem
from core.model_sizes import unused_lr_groups


@dataclass
class Step:
    name: str                     # "main" or "merge"
    entry: str                    # workload function: "run" or "merge"
    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    mem_gb: Optional[float]
    minutes: int
    task_items: Optional[list[list[Any]]] = None   # arrays: the items of each task; None for a single task
    chunks: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) task ranges, one Slurm array each
    parallelism: Optional[int] = None
    after: list[str] = field(default_factory=list)  # steps that must succeed first (afterok)
    device: bool = True           # asks for the profile's accelerator (gres); False: the workload needs none

    @property
    def is_array(self) -> bool:
        return self.task_items is not None

    @property
    def n_tasks(self) -> int:
        return len(self.task_items) if self.task_items is not None else 1

    def describe(self) -> str:
        shape = f"{self.nodes} node{'s' if self.nodes > 1 else ''} x {self.tasks_per_node} task{'s' if self.tasks_per_node > 1 else ''}"
        res = f"{shape}, {self.cpus_per_task} cpu/task" + (f", {self.mem_gb:g} GB" if self.mem_gb else "") + \
              f", {self.minutes} min"
        if not self.is_array:
            head = f"step {self.name}: 1 job ({res})"
        else:
            n_items = sum(len(t) for t in self.task_items)
            per = f"{len(self.task_items[0])} item{'s' if len(self.task_items[0]) > 1 else ''}/task"
            ranges = " ".join(f"[{a}-{b - 1}]" for a, b in self.chunks)
            throttle = f", at most {self.parallelism} at once" if self.parallelism else ""
            head = (f"step {self.name}: array of {self.n_tasks} tasks for {n_items} items ({per}) in "
                    f"{len(self.chunks)} Slurm array{'s' if len(self.chunks) > 1 else ''} {ranges}{throttle}; each {res}")
        if self.after:
            head += f"; afterok: {', '.join(self.after)}"
        return head


@dataclass
class Plan:
    spec: JobSpec
    cluster: Cluster
    steps: list[Step]
    max_array_size: int
    memory: Any = None            # core.memory.MemoryEstimate for DeepSpeed specs
    notes: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (field, why): a dry run plans past them
    cluster_source: str = ""      # why this profile: --cluster, the spec's cluster: key, $MEDHPC_CLUSTER, ...
    def describe(self) -> str:
        c = self.cluster
        lines = [f"plan for {self.spec.name} (workload {self.spec.workload}) on {c.name} "
                 f"[{c.executor}, {c.accelerator}]" + (f" (profile from {self.cluster_source})"
                                                       if self.cluster_source else "")]
        lines += [f"  {s.describe()}" for s in self.steps]
        ds = self.spec.deepspeed
        if ds is not None:
            offload = [w for w, on in (("optimizer", ds.offload_optimizer), ("parameters", ds.offload_param)) if on]
            lines.append(f"  deepspeed: ZeRO-{ds.stage}, {ds.precision}, micro-batch {ds.micro_batch} x grad-accum "
                         f"{ds.grad_accum}" + (", activation checkpointing" if checkpointing(self.spec) else "")
                         + (f", {' and '.join(offload)} offloaded to the host" if offload else ""))
        if self.memory is not None:
            lines.append(f"  memory: {self.memory.describe()}")
        lines += ["  note: " + n.replace("\n", "\n        ") for n in self.notes]   # a note's own lines, indented
        return "\n".join(lines)


def chunk_ranges(n_tasks: int, max_array_size: int) -> list[tuple[int, int]]:
    """Split task indices 0..n-1 into runs that each fit one Slurm array (indices 0..MaxArraySize-1)."""
    return [(a, min(a + max_array_size, n_tasks)) for a in range(0, n_tasks, max_array_size)]


def _memory(spec: JobSpec, cluster: Cluster, tasks_per_node: int):
    """The per-device estimate from the model the workload builds (counted on the meta device)."""
    from core.models.pangu import decoder_size

    builder = registry.get(spec.workload).model_size or decoder_size
    size = builder(spec)
    if size is None:
        return None
    groups = spec.train.lr_groups if spec.train is not None else {}
    unused = unused_lr_groups(groups, size.param_names) if size.param_names else []
    if unused:
        owners = sorted({n.rsplit(".", 1)[0] for n in size.param_names})
        what = "the adapters' modules" if spec.peft is not None else "the model's modules"
        raise FieldError("train.lr_groups", f"{unused} name no module above a trainable parameter of the model "
                                            f"{spec.workload} builds; give a module name or dotted path, e.g. of "
                                            f"{what}: {_sample(owners)}")
    t = spec.model.trainable
    trainable = size.trainable if size.trainable is not None and t == "all" else \
        size.total if t == "all" else 0 if t == "none" else int(t)
    from core.memory import estimate

    ds = spec.deepspeed
    return trainable, size.total, estimate(size, trainable, stage=ds.stage, precision=ds.precision, offload_optimizer=ds.offload_optimizer,
                    offload_param=ds.offload_param, devices_per_node=tasks_per_node, nodes=spec.resources.nodes,
                    seq=spec.model.seq_len, micro_batch=ds.micro_batch, checkpointing=checkpointing(spec),
                    device_gib=cluster.device_mem_gb if cluster.accelerator != "cpu" else None)


def _sample(names: list[str], n: int = 8) -> str:
    """A few distinct names spread over the model (first, middle, last), not the first n of one block."""
    if len(names) <= n:
        return ", ".join(names)
    step = (len(names) - 1) / (n - 1)
    return ", ".join(names[round(i * step)] for i in range(n)) + f" ({len(names)} in all)"


def checkpoint_host_bytes(trainable: int, tasks_per_node: int, world: int) -> float:
    """Host memory per node that a background checkpoint copies into: each rank's share of the fp32 master weights
    and Adam's two moments (12 bytes per trainable parameter over the ranks) plus the module's trainable weights
    that the writer ranks save (at most 4 bytes each, counted once per node: an upper bound)."""
    return 12 * trainable * tasks_per_node / max(world, 1) + 4 * trainable


def _checkpoint_note(plan: "Plan", spec: JobSpec, cluster: Cluster, trainable: int, tasks_per_node: int,
                     source: str, keep_going: bool) -> None:
    """What checkpoints cost the job: background writes (train.async_checkpoint) and the host memory they copy
    into; a copy that cannot fit next to DeepSpeed's own host memory on the profile's nodes is refused."""
    from core.memory import GiB

    train = spec.train
    every = f"every {train.checkpoint_every} steps" if train.checkpoint_every else "only at the end"
    if not train.async_checkpoint or not train.checkpoint_every:
        plan.notes.append(f"checkpoints: {every} and on Slurm's signal, written before training goes on")
        return
    copy = checkpoint_host_bytes(trainable, tasks_per_node, tasks_per_node * spec.resources.nodes)
    plan.notes.append(f"checkpoints: {every} in the background (training waits for a host copy of up to "
                      f"{copy / GiB:.2f} GiB per node); the final one and the one on Slurm's signal are written "
                      f"before going on")
    need = copy + (plan.memory.cpu_per_node if plan.memory is not None else 0)
    if cluster.mem_gb_per_node and need > cluster.mem_gb_per_node * GiB:
        problem = ("train.async_checkpoint", f"a background checkpoint copies up to {copy / GiB:.1f} GiB per node, "
                   f"which with DeepSpeed's host memory ({(need - copy) / GiB:.1f} GiB) does not fit the profile's "
                   f"mem_gb_per_node ({cluster.mem_gb_per_node:g}); set train.async_checkpoint: false")
        if not keep_going:
            raise SpecError(source, [problem])
        plan.problems.append(problem)


def checkpointing(spec: JobSpec) -> bool:
    """Activation checkpointing as the job will run it: deepspeed.activation_checkpointing for a workload that
    applies it, or peft.gradient_checkpointing (core.models.peft.apply_peft switches it on)."""
    asked = bool(spec.deepspeed and spec.deepspeed.activation_checkpointing and registry.get(spec.workload).checkpointing)
    return asked or bool(spec.peft and spec.peft.gradient_checkpointing)


def _takes_cluster(planner) -> bool:
    import inspect

    try:
        params = inspect.signature(planner).parameters
    except (TypeError, ValueError):
        return False
    return "cluster" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def workload_shape(spec: JobSpec, source: str, resume_dir=None, cluster: Optional[Cluster] = None):
    """The workload's own steps and items (layers, ratios), from its torch-free planner, if it has one. A planner
    that declares a `cluster` parameter gets the profile (e.g. a per-cluster task start cost); others do not."""
    planner = registry.get(spec.workload).plan
    if planner is None:
        if resume_dir is not None:
            raise SpecError(source, [("--resume-missing", f"workload '{spec.workload}' has no per-item results "
                                                          f"to complete; use --resume")])
        return None
    try:
        if cluster is not None and _takes_cluster(planner):
            return planner(spec, resume_dir, cluster=cluster)
        return planner(spec, resume_dir)
    except FieldError as e:
        raise SpecError(source, [(e.field, e.message)]) from None


LOCAL_PROCESSES_PER_CPU = 4


def check_limits(spec: JobSpec, cluster: Cluster, source: str, tasks_per_node: int) -> None:
    """Bounds that depend on where the job goes: the profile's node limit, this machine for the local executor,
    and where run folders may be written. Refusals name the field and the limit."""
    from core.run_folder import logs_dir_problem

    problems = []
    res = spec.resources
    if cluster.max_nodes and res.nodes > cluster.max_nodes:
        problems.append(("resources.nodes", f"{res.nodes} nodes but {cluster.name} allows at most {cluster.max_nodes} "
                                            f"per job (profile max_nodes)"))
    if scheduler.for_cluster(cluster).single_host:
        cap = LOCAL_PROCESSES_PER_CPU * (os.cpu_count() or 1)
        if res.nodes * tasks_per_node > cap:
            problems.append(("resources.nodes", f"{res.nodes} x {tasks_per_node} tasks would start "
                                                f"{res.nodes * tasks_per_node} processes on this machine "
                                                f"({os.cpu_count()} CPUs; at most {cap}); use a Slurm profile"))
    if spec.peft and spec.peft.quantize and cluster.accelerator == "npu":
        problems.append(("peft.quantize", f"bitsandbytes has no Ascend NPU backend, so {cluster.name} cannot load a "
                                          f"{spec.peft.quantize} base; drop peft.quantize (LoRA on a bf16 base) or "
                                          f"use a CUDA profile"))
    problem = logs_dir_problem(spec.outputs.logs_dir, cluster.logs_roots)
    if problem:
        problems.append(("outputs.logs_dir", problem))
    for key, value in spec.env.items():  # ${file:PATH} secrets this machine can see are checked now, not in the job
        for m in FILE_REF.finditer(value):
            if Path(m.group(1)).exists() and secret_file_problem(m.group(1)):
                problems.append((f"env.{key}", secret_file_problem(m.group(1))))
    from core import tracking

    problems += tracking.plan_problems(spec, cluster)
    key_ref = spec.tracking.wandb_key or ""
    for m in FILE_REF.finditer(key_ref):
        if Path(m.group(1)).exists() and secret_file_problem(m.group(1)):
            problems.append(("tracking.wandb_key", secret_file_problem(m.group(1))))
    if problems:
        raise SpecError(source, problems)


def _watchdog_notes(spec: JobSpec, steps: list[Step], notes: list[str]) -> None:
    """What the hang watchdog and the node health check will do (core/watchdog.py, core/health.py)."""
    from core import watchdog

    what = registry.get(spec.workload).watched
    if what is None:
        if "hang" in spec.model_fields_set:
            notes.append(f"hang: workload {spec.workload} runs no hang watchdog; the section is not used")
        return
    notes.append(watchdog.describe(spec, what))
    main = next((s for s in steps if s.name == "main"), None)
    if main is not None and main.nodes > 1 and registry.get(spec.workload).trains:
        notes.append(f"node health check on each of the {main.nodes} nodes before the rendezvous: the device, a TCP "
                     f"connection to the first node's rendezvous port, one timed all-reduce; a failing node ends the "
                     f"job (class node) and is named")


def make_plan(spec: JobSpec, cluster: Cluster, source: str = "spec", force: bool = False,
              limits: Optional[dict[str, int]] = None, resume_dir=None, keep_going: bool = False) -> Plan:
    """The plan, or a SpecError for the first thing a submission would be refused for. With keep_going (a dry
    run) a refusal by the workload's own planner (data not on this machine, say) is kept in `plan.problems` and
    planning goes on with one task, so the plan, the scripts and the estimate still print."""
    res = spec.resources
    notes: list[str] = []
    nodes = res.nodes
    device = registry.get(spec.workload).device
    tasks_per_node = res.tasks_per_node or (cluster.devices_per_node if cluster.accelerator != "cpu" and device
                                            else 0) or 1
    check_limits(spec, cluster, source, tasks_per_node)
    if cluster.accelerator != "cpu" and cluster.devices_per_node and tasks_per_node > cluster.devices_per_node:
        raise SpecError(source, [("resources.tasks_per_node",
                                  f"{tasks_per_node} tasks per node but {cluster.name} has {cluster.devices_per_node} "
                                  f"{cluster.accelerator} devices per node; use at most {cluster.devices_per_node}")])
    sched = scheduler.for_cluster(cluster)
    if sched.single_host and nodes > 1:
        notes.append(f"{sched.name} executor: {nodes} nodes x {tasks_per_node} tasks run as {nodes * tasks_per_node} "
                     f"processes on this machine")
        tasks_per_node, nodes = nodes * tasks_per_node, 1
    cpus = res.cpus_per_task or cluster.cpus_per_task
    common = dict(nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=cpus, mem_gb=res.mem_gb,
                  minutes=res.minutes)

    if limits is None:
        limits = sched.limits(cluster) if res.array or registry.get(spec.workload).plan else {}
    max_array = limits.get("MaxArraySize", cluster.max_array_size)
    steps: list[Step] = []
    problems: list[tuple[str, str]] = []
    try:
        shape = workload_shape(spec, source, resume_dir, cluster)
    except SpecError as e:
        if not keep_going:
            raise
        problems, shape = e.problems, None
    if shape is not None and shape.problems:  # the planner knows the shape but a submission would be refused
        if not keep_going:
            raise SpecError(source, shape.problems)
        problems = list(shape.problems)
    arr = res.array
    job_limit = min(x for x in (cluster.max_jobs_per_user, limits.get("MaxJobCount")) if x) \
        if (cluster.max_jobs_per_user or limits.get("MaxJobCount")) else None

    def array_step(name: str, entry: str, items: list, per: int, throttle: Optional[int], after: list[str],
                   resources: dict, field_name: str) -> Step:
        """An array step: tasks of `per` items, split into Slurm arrays under MaxArraySize, throttle shared."""
        task_items = [items[i:i + per] for i in range(0, len(items), per)]
        if job_limit and len(task_items) > job_limit:
            need = math.ceil(len(items) / job_limit)
            raise SpecError(source, [(field_name,
                                      f"{len(task_items)} tasks exceed {cluster.name}'s limit of {job_limit} queued jobs "
                                      f"per user, which splitting into several arrays cannot get around; "
                                      f"set resources.array.items_per_task to at least {need}")])
        chunks = chunk_ranges(len(task_items), max_array)
        parallelism = throttle
        if len(chunks) > 1:
            notes.append(f"{len(task_items)} tasks exceed MaxArraySize={max_array}: submitted as {len(chunks)} arrays")
            if parallelism:  # Slurm throttles each array on its own: share the limit between the chunks
                parallelism = max(1, parallelism // len(chunks))
                notes.append(f"throttle {throttle} shared by {len(chunks)} arrays: %{parallelism} each")
        return Step(name, entry, task_items=task_items, chunks=chunks, parallelism=parallelism, after=after,
                    **resources)

    single = dict(nodes=1, tasks_per_node=1, cpus_per_task=cpus, mem_gb=res.mem_gb, minutes=res.minutes)
    throttle = arr.parallelism if arr else None
    if shape is not None:
        notes += shape.notes
        if shape.samples and spec.train is not None and spec.train.epochs is not None:
            ds = spec.deepspeed
            ranks = nodes * tasks_per_node
            per_step = (ds.micro_batch * ds.grad_accum if ds else 1) * ranks
            notes.append(f"train.epochs {spec.train.epochs:g} x {shape.samples} samples / ({per_step} samples per "
                         f"step: {ranks} ranks x micro-batch x grad-accum) = "
                         f"{max(1, math.ceil(spec.train.epochs * shape.samples / per_step))} optimizer steps")
        if shape.pre and shape.pre_items is not None:  # e.g. teacher features: one single-device task per chunk
            steps.append(array_step(shape.pre, shape.pre, shape.pre_items, shape.pre_items_per_task, throttle, [],
                                    single, "resources.array"))
        elif shape.pre:
            steps.append(Step(shape.pre, shape.pre, **common))
    if shape is not None and shape.items is None:
        steps.append(Step("main", "run", after=[s.name for s in steps], **common))
        if shape.merge:
            steps.append(Step("merge", "merge", after=["main"], **single))
    elif (arr is None and shape is None) or (problems and shape is None):  # (a dry run past the planner's refusal)
        steps.append(Step("main", "run", **common))
    else:
        if shape is not None:
            items, per = shape.items, shape.items_per_task
        else:
            if arr.items is None:
                raise SpecError(source, [("resources.array.items", "give a count or a list of items")])
            items, per = arr.item_list(), arr.items_per_task
        merge = shape.merge if shape is not None else arr.merge
        steps.append(array_step("main", "run", items, per, throttle, [s.name for s in steps], common,
                                "resources.array"))
        if merge:
            steps.append(Step("merge", "merge", after=["main"], **single))

    if spec.deepspeed is not None and spec.deepspeed.activation_checkpointing \
            and not registry.get(spec.workload).checkpointing and not checkpointing(spec):
        notes.append(f"deepspeed.activation_checkpointing is on, but workload {spec.workload} does not apply it: "
                     f"the job and the estimate run without it")
    if not device:
        for cpu_step in steps:
            cpu_step.device = False
        if cluster.accelerator != "cpu":
            notes.append(f"workload {spec.workload} needs no {cluster.accelerator} device: its jobs run on CPU "
                         f"and ask for no gres")
    _watchdog_notes(spec, steps, notes)
    plan = Plan(spec, cluster, steps, max_array, notes=notes, problems=problems)
    if registry.get(spec.workload).trains:
        from core import tracking

        notes.append(tracking.describe(spec, cluster))
    if spec.deepspeed is not None:
        from core.models.peft import PeftTargetError

        try:
            estimated = _memory(spec, cluster, tasks_per_node)
        except PeftTargetError as e:
            field, message = str(e).split(": ", 1)
            raise SpecError(source, [(field, message)]) from None
        except FieldError as e:  # the workload's model builder refused a field (an unknown architecture, ...)
            raise SpecError(source, [(e.field, e.message)]) from None
        if estimated is not None:
            trainable, total, plan.memory = estimated
            plan.notes.append(f"trainable: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
                              + (f", frozen base in {spec.peft.quantize}" if spec.peft and spec.peft.quantize else ""))
            if registry.get(spec.workload).trains:
                _checkpoint_note(plan, spec, cluster, trainable, tasks_per_node, source, keep_going)
        if plan.memory is not None and not plan.memory.fits:
            msg = (f"{plan.memory.describe()}: does not fit one {cluster.accelerator} device; raise deepspeed.stage, "
                   f"enable deepspeed.offload_optimizer/offload_param, lower model.seq_len or deepspeed.micro_batch, "
                   f"add nodes, or pass --force to submit anyway")
            if not force:
                raise SpecError(source, [("deepspeed", msg)])
            notes.append("--force: " + msg)
    return plan
