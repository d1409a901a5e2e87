"""Faults on purpose, for the failure-class tests (tests/test_failures.py): off unless MEDHPC_FAULT lists this point.

MEDHPC_FAULT holds `;`-separated entries `<fault>@<point>:<value>`; the smoke workload asks at the point `item`
with each array item, so one array job can fail each task a different way:

  MEDHPC_FAULT="exception@item:0;data@item:1;comm@item:3" python launchers/submit.py jobs/tiny/smoke_array.yaml ...

What each fault does, and how real it is on a CPU-only test cluster:
  exception   raises a ValueError in the workload                                  (real)
  data        raises our DatasetError                                              (real)
  comm        a real gloo collective timeout against a peer that never joins      (real, 3 s)
  cancel      the task cancels its own job through the scheduler                  (real)
  device_oom  raises with CUDA's out-of-memory message                              (the text only: no GPU here)
  host_oom    writes slurmstepd's oom-kill notice, raises MemoryError             (the text only: no cgroup limit)
  node        prints the node health check's failure mark, then raises           (the mark the check prints)
  hang        prints the hang watchdog's failure mark, then raises               (the mark the watchdog prints)
The existing `kill@` / `fail@` points of core.runtime.fault_point are separate (one exact entry).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

FAULTS = ("exception", "data", "comm", "cancel", "device_oom", "host_oom", "node", "hang")


def wanted(point: str, value) -> str:
    """The fault MEDHPC_FAULT asks for at this point and value; '' for none."""
    for entry in os.environ.get("MEDHPC_FAULT", "").split(";"):
        fault, _, where = entry.strip().partition("@")
        if fault in FAULTS and where == f"{point}:{value}":
            return fault
    return ""


_PEER = ("import datetime, time, torch.distributed as d\n"
         "d.init_process_group('gloo', init_method='tcp://127.0.0.1:{port}', rank=1, world_size=2, "
         "timeout=datetime.timedelta(seconds=120))\n"
         "d.new_group([0, 1], timeout=datetime.timedelta(seconds={seconds}))\ntime.sleep(60)\n")


def _gloo_timeout(seconds: float = 3.0) -> None:
    """A real gloo timeout: a 2-rank group whose peer joins the group but never the all-reduce. The rendezvous has
    a long timeout (the peer imports torch first: seconds on a loaded node), the group of the all-reduce a short one."""
    import datetime

    import torch
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = subprocess.Popen([sys.executable, "-c", _PEER.format(port=port, seconds=seconds)])
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2,
                                timeout=datetime.timedelta(seconds=120))
        group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=seconds))
        dist.all_reduce(torch.ones(1), group=group)
    finally:
        peer.kill()


def inject(point: str, value, node: str = "", job_ref: str = "") -> None:
    """Fail here the way MEDHPC_FAULT asks (nothing when it does not name this point and value)."""
    fault = wanted(point, value)
    if not fault:
        return
    where = f"{point} {value}"
    if fault == "exception":
        raise ValueError(f"[fault] injected exception at {where}")
    if fault == "data":
        from core.errors import DatasetError

        raise DatasetError("data.path", f"[fault] injected at {where}: labels.csv line 7 has no label")
    if fault == "comm":
        _gloo_timeout()
        raise RuntimeError("[fault] the gloo peer answered: no timeout happened")
    if fault == "cancel":
        from core import scheduler

        sched = scheduler.in_task()
        if sched is not None:
            sched.cancel([job_ref])
        time.sleep(120)  # the scheduler ends the task meanwhile
        raise RuntimeError(f"[fault] cancel at {where}: the task was not cancelled")
    if fault == "device_oom":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity; 77.90 GiB "
                           f"already allocated) [fault: injected text at {where}]")
    if fault == "host_oom":
        print(f"slurmstepd: error: Detected 1 oom-kill event(s) in StepId={job_ref}.batch. Some of your processes "
              f"may have been killed by the cgroup out-of-memory handler. [fault: injected text at {where}]",
              file=sys.stderr, flush=True)
        raise MemoryError(f"[fault] injected host OOM at {where}")  # the notice decides; an exception (not a
        # SIGKILL) leaves submitit's result file, so --wait does not wait 15 s for one that never comes
    from core import failure_mark

    if fault == "node":
        failure_mark.report("node", f"{node or socket.gethostname()}: [fault] injected health-check failure at "
                                    f"{where}: all-reduce of 4 bytes took 31.0 s (limit 10 s)")
    else:
        failure_mark.report("hang", f"[fault] injected at {where}: no step ended within 30 s (p95 step 0.2 s)")
    raise RuntimeError(f"[fault] {fault} at {where}: the task ends after its failure mark")
