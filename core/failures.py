"""Why a job or array task failed: one class and a one-line cause, for status, `submit.py --wait`, the retry
policy (core.retry) and a study's folded line.

A person on a shared cluster needs two things from a failed task before reading any log: is it mine (a bug, bad
data: fix and resubmit) or the cluster's (a node, the network, a time limit, a preemption: retry), and where. So
every finished task gets exactly one class, decided in this order (first match wins):

1. what the scheduler ended from outside, which the task's log cannot know: time limit, preemption, node failure,
   host out of memory, a dependency that failed, a cancel (by whom). The scheduler reads its own accounting words
   (core.scheduler: `classify_end`; Slurm's in core/scheduler/slurm/ends.py). A cancelled task whose log carries a
   failure mark is the exception: a watchdog that stops every rank of a hung job cancels its own job after saying
   why, so the mark wins there;
2. the task's own failure mark (core.failure_mark: `[medhpc] failure <class>: <cause>`): a task that knows why it
   ends (hang watchdog, node health check, a data error) says so, and that beats any guess from the text;
3. the log's text, most specific first: device out of memory (CUDA / NPU), communication failure or timeout
   (NCCL, HCCL / HCCP, gloo, torch.distributed), data error (our DatasetError / FieldError), any other Python
   exception (the exception line and the file:line where it was raised);
4. else `unknown`, with the exit code.

Only the log lines of the task's LAST attempt count (a requeued job appends to its log; an earlier attempt's mark
or error is history, not the cause). Reading is local: the task's own log files, no extra scheduler call (the
accounting comes from the one sacct call status already makes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from core import failure_mark
from core.scheduler import TaskEnd
from core.secrets_guard import redact

CLASSES = {  # class -> what it means for the person (docs/failures.md has the detail)
    "timeout": "reached its time limit",
    "preempted": "preempted by a higher-priority job",
    "node": "a node failed (or failed its health check)",
    "host_oom": "host memory exhausted",
    "device_oom": "device (GPU / NPU) memory exhausted",
    "comm": "communication failure or timeout between ranks",
    "hang": "no progress: stopped by the hang watchdog",
    "exception": "a Python exception in the workload (a bug)",
    "data": "bad input data (DatasetError / FieldError)",
    "cancelled": "cancelled by a person",
    "dependency": "never ran: a step it waits for failed",
    "unknown": "failed, nothing in accounting or the log says why",
}
WORKLOAD_FAULTS = ("exception", "data")  # the user's to fix: never retried, whatever a profile says

_ATTEMPT_START = re.compile(r"submitit INFO .* - Starting with JobEnvironment")
_RANK = re.compile(r"^\[rank\d+\]:\s?")
_DEVICE_OOM = re.compile(r"(CUDA|NPU|HIP|XPU) out of memory|OutOfMemoryError|ACL_ERROR_RT_MEMORY_ALLOCATION"
                         r"|CUBLAS_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation", re.I)
_COMM = re.compile(r"\bNCCL error|\bHccl[A-Z]\w*.*error|nccl(System|Internal|Remote|UnhandledCuda|InvalidUsage)Error"
                   r"|ProcessGroupNCCL.*(timeout|Timeout|error)|Watchdog caught collective operation timeout"
                   r"|\bHCC[LP]\b.*(error|fail|timeout|time out)|\bEI000[0-9]"
                   r"|third_party/gloo/.*(Timed out|Connection (closed|reset|refused)|Read error|Socket)"
                   r"|\bgloo\b.*(timed out|Timed out|Connection closed|connection reset)"
                   r"|DistBackendError|DistNetworkError|DistStoreError|RendezvousTimeoutError"
                   r"|RendezvousConnectionError", re.I)
_EXC = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Failure|Fault|Exit)|([a-z_]\w*\.)+[A-Z]\w*)(:\s|$)")
_PREEMPTED = re.compile(r"^([\w.]*\.)?Preempted(:|$)")  # core.engine: the stop signal came, no requeue left
_DATA_EXC = re.compile(r"^([\w.]*\.)?(DatasetError|FieldError)(:|$)")
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)')


@dataclass(frozen=True)
class Failure:
    """One failed task's class and cause; `node` is the node to keep a retry off (class node), `source` says who
    decided it: 'scheduler' (accounting), 'mark' (the task's own line), 'log' (its text) or 'exit' (nothing else)."""
    klass: str
    cause: str
    source: str
    node: str = ""

    def __post_init__(self):  # log text is untrusted: one line, token shapes hidden, control characters escaped
        object.__setattr__(self, "cause", redact(" ".join(str(self.cause).split()), 300))

    def line(self) -> str:
        return f"{self.klass}: {self.cause}"

    def as_dict(self) -> dict:
        return {"class": self.klass, "cause": self.cause, "source": self.source, "node": self.node or None}


def last_attempt(lines: list[str]) -> list[str]:
    """The lines of a log's last attempt (from the last 'Starting with JobEnvironment' of submitit on)."""
    starts = [i for i, ln in enumerate(lines) if _ATTEMPT_START.search(ln)]
    return lines[starts[-1]:] if starts else lines


def _short_path(path: str) -> str:
    from core.run_folder import REPO

    try:
        return str(Path(path).relative_to(REPO)) if Path(path).is_absolute() else path
    except ValueError:
        return path


def exception_at(lines: list[str], want=_EXC) -> Optional[tuple[str, str]]:
    """(exception line, 'file:line in function' where it was raised) of the last traceback in these lines whose
    exception line matches `want`; None when there is none."""
    clean = [_RANK.sub("", ln).rstrip() for ln in lines]
    for i in range(len(clean) - 1, -1, -1):
        text = clean[i].strip()
        if not want.match(text) or clean[i].startswith((" ", "\t")):
            continue
        where = ""
        for j in range(i - 1, max(-1, i - 400), -1):
            m = _FRAME.match(clean[j])
            if m:
                where = f"{_short_path(m.group('file'))}:{m.group('line')} in {m.group('fn')}"
                break
            if clean[j].startswith("Traceback"):
                break
        return text[:200], where
    return None


def _node_of(cause: str) -> str:
    """The node a mark of class node names first ('n2: rendezvous ... unreachable' -> 'n2')."""
    m = re.match(r"([A-Za-z0-9][\w.\-\[\],]*)[:\s]", cause)
    return m.group(1).rstrip(":,") if m else ""


def from_log(lines: list[str]) -> Optional[Failure]:
    """The class the task's own log gives: its failure mark, else what its text shows (device OOM, communication,
    data error, exception); None when the log says nothing that looks like a failure."""
    text = "\n".join(_RANK.sub("", ln) for ln in lines)
    marked = failure_mark.find(text)
    if marked:
        klass, cause = marked
        return Failure(klass, cause, "mark", _node_of(cause) if klass == "node" else "")
    for ln in reversed(lines):
        if _DEVICE_OOM.search(ln):
            return Failure("device_oom", _RANK.sub("", ln).strip()[:200], "log")
    for ln in lines:  # the first one: later ranks' and layers' lines are its fallout
        if _COMM.search(ln):
            return Failure("comm", _RANK.sub("", ln).strip()[:200], "log")
    stopped = exception_at(lines, _PREEMPTED)
    if stopped:  # the time-limit (or preemption) signal came, the checkpoint was saved, the requeues were spent
        return Failure("timeout", stopped[0], "log")
    data = exception_at(lines, _DATA_EXC)
    if data:
        return Failure("data", data[0] + (f" (at {data[1]})" if data[1] else ""), "log")
    exc = exception_at(lines)
    if exc:
        return Failure("exception", exc[0] + (f" (at {exc[1]})" if exc[1] else ""), "log")
    return None


def classify(end: TaskEnd, lines: list[str], sched=None) -> Failure:
    """The class and cause of one finished, failed task: `end` is how the scheduler accounted it, `lines` its own
    log lines (every rank's), `sched` the scheduler that ran it (it reads its own accounting words)."""
    every, lines = lines, last_attempt(lines)
    said = sched.classify_end(end, lines) if sched is not None else None
    if said and said[0] == "node" and len(said) == 2:  # srun's 'Node failure on n2' is in the batch rank's log,
        named = sched.classify_end(end, every)         # which the other ranks' attempt lines may follow
        said = named if named and len(named) > 2 else said
    if said and said[0] == "cancelled":
        marked = from_log(lines)  # a task that marked its end and then cancelled its own job (a watchdog ending
        if marked is not None and marked.source == "mark":  # every rank of a hung job): its mark says why
            return marked
    if said:
        klass, cause = said[:2]
        node = (said[2] if len(said) > 2 else end.nodes) if klass == "node" else ""  # the failed node, when known
        return Failure(klass, cause, "scheduler", node)
    found = from_log(lines)
    if found:
        return found
    code = sched.exit_text(end) if sched is not None else ""
    state = end.state.split()[0] if end.state else "FAILED"
    return Failure("unknown", f"{state}" + (f", {code}" if code else "") + ", no error line in its log", "exit")

