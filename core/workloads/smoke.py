"""The smoke workload: proves single-task, multi-node and array submission end to end.

Each rank reports its host, the Slurm ids and the ranks it sees; array tasks also echo their items (and raise
for items listed in `smoke.fail_items`, so tests can watch an `afterok` merge refuse to run). The merge step
gathers every task's record and checks that each item ran exactly once.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

from pydantic import Field

from core import fault_inject, scheduler
from core.run_folder import write_json_atomic
from core.runtime import TaskContext, context_dict
from core.config import JobSpec, Strict
from core.workloads import Workload

log = logging.getLogger("smoke")


class SmokeSection(Strict):
    message: str = "hello from the smoke workload"
    sleep_s: float = Field(0.0, ge=0)
    release_file: str = Field("", description="with sleep_s: end the sleep as soon as this file exists (tests hold "
                                               "a step running exactly as long as they need it)")
    fail_items: list[Any] = Field(default_factory=list, description="array items that raise (to test afterok)")
    report_env: list[str] = Field(default_factory=list, description="variables whose SHA-256 the job reports")


def run(spec: JobSpec, ctx: TaskContext) -> dict:
    cfg = spec.smoke
    if cfg.sleep_s:
        end = time.monotonic() + cfg.sleep_s
        while time.monotonic() < end and not (cfg.release_file and os.path.exists(cfg.release_file)):
            time.sleep(min(0.5, max(end - time.monotonic(), 0)) if cfg.release_file else cfg.sleep_s)
    # MEDHPC_FAULT=<fault>@step:<step> or <fault>@item:<item>;...: the failure-class tests (core.fault_inject)
    fault_inject.inject("step", ctx.step, node=ctx.hostname, job_ref=ctx.job_id)
    for item in ctx.items or []:
        fault_inject.inject("item", item, node=ctx.hostname, job_ref=ctx.job_id)
    bad = [i for i in (ctx.items or []) if i in cfg.fail_items]
    if bad:
        raise RuntimeError(f"smoke: items {bad} are listed in smoke.fail_items")
    slurm = scheduler.task_variables()  # what the scheduler set (Slurm's SLURM_* variables), for the record
    log.info("%s: rank %d/%d on %s, job %s, items %s", cfg.message, ctx.rank, ctx.world_size, ctx.hostname,
             ctx.job_id, ctx.items)
    env_sha = {k: hashlib.sha256(os.environ[k].encode()).hexdigest() if k in os.environ else None
               for k in cfg.report_env}  # digests only: a secret's value never reaches a log or a result
    return {"message": cfg.message, "context": context_dict(ctx), "slurm": slurm, "pid": os.getpid(),
            "master": f"{ctx.dist.master_addr}:{ctx.dist.master_port}",   # the rendezvous address the ranks would use
            "env_sha256": env_sha}


def merge(spec: JobSpec, ctx: TaskContext) -> dict:
    records = [r for r in ctx.task_records("main") if r["rank"] == 0]
    expected = spec.resources.array.item_list()
    seen = [item for r in records for item in (r["items"] or [])]
    missing = [i for i in expected if i not in seen]
    if missing:
        raise RuntimeError(f"merge: {len(missing)} items have no result: {missing}")
    dup = sorted({repr(i) for i in seen if seen.count(i) > 1})
    summary = {"items": len(seen), "tasks": len(records), "duplicates": dup,
               "hosts": sorted({r["host"] for r in records})}
    write_json_atomic(ctx.path("merged.json"), summary)
    log.info("merged %d items from %d tasks", len(seen), len(records))
    return summary


WORKLOAD = Workload(run=run, merge=merge, section="smoke", Section=SmokeSection)
