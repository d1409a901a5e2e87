"""The smoke workload: proves single-task, multi-node and array submission end to end.

Each rank reports its host, the Slurm ids and the ranks it sees; array tasks also echo their items (and raise
for items listed in `smoke.fail_items`, so tests can watch an `afterok` merge refuse to run). The merge step
gathers every task's record and checks that each item ran exactly once.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

from core.runtime import context_dict


def run(spec, ctx) -> dict:
    cfg = spec.smoke
    if cfg.sleep_s:
        time.sleep(cfg.sleep_s)
    bad = [i for i in (ctx.items or []) if i in cfg.fail_items]
    if bad:
        raise RuntimeError(f"smoke: items {bad} are listed in smoke.fail_items")
    slurm = {k: v for k, v in os.environ.items() if k in {
        "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "SLURM_NTASKS",
        "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURMD_NODENAME", "SLURM_RESTART_COUNT"}}
    print(f"[smoke] {cfg.message}: rank {ctx.rank}/{ctx.world_size} on {ctx.hostname}, job {ctx.job_id}, "
          f"items {ctx.items}", flush=True)
    env_sha = {k: hashlib.sha256(os.environ[k].encode()).hexdigest() if k in os.environ else None
               for k in cfg.report_env}  # digests only: a secret's value never reaches a log or a result
    return {"message": cfg.message, "context": context_dict(ctx), "slurm": slurm, "pid": os.getpid(),
            "env_sha256": env_sha}


def merge(spec, ctx) -> dict:
    records = [r for r in ctx.task_records("main") if r["rank"] == 0]
    expected = spec.resources.array.item_list()
    seen = [item for r in records for item in (r["items"] or [])]
    missing = [i for i in expected if i not in seen]
    if missing:
        raise RuntimeError(f"merge: {len(missing)} items have no result: {missing}")
    dup = sorted({repr(i) for i in seen if seen.count(i) > 1})
    summary = {"items": len(seen), "tasks": len(records), "duplicates": dup,
               "hosts": sorted({r["host"] for r in records})}
    ctx.path("merged.json").write_text(json.dumps(summary, indent=1))
    print(f"[smoke] merged {len(seen)} items from {len(records)} tasks", flush=True)
    return summary
