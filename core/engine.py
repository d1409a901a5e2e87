"""DeepSpeed from the spec: config, process group, model under ZeRO-3, initialize, a flat train loop that
checkpoints and resumes, and preemption that every rank agrees on.

`start(spec, ctx)` brings a task up (device, process group, resume point); the workload builds its own model
(the engine knows no model family) and `initialize(...)` wraps it; `Trainer.fit(...)` runs optimizer steps, logs
metrics (tqdm on rank 0, metrics.csv, TensorBoard, W&B / MLflow through core.tracking), saves every `train.checkpoint_every` steps and when Slurm's
signal arrives. The signal handler (core.runtime) only sets a flag; at the next step boundary the ranks agree on
it with one all-reduce, all save (DeepSpeed's save must be called by every rank), then rank 0 asks the runtime to
requeue the job while the profile's requeue budget lasts.
"""
from __future__ import annotations

import csv
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from core.checkpoint import CheckpointManager, ResumePoint
from core.runtime import (PREEMPT, Accelerator, DistEnv, TaskContext, activate, check_rendezvous, init_distributed,
                          requeue, resolve_accelerator, restart_count, torch_dtype)
from core.config import DeepSpeedSpec, JobSpec
from core.model_sizes import lr_group_of
from core.results.progress import note

log = logging.getLogger("engine")
T = TypeVar("T")

class Preempted(RuntimeError):
    """Raised after a checkpoint when the job cannot be requeued (local executor, or requeues used up)."""


class Requeued(SystemExit):
    pass


# ---------------------------------------------------------------- configuration
def ds_config(spec: JobSpec, world_size: int, universal: bool = False) -> dict:
    ds = spec.deepspeed or DeepSpeedSpec()
    zero: dict = {"stage": ds.stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_param and ds.stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if ds.stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=0)
    cfg = {
        "train_micro_batch_size_per_gpu": ds.micro_batch,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": ds.micro_batch * ds.grad_accum * world_size,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


@lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int):
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def sample_index(k: int, n: int, seed: int) -> int:
    """The k-th sample a run consumes (over all steps, micro-steps and ranks) out of n: a fresh permutation per
    epoch from the seed. Depends on k only, so a resumed run sees exactly the batches it would have seen."""
    epoch, pos = divmod(k, n)
    return int(_epoch_order(n, seed, epoch)[pos])


def padded_share(items: list[T], rank: int, world: int) -> list[tuple[T, bool]]:
    """This rank's share of `items` for evaluation (every world-th item from `rank`), padded with repeats of the
    first item (flagged False: do not record) so that every rank runs the same number of forward passes, which
    ZeRO-3's parameter gathering and `synced_gpus` generation need."""
    share = items[rank::world]
    rounds = -(-len(items) // world)
    return [(share[r], True) if r < len(share) else (items[0], False) for r in range(rounds)]


def total_steps(spec: JobSpec, samples: Optional[int], world_size: int) -> int:
    """Optimizer steps of the run: `train.epochs` over `samples` training samples at micro-batch x grad-accum x
    ranks samples per step (rounded up), else `train.steps`."""
    train, ds = spec.train, spec.deepspeed or DeepSpeedSpec()
    if train.epochs is None or not samples:
        return train.steps
    return max(1, math.ceil(train.epochs * samples / (ds.micro_batch * ds.grad_accum * world_size)))


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant_with_warmup":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return f


# ---------------------------------------------------------------- task start-up
@dataclass
class Session:
    dist: DistEnv
    acc: Accelerator
    device: Any
    ckpt: CheckpointManager
    resume: Optional[ResumePoint]
    ds_config: dict
    run_dir: Path
    precision: str = "fp32"
    watchdog: Any = None             # core.watchdog.Watchdog of this rank (the train loop beats it)

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def dtype(self):
        """The torch dtype of the weights for deepspeed.precision (fp32, bf16, fp16)."""
        return torch_dtype(self.precision)

    def barrier(self) -> None:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized() and self.dist.world_size > 1:
            tdist.barrier()

    def rank0_first(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0, then (after a barrier) on every other rank: for steps that may write shared files
        the first time (a tiny model folder, a synthetic dataset) and only read them afterwards."""
        if self.rank == 0:
            out = fn()
        self.barrier()
        return out if self.rank == 0 else fn()

    def gather_rows(self, rows: list[dict], key: str, order: list) -> Optional[list[dict]]:
        """Every rank's result rows on rank 0, one per `key` value, in the order of `order` (a list of key values);
        None on the other ranks. Every rank must call it."""
        gathered = [rows]
        if self.dist.world_size > 1:
            import torch.distributed as tdist

            gathered = [None] * self.dist.world_size
            tdist.all_gather_object(gathered, rows)
        if self.rank != 0:
            return None
        by_key: dict = {}
        for part in gathered:
            for row in part:
                by_key.setdefault(row[key], row)
        return [by_key[k] for k in order if k in by_key]

    @property
    def zero3(self) -> bool:
        return self.ds_config.get("zero_optimization", {}).get("stage") == 3

    def enable_zero3_init(self) -> None:
        """Call before loading the model: under ZeRO-3, transformers' from_pretrained then builds it inside
        deepspeed.zero.Init, so each rank only ever holds its shard of the (frozen) weights."""
        if self.ds_config["zero_optimization"]["stage"] == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(self.ds_config)  # must stay referenced until deepspeed.initialize


def start(spec: JobSpec, ctx: TaskContext) -> Session:
    """Bring the task up: node health (multi-node), the hang watchdog, device, process group (its collective timeout
    from the watchdog's figure), checkpoint resume point, DeepSpeed config."""
    from core import health, watchdog

    dist = ctx.dist
    check_rendezvous(dist, ctx.cluster)
    acc = resolve_accelerator(ctx.accelerator, dist, ctx.cluster)
    if dist.num_nodes > 1:
        device, found = health.before_rendezvous(dist, acc, ctx.hostname, ctx)
    else:
        health.fault_point(ctx.hostname, ctx)   # a test hook only (MEDHPC_FAULT=health@...): no check on one node
        device, found = activate(acc), None
    wd = watchdog.start(spec, ctx.run_dir, ctx.job_id, dist.rank, dist.world_size, ctx.hostname, restart_count(),
                        on_limit=watchdog.set_collective_timeout)
    if ctx.requeues:  # the hang is decided in the task (the policy's requeue or stop), not left to a watcher
        wd.on_end = lambda cause: retry_in_task(ctx, "hang", cause)
    # DeepSpeed's import and, on CPU, its shared-memory communication op (compiled on an environment's first run) are
    # the slow part of start-up in a fresh environment: say so before, not after
    note(ctx.run_dir, "joining the process group" + ("; an environment's first run compiles DeepSpeed's CPU "
                                                     "communication op first, about half a minute"
                                                     if acc.kind == "cpu" else ""), rank=dist.rank)
    init_distributed(dist, acc, timeout_s=wd.limits.collective_timeout_s())
    if found is not None:
        health.after_rendezvous(dist, device, ctx.hostname, found, ctx.run_dir, ctx.job_id, ctx)
    if dist.rank == 0:
        log.info("%d ranks on %d node(s), master %s:%d, %s", dist.world_size, dist.num_nodes, dist.master_addr,
                 dist.master_port, acc.describe())
    precision = (spec.deepspeed or DeepSpeedSpec()).precision
    session = Session(dist, acc, device, None, None, {}, ctx.run_dir, precision, watchdog=wd)
    train = spec.train
    session.ckpt = CheckpointManager(ctx.run_dir / "checkpoints", dist.rank, dist.world_size, train.keep_last,
                                     barrier=session.barrier)
    # --fresh applies to the submission that asked for it, never again after a Slurm requeue of that job
    fresh = train.fresh and restart_count() == 0
    session.resume = session.ckpt.resume_point(fresh=fresh)
    session.ds_config = ds_config(spec, dist.world_size, universal=bool(session.resume and session.resume.universal))
    note(ctx.run_dir, f"{dist.world_size} rank(s) up: building the model", rank=dist.rank)
    return session


def retry_in_task(ctx: TaskContext, klass: str, cause: str) -> None:
    """core.retry.in_task for the watchdog's end (imported late: the retry policy reads the profile's models)."""
    from core import retry

    retry.in_task(ctx, klass, cause)


# the Hugging Face Trainer's rule (Trainer.get_decay_parameter_names): no weight decay inside a LayerNorm module or
# on a parameter whose lower-cased name matches one of these
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def no_decay_names(model) -> set[str]:
    """Names of the parameters the HF Trainer exempts from weight decay: biases and norm weights."""
    import re

    import torch

    patterns = [re.compile(p) for p in NO_DECAY_PATTERNS]
    in_layernorm = {f"{m_name}.{n}" if m_name else n for m_name, m in model.named_modules()
                    if isinstance(m, torch.nn.LayerNorm) for n, _ in m.named_parameters(recurse=False)}
    return {n for n, _ in model.named_parameters() if n in in_layernorm or any(p.search(n.lower()) for p in patterns)}


def param_groups(model, train) -> list[dict]:
    """AdamW parameter groups from the spec: train.lr for the rest, train.lr_groups' rate for the parameters under a
    named module, and (unless train.decay_norms_and_biases) weight decay 0 for biases and norm weights. Only
    trainable parameters; the default group comes first (its lr is the one the metrics log). A group's "name" says
    which pattern and decay it has (saved in the checkpoint with the optimizer state)."""
    patterns = list(train.lr_groups)
    exempt = no_decay_names(model) if train.weight_decay and not train.decay_norms_and_biases else set()
    groups: dict[tuple, dict] = {}
    used = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        pattern = lr_group_of(name, patterns)
        used.add(pattern)
        decay = 0.0 if name in exempt else train.weight_decay
        key = (pattern or "", decay == 0.0 and bool(train.weight_decay))
        group = groups.setdefault(key, {"params": [], "names": [], "lr": train.lr_groups[pattern] if pattern
                                        else train.lr, "weight_decay": decay,
                                        "name": (pattern or "default") + (" no_decay" if key[1] else "")})
        group["params"].append(p)
        group["names"].append(name)
    unused = [p for p in patterns if p not in used]
    if unused:
        some = sorted({n.rsplit(".", 1)[0] for g in groups.values() for n in g["names"]})[:12]
        raise ValueError(f"train.lr_groups: {unused} name no module above a trainable parameter of "
                         f"{type(model).__name__}; trainable modules include {some}")
    ordered = sorted(groups.items(), key=lambda kv: kv[0])
    return [{k: v for k, v in g.items() if k != "names"} for _, g in ordered]


def group_layout(groups: list[dict]) -> list[dict]:
    """What the spec asked of each optimizer group (name, base lr, weight decay, parameter count): saved with every
    checkpoint and compared on resume."""
    return [{"name": g["name"], "lr": float(g["lr"]), "weight_decay": float(g["weight_decay"]),
             "params": int(sum(getattr(p, "ds_numel", p.numel()) for p in g["params"]))} for g in groups]


def initialize(session: Session, model, spec: JobSpec, steps: Optional[int] = None):
    """deepspeed.initialize with AdamW over the trainable parameters only (frozen ones get no optimizer state), in
    the spec's parameter groups (param_groups), and the spec's learning-rate schedule."""
    import deepspeed
    import torch

    train = spec.train
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters: check peft: / the workload's freezing")
    groups = param_groups(model, train)
    layout = group_layout(groups)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train.scheduler, train.warmup_steps,
                                                             steps or train.steps))
    stage = session.ds_config.get("zero_optimization", {}).get("stage", 0)
    note(session.run_dir, f"starting DeepSpeed (ZeRO-{stage})", rank=session.rank)
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                 model_parameters=params, config=session.ds_config)
    engine.group_layout = layout
    return engine


def weights_checksum(engine, trainable: bool = True) -> float:
    """Sum of the trainable (or the frozen) parameters in fp32, gathered under ZeRO-3: equal weights, equal sums."""
    import deepspeed
    import torch

    params = [p for p in engine.module.parameters() if p.requires_grad == trainable]
    if not params:
        return 0.0
    total = 0.0
    ctx = deepspeed.zero.GatheredParameters(params) if hasattr(params[0], "ds_id") else nullcontext()
    with ctx, torch.no_grad():
        for p in params:
            total += float(p.detach().float().sum())
    return total


def check_groups(saved: Optional[list], wanted: Optional[list], tag: str) -> None:
    """A resume continues the optimizer groups it saved (DeepSpeed restores their lr and weight decay from the
    checkpoint): a spec whose train.lr / lr_groups / weight_decay now say otherwise is stopped, not silently
    overruled."""
    if saved is None or wanted is None or saved == wanted:
        return
    raise ValueError(f"train.lr_groups: checkpoint {tag} was trained with optimizer groups {saved}, the spec now "
                     f"asks for {wanted}; resume with the spec it was saved with, or start over with --fresh")


# ---------------------------------------------------------------- the train loop
@dataclass
class Trainer:
    session: Session
    engine: Any                                  # deepspeed.DeepSpeedEngine
    spec: JobSpec
    ctx: TaskContext
    loss_fn: Callable[[Any, Any], Any]           # loss_fn(engine, batch) -> loss tensor, or {"loss": ..., parts}
    batch_fn: Callable[[int, int], Any]          # batch_fn(step, micro) -> batch; depends only on (step, micro)
    steps: Optional[int] = None                  # total optimizer steps (default train.steps; see total_steps)
    history: list[dict] = field(default_factory=list)
    checkpoint_stalls: list[float] = field(default_factory=list)   # seconds each checkpoint held training
    _writer: Any = None                                            # rank 0's TensorBoard writer while fit() runs
    _tracker: Any = None                                           # rank 0's W&B / MLflow fan-out (core.tracking)

    def _mean_across_ranks(self, value: float) -> float:
        import torch
        import torch.distributed as tdist

        if self.session.dist.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        tdist.all_reduce(t)
        return float(t.item()) / self.session.dist.world_size

    def _agree_preempt(self) -> bool:
        import torch
        import torch.distributed as tdist

        flag = torch.tensor([1 if PREEMPT["signal"] else 0], dtype=torch.int32)
        if self.session.dist.world_size > 1:
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item())

    def _metrics_file(self, start_step: int) -> Path:
        path = self.ctx.run_dir / "metrics.csv"
        if self.session.rank == 0 and path.exists():
            # a resumed run repeats nothing: drop rows logged after the checkpoint it resumed from
            reader = csv.DictReader(path.open())
            rows = list(reader)
            kept = [r for r in rows if int(r["step"]) <= start_step]
            with path.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=reader.fieldnames)
                w.writeheader()
                w.writerows(kept)
        return path

    def save(self, step: int, background: bool = False) -> None:
        """Checkpoint at `step`; background=True returns after the host copy (core.checkpoint_writer). The time
        training was held goes to checkpoint_times.csv and TensorBoard's train/checkpoint_stall_s."""
        extra = self.checkpoint_meta(step)   # a workload's own work (ViTP scores val): not the checkpoint's stall
        t0 = time.perf_counter()
        meta = {"checksum": weights_checksum(self.engine), **extra}
        client = {"step": step, "param_groups": getattr(self.engine, "group_layout", None)}
        ckpt = self.session.ckpt
        tag = ckpt.save(self.engine, step, client, meta, background=background)
        held = time.perf_counter() - t0
        self.checkpoint_stalls.append(held)
        if self.session.rank == 0:
            log.info("checkpoint %s %s (training held %.3f s)", tag, "queued for the background writer" if background
                     else "saved", held)
            path = self.ctx.run_dir / "checkpoint_times.csv"
            new = not path.exists()
            with path.open("a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step", "mode", "held_s", "host_copy_s"])
                w.writerow([step, "background" if background else "sync", round(held, 4),
                            round(ckpt.last_stall, 4) if background else ""])
            if self._writer is not None:
                self._writer.add_scalar("train/checkpoint_stall_s", held, step)
        self.after_checkpoint(step, meta)

    def checkpoint_meta(self, step: int) -> dict:
        """What a workload adds to the checkpoint's COMPLETE marker (all ranks call it, before the save)."""
        return {}

    def after_checkpoint(self, step: int, meta: dict) -> None:
        """Called on every rank once the checkpoint at `step` is saved (queued, for a background save)."""

    def fit(self) -> dict:
        from tqdm import tqdm

        train, ds = self.spec.train, self.spec.deepspeed
        grad_accum = ds.grad_accum if ds else 1
        start_step, resumed_checksum, saved_checksum = 0, None, None
        point = self.session.resume
        if point is not None:
            client = self.session.ckpt.load(self.engine, point)
            check_groups(client.get("param_groups"), getattr(self.engine, "group_layout", None), point.tag)
            start_step = int(client.get("step", point.step))
            saved_checksum = point.meta.get("checksum")
            resumed_checksum = weights_checksum(self.engine)
            if self.session.rank == 0:
                how = " (universal format)" if point.universal else ""
                log.info("resumed from %s%s at step %d", point.tag, how, start_step)
        frozen_before = weights_checksum(self.engine, trainable=False)
        rank0 = self.session.rank == 0
        wd = self._watchdog()
        metrics = self._metrics_file(start_step) if rank0 else None
        from core import tracking

        tracked = tracking.settings(self.spec, self.ctx.cluster)
        writer = self._writer = (_tensorboard(self.ctx.run_dir / "tensorboard") if rank0 and tracked["tensorboard"]
                                 else None)
        tracker = self._tracker = tracking.open_tracker(self.spec, self.ctx, start_step, metrics)
        total = self.steps or train.steps
        bar = tqdm(total=total, initial=start_step, disable=not rank0, mininterval=2, desc="train")
        step = start_step
        wd.ready()
        while step < total:
            t0 = time.time()
            losses, extras = [], {}
            for micro in range(grad_accum):
                out = self.loss_fn(self.engine, self.batch_fn(step, micro))
                loss = out["loss"] if isinstance(out, dict) else out
                self.engine.backward(loss)
                self.engine.step()
                losses.append(float(loss.detach().float().item()))
                for k, v in (out.items() if isinstance(out, dict) else ()):
                    if k != "loss" and hasattr(v, "numel") and v.numel() == 1:
                        extras.setdefault(k, []).append(float(v.detach().float().item()))
            step += 1
            mean = self._mean_across_ranks(sum(losses) / len(losses))
            parts = {k: self._mean_across_ranks(sum(v) / len(v)) for k, v in sorted(extras.items())}
            lr = self.engine.get_lr()[0]
            self.history.append({"step": step, "loss": mean, **parts})
            if rank0:
                new = not metrics.exists()
                with metrics.open("a", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=["step", "loss", *parts, "lr", "seconds"])
                    if new:
                        w.writeheader()
                    w.writerow({"step": step, "loss": repr(mean), **{k: repr(v) for k, v in parts.items()}, "lr": lr,
                                "seconds": round(time.time() - t0, 4)})
                if writer:
                    for k, v in {"loss": mean, **parts, "lr": lr}.items():
                        writer.add_scalar(f"train/{k}", v, step)
                if tracker.active:
                    tracker.log(step, {f"train/{k}": v for k, v in {"loss": mean, **parts, "lr": lr}.items()})
                bar.update(1)
                bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
            wd.beat(step)
            preempt = self._agree_preempt()
            if preempt or (train.checkpoint_every and step % train.checkpoint_every == 0) or step == total:
                # the final checkpoint and the one on Slurm's signal are finished before going on
                with wd.phase("checkpoint"):
                    self.save(step, background=train.async_checkpoint and not preempt and step < total)
            if preempt and step < total:
                bar.close()
                tracker.close("KILLED")   # flushed; the requeued task continues the same runs
                self._requeue_or_stop(step)
        bar.close()
        with wd.phase("checkpoint"):
            self.session.ckpt.finish()   # nothing of this run's checkpoints is left to the background writer
        wd.stop()                    # what follows (evaluation, generation) is not timed by the step figure
        if writer:
            writer.close()
        self._writer = None
        # the trackers stay open for the workload's evaluation; the task closes them (core.tracking.finish_task)
        loss_png = self.ctx.run_dir / "results" / "loss.png"
        if rank0:
            plot_losses(metrics, loss_png)
        return {"steps": step, "start_step": start_step, "loss_plot": str(loss_png), "final_loss": self.history[-1]["loss"] if self.history
                else None, "losses": [h["loss"] for h in self.history], "resumed_checksum": resumed_checksum,
                "saved_checksum": saved_checksum, "checksum": weights_checksum(self.engine),
                "restart_count": restart_count(),
                "checkpoint_held_s": [round(x, 4) for x in self.checkpoint_stalls],
                "param_groups": [{"name": g.get("name"), "lr": g["lr"], "initial_lr": g.get("initial_lr"),
                                  "weight_decay": g["weight_decay"]} for g in self.engine.optimizer.param_groups],
                "frozen_checksum_before": frozen_before,
                "frozen_checksum_after": weights_checksum(self.engine, trainable=False)}

    def _watchdog(self):
        from core import watchdog

        return self.session.watchdog or watchdog.idle()

    def _requeue_or_stop(self, step: int) -> None:
        import torch
        import torch.distributed as tdist

        self._watchdog().stop()  # the ranks now wait for the scheduler, not for a step
        from core import retry

        ok = 0
        why = f"{restart_count()} requeues used" if self.ctx.requeues else f"the {self.ctx.executor} executor does not requeue"
        if self.session.rank == 0 and self.ctx.can_requeue():
            # recorded in <run>/retries/ before acting (the requeue ends this process), amended if refused
            entry = retry.signal_requeue(self.ctx, step, True, "asked the scheduler", PREEMPT["signal"])
            accepted, detail = requeue(self.ctx)
            ok = int(accepted)
            log.info("checkpointed at step %d; requeue %s (restart %d/%s): %s", step, self.ctx.job_id,
                     restart_count() + 1, self.ctx.cluster.get("max_requeues"), "ok" if ok else detail)
            if entry is not None:
                retry.amend(entry, detail="requeued") if ok else retry.amend(
                    entry, action="stop", why=f"the scheduler refused the requeue: {' '.join(detail.split())[:200]}")
        elif self.session.rank == 0:
            retry.signal_requeue(self.ctx, step, False, why, PREEMPT["signal"])
        flag = torch.tensor([ok], dtype=torch.int32)
        if self.session.dist.world_size > 1:
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        if flag.item():
            time.sleep(600)  # the scheduler stops this allocation and runs the job again; it resumes from the checkpoint
            raise Requeued(1)
        raise Preempted(f"{PREEMPT['signal']} received: checkpoint saved at step {step}, not requeued ({why}); "
                        f"continue with: python launchers/submit.py SPEC --resume {self.ctx.run_dir}")


def plot_losses(metrics_csv: Path, png: Path) -> None:
    """The loss curve of the whole run (every step once, across requeues) from metrics.csv, with its parts."""
    if not metrics_csv.is_file():
        return
    from core.run_folder import atomic_path
    from core.plotting import loss_figure, pyplot

    rows = list(csv.DictReader(metrics_csv.open()))
    if not rows:
        return
    plt = pyplot()
    fig = loss_figure(rows, "loss (mean over ranks)")
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))
