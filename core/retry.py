"""The retry policy: what happens to a failed job or array task, decided from its failure class (core.failures) and
the profile's `retry:` section (core.config.cluster.RetryPolicy), and recorded in the run folder.

Why it is shaped like this (a demanding HPC user's rules):
- retry only what a retry can fix: the cluster's faults (node, communication, hang, preemption, time limit); never a
  workload bug or bad data (`exception`, `data` always stop: the profile cannot say otherwise);
- a bound: at most `retry.max_retries` retries per job or array task, all classes together;
- a loop guard: a retry must make progress. When the same class comes back at the same training step (the newest
  complete checkpoint, or the step the task reported), the second one stops: a job that dies at step 1200 with a
  comm timeout twice will die there a third time, and each retry burns an allocation;
- a node that failed is kept out of the retry (requeue with that node excluded), unless too few usable nodes are
  left in the job's partition without it: then it stops ("no node left to replace ..."), never pends for ever;
- every decision (class, cause, action, attempt, step, who decided, what the scheduler said) is written to the run
  folder before it is acted on, so status shows it and the next decision can read it.

Where the decision runs, so that it works without the user's terminal open:
- inside the task, when the task knows why it fails (the hang watchdog, the node health check, a communication
  error caught in-process): `in_task(ctx, klass, cause, step)` prints the failure mark, decides, records and asks
  the scheduler to requeue this job with the failing node excluded (the other ranks end with the job);
- the time-limit and preemption signals keep their own in-task path (core.engine: checkpoint, then requeue while
  the profile's `max_requeues` lasts; recorded here too, by `signal`), and Slurm requeues a NODE_FAIL of a
  `--requeue` job by itself;
- `submit.py --wait` (core.submission.follow_job) decides for every task that ended failed while it watches:
  requeue through the scheduler, resubmit from the checkpoint with `--resume`, or stop.
Decisions live in `<run_dir>/retries/<unit>.<attempt>.json`, one file per decision: tasks on different nodes and the
watcher write them at the same time, and one file each needs no lock (run.json is the submission's record). The
bound and the loop guard count per UNIT, the logical task that survives a retry: the step (`main`) of a plain job,
the step and global array index (`main[7]`) of an array task. A resubmission gets new job ids, so counting per job
id would let a resubmitted job retry for ever.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from core import failure_mark
from core.failures import WORKLOAD_FAULTS, Failure
from core.run_folder import write_json_atomic

FOLDER = "retries"
_DECIDED: dict = {}  # set once this process has decided in the task: the exception that follows is not decided again
ACTIONS = ("requeue", "resubmit", "stop")


def policy_of(cluster) -> dict:
    """The profile's retry policy as a dict (a Cluster, its dict, or a dict without `retry`: the defaults)."""
    from core.config.cluster import RetryPolicy

    data = cluster if isinstance(cluster, dict) else cluster.model_dump()
    return RetryPolicy(**(data.get("retry") or {})).model_dump()


def checkpoint_step(run_dir: Path) -> Optional[int]:
    """The step of the run's newest complete checkpoint (what a retry resumes from); None without one."""
    steps = []
    for marker in (Path(run_dir) / "checkpoints").glob("step*/COMPLETE"):
        m = re.fullmatch(r"step(\d+)", marker.parent.name)
        if m:
            steps.append(int(m.group(1)))
    return max(steps) if steps else None


def unit(step: str, task_index: Optional[int] = None) -> str:
    """The logical task the bound and the loop guard count for: 'main', or 'main[7]' for array index 7."""
    return step if task_index is None else f"{step}[{task_index}]"


def decisions(run_dir: Path, task: Optional[str] = None) -> list[dict]:
    """The retry decisions recorded in a run folder (of one unit when given: `unit()`), oldest first."""
    folder = Path(run_dir) / FOLDER
    out = []
    for p in folder.glob("*.json") if folder.is_dir() else []:
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and (task is None or d.get("task") == task):
            out.append(d)
    return sorted(out, key=lambda d: (d.get("at", 0), d.get("attempt", 0)))


def decide(policy: dict, failure: Failure, history: list[dict], step: Optional[int]) -> tuple[str, str]:
    """(action, why) for one failure of one task, given the policy and that task's earlier decisions. Pure."""
    klass = failure.klass
    if klass in WORKLOAD_FAULTS:
        return "stop", f"{klass} is never retried (the same input fails the same way)"
    action = policy.get(klass) if klass in policy else "stop"
    if action not in ACTIONS:
        action = "stop"
    if action == "stop":
        return "stop", f"the profile's retry.{klass} is stop" if klass in policy else \
            f"class {klass} has no retry policy: stop"
    history = [d for d in history if d.get("by") != "signal"]  # the engine's own signal requeues: max_requeues
    same = [d for d in history if d.get("class") == klass and d.get("step") == step]
    if same:
        where = f"step {step}" if step is not None else "the same point (no checkpoint yet)"
        return "stop", f"loop guard: {klass} again at {where} (attempt {same[-1].get('attempt')} failed the same way)"
    tried = [d for d in history if d.get("action") in ("requeue", "resubmit")]
    if len(tried) >= int(policy.get("max_retries", 0)):
        return "stop", f"retry bound reached: {len(tried)} of retry.max_retries={policy.get('max_retries', 0)}"
    return action, f"the profile's retry.{klass} is {action}"


def record(run_dir: Path, task: str, failure: Failure, action: str, why: str, step: Optional[int],
           by: str, detail: str = "", job_id: str = "") -> dict:
    """Write one decision of unit `task` (`unit()`) about scheduler job `job_id` to the run folder; returns it
    (its file in `_path`, so `amend` can say how acting on it went)."""
    safe = re.sub(r"[^\w.\-]", "_", task)
    folder = Path(run_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    attempt = len(decisions(run_dir, task)) + 1
    while True:   # the task and a --wait watcher may decide at once: claim the number, never overwrite
        path = folder / f"{safe}.{attempt:03d}.json"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            break
        except FileExistsError:
            attempt += 1
    entry = {"task": task, "job_id": job_id or None, "attempt": attempt, "class": failure.klass,
             "cause": failure.cause, "node": failure.node or None, "action": action, "why": why, "step": step,
             "by": by, "detail": detail, "at": round(time.time(), 3)}
    write_json_atomic(path, entry)
    return {**entry, "_path": str(path)}


def amend(entry: dict, **changes) -> dict:
    """The same decision file, rewritten with what acting on it gave (the scheduler's answer)."""
    path = entry["_path"]
    entry = {k: v for k, v in {**entry, **changes}.items() if k != "_path"}
    write_json_atomic(Path(path), entry)
    return {**entry, "_path": path}


def apply(sched, run_dir: Path, task: str, job_id: str, failure: Failure, policy: dict, by: str,
          step: Optional[int] = None, resubmit=None) -> dict:
    """Decide for one failed task, record it, then act on it: `requeue` through the scheduler (the failing node
    excluded), `resubmit` through the callable given (the watcher's `--resume`; without one it requeues, which on
    a resumable workload also continues from the checkpoint), `stop` does nothing. The decision is written BEFORE
    acting (a task that requeues itself is killed by that requeue) and amended with the outcome: what the scheduler
    refused becomes a stop with its words. `task` is the unit (`unit()`), `job_id` the scheduler's id of the job or
    array task that failed. Returns the recorded decision."""
    step = step if step is not None else checkpoint_step(run_dir)
    action, why = decide(policy, failure, decisions(run_dir, task), step)
    if action == "resubmit" and resubmit is None:  # an array task, or a task deciding for itself
        action, why = "requeue", why + " (here: a requeue, which resumes from the checkpoint too)"
    keep_off = ""
    if action == "requeue" and failure.klass == "node":
        keep_off = failure.node
        if keep_off and failure.source == "scheduler":  # NODE_FAIL names the whole allocation: only the sick ones
            keep_off = sched.unhealthy(keep_off)
            if keep_off:  # the record names the node that failed, not the allocation
                failure = replace(failure, node=keep_off)
        short = no_room(sched, job_id, keep_off)
        if short:
            action, why = "stop", short
    entry = record(run_dir, task, failure, action, why, step, by, "asked the scheduler" if action != "stop" else "",
                   job_id)
    if action == "resubmit":
        ok, detail = resubmit()
        return amend(entry, detail=detail) if ok else amend(entry, action="stop", detail="",
                                                            why=f"resubmission failed: {detail}")
    if action == "requeue":
        ok, detail = sched.requeue_excluding(job_id, keep_off)
        return amend(entry, detail=detail) if ok else amend(
            entry, action="stop", detail="", why=f"the scheduler refused the requeue: {' '.join(detail.split())[:200]}")
    return entry


def no_room(sched, job_id: str, keep_off: str) -> str:
    """Why a requeue kept off `keep_off` cannot run ('' when it can, or when the scheduler cannot say): fewer
    usable nodes are left in the job's partition than the job needs, so the requeued job would pend for ever."""
    if not keep_off:
        return ""
    try:
        left = sched.nodes_left(job_id, keep_off)
    except Exception:  # asking must never hide the decision
        left = None
    if left is None:
        return ""
    need, usable = left
    if len(usable) >= need:
        return ""
    return (f"no node left to replace {keep_off}: the job needs {need} node{'s' if need != 1 else ''} and the "
            f"partition has {len(usable)} usable ({', '.join(usable) or 'none'} besides it)")


def in_task(ctx, klass: str, cause: str, step: Optional[int] = None, node: str = "",
            decides: Optional[bool] = None) -> dict:
    """For a task that knows why it fails (hang watchdog, node health check, a caught communication error): print
    the failure mark to its log, then on the rank that `decides` (default: the task's first rank; the node health
    check: the first rank of the failing node, since the others may never hear of it) decide with the profile's
    policy, record it and, for a retry, requeue this job (with `node` excluded for class node, unless no node is
    left to replace it). The caller then exits non-zero; the other ranks end with the job. Returns the decision
    (every rank: what the deciding rank decides is in the run folder)."""
    from core import scheduler

    _DECIDED["in_task"] = True
    failure_mark.report(klass, cause)
    failure = Failure(klass, " ".join(cause.split()), "mark", node if klass == "node" else "")
    policy = policy_of(ctx.cluster)
    me = unit(ctx.step, ctx.task_index)
    if not (ctx.rank == 0 if decides is None else decides):
        step = step if step is not None else checkpoint_step(ctx.run_dir)
        action, why = decide(policy, failure, decisions(ctx.run_dir, me), step)
        return {"task": me, "job_id": ctx.job_id, "class": klass, "action": action, "why": why, "step": step,
                "recorded": False}
    decision = apply(scheduler.by_name(ctx.executor), ctx.run_dir, me, ctx.job_id, failure, policy, by="task",
                     step=step)
    return {**decision, "recorded": True}


def caught(ctx, exc: BaseException) -> Optional[dict]:
    """core.runtime.TaskEntry, for the exception that ends a task: a communication failure (class comm from the
    exception's own text: NCCL, HCCL, gloo, a rendezvous timeout) is decided right here by `in_task`, so a retry does
    not wait for someone's `--wait`; only where the scheduler requeues. Anything else, or a failure while deciding,
    returns None and leaves the exception as it is (the log's traceback classifies it)."""
    if not getattr(ctx, "requeues", False) or _DECIDED.get("in_task"):  # the watchdog / health check already did
        return None
    from core.failures import from_log

    found = from_log(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}".splitlines())
    if found is None or found.klass != "comm":
        return None
    try:
        return in_task(ctx, "comm", found.cause)
    except Exception as e:  # deciding must never hide why the task failed
        print(f"[retry] could not decide in the task: {type(e).__name__}: {e}", flush=True)
        return None


def signal_requeue(ctx, step: int, requeued: bool, detail: str, signal_name: str) -> Optional[dict]:
    """The engine's own requeue on the scheduler's warning signal (core.engine: checkpoint at `step`, then requeue
    while the profile's `max_requeues` lasts), recorded like the policy's decisions so status shows it: class
    timeout, action requeue (or stop with the --resume hint once the requeues are used up), by `signal`. These
    records count against `max_requeues`, not `retry.max_retries`, and the loop guard ignores them. Rank 0 only;
    None where writing fails (the requeue goes on)."""
    me = unit(ctx.step, ctx.task_index)
    failure = Failure("timeout", f"{signal_name} received (the scheduler's warning before the time limit or a "
                                 f"preemption): checkpoint saved at step {step}", "signal")
    if requeued:
        why = f"checkpointed at step {step}; requeue within max_requeues={ctx.cluster.get('max_requeues')}"
    else:
        why = f"checkpointed at step {step}; not requeued ({detail}): continue with submit.py --resume"
    try:
        return record(ctx.run_dir, me, failure, "requeue" if requeued else "stop", why, step, by="signal",
                      detail=detail if requeued else "", job_id=ctx.job_id)
    except OSError as e:
        print(f"[retry] could not record the signal requeue: {e}", flush=True)
        return None
