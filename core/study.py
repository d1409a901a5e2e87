"""A study: several job specs submitted at once as one graph of Slurm jobs chained with `afterok`.

A study spec (e.g. jobs/pangu_pruning_study.yaml) names steps; each step is a job spec plus `--set`-style overrides
(`set:`) and the steps it waits for (`after:`), or an existing run folder (`run:`) that is used as it is. An
override may name an earlier step's run folder as `${step:NAME}` (e.g. `prune.sensitivity_csv=${step:scan}/
sensitivity.csv`): the run folder is logs/<name>/<first job id>, known as soon as that step is submitted, so the
later steps find their inputs through the run record, never through `latest`. A `${step:NAME}` reference is also
an `after:`.

Before anything is submitted every step's spec is loaded (core.spec.load_spec, the usual validation) and planned
(core.plan.make_plan) with the earlier steps' run folders *promised* (core.run_folder.promises): a planner accepts a
path inside one of them instead of insisting it exists now. Then the steps are submitted in order, each with the
job ids of the steps it waits for; a failure half-way cancels what this submission already queued and says so.

The study folder `<logs_dir>/<study>/<id>/study.json` lists each step's run folder and job ids; each step's
run.json names the study (`study`, `study_name`, `study_step`), which is how status.py shows the study as one
group and cancel.py cancels a study by its name. `--resume-missing` reads study.json: steps whose jobs all
completed (or are still queued) keep their runs; failed, cancelled, lost (jobs neither queued nor accounted)
and never-run steps, and every step after them, are submitted again, waiting only for the steps still queued.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import Field

from core import run_folder
from core.spec import SpecError, Strict, _read_yaml, control_characters, validate
from core.secrets_guard import secret_paths

STEP_REF = re.compile(r"\$\{step:([^{}]*)\}")
STEP_NAME = r"^[A-Za-z][A-Za-z0-9_]{0,39}$"
RECORD = "study.json"


class StudyStep(Strict):
    spec: Optional[str] = Field(None, max_length=1024, description="job spec YAML of this step (jobs/...)")
    run: Optional[str] = Field(None, max_length=1024, description="an existing finished run folder used instead "
                                                                  "of submitting (e.g. a trained Dia-Pangu)")
    set: list[str] = Field(default_factory=list, description="overrides KEY=VALUE as with --set; ${step:NAME} "
                                                             "is the run folder of step NAME")
    after: list[str] = Field(default_factory=list, description="steps that must succeed first (afterok)")


class StudySpec(Strict):
    study: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=100,
                       description="the study's name (its folder: <logs_dir>/<study>/<id>/)")
    description: str = ""
    cluster: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_./\-]{1,200}$",
                                   description="the profile every step runs on unless --cluster says otherwise")
    logs_dir: str = Field("logs", min_length=1, max_length=1024, description="where the study folder goes (as "
                                                                             "outputs.logs_dir of a job spec)")
    steps: dict[str, StudyStep] = Field(min_length=1, max_length=50)


def is_study(path) -> bool:
    """Whether a YAML file is a study spec (a top-level `study:` key) rather than a job spec."""
    try:
        data = _read_yaml(Path(path), "spec")
    except SpecError:
        return False
    return "study" in data and "workload" not in data


@dataclass
class Step:
    name: str
    spec_file: Optional[str]          # None for a `run:` step
    run: Optional[Path]               # the existing run folder of a `run:` step
    sets: list[str]
    after: list[str]                  # explicit after: + ${step:} references, in file order


@dataclass
class Study:
    source: str
    spec: StudySpec
    steps: list[Step]                 # in submission (topological) order
    global_sets: list[str] = field(default_factory=list)
    logs_dir: str = "logs"
    force: bool = False               # --force: submit steps whose memory estimate does not fit

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def dependants(self, names: set[str]) -> set[str]:
        """`names` and every step that waits for one of them, directly or not."""
        out = set(names)
        for s in self.steps:  # topological order: one pass suffices
            if set(s.after) & out:
                out.add(s.name)
        return out


def load_study(path, overrides: tuple[str, ...] = ()) -> Study:
    """Read and check a study spec: schema, step names, `after:` and `${step:}` references, no cycle, spec files
    that exist, `run:` folders that are run folders. `--set KEY=VALUE` applies to every submitted step,
    `--set STEP:KEY=VALUE` to one. Raises SpecError naming the file and field."""
    source = str(path)
    data = _read_yaml(Path(path), "study spec")
    secrets = secret_paths(data)
    if secrets:
        raise SpecError(source, [(s, "looks like a secret written literally; use '${env:VAR_NAME}' in the step's "
                                     "job spec instead") for s in secrets])
    spec = validate(StudySpec, data, source)
    problems: list[tuple[str, str]] = []
    names = list(spec.steps)
    for name in names:
        if not re.fullmatch(STEP_NAME, name):
            problems.append((f"steps.{name}", "a step name is a letter, then letters, digits or '_' (at most 40)"))
    if problems:
        raise SpecError(source, problems)
    steps: dict[str, Step] = {}
    for name, st in spec.steps.items():
        where = f"steps.{name}"
        if (st.spec is None) == (st.run is None):
            problems.append((where, "give either spec: (a job spec to submit) or run: (an existing run folder)"))
            continue
        after = list(st.after)
        for i, a in enumerate(st.after):
            if a not in spec.steps:
                problems.append((f"{where}.after[{i}]", f"unknown step '{a}'; steps: {', '.join(names)}"))
            elif a == name:
                problems.append((f"{where}.after[{i}]", "a step cannot wait for itself"))
        for i, assignment in enumerate(st.set):
            if "=" not in assignment:
                problems.append((f"{where}.set[{i}]", f"'{assignment[:80]}' is not KEY=VALUE (as --set takes)"))
            for ref in STEP_REF.findall(assignment):
                if ref not in spec.steps:
                    problems.append((f"{where}.set[{i}]", f"${{step:{ref[:40]}}} names no step; steps: "
                                                          f"{', '.join(names)}"))
                elif ref == name:
                    problems.append((f"{where}.set[{i}]", "a step cannot use its own run folder"))
                elif ref not in after:
                    after.append(ref)
            if "${step:" in STEP_REF.sub("", assignment):
                problems.append((f"{where}.set[{i}]", "malformed reference: write ${step:NAME}"))
        if st.run is not None:
            if st.set or st.after:
                problems.append((where, "a run: step is an existing run: it takes no set: or after:"))
            if not run_folder.is_run(Path(st.run)):
                problems.append((f"{where}.run", f"{st.run} is not a run folder (no run.json); give "
                                                 f"logs/<name>/<id> of a finished run"))
        elif not Path(st.spec).is_file():
            problems.append((f"{where}.spec", f"job spec {st.spec} not found (paths are relative to the checkout "
                                              f"or absolute; cwd: {os.getcwd()})"))
        steps[name] = Step(name, st.spec, Path(st.run).resolve() if st.run else None, list(st.set), after)
    if problems:
        raise SpecError(source, problems)
    order = _topological(steps, source)
    global_sets, logs_dir = [], spec.logs_dir
    for assignment in overrides:
        head, eq, _ = assignment.partition("=")
        if ":" in head:
            target, _, rest = assignment.partition(":")
            if target not in steps:
                raise SpecError("--set", [(assignment[:80], f"unknown step '{target[:40]}'; steps: {', '.join(names)}")])
            if steps[target].spec_file is None:
                raise SpecError("--set", [(assignment[:80], f"step '{target}' is an existing run (run:)")])
            steps[target].sets.append(rest)
        elif not eq:
            raise SpecError("--set", [(assignment[:80], "expected KEY=VALUE or STEP:KEY=VALUE")])
        else:
            global_sets.append(assignment)
            if head.strip() == "outputs.logs_dir":
                logs_dir = assignment.split("=", 1)[1].strip()
    problems = control_characters({"set": list(overrides)})
    if problems:
        raise SpecError("--set", problems)
    return Study(source, spec, [steps[n] for n in order], global_sets, logs_dir)


def _topological(steps: dict[str, Step], source: str) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise SpecError(source, [(f"steps.{cycle[0]}.after", f"the steps wait for each other in a cycle: "
                                                                  f"{' -> '.join(cycle)}; remove one after:")])
        state[name] = 1
        for a in steps[name].after:
            visit(a, path + [name])
        state[name] = 2
        order.append(name)

    for name in steps:
        visit(name, [])
    return order


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
    from core.spec import load_spec

    if step.spec_file is None:
        return PlannedStep(step, run_dir=step.run)
    where = f"{study.source}: steps.{step.name} ({step.spec_file})"
    sets = tuple(study.global_sets) + tuple(_resolve_sets(step, folders))
    try:
        spec, raw = load_spec(step.spec_file, sets)
        with run_folder.promises({str(f): s for s, f in pending.items()}):
            plan = make_plan(spec, cluster, source=where, keep_going=keep_going, force=study.force)
    except SpecError as e:
        raise SpecError(where, e.problems) from None
    return PlannedStep(step, spec, raw, plan)


def choose_study_cluster(study: Study, flag: Optional[str]):
    """--cluster > the study's cluster: > its steps' cluster: keys when they agree > $MEDHPC_CLUSTER > default."""
    from core.spec import choose_cluster, load_spec

    if flag or study.spec.cluster:
        return choose_cluster(flag, study.spec.cluster)
    named = set()
    for s in study.steps:
        if s.spec_file:
            try:
                named.add(load_spec(s.spec_file, tuple(study.global_sets))[0].cluster)
            except SpecError:
                pass  # planned (and reported) later
    named.discard(None)
    if len(named) == 1:
        return named.pop(), "the steps' cluster: keys"
    if len(named) > 1:
        raise SpecError(study.source, [("cluster", f"the steps' specs name different clusters ({sorted(named)}); "
                                                   f"one study runs on one: give cluster: or --cluster")])
    return choose_cluster(None, None)


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
    from core.model_sizes import decoder_size

    size = decoder_size(spec)
    dtype = getattr(spec.section, "dtype", "bf16") if spec.section is not None else "bf16"
    per = 4 if dtype == "fp32" else 2
    gib = size.total * per / 2 ** 30
    return (f"memory: inference, no DeepSpeed estimate: weights {size.total:,} parameters in {dtype} = "
            + (f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB") + " per task (plus one prompt's activations)")


# ---------------------------------------------------------------- the study record
def study_root(study: Study) -> Path:
    p = Path(study.logs_dir)
    return (p if p.is_absolute() else run_folder.REPO / p) / study.spec.study


def read_record(study_dir: Path) -> dict:
    import json

    return json.loads((Path(study_dir) / RECORD).read_text())


def find_study(study: Study, given: Optional[str]) -> Path:
    """The study folder to resume: the one given (its study.json names this study), else the newest."""
    root = study_root(study)
    if given:
        p = Path(given)
        if not (p / RECORD).is_file():
            raise FileNotFoundError(f"--resume-missing {given}: no {RECORD} there; give a study folder "
                                    f"{root}/<id>")
        if read_record(p).get("study") != study.spec.study:
            raise ValueError(f"--resume-missing {given}: not a folder of study '{study.spec.study}'")
        return p.resolve()
    found = sorted((d for d in root.glob("*") if (d / RECORD).is_file()), key=lambda d: (d / RECORD).stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"--resume-missing: no earlier submission of study '{study.spec.study}' under {root}")
    return found[-1]


def _job_ids(record: dict) -> list[str]:
    """Every Slurm job id (array ids for arrays) of a run record's newest submission."""
    return [j for st in record.get("steps", []) for j in st.get("job_ids", [])]


# ---------------------------------------------------------------- states (one sacct + one squeue call)
FAILED_STATES = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


def step_states(record: dict) -> dict[str, dict]:
    """Per study step: {'state': done|active|failed|cancelled|lost|not run|existing, 'detail': text}. Slurm
    states from one sacct and one squeue call over every job of the study; local steps from the record. A step
    is `lost` when one of its job ids is neither in the queue nor in accounting (squeue knows a job as soon as
    sbatch returns, so accounting lagging a fresh submission never makes a step lost; when squeue does not
    answer, no step is called lost)."""
    from core import monitor

    steps = record.get("steps", {})
    ids = sorted({j for st in steps.values() for j in st.get("job_ids", [])}, key=lambda j: int(j) if j.isdigit() else 0)
    states: dict[str, str] = {}
    queue_answered = True
    if record.get("executor") == "slurm" and ids:
        numeric = [j for j in ids if j.isdigit()]
        if numeric:
            acct = monitor.slurm_output(["sacct", "-X", "-n", "-P", "-j", ",".join(numeric), "-o", "JobID,State"])
            for line in acct.splitlines():
                if "|" in line:
                    jid, state = line.split("|")[:2]
                    for t in monitor.expand_task_ids(jid):
                        states[t] = state.split()[0] if state else "UNKNOWN"
            try:
                live = monitor.slurm_output(["squeue", "-h", "-r", "-j", ",".join(numeric), "-o", "%i|%T"])
            except monitor.SlurmUnavailable as e:
                if "Invalid job id" not in str(e):  # squeue did not answer: no job can be called lost
                    queue_answered = False
                live = ""  # every id has left the queue (or never existed)
            for line in live.splitlines():
                if "|" in line:
                    jid, state = line.split("|")[:2]
                    for t in monitor.expand_task_ids(jid.strip()):
                        states[t] = state.strip()
    out = {}
    for name, st in steps.items():
        if st.get("existing"):
            out[name] = {"state": "existing", "detail": "an existing run"}
            continue
        if not st.get("job_ids"):
            out[name] = {"state": st.get("state") or "not run", "detail": st.get("detail", "")}
            continue
        if record.get("executor") != "slurm":
            out[name] = {"state": st.get("state", "failed"), "detail": st.get("detail", "")}
            continue
        mine = {t: s for t, s in states.items() if t.split("_")[0] in st["job_ids"]}
        cats = {t: monitor.category(s) for t, s in mine.items()}
        failed = sorted(t for t, s in mine.items() if s.startswith(FAILED_STATES))
        unknown = [j for j in st["job_ids"] if not any(t.split("_")[0] == j for t in mine)]
        if failed:
            out[name] = {"state": "failed", "detail": ", ".join(f"{t} {mine[t]}" for t in failed[:5])}
        elif unknown and queue_answered:
            # squeue lists a job from the moment sbatch returns, while accounting may lag it: a job that neither
            # the queue nor sacct knows will never run (purged, another cluster's id, a lost controller state)
            out[name] = {"state": "lost", "detail": f"jobs {' '.join(unknown[:5])} neither queued (squeue) nor "
                                                    f"known to accounting (sacct)"}
        elif any(c in ("running", "pending") for c in cats.values()) or len(mine) == 0:
            out[name] = {"state": "active", "detail": "queued or running"}
        elif all(c == "done" for c in cats.values()):
            out[name] = {"state": "done", "detail": ""}
        else:
            out[name] = {"state": "cancelled", "detail": ", ".join(sorted({mine[t] for t, c in cats.items()
                                                                        if c == "failed"}))}
    return out


def summary_line(record: dict, states: dict[str, dict]) -> str:
    """'FAILED at step prune (123_2 FAILED); cancelled: table; done: dia, scan' and the like."""
    by: dict[str, list[str]] = {}
    for name, s in states.items():
        by.setdefault(s["state"], []).append(name)
    if by.get("failed"):
        head = "FAILED at step " + ", ".join(f"{n} ({states[n]['detail']})" for n in by["failed"])
    elif by.get("active"):
        head = "RUNNING"
    elif by.get("cancelled") or by.get("not run") or by.get("lost"):
        head = "INCOMPLETE"
    else:
        head = "COMPLETED"
    rest = [f"{k}: {', '.join(v)}" for k, v in by.items() if k not in ("failed",) and v]
    return "; ".join([head, *rest])


# ---------------------------------------------------------------- what to submit (fresh or --resume-missing)
@dataclass
class Selection:
    """Which steps a submission submits and which it keeps. `kept`: step -> run folder that stays (run: steps,
    and on --resume-missing the finished and still-queued steps); `queued`: the kept steps whose jobs are still
    queued (later steps wait for them and are promised their outputs); `stale`: job ids still queued of steps
    that are submitted again (an earlier step failed): cancelled before the new submission."""
    resubmit: list[str]
    kept: dict[str, Path]
    queued: set[str] = field(default_factory=set)
    stale: list[str] = field(default_factory=list)
    study_dir: Optional[Path] = None  # the study folder resumed (None: a fresh submission)
    previous: Optional[dict] = None   # its study.json
    states: dict[str, dict] = field(default_factory=dict)  # its steps' states (step_states)


REDO_STATES = ("failed", "cancelled", "not run", "lost")


def select_steps(study: Study, resume_missing: Optional[str] = None) -> Selection:
    """A fresh submission (resume_missing None) submits every spec: step. With resume_missing ('' = the newest
    study folder, or one given): steps that failed, were cancelled or never ran, steps new to the study spec, and
    every step after them are submitted again; the others keep their runs. Raises FileNotFoundError / ValueError
    (no such study folder; nothing to resubmit)."""
    kept = {s.name: s.run for s in study.steps if s.run}
    if resume_missing is None:
        return Selection([s.name for s in study.steps if s.spec_file], kept)
    study_dir = find_study(study, resume_missing or None)
    previous = read_record(study_dir)
    states = step_states(previous)
    redo = {n for n, s in states.items() if s["state"] in REDO_STATES}
    redo |= {s.name for s in study.steps if s.spec_file and s.name not in previous.get("steps", {})}
    redo = {n for n in study.dependants(redo) if study.step(n).spec_file}
    ours = {s.name for s in study.steps}
    queued: set[str] = set()
    stale: list[str] = []
    for name, s in states.items():
        if name in redo or name not in ours:
            if s["state"] == "active":
                stale += previous["steps"][name].get("job_ids", [])
            continue
        if s["state"] in ("done", "active"):
            kept[name] = Path(previous["steps"][name]["run_dir"])
            if s["state"] == "active":
                queued.add(name)
    resubmit = [s.name for s in study.steps if s.name in redo]
    if not resubmit:
        raise ValueError(f"--resume-missing: every step of {study_dir} finished or is still queued "
                         f"({summary_line(previous, states)}); nothing to resubmit")
    return Selection(resubmit, kept, queued, stale, study_dir, previous, states)


class StepCheckError(RuntimeError):
    """A step's preflight raised (a bug or an environment problem): `step` and the original `cause`."""

    def __init__(self, step: str, cause: BaseException):
        super().__init__(f"step {step}: {type(cause).__name__}: {cause}")
        self.step, self.cause = step, cause


def preflight(planned: dict[str, PlannedStep], sel: Selection) -> dict[str, Any]:
    """core.preflight.check of every planned step to submit: step -> its Preflight (notes, problems)."""
    from core import submit as sub
    from core.preflight import check

    out = {}
    for name in sel.resubmit:
        p = planned[name]
        if p.plan is None:
            continue
        try:
            out[name] = check(p.plan, sub.sbatch_texts(p.plan))
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
        local = cluster.executor != "slurm"  # no dependencies there: each step runs to its end before the next
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
                     + (f" ({n_jobs} Slurm jobs to submit)" if cluster.executor == "slurm" else
                        f" ({n_jobs} jobs, run one step after another by the {cluster.executor} executor)"))
    else:
        lines.append("graph: no dependencies")
    return "\n".join(lines)


# ---------------------------------------------------------------- submission
@dataclass
class Outcome:
    study_dir: Path
    record: dict
    submitted: list[str]


def cancel_jobs(job_ids: list[str]) -> Optional[str]:
    """scancel these ids; None when done, else why not."""
    if not job_ids:
        return None
    try:
        proc = subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()[:300]


def submit_study(study: Study, planned: dict[str, PlannedStep], cluster, resubmit: list[str],
                 study_dir: Path, previous: Optional[dict], out,
                 prev_states: Optional[dict[str, dict]] = None) -> Outcome:
    """Submit the steps in `resubmit` (topological order) with afterok on the steps they wait for that are still
    queued; the others keep their run folders from `previous` (or are run: steps). `prev_states`: the states
    the selection was made on (Selection.states; queried again when not given). study.json is rewritten after
    every step, so even a failure half-way leaves the record of what is queued."""
    from core import submit as sub

    slurm = cluster.executor == "slurm"
    record = {"study": study.spec.study, "spec_file": study.source, "cluster": cluster.name,
              "executor": cluster.executor, "study_dir": str(study_dir),
              "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "order": [s.name for s in study.steps],
              "steps": {}}
    if previous:
        record["history"] = previous.get("history", []) + [{"submitted_at": previous.get("submitted_at"),
                                                            "steps": previous.get("steps", {})}]
    folders: dict[str, Path] = {}
    pending_ids: dict[str, list[str]] = {}  # steps whose jobs are queued: their ids
    if prev_states is None:
        prev_states = step_states(previous) if previous else {}
    for s in study.steps:
        if s.name in resubmit:
            continue
        if s.run is not None:
            record["steps"][s.name] = {"existing": True, "run_dir": str(s.run)}
            folders[s.name] = s.run
        else:
            old = previous["steps"][s.name]
            record["steps"][s.name] = {**old, "kept": True}
            folders[s.name] = Path(old["run_dir"])
            if prev_states.get(s.name, {}).get("state") == "active":
                pending_ids[s.name] = list(old["job_ids"])
    for name in resubmit:
        record["steps"][name] = {"spec": study.step(name).spec_file, "state": "not run", "job_ids": []}
    run_folder.write_json_atomic(study_dir / RECORD, record)
    submitted: list[str] = []
    for s in study.steps:
        if s.name not in resubmit:
            continue
        promised = {n: f for n, f in folders.items() if n in pending_ids}  # queued: their outputs are to come
        try:
            p = plan_step(study, s, folders, promised, cluster)
            deps = [j for a in s.after if a in pending_ids for j in pending_ids[a]]
            extra = {"study": str(study_dir), "study_name": study.spec.study, "study_step": s.name}
            submission = sub.submit(p.plan, p.raw, s.spec_file, after_ids=tuple(deps), extra_record=extra)
        except BaseException as e:
            ids = [j for n in submitted for j in record["steps"][n]["job_ids"]]
            why = cancel_jobs(ids) if slurm else None
            for n in submitted:
                record["steps"][n]["state"] = "cancelled"
                record["steps"][n]["detail"] = f"submission of step {s.name} failed"
            record["steps"][s.name]["detail"] = f"submission failed: {type(e).__name__}: {str(e)[:200]}"
            run_folder.write_json_atomic(study_dir / RECORD, record)
            msg = f"submitting step {s.name} failed: {type(e).__name__}: {str(e)[:300]}"
            if submitted:
                msg += (f"\nsteps submitted before it: {', '.join(submitted)} (jobs {' '.join(ids)}): "
                        + ("cancelled" if why is None else f"NOT cancelled ({why}); cancel them with: "
                                                           f"scancel {' '.join(ids)}"))
            else:
                msg += "\nno step of this study was submitted by this command"
            raise StudySubmitError(msg) from None
        run_dir = submission.run_dir
        ids = run_folder_ids = [j for st in submission.record["steps"] for j in st.get("job_ids", [])]
        folders[s.name] = run_dir
        submitted.append(s.name)
        state = "submitted"
        detail = ""
        if not slurm:  # the local executor has no dependencies: each step runs to its end before the next
            code = sub.report_results(submission, out=out)
            state = "done" if code == 0 and not any(st.get("skipped") for st in submission.record["steps"]) \
                else "failed"
            detail = "" if state == "done" else f"see {run_dir}"
        else:
            pending_ids[s.name] = run_folder_ids
        record["steps"][s.name] = {"spec": s.spec_file, "run_dir": str(run_dir), "job_ids": ids,
                                   "after": s.after, "dependency": deps, "state": state, "detail": detail}
        run_folder.write_json_atomic(study_dir / RECORD, record)
        dep = f" (afterok:{':'.join(deps)})" if deps else ""
        out.write(f"submitted step {s.name}: {run_dir} jobs {','.join(ids) or '(local)'}{dep}\n")
        out.flush()
        if not slurm and state == "failed":
            rest = [n for n in resubmit if n not in submitted]
            for n in rest:
                record["steps"][n].update(state="not run", detail=f"step {s.name} failed")
            run_folder.write_json_atomic(study_dir / RECORD, record)
            out.write(f"step {s.name} failed; not run: {', '.join(rest) or 'none'}\n")
            break
    return Outcome(study_dir, record, submitted)


class StudySubmitError(RuntimeError):
    pass


def make_study_dir(study: Study) -> Path:
    base = study_root(study) / time.strftime("%Y%m%d-%H%M%S")
    d, n = base, 1
    while d.exists():
        n += 1
        d = base.with_name(f"{base.name}-{n}")
    d.mkdir(parents=True)
    return d


def wait(record: dict, poll_s: float = 5.0, out=None) -> dict[str, dict]:
    """Poll (one sacct + one squeue call per round) until no step of the study is queued; the final states."""
    while True:
        states = step_states(record)
        if not any(s["state"] == "active" for s in states.values()):
            return states
        time.sleep(poll_s)


def final_table(record: dict) -> Optional[Path]:
    """The markdown table a finished step reported (the study_table workload's `markdown` result), if any. Read
    from the steps' task records, so the study needs no workload module (nothing outside core/workloads/ does)."""
    from core.run_folder import task_records

    for st in record.get("steps", {}).values():
        if not st.get("run_dir"):
            continue
        for rec in task_records(Path(st["run_dir"])):
            result = rec.get("result")
            md = Path(result["markdown"]) if isinstance(result, dict) and result.get("markdown") else None
            if md is not None and md.is_file():
                return md
    return None
