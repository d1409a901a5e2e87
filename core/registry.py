"""The workload registry, on the ground floor: which workloads exist, and the contract each one fulfils.

Every layer above (the configuration, the plan, the scheduler, the task entry, the monitor) reaches a workload
through `get(name)` here and never imports `core.workloads`; this module imports nothing of the project.
Add a workload: one line in WORKLOADS below, and the module it names (see core/workloads/README.md).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

WORKLOADS: dict[str, str] = {
    "smoke": "core.workloads.smoke",
    "lm_finetune": "core.workloads.lm_finetune",
    "sensitivity": "core.workloads.sensitivity",
    "prune": "core.workloads.prune",
    "dia_pangu": "core.workloads.dia_pangu",
    "vitp_lung": "core.workloads.vitp_lung",
    "blip_caption": "core.workloads.blip_caption",
    "gigapath_distill": "core.workloads.gigapath_distill",
    "study_table": "core.workloads.study_table",
}


@dataclass
class Shape:
    """What a workload's planner asks the plan for, beyond one task on the spec's resources."""
    items: Optional[list[Any]]          # array items of the main step (None: a single task on the spec's resources)
    items_per_task: int = 1
    pre: Optional[str] = None           # entry of a step that must succeed before the main step (afterok)
    pre_items: Optional[list[Any]] = None  # make `pre` an array of single-device tasks over these items
    pre_items_per_task: int = 1
    merge: bool = True                  # a merge step after the main step (afterok)
    samples: Optional[int] = None       # training samples (the plan derives the steps of train.epochs from it)
    notes: list[str] = field(default_factory=list)
    # (field, why) a submission is refused for although the shape is known (an input file not on this machine):
    # a real submit stops on them, a dry run prints the whole plan and then lists them
    problems: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Workload:
    """What a workload module declares as `WORKLOAD`.

    section:  the key of its own spec section (e.g. "scan"), validated with `Section`; None if it has none
    Data:     the schema of its `data:` section (default: core.config.DataSpec)
    trains:   it runs the engine's train loop, so it reads `train:` and `peft:` (defaults filled in)
    plan:     torch-free `(spec, resume_dir | None[, cluster=Cluster]) -> Shape | None`; may raise
              core.errors.FieldError; the plan passes `cluster=` (the profile) only to planners that declare it
    model_size: `(spec) -> core.model_sizes.ModelSize | None` for the memory estimate of DeepSpeed specs
              (default: the decoder LLM named by model.path / model.preset)
    models:   extra named models it needs under `models:` (e.g. ("teacher", "student"))
    entries:  functions a step may call by name ("run", "merge", "baseline", ...)
    watchdog: what the hang watchdog of its main step counts ("layer", ...) when it is not the train loop's "step"
              (core/watchdog.py): set it only if the step function beats the watchdog (see core/workloads/README.md)
    checkpointing: it switches on activation checkpointing when deepspeed.activation_checkpointing asks; the plan
              promises (and the memory estimate assumes) checkpointing only for such workloads
    device:   False for a workload that never touches the accelerator (e.g. the study table): its jobs ask for no
              gres and default to one task per node, so a CPU-only step does not hold an NPU/GPU node's devices
    """
    run: Callable
    section: Optional[str] = None
    Section: Optional[type] = None
    Data: Optional[type] = None
    trains: bool = False
    plan: Optional[Callable] = None
    model_size: Optional[Callable] = None
    models: tuple[str, ...] = ()
    merge: Optional[Callable] = None
    entries: dict[str, Callable] = field(default_factory=dict)
    resumable: Optional[bool] = None    # a requeued job continues where it stopped (default: workloads that train)
    device: bool = True                 # its tasks use the profile's accelerator; False: CPU only, no gres asked
    checkpointing: bool = False         # it applies deepspeed.activation_checkpointing to its model
    watchdog: Optional[str] = None      # what its main step's hang watchdog counts ("layer"); default "step" if it trains

    @property
    def has_merge(self) -> bool:
        return self.merge is not None

    @property
    def can_resume(self) -> bool:
        """Slurm may requeue its jobs (--requeue): they resume instead of starting over (or are idempotent)."""
        return self.trains if self.resumable is None else self.resumable

    @property
    def watched(self) -> Optional[str]:
        """What the hang watchdog of its main step counts (core.watchdog), or None when it runs none."""
        return self.watchdog or ("step" if self.trains else None)

    def entry(self, name: str) -> Callable:
        fns = {"run": self.run, **({"merge": self.merge} if self.merge else {}), **self.entries}
        if name not in fns:
            raise KeyError(f"workload has no step function '{name}' (has: {', '.join(sorted(fns))})")
        return fns[name]


def get(name: str) -> Workload:
    """The workload registered under `name` (imports its module; no torch at import time)."""
    module = importlib.import_module(WORKLOADS[name])
    workload = getattr(module, "WORKLOAD", None)
    if not isinstance(workload, Workload):
        raise TypeError(f"{WORKLOADS[name]} defines no WORKLOAD = Workload(...)")
    return workload


def sections() -> dict[str, str]:
    """Spec section key -> the workload that owns it (for 'this section belongs to ...' messages)."""
    return {w.section: name for name, w in ((n, get(n)) for n in WORKLOADS) if w.section}


def step_names() -> set[str]:
    """Every step name a plan may give a job besides `main`: `merge` and each workload's own entries (Dia-Pangu's
    `baseline`, GigaPath's `features`, ...). Jobs are named `<run>-<step>`; cancel-by-name uses this for jobs whose
    run record is not there to ask."""
    names = {"merge"}
    for n in WORKLOADS:
        names.update(get(n).entries)
    return names
