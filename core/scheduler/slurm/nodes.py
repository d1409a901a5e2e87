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


def job_fields(job_id: str) -> dict[str, str]:
    """NumNodes, Partition and ExcNodeList of a job as slurmctld holds it ({} when it does not answer)."""
    from core.scheduler.slurm.commands import call

    code, out = call(["scontrol", "show", "job", "-o", job_id], timeout=30)
    if code != 0:
        return {}
    found = {}
    for key in ("NumNodes", "Partition", "ExcNodeList"):
        m = re.search(rf"\b{key}=(\S+)", out)
        if m and m.group(1) != "(null)":
            found[key] = m.group(1)
    return found


def excluded_with(job_id: str, nodes: str) -> str:
    """The job's exclusion list after also keeping it off `nodes`: what it already excludes (an earlier retry's
    node) plus these, so a second exclusion does not undo the first."""
    before = job_fields(job_id).get("ExcNodeList", "")
    return ",".join(dict.fromkeys(hostnames(before) + hostnames(nodes)))


def nodes_left(job_id: str, exclude: str) -> Optional[tuple[int, list[str]]]:
    """(nodes the job needs, usable nodes of its partition(s) neither in `exclude` nor already excluded from the
    job); None when Slurm does not say (the job is gone from slurmctld's memory, or a client fails)."""
    from core.scheduler.slurm.commands import call

    job = job_fields(job_id)
    need = re.match(r"\d+", job.get("NumNodes", ""))
    if not need or not job.get("Partition"):
        return None
    code, out = call(["sinfo", "-h", "-N", "-p", job["Partition"], "-o", "%N %t"], timeout=30)
    if code != 0:
        return None
    off = set(hostnames(exclude)) | set(hostnames(job.get("ExcNodeList", "")))
    left: dict[str, bool] = {}
    for line in out.splitlines():
        name, _, state = line.strip().partition(" ")
        if name and name not in off:
            left[name] = left.get(name, False) or usable(state)
    return int(need.group(0)), sorted(n for n, ok in left.items() if ok)
