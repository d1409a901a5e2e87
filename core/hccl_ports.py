"""Wait until HCCL's host ports on this node are free (Ascend, before the process group starts).

HCCL binds `count` consecutive host ports from `HCCL_IF_BASE_PORT` (core.runtime gives each job one window). A
Slurm requeue keeps the job id, so the requeued job gets the same window; landing on the same node right after the
previous attempt was killed, Ascend's HCCP may still hold those ports for a while, and HCCL's init would fail with
a bind error. Here each port is probed by binding a TCP socket without SO_REUSEADDR (a live listener, another
process's socket or a connection still closing makes the bind fail) and closing it at once; while any is busy we
wait, up to the profile's `hccl_port_wait_s`. Imports nothing beyond the standard library.
"""
from __future__ import annotations

import errno
import socket
import time
from typing import Callable

REPROBE_S = 0.005  # a sibling rank's own probe holds a port for microseconds: one failed bind is tried once more


def _bind_fails(host: str, port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, port))  # no SO_REUSEADDR: any socket on the port (listening, connected or closing) refuses
        return False
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            return True
        raise
    finally:
        s.close()


def busy_ports(base: int, count: int = 16, host: str = "0.0.0.0") -> list[int]:
    """The ports of base .. base + count - 1 that cannot be bound now. A port whose first bind fails is probed once
    more a few ms later, so another rank probing the same window at the same instant does not count as busy."""
    first = [p for p in range(base, base + count) if _bind_fails(host, p)]
    if not first:
        return []
    time.sleep(REPROBE_S)
    return [p for p in first if _bind_fails(host, p)]


def _ranges(ports: list[int]) -> str:
    """[60000, 60001, 60002, 60005] -> '60000-60002, 60005'"""
    out, start = [], None
    for i, p in enumerate(ports):
        start = p if start is None else start
        if i + 1 == len(ports) or ports[i + 1] != p + 1:
            out.append(str(p) if p == start else f"{start}-{p}")
            start = None
    return ", ".join(out)


def wait_for_ports(base: int, count: int = 16, *, timeout_s: float, poll_s: float = 1.0,
                   log: Callable[[str], None] = print, host: str = "0.0.0.0") -> float:
    """Block until every port of base .. base + count - 1 can be bound on this node; seconds waited (0.0, and no log
    line, when they are free at once). One line when waiting starts (which ports, why, how long at most) and one
    when they are free; a RuntimeError naming the ports, the node and the fix when they are still busy at
    `timeout_s`."""
    start = time.monotonic()
    busy = busy_ports(base, count, host)
    if not busy:
        return 0.0
    node = socket.gethostname()
    log(f"HCCL host ports {_ranges(busy)} (HCCL_IF_BASE_PORT={base}, {count} ports) are busy on {node}: Ascend's "
        f"HCCP may still hold them after the previous attempt of this job on this node; waiting up to "
        f"{timeout_s:g} s for their release (profile hccl_port_wait_s)")
    while True:
        waited = time.monotonic() - start
        if waited >= timeout_s:
            raise RuntimeError(
                f"HCCL host ports {_ranges(busy)} (HCCL_IF_BASE_PORT={base}) on node {node} were still busy after "
                f"{waited:.1f} s (the cluster profile's hccl_port_wait_s: {timeout_s:g}). Fix: raise "
                f"hccl_port_wait_s if HCCP releases them later than that, or set another hccl_if_base_port in the "
                f"profile if something else on the node owns these ports")
        time.sleep(max(0.0, min(poll_s, timeout_s - waited)))
        busy = busy_ports(base, count, host)
        if not busy:
            waited = time.monotonic() - start
            log(f"HCCL host ports {base}-{base + count - 1} are free on {node} after {waited:.1f} s")
            return waited
