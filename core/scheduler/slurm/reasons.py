"""Slurm's pending reasons (squeue's %R of a pending job) in plain words: what the job waits for and what, if
anything, a person can do about it. Codes not listed keep Slurm's own word; the families QOS* / Assoc* are named
by what they limit."""
from __future__ import annotations

import re

REASONS: dict[str, str] = {
    "Priority": "other jobs of higher priority go first",
    "Resources": "not enough free nodes (CPUs, memory or devices) for its size yet",
    "Dependency": "starts when the jobs it depends on have completed (afterok)",
    "DependencyNeverSatisfied": "will never start: a job it depends on failed or was cancelled; cancel it "
                                "(cancel.py) or finish with --resume-missing",
    "JobHeldUser": "held: submitted held until every job of its study or plan is queued, or held by you "
                   "(scontrol release <id> starts it)",
    "JobHeldAdmin": "held by an administrator: ask the cluster's admins",
    "BeginTime": "asked to start later: its begin time has not come",
    "QOSMaxGRESPerUser": "your QOS allows no more devices at once: waits for your other jobs to end",
    "QOSMaxCpuPerUserLimit": "your QOS allows no more CPUs at once: waits for your other jobs to end",
    "QOSMaxJobsPerUserLimit": "your QOS allows no more running jobs: waits for your other jobs to end",
    "QOSMaxNodePerUserLimit": "your QOS allows no more nodes at once: waits for your other jobs to end",
    "QOSGrpGRES": "the QOS's devices are all in use (a group limit): waits for other jobs of that QOS",
    "QOSMaxWallDurationPerJobLimit": "its time limit is over the QOS's maximum: it will not start; lower "
                                     "resources.time",
    "AssocGrpGRES": "the account's device limit is reached: waits for the group's other jobs to end",
    "AssocGrpCpuLimit": "the account's CPU limit is reached: waits for the group's other jobs to end",
    "AssocGrpJobsLimit": "the account's limit of running jobs is reached: waits for the group's other jobs",
    "AssocMaxJobsLimit": "your limit of running jobs in this account is reached: waits for your other jobs",
    "AssocGrpNodeLimit": "the account's node limit is reached: waits for the group's other jobs to end",
    "ReqNodeNotAvail": "a node it needs is not available (down, drained or reserved)",
    "PartitionDown": "its partition is down: it waits until the admins bring it up",
    "PartitionInactive": "its partition is inactive: it waits until the admins activate it",
    "PartitionNodeLimit": "it asks for more nodes than its partition allows: it will not start; lower "
                          "resources.nodes",
    "PartitionTimeLimit": "its time limit is over the partition's MaxTime: it will not start; lower resources.time",
    "NodeDown": "a node it needs is down",
    "BadConstraints": "no node has the features it asks for (constraint): it will not start",
    "Reservation": "its reservation has not started",
    "JobArrayTaskLimit": "the array's throttle (at most so many tasks at once) is reached",
    "launch failed requeued held": "its launch failed and Slurm held it: scontrol release <id> after a look at "
                                   "the node",
    "None": "about to be scheduled",
}

FAMILIES = [(re.compile(r"^QOS"), "a limit of your QOS is reached"),
            (re.compile(r"^Assoc"), "a limit of your account is reached")]


def explain(reason: str) -> str:
    """Plain words for one of squeue's reasons ('' for none). A reason of a running job (a node list) is kept."""
    reason = (reason or "").strip().strip("()")
    if not reason:
        return ""
    code = reason.split(",")[0].strip()
    if code in REASONS:
        return REASONS[code]
    if code.startswith("ReqNodeNotAvail"):
        return REASONS["ReqNodeNotAvail"]
    for pattern, words in FAMILIES:
        if pattern.match(code):
            return f"{words} ({code})"
    return code


def start_time(text: str) -> str:
    """squeue's %S of a pending job: an ISO time, or '' when Slurm has no estimate (N/A, Unknown, None)."""
    text = (text or "").strip()
    return text if re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", text) else ""
