"""A cluster profile written from the Slurm cluster itself (launchers/cluster_profile.py): the cluster is read once
(`scontrol show config`, `scontrol show partition`, `scontrol show node`, `sacctmgr` where accounting answers) and
every value of the profile comes with a comment saying where it came from, for the person who reviews it before
the first submission. Nothing is guessed silently: what Slurm cannot say (a device's memory) is left as a commented
line to fill in."""
from __future__ import annotations

import getpass
import ipaddress
import json
import re
import socket
import time
from pathlib import Path
from typing import Any, Optional

from core.scheduler.base import SchedulerUnavailable
from core.scheduler.slurm.commands import call, run
from core.scheduler.slurm.names import minutes

DEVICES = {"gpu": "cuda", "npu": "npu"}  # generic resource -> the profile's accelerator


def _records(text: str) -> list[dict[str, str]]:
    """`scontrol show ... -o` lines -> one dict per line (Key=Value pairs; values may not contain spaces)."""
    out = []
    for line in text.splitlines():
        pairs = dict(m.groups() for m in re.finditer(r"(\w[\w:/]*)=(\S*)", line))
        if pairs:
            out.append(pairs)
    return out


def _gres(text: str) -> tuple[str, int]:
    """A node's Gres ('gpu:a100:8(S:0-1),npu:8' or '(null)') -> (device kind, count) of the first gpu/npu."""
    for part in (text or "").split(","):
        fields = part.split("(")[0].split(":")
        if fields and fields[0] in DEVICES:
            count = fields[-1]
            return fields[0], int(count) if count.isdigit() else 0
    return "", 0


def _loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(addr)).is_loopback
    except (OSError, ValueError):
        return False


def read_cluster(partition: Optional[str] = None) -> dict[str, Any]:
    """What the profile needs, read once: the config, the chosen partition (the default one unless named), its
    nodes, and the user's associations (None when accounting does not answer)."""
    config = dict(re.findall(r"^(\w+)\s*=\s*(.*?)\s*$", run(["scontrol", "show", "config"]), re.M))
    parts = _records(run(["scontrol", "show", "partition", "-o"]))
    if not parts:
        raise SchedulerUnavailable("scontrol show partition listed no partition")
    if partition:
        chosen = next((p for p in parts if p.get("PartitionName") == partition), None)
        if chosen is None:
            raise ValueError(f"--partition {partition}: no such partition (Slurm has "
                             f"{', '.join(p.get('PartitionName', '?') for p in parts)})")
    else:
        chosen = next((p for p in parts if p.get("Default") == "YES"), parts[0])
    name = chosen["PartitionName"]
    nodes = [n for n in _records(run(["scontrol", "show", "node", "-o"]))
             if name in (n.get("Partitions") or "").split(",")]
    if not nodes:
        raise SchedulerUnavailable(f"scontrol show node listed no node of partition {name}")
    user = getpass.getuser()
    code, assoc = call(["sacctmgr", "-n", "-P", "show", "assoc", f"user={user}", "format=account,qos"])
    accounts = None
    if code == 0:
        accounts = {}
        for line in assoc.splitlines():
            acct, _, qos = line.partition("|")
            if acct.strip():
                accounts.setdefault(acct.strip(), set()).update(q for q in qos.strip().split(",") if q)
    code, default = call(["sacctmgr", "-n", "-P", "show", "user", user, "format=defaultaccount"])
    code_q, qos_limits = call(["sacctmgr", "-n", "-P", "show", "qos", "format=name,maxsubmitjobsperuser"])
    limits = {}
    if code_q == 0:
        for line in qos_limits.splitlines():
            qname, _, most = line.partition("|")
            if most.strip().isdigit():
                limits[qname.strip()] = int(most)
    return {"config": config, "partition": chosen, "nodes": nodes, "user": user, "accounts": accounts,
            "default_account": default.strip() if code == 0 else "", "qos_limits": limits,
            "partitions": [p.get("PartitionName") for p in parts]}


def profile_entries(facts: dict[str, Any], name: Optional[str], repo: Path) -> list[tuple[str, Any, str]]:
    """(key, value, where it came from) for each line of the profile; a value None is written commented out."""
    cfg, part, nodes = facts["config"], facts["partition"], facts["nodes"]
    cluster = cfg.get("ClusterName", "")
    pname = part["PartitionName"]
    e: list[tuple[str, Any, str]] = []
    e.append(("name", name or cluster or "site", "--name" if name else "Slurm's ClusterName (scontrol show config)"))
    e.append(("executor", "slurm", "this profile was read from a Slurm cluster"))
    e.append(("slurm.cluster_name", cluster or None, "ClusterName (scontrol show config): MaxArraySize and "
                                                     "MaxJobCount are read live only on this cluster"))
    e.append(("slurm.partition", pname, ("--partition" if facts.get("chosen_by_user") else
                                         "the default partition (scontrol show partition: Default=YES)")
              + f"; partitions here: {', '.join(facts['partitions'])}"))
    accounts = facts["accounts"]
    if accounts is None:
        e.append(("slurm.account", None, "accounting did not answer (sacctmgr): name your account if the site "
                                         "needs one"))
        e.append(("slurm.qos", None, "accounting did not answer (sacctmgr)"))
    else:
        names = sorted(accounts)
        if len(names) > 1:
            acct = facts["default_account"] if facts["default_account"] in accounts else names[0]
            e.append(("slurm.account", acct, f"your default account (sacctmgr show user); yours: {', '.join(names)}"))
        else:
            e.append(("slurm.account", None, f"your only account is {names[0] if names else 'none'} (sacctmgr show "
                                             f"assoc): Slurm uses it without being told"))
        qos = sorted({q for qs in accounts.values() for q in qs})
        e.append(("slurm.qos", None, f"your QOS (sacctmgr show assoc): {', '.join(qos) or 'none listed'}; Slurm "
                                     f"uses the default one without being told"))
    kinds = {_gres(n.get("Gres", ""))[0] for n in nodes}
    kind = next((k for k in kinds if k), "")
    counts = [_gres(n.get("Gres", ""))[1] for n in nodes]
    cpus = min(int(n.get("CPUTot", 0) or 0) for n in nodes)
    mem_mb = min(int(n.get("RealMemory", 0) or 0) for n in nodes)
    node_names = ", ".join(n.get("NodeName", "?") for n in nodes[:4]) + (" ..." if len(nodes) > 4 else "")
    if kind and len(kinds - {""}) == 1 and min(counts) > 0:
        devices = min(counts)
        e.append(("slurm.gres", f"{kind}:{{devices}}", f"the nodes' Gres ({kind}): each task gets one device"))
        e.append(("description", f"{devices} x {kind} per node, partition {pname} of {cluster}",
                  f"written by launchers/cluster_profile.py on {time.strftime('%Y-%m-%d')}"))
        e.append(("accelerator", DEVICES[kind], f"Gres {kind} of the nodes of {pname} ({node_names})"))
        e.append(("devices_per_node", devices, f"the smallest {kind} count of a node of {pname} (scontrol show node)"))
        e.append(("device_mem_gb", None, "Slurm does not know a device's memory: give it (GB) for the plan's "
                                         "memory estimate"))
        per_task = max(1, cpus // devices)
        e.append(("cpus_per_task", per_task, f"the node's {cpus} CPUs (CPUTot) shared by its {devices} devices"))
        e.append(("mem_gb_per_node", max(1, int(mem_mb * 0.9 / 1024)),
                  f"90% of the smallest node's RealMemory ({mem_mb} MB): a job holds whole nodes"))
    else:
        if kinds - {""}:
            e.append(("description", f"partition {pname} of {cluster}", "the nodes of this partition have different "
                                                                          f"Gres ({', '.join(sorted(kinds))}): "
                                                                          "written as a CPU profile, review it"))
        else:
            e.append(("description", f"CPU nodes, partition {pname} of {cluster}",
                      f"written by launchers/cluster_profile.py on {time.strftime('%Y-%m-%d')}"))
        e.append(("accelerator", "cpu", f"no gpu/npu Gres on the nodes of {pname} ({node_names})"))
        e.append(("devices_per_node", 0, "no devices"))
        e.append(("cpus_per_task", 1, "one CPU per task (raise it for threaded work)"))
        share = max(1, round(mem_mb / max(cpus, 1) / 1024))
        e.append(("mem_gb_per_node", share, f"one CPU's share of the smallest node's RealMemory ({mem_mb} MB / "
                                            f"{cpus} CPUs), rounded: a job asks for what it needs, not the node"))
    e.append(("env.OMP_NUM_THREADS", str({k: v for k, v, _ in e}["cpus_per_task"]), "threads per process = cpus_per_task"))
    venv = repo / ".venv" / "bin" / "activate"
    if venv.is_file():
        e.append(("setup", [f'source "{repo / ".venv" / "bin" / "activate"}"'],
                  "this checkout's own virtualenv (found at .venv)"))
    else:
        e.append(("setup", None, f"no virtualenv at {repo / '.venv'}: add the lines that make python find the "
                                 f"project's packages on the nodes"))
    if cfg.get("MaxArraySize", "").isdigit():
        e.append(("max_array_size", int(cfg["MaxArraySize"]), "MaxArraySize (scontrol show config)"))
    limits = facts["qos_limits"]
    mine = [limits[q] for qs in (accounts or {}).values() for q in qs if q in limits]
    if mine:
        e.append(("max_jobs_per_user", min(mine), "MaxSubmitJobsPerUser of your QOS (sacctmgr show qos)"))
    else:
        e.append(("max_jobs_per_user", None, f"no per-user job limit found (sacctmgr show qos); the whole cluster "
                                             f"holds MaxJobCount={cfg.get('MaxJobCount', '?')} jobs"))
    most = part.get("MaxNodes", "")
    total = int(part.get("TotalNodes", len(nodes)) or len(nodes))
    e.append(("max_nodes", int(most) if most.isdigit() else total,
              f"MaxNodes={most} of partition {pname}" + ("" if most.isdigit() else f", so its {total} nodes")))
    e.append(("signal_s_before_timeout", 120, "the project's default: Slurm signals a job this long before its "
                                              "time limit, for the last checkpoint"))
    e.append(("max_requeues", 3, "the project's default: requeues after a preemption or time limit"))
    e.append(("task_start_s", 20, "the project's default seconds an array task spends starting; measure it with "
                                  "bench/sensitivity_scan.py"))
    limit = minutes(part.get("MaxTime", ""))
    e.append(("# MaxTime", None, f"partition {pname} allows {limit} minutes per job" if limit else
              f"partition {pname} has no time limit"))
    from core.config.cluster import RetryPolicy

    for key, field in RetryPolicy.model_fields.items():  # the retry policy (docs/failures.md), spelled out
        e.append((f"retry.{key}", field.default, f"the project's default: {field.description}"))
    if all(_loopback(n.get("NodeAddr") or n.get("NodeName", "")) for n in nodes):
        e.append(("loopback_rendezvous", True, "every node's NodeAddr is a loopback address: the nodes are this "
                                               "one host"))
    return e


def render_yaml(entries: list[tuple[str, Any, str]], header: str) -> str:
    """The entries as YAML with a comment on every value; dotted keys go into their section (slurm:, env:)."""
    lines = [f"# {ln}" if ln else "#" for ln in header.splitlines()]
    sections: dict[str, list[tuple[str, Any, str]]] = {}
    order: list[str] = []
    for key, value, why in entries:
        top = key.split(".")[0]
        if top not in sections:
            order.append(top)
        sections.setdefault(top, []).append((key, value, why))
    for top in order:
        items = sections[top]
        if top.startswith("#"):
            lines += [f"# {why}" for _, _, why in items]
            continue
        if "." in items[0][0]:
            if all(v is None for _, v, _ in items):
                lines.append(f"# {top}:")
            else:
                lines.append(f"{top}:")
            for key, value, why in items:
                sub = key.split(".", 1)[1]
                lines.append(_line(f"  {sub}", value, why))
            continue
        key, value, why = items[0]
        lines.append(_line(key, value, why))
    return "\n".join(lines) + "\n"


def _line(key: str, value: Any, why: str) -> str:
    indent = len(key) - len(key.lstrip())
    if value is None:
        return f"{' ' * indent}# {key.strip()}:  # {why}"
    return f"{key}: {json.dumps(value)}  # {why}"


def write_profile(name: Optional[str], partition: Optional[str], repo: Path) -> str:
    facts = read_cluster(partition)
    facts["chosen_by_user"] = bool(partition)
    header = (f"Written by launchers/cluster_profile.py from Slurm cluster {facts['config'].get('ClusterName', '?')} on "
              f"{time.strftime('%Y-%m-%d %H:%M')} for user {facts['user']}.\n"
              f"Review every value (each comment says where it came from) before the first submission;\n"
              f"check it with: python launchers/submit.py jobs/tiny/smoke.yaml -c <this file> --dry-run")
    return render_yaml(profile_entries(facts, name, repo), header)
