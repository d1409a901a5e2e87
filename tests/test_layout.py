"""The house rules, checked on the source: the scheduler is the only place that knows which scheduler it talks to,
Slurm's commands and submitit's private names live only in the Slurm backend, the registry is on the ground floor
(nothing in core/ outside core/workloads/ imports a workload), and no module imports another that imports it back
(function-level imports count too: a circle is a circle, even when it only closes at run time)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

CODE = sorted(p for top in ("core", "launchers") for p in (REPO / top).rglob("*.py"))
SLURM_COMMANDS = ("squeue", "sacct", "scancel", "scontrol", "sinfo", "sbatch", "sacctmgr", "srun")


def rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


def module_name(p: Path) -> str:
    parts = p.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def string_constants(tree) -> list[tuple[int, str]]:
    """Strings that run a program: the first element of a list (a command line) or the argument of a call
    (shutil.which("scontrol")); a record key or a folder named like a command is no call."""
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.List) and n.elts:
            first = n.elts[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                out.append((n.lineno, first.value))
        elif isinstance(n, ast.Call):
            out += [(a.lineno, a.value) for a in n.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return out


def test_no_scheduler_name_is_compared_outside_the_scheduler():
    bad = []
    for p in CODE:
        if rel(p).startswith("core/scheduler/"):
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"executor\s*(==|!=|\bin\b|\bnot in\b)", line) or re.search(r"[\"'](slurm|local)[\"']\s*(==|!=)", line):
                bad.append(f"{rel(p)}:{i}: {line.strip()}")
    assert not bad, "compare scheduler names only in core/scheduler/ (use its has_queue / single_host / requeues):\n" \
        + "\n".join(bad)


def test_slurm_commands_and_submitit_private_names_only_in_the_slurm_backend():
    bad = []
    for p in CODE:
        if rel(p).startswith("core/scheduler/slurm/"):
            continue
        tree = ast.parse(p.read_text())
        bad += [f"{rel(p)}:{line}: the string {value!r}" for line, value in string_constants(tree)
                if value in SLURM_COMMANDS]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("submitit"):
                bad += [f"{rel(p)}:{node.lineno}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") or ".slurm" in (node.module or "")]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id in ("submitit", "ex", "executor"):
                bad.append(f"{rel(p)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "Slurm commands and submitit's private names belong in core/scheduler/slurm/:\n" + "\n".join(bad)


def test_scheduler_variables_are_read_only_by_the_scheduler():
    """SLURM_* / SUBMITIT_* variables (rank, array index, job id, restart count, devices) are each backend's own."""
    bad = []
    for p in CODE:
        if rel(p).startswith("core/scheduler/"):
            continue
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and \
                    re.fullmatch(r"(SLURM|SLURMD|SUBMITIT)_[A-Z_]+", n.value):
                bad.append(f"{rel(p)}:{n.lineno}: {n.value}")
    assert not bad, "ask core.scheduler (in_task, array_index, root_job_id, ...) instead:\n" + "\n".join(bad)


def imports(p: Path) -> set[str]:
    """Every project module this file imports, at module level or inside functions (the package of a relative or
    `from core import x` import resolved to the module when it is one)."""
    out = set()
    tree = ast.parse(p.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never imported at run time
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "core"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "core":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if (REPO / Path(*sub.split("."))).with_suffix(".py").is_file()
                        or (REPO / Path(*sub.split(".")) / "__init__.py").is_file() else node.module)
    return out


def graph() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in CODE if rel(p).startswith("core/")}
    return {m: {i for i in imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_the_registry_is_on_the_ground_floor():
    g = graph()
    upstairs = sorted(f"{m} imports {', '.join(sorted(i for i in deps if i.startswith('core.workloads')))}"
                      for m, deps in g.items() if not m.startswith("core.workloads")
                      and any(i.startswith("core.workloads") for i in deps))
    assert not upstairs, "reach workloads through core.registry.get(name), never by importing them:\n" + "\n".join(upstairs)
    assert not {i for i in g["core.registry"] if i.startswith("core")}, "core/registry.py imports nothing of the project"


def test_no_import_circle():
    g = graph()
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_what_they_look_for(tmp_path):
    """The scanners are not blind: a planted comparison, command and circle are found."""
    planted = tmp_path / "x.py"
    planted.write_text('import subprocess\nif c.executor == "slurm":\n    subprocess.run(["squeue"])\n'
                       "from submitit.slurm.slurm import _make_sbatch_string\n")
    tree = ast.parse(planted.read_text())
    assert any(v == "squeue" for _, v in string_constants(tree))
    assert re.search(r"executor\s*(==|!=)", planted.read_text())
    assert re.fullmatch(r"(SLURM|SLURMD|SUBMITIT)_[A-Z_]+", "SLURM_ARRAY_TASK_ID")
    assert any(isinstance(n, ast.ImportFrom) and n.names[0].name.startswith("_") for n in ast.walk(tree))
    g = graph()
    assert "core.scheduler" in g["core.submit"] and "core.registry" in g["core.plan"]
