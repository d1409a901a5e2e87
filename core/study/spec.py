"""The study spec: its schema (StudySpec), loading and checking it (load_study: step names, `after:` and
`${step:NAME}` references, no cycle), telling a study spec from a job spec (is_study) and the profile the study
runs on (choose_study_cluster)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pydantic import Field

from core import run_folder
from core.config import SpecError, Strict, _read_yaml, control_characters, validate
from core.secrets_guard import secret_paths

STEP_REF = re.compile(r"\$\{step:([^{}]*)\}")
STEP_NAME = r"^[A-Za-z][A-Za-z0-9_]{0,39}$"


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



def choose_study_cluster(study: Study, flag: Optional[str]):
    """--cluster > the study's cluster: > its steps' cluster: keys when they agree > $MEDHPC_CLUSTER > default."""
    from core.config import choose_cluster, load_spec

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

