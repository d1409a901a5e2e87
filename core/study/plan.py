"""Planning a study: every step loaded and planned before anything is submitted (plan_step, plan_all), with the
earlier steps' run folders promised; the plan text submit.py prints (describe, inference_memory) and the
steps' preflight checks through the profile's scheduler (preflight, StepCheckError)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from core import run_folder, scheduler
from core.config import SpecError
from core.study.spec import STEP_REF, Step, Study
from core.study.state import Selection


# ---------------------------------------------------------------- planning
@dataclass
class PlannedStep:
    step: Step
    spec: Any = None                  # the validated JobSpec (None for a run: step)
    raw: Optional[dict] = None
    plan: Any = None                  # core.plan.Plan
    run_dir: Optional[Path] = None    # known once submitted (or for run: / kept steps)


def _pending_folder(spec, step: str) -> Path:
    """Stands for a not-yet-submitted step's run folder while the study is checked before submission."""
    return run_folder.logs_root(spec) / f"(run folder of study step {step})"


def _resolve_sets(step: Step, folders: dict[str, Path]) -> list[str]:
    return [STEP_REF.sub(lambda m: str(folders[m.group(1)]), s) for s in step.sets]


def plan_step(study: Study, step: Step, folders: dict[str, Path], pending: dict[str, Path], cluster,
              keep_going: bool = False) -> PlannedStep:
    """Load and plan one step with the run folders of earlier steps filled in (`folders`) and the ones not yet
    written promised (`pending`: folder -> step). SpecErrors name the study, the step and its spec file."""
    from core.plan import make_plan
    from core.config import load_spec

    if step.spec_file is None:
        return PlannedStep(step, run_dir=step.run)
    where = f"{study.source}: steps.{step.name} ({step.spec_file})"
    # a study's runs are one W&B group (docs/tracking.md) unless its sets name another
    sets = (f"tracking.group={study.spec.study}",) + tuple(study.global_sets) + tuple(_resolve_sets(step, folders))
    try:
        spec, raw = load_spec(step.spec_file, sets)
        with run_folder.promises({str(f): s for s, f in pending.items()}):
            plan = make_plan(spec, cluster, source=where, keep_going=keep_going, force=study.force)
    except SpecError as e:
        raise SpecError(where, e.problems) from None
    return PlannedStep(step, spec, raw, plan)



def plan_all(study: Study, cluster, resubmit: list[str], kept: dict[str, Path], queued: set[str],
             keep_going: bool = False) -> tuple[dict[str, PlannedStep], list[tuple[str, str, str]]]:
    """Every step to submit, loaded and planned before anything is submitted: earlier steps to submit stand for
    their run folders with a placeholder, promised; `kept` are run folders that stay (run: steps, finished or
    queued steps on --resume-missing; `queued` of them are promised too). With keep_going (a dry run) refusals
    are collected as (step, field, message) instead of raised."""
    folders: dict[str, Path] = dict(kept)
    pending: dict[str, Path] = {n: kept[n] for n in queued}
    planned: dict[str, PlannedStep] = {}
    problems: list[tuple[str, str, str]] = []
    for s in study.steps:
        if s.name not in resubmit:
            planned[s.name] = PlannedStep(s, run_dir=kept.get(s.name))
            continue
        try:
            p = plan_step(study, s, folders, pending, cluster, keep_going=keep_going)
        except SpecError as e:
            if not keep_going:
                raise
            problems += [(s.name, f, m) for f, m in e.problems]
            p = PlannedStep(s)
        planned[s.name] = p
        if p.plan is not None:
            problems += [(s.name, f, m) for f, m in p.plan.problems]
            folders[s.name] = pending[s.name] = _pending_folder(p.spec, s.name)
        else:  # its spec did not load: later steps still plan, with a placeholder folder
            folders[s.name] = pending[s.name] = run_folder.LOGS / f"(run folder of study step {s.name})"
    return planned, problems


def inference_memory(spec) -> str:
    """For a step without a DeepSpeed estimate: the weights one task holds (model.path / model.preset at the
    section's dtype), or why there is no figure."""
    from core.model_sizes import model_config

    if model_config(spec.model.path, spec.model.preset) is None:
        return "memory: no model to estimate (no model.path config.json or model.preset)"
    from core.models.pangu import decoder_size

    size = decoder_size(spec)
    dtype = getattr(spec.section, "dtype", "bf16") if spec.section is not None else "bf16"
    per = 4 if dtype == "fp32" else 2
    gib = size.total * per / 2 ** 30
    return (f"memory: inference, no DeepSpeed estimate: weights {size.total:,} parameters in {dtype} = "
            + (f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB") + " per task (plus one prompt's activations)")



class StepCheckError(RuntimeError):
    """A step's preflight raised (a bug or an environment problem): `step` and the original `cause`."""

    def __init__(self, step: str, cause: BaseException):
        super().__init__(f"step {step}: {type(cause).__name__}: {cause}")
        self.step, self.cause = step, cause


def preflight(planned: dict[str, PlannedStep], sel: Selection) -> dict[str, Any]:
    """The scheduler's preflight of every planned step to submit: step -> its Preflight (notes, problems)."""
    out = {}
    for name in sel.resubmit:
        p = planned[name]
        if p.plan is None:
            continue
        try:
            sched = scheduler.for_cluster(p.plan.cluster)
            out[name] = sched.preflight(p.plan, sched.render(p.plan))
        except Exception as e:
            raise StepCheckError(name, e) from e
    return out


def describe(study: Study, planned: dict[str, PlannedStep], cluster, source: str, sel: Selection,
             checked: Optional[dict[str, Any]] = None) -> str:
    """The study plan as submit.py prints it: the header, each step (kept ones with their run folder; submitted
    ones with what they wait for, their plan, memory and preflight notes) and the graph."""
    checked = checked or {}
    lines = [f"study {study.spec.study} ({study.source}): {len(study.steps)} steps on {cluster.name} "
             f"[{cluster.executor}, {cluster.accelerator}] (profile from {source})"
             + (f"; resubmitting {', '.join(sel.resubmit)}, keeping {', '.join(sorted(sel.kept)) or 'nothing'}"
                if sel.previous else "")]
    n_jobs = 0
    for s in study.steps:
        p = planned[s.name]
        if s.name not in sel.resubmit:
            why = "an existing run" if s.run else "kept: " + ("still queued" if s.name in sel.queued else "finished")
            lines.append(f"step {s.name}: {sel.kept.get(s.name)} ({why})")
            continue
        waits = [f"{a} ({'queued' if a in sel.queued else 'kept, finished'})" if a in sel.kept
                 and study.step(a).spec_file else f"{a} (existing run)" if a in sel.kept else a for a in s.after]
        local = not scheduler.for_cluster(cluster).has_queue  # no dependencies there: each step runs to its end before the next
        wait_text = "; after the end of: " if local else "; afterok on every job of: "
        lines.append(f"step {s.name}: {s.spec_file}" + (f"{wait_text}{', '.join(waits)}" if waits
                                                         else "; waits for no other step"))
        if p.plan is None:
            lines.append("  (not planned: see the errors below)")
            continue
        lines += [f"  {line}" for line in p.plan.describe().splitlines()]
        if p.plan.memory is None:
            lines.append(f"  {inference_memory(p.spec)}")
        n_jobs += sum(len(x.chunks) if x.is_array else 1 for x in p.plan.steps)
        if s.name in checked:
            lines += [f"  preflight: {note}" for note in checked[s.name].notes]
    if any(s.after for s in study.steps):
        lines.append("graph: " + "; ".join(f"{a} -> {s.name}" for s in study.steps for a in s.after)
                     + (f" ({n_jobs} {cluster.executor.capitalize()} jobs to submit)"
                        if scheduler.for_cluster(cluster).has_queue else
                        f" ({n_jobs} jobs, run one step after another by the {cluster.executor} executor)"))
    else:
        lines.append("graph: no dependencies")
    if scheduler.for_cluster(cluster).holds:   # (core.study.submit always submits a study held)
        lines.append(f"all or nothing: the {n_jobs} jobs are submitted held and released together once every one is "
                     f"queued (a submission stopped half-way leaves nothing runnable)" if n_jobs > 1 else
                     "the job is submitted held and released once it is queued (as every study's jobs are)")
    return "\n".join(lines)

