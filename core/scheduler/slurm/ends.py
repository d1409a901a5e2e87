"""How a Slurm job or array task ended, in the failure classes of core.failures: what Slurm's accounting says (State,
ExitCode, Reason, DerivedExitCode, NodeList from the one sacct call of a status refresh) and the lines Slurm itself
writes into a task's log (slurmstepd's `*** ... CANCELLED ... DUE TO TIME LIMIT ***`, the cgroup oom-kill notice).

Slurm's words, as the local cluster (Slurm 23+) and the sacct / squeue man pages show them:
  TIMEOUT                                  -> timeout
  PREEMPTED                                -> preempted
  NODE_FAIL                                -> node (NodeList names the allocation; srun's 'error: Node failure on
                                              n2' in the task's log names the node that failed)
  OUT_OF_MEMORY, 'Detected N oom-kill'     -> host_oom
  CANCELLED by <uid>                       -> cancelled (by that user)
  CANCELLED, never started, Reason Dependency / DependencyNeverSatisfied (kill_on_invalid_dep: slurmctld cancels
  it, sacct keeps the last pending reason, 'Dependency'; scontrol says DependencyNeverSatisfied) -> dependency
Anything else (FAILED, a plain CANCELLED of a job that ran) is left to the task's own log (None here).
"""
from __future__ import annotations

import pwd
import re
from typing import Optional

from core.scheduler.base import TaskEnd

_BY = re.compile(r"^CANCELLED by (\d+)")
_STEPD_END = re.compile(r"\*\*\* (JOB|STEP) \S+ ON (\S+) CANCELLED AT \S+ DUE TO (TIME LIMIT|PREEMPTION|NODE FAILURE)")
_OOM_KILL = re.compile(r"Detected (\d+) oom[-_]kill event")
_SRUN_NODE_FAIL = re.compile(r"srun: error: Node failure on (\S+)")  # srun names the node that failed


def _user(uid: str) -> str:
    try:
        return f"{pwd.getpwuid(int(uid)).pw_name} (uid {uid})"
    except (KeyError, ValueError):
        return f"uid {uid}"


def _code(text: str) -> tuple[int, int]:
    code, _, sig = (text or "0:0").partition(":")
    try:
        return int(code or 0), int(sig or 0)
    except ValueError:
        return 0, 0


def exit_text(end: TaskEnd) -> str:
    """'exit code 3', 'killed by signal 9' (the script's, else its steps' highest), '' when both are 0:0."""
    for value in (end.exit_code, end.derived_exit_code):
        code, sig = _code(value)
        if sig:
            return f"killed by signal {sig}"
        if code:
            return f"exit code {code}"
    return ""


def classify(end: TaskEnd, lines: list[str]) -> Optional[tuple]:
    """(class, cause) that Slurm's own record of the task says, or None when it only says 'failed' (the task's log
    then tells why). `lines` are the task's log lines (for slurmstepd's own end line, the oom-kill notice and srun's
    `Node failure on <node>`). A NODE_FAIL whose failed node srun named gives (class, cause, that node)."""
    state = end.state.split()[0].rstrip("+") if end.state else ""
    where = f" on {end.nodes}" if end.nodes else ""
    if state == "TIMEOUT":
        return "timeout", f"reached its time limit{where} (Slurm TIMEOUT)"
    if state == "PREEMPTED":
        return "preempted", f"preempted by a higher-priority job{where} (Slurm PREEMPTED)"
    if state == "NODE_FAIL":  # NodeList is the whole allocation: which node failed, srun's own line says (or, for
        # the retry, the node states: unhealthy)
        named = [m.group(1) for ln in lines for m in [_SRUN_NODE_FAIL.search(ln)] if m]
        if named:  # the last one: the attempt that ended NODE_FAIL
            return "node", f"node {named[-1]} failed (Slurm NODE_FAIL on {end.nodes or '?'}; srun: Node failure " \
                           f"on {named[-1]})", named[-1]
        one = end.nodes and not re.search(r"[\[,]", end.nodes)
        return "node", (f"node {end.nodes} failed" if one else f"a node of {end.nodes or '?'} failed") + \
            " (Slurm NODE_FAIL)"
    if state == "OUT_OF_MEMORY":
        return "host_oom", f"host memory exhausted{where} (Slurm OUT_OF_MEMORY: the job's --mem was too small)"
    oom = [m for ln in lines for m in [_OOM_KILL.search(ln)] if m]
    if oom and state in ("FAILED", "CANCELLED"):
        return "host_oom", f"killed by the out-of-memory handler{where} ({oom[-1].group(1)} oom-kill event(s))"
    if state == "CANCELLED":
        by = _BY.match(end.state)
        # kill_on_invalid_dep: slurmctld cancels it (no 'by' on this Slurm; sacct keeps Reason 'Dependency', or
        # 'None' when the dependency failed before a scheduling pass had set one) or the reason says so outright; a
        # person cancelling a job that waited for its dependency says 'by <uid>'
        if not end.started and (end.reason == "DependencyNeverSatisfied"
                                or (end.reason in ("Dependency", "None", "") and not by)):
            return "dependency", "never ran: a job it depends on (afterok) failed (DependencyNeverSatisfied)"
        stepd = [m for ln in lines for m in [_STEPD_END.search(ln)] if m]
        if stepd:  # slurmstepd's own word beats a plain CANCELLED (a time limit during the grace time)
            kind = {"TIME LIMIT": "timeout", "PREEMPTION": "preempted", "NODE FAILURE": "node"}[stepd[-1].group(3)]
            return kind, f"{stepd[-1].group(3).lower()} on {stepd[-1].group(2)} (slurmstepd)"
        who = _user(by.group(1)) if by else "the scheduler or an administrator"
        ran = "" if end.started else " while pending"
        return "cancelled", f"cancelled by {who}{ran}{where}"
    return None


def unhealthy(nodes: str) -> str:
    """Those of `nodes` (a hostlist) that Slurm holds down, drained, failing or not responding now, as a hostlist
    ('' when none, or when sinfo does not answer): what a requeue after NODE_FAIL keeps off. (sinfo -t knows `fail`,
    which also matches a FAILING node, and refuses the word `failing`: asking for it made every call fail.)"""
    from core.scheduler.slurm.commands import call

    if not nodes:
        return ""
    code, out = call(["sinfo", "-h", "-N", "-n", nodes, "-t", "down,drain,draining,fail,no_respond",
                      "-o", "%N"], timeout=30)
    if code != 0:
        return ""
    return ",".join(dict.fromkeys(ln.strip() for ln in out.splitlines() if ln.strip()))
