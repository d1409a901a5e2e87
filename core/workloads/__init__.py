"""The workload registry: names a spec may use, without importing the workloads (they may import torch).

A workload is a module with `run(spec, ctx) -> dict` (and `merge(spec, ctx) -> dict` when it has a merge step).
Nothing Slurm-specific lives in a workload; the runtime hands it a context.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkloadInfo:
    module: str
    section: str | None = None  # the spec section this workload reads (e.g. "smoke")
    has_merge: bool = False
    # "module:function" of a torch-free planner: (spec, resume_run_dir|None) -> core.workloads.shapes.Shape,
    # for workloads that make their own array items (layers, ratios) and steps (baseline, merge)
    shape: str | None = None
    also: tuple[str, ...] = ()  # other spec sections it reads (e.g. "train")


WORKLOADS: dict[str, WorkloadInfo] = {
    "smoke": WorkloadInfo("core.workloads.smoke", section="smoke", has_merge=True),
    "lm_finetune": WorkloadInfo("core.workloads.lm_finetune", section="train"),
    "sensitivity": WorkloadInfo("core.workloads.sensitivity", section="scan", has_merge=True,
                                shape="core.workloads.shapes:sensitivity"),
    "prune": WorkloadInfo("core.workloads.prune", section="prune", has_merge=True,
                          shape="core.workloads.shapes:prune"),
    "dia_pangu": WorkloadInfo("core.workloads.dia_pangu", section="dia", also=("train",),
                              shape="core.workloads.shapes:dia_pangu"),
}
