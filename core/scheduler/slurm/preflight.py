"""Preflight on Slurm: compare a plan with the real cluster it goes to, before anything is submitted.

One call each, cached for the submission: `scontrol show partition` (state, MaxTime, MaxNodes, its nodes),
`scontrol show node` (CPUs, memory and GRES of those nodes), `sacctmgr show assoc` (accounts and QOS of the user,
where accounting is on), then `sbatch --test-only` for each script (Slurm's own verdict and its expected start
time). Each problem names the spec or profile field, the limit and where the limit came from.
"""
from __future__ import annotations

import getpass
import re
from typing import TYPE_CHECKING

from core.scheduler.base import Preflight
from core.scheduler.slurm.commands import call, have
from core.scheduler.slurm.names import minutes, pairs

if TYPE_CHECKING:
    from core.plan import Plan


def _gres_count(gres: str, name: str) -> int:
    """Devices of type `name` in a node's Gres string ('gpu:a100:8(S:0-1),nic:1' -> 8 for 'gpu')."""
    total = 0
    for part in gres.split(","):
        bits = part.split("(")[0].split(":")
        if bits and bits[0] == name:
            try:
                total += int(bits[-1])
            except ValueError:
                total += 1
    return total


def check(plan: "Plan", scripts: dict[str, list[str]]) -> Preflight:
    out = Preflight()
    c = plan.cluster
    if not have("scontrol"):
        out.notes.append("preflight skipped: no Slurm commands on this machine (run it again on the login node)")
        return out
    partition = (c.slurm.partition or "").split(",")[0] or None
    code, text = call(["scontrol", "show", "partition", "-o"] + ([partition] if partition else []))
    if code != 0:
        if partition:
            out.problems.append(("slurm.partition", f"partition '{partition}' (profile {c.name}) is not known to this "
                                              f"cluster: {text[:200]}"))
        else:
            out.notes.append(f"preflight: scontrol show partition failed: {text[:200]}")
        return out
    parts = [pairs(line) for line in text.splitlines() if line.strip()]
    part = parts[0] if partition or len(parts) == 1 else next((p for p in parts if p.get("Default") == "YES"),
                                                              parts[0])
    pname = part.get("PartitionName", partition or "?")
    where = f"partition {pname} (scontrol show partition)"
    if part.get("State", "UP") != "UP":
        out.problems.append(("slurm.partition", f"{where} is {part.get('State')}, not UP"))
    longest = max(s.minutes for s in plan.steps)
    max_time = minutes(part.get("MaxTime", ""))
    if max_time is not None and longest > max_time:
        out.problems.append(("resources.time", f"{longest} minutes is more than the MaxTime of {where}: "
                                               f"{part.get('MaxTime')} ({max_time} minutes)"))
    nodes = max(s.nodes for s in plan.steps)
    total = int(part.get("TotalNodes", "0") or 0)
    max_nodes = part.get("MaxNodes", "UNLIMITED")
    if total and nodes > total:
        out.problems.append(("resources.nodes", f"{nodes} nodes but {where} has {total}"))
    if max_nodes.isdigit() and nodes > int(max_nodes):
        out.problems.append(("resources.nodes", f"{nodes} nodes but MaxNodes of {where} is {max_nodes}"))
    _check_nodes(plan, part.get("Nodes", ""), where, out)
    _check_accounting(plan, out)
    for step, texts in scripts.items():
        for i, text in enumerate(texts):  # every array chunk is tested; the start time is told once per step
            _test_only(step, text, out, tell_start=i == 0)
    return out


def _check_nodes(plan: "Plan", nodelist: str, where: str, out: Preflight) -> None:
    c, spec = plan.cluster, plan.spec
    code, text = call(["scontrol", "show", "node", "-o"] + ([nodelist] if nodelist else []))
    if code != 0 or not text:
        return
    nodes = [pairs(line) for line in text.splitlines() if line.strip()]
    cpus = max(int(n.get("CPUTot", "0") or 0) for n in nodes)
    mem_mb = max(int(n.get("RealMemory", "0") or 0) for n in nodes)
    step = max(plan.steps, key=lambda s: s.tasks_per_node * s.cpus_per_task)
    want_cpus = step.tasks_per_node * step.cpus_per_task
    if cpus and want_cpus > cpus:
        out.problems.append(("resources.cpus_per_task", f"{step.tasks_per_node} tasks x {step.cpus_per_task} CPUs = "
                                                        f"{want_cpus} per node, but the nodes of {where} have at most "
                                                        f"{cpus} (scontrol show node CPUTot)"))
    mem_gb = spec.resources.mem_gb or c.mem_gb_per_node
    if mem_gb and mem_mb and mem_gb * 1024 > mem_mb:
        field_name = "resources.mem_gb" if spec.resources.mem_gb else "mem_gb_per_node"
        out.problems.append((field_name, f"{mem_gb:g} GB per node, but the nodes of {where} have at most "
                                         f"{mem_mb / 1024:.1f} GB (scontrol show node RealMemory)"))
    if c.slurm.gres and c.accelerator != "cpu" and any(s.device for s in plan.steps):
        kind = c.slurm.gres.split(":")[0]
        have = max(_gres_count(n.get("Gres", ""), kind) for n in nodes)
        want = max(s.tasks_per_node for s in plan.steps if s.device)
        if have < want:
            out.problems.append(("slurm.gres", f"{want} x {kind} per node requested (profile gres {c.slurm.gres}), but the nodes "
                                         f"of {where} have {have or 'no'} {kind} (scontrol show node Gres)"))


def _check_accounting(plan: "Plan", out: Preflight) -> None:
    c = plan.cluster
    if not (c.slurm.account or c.slurm.qos) or not have("sacctmgr"):
        return
    code, text = call(["sacctmgr", "-n", "-P", "show", "assoc", f"user={getpass.getuser()}", "format=account,qos"])
    if code != 0:
        out.notes.append("preflight: accounting not queried (sacctmgr failed); sbatch --test-only still checks")
        return
    rows = [ln.split("|") for ln in text.splitlines() if "|" in ln]
    accounts = {r[0] for r in rows}
    qos = {q for r in rows for q in r[1].split(",") if q}
    if c.slurm.account and accounts and c.slurm.account not in accounts:
        out.problems.append(("slurm.account", f"account '{c.slurm.account}' (profile {c.name}) is not one of yours: "
                                        f"{', '.join(sorted(accounts))} (sacctmgr show assoc)"))
    if c.slurm.qos and qos and c.slurm.qos not in qos:
        out.problems.append(("slurm.qos", f"QOS '{c.slurm.qos}' (profile {c.name}) is not allowed for you: "
                                    f"{', '.join(sorted(qos))} (sacctmgr show assoc)"))


def _test_only(step: str, text: str, out: Preflight, tell_start: bool = True) -> None:
    """sbatch --test-only on the script (dependencies on jobs that do not exist yet are left out)."""
    import tempfile

    body = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#SBATCH --dependency"))
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=True) as f:
        f.write(body + "\n")
        f.flush()
        code, said = call(["sbatch", "--test-only", f.name])
    if code != 0:
        out.problems.append((f"step {step}", f"sbatch --test-only refused the script: {said[:300]}"))
        return
    m = re.search(r"to start at (\S+)", said)
    if m and tell_start:
        out.notes.append(f"step {step}: Slurm expects it to start at {m.group(1)} (sbatch --test-only)")
