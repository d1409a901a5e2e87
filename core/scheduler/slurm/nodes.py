"""What the retry policy asks Slurm before it requeues a job kept off a node (core.retry): how many nodes the job
needs and which nodes of its partition could still run it. One `scontrol show job`, one `sinfo` of the partition
and, for a node list, one `scontrol show hostnames`."""
from __future__ import annotations

import re
from typing import Optional

# sinfo's short states of a node that cannot take a job now (a trailing '*' means not responding: unusable too)
UNUSABLE = ("down", "drain", "drng", "fail", "maint", "inval", "unk", "futr", "npc", "pow", "reboot", "blocked")


def hostnames(nodes: str) -> list[str]:
    """A Slurm hostlist ('n[1-2],g07') as node names; the text split on commas when scontrol cannot expand it."""
    from core.scheduler.slurm.commands import call

    if not nodes:
        return []
    code, out = call(["scontrol", "show", "hostnames", nodes], timeout=30)
    if code != 0:
        return [n for n in nodes.split(",") if n]
    return [ln.strip() for ln in out.splitlines() if ln.strip()]


def usable(state: str) -> bool:
    """A node in this sinfo short state (%t) can take a job."""
    state = state.strip().lower()
    return bool(state) and not state.endswith("*") and not state.startswith(UNUSABLE)


def nodes_left(job_id: str, exclude: str) -> Optional[tuple[int, list[str]]]:
    """(nodes the job needs, usable nodes of its partition(s) not in `exclude`); None when Slurm does not say
    (the job is gone from slurmctld's memory, or a client fails)."""
    from core.scheduler.slurm.commands import call

    code, out = call(["scontrol", "show", "job", "-o", job_id], timeout=30)
    need = re.search(r"\bNumNodes=(\d+)", out) if code == 0 else None
    part = re.search(r"\bPartition=(\S+)", out) if code == 0 else None
    if not need or not part:
        return None
    code, out = call(["sinfo", "-h", "-N", "-p", part.group(1), "-o", "%N %t"], timeout=30)
    if code != 0:
        return None
    off = set(hostnames(exclude))
    left: dict[str, bool] = {}
    for line in out.splitlines():
        name, _, state = line.strip().partition(" ")
        if name and name not in off:
            left[name] = left.get(name, False) or usable(state)
    return int(need.group(1)), sorted(n for n, ok in left.items() if ok)
