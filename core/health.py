"""Node health before the rendezvous of a multi-node job (core.engine.start calls it; docs/hangs.md).

Before the process group: each rank checks its device (binds it and runs one small computation: core.runtime's
`device_check`; a CPU profile has no device to check and says so) and, on every node but the first, that the
rendezvous address answers (one TCP connection to MASTER_ADDR:MASTER_PORT with a short timeout: a refused connection
still proves the host is reachable, since the first node opens the port only when it reaches the rendezvous).
A rank whose check fails prints `[medhpc] failure node: <node>: <what failed>` (core.failure_mark) and exits 1
(srun's --kill-on-bad-exit ends the other ranks, so none waits at the rendezvous for it).
After the rendezvous, before the model loads: one small all-reduce, timed, in which every rank adds a one-hot vector
(so a rank whose contribution went missing or doubled is named), and the ranks' findings gathered; rank 0 writes
them to `<run dir>/health/<job>.json`.

A failing rank decides right there (core.retry.in_task, the first rank of the failing node): with the profile's
`retry.node: requeue` it requeues its own job with the node excluded, or stops when the job's partition has no
usable node left to replace it; the decision is in `<run dir>/retries/`. A node that cannot reach the rendezvous
host is named with the mark but does not decide: the host may be the sick one (the `--wait` watcher decides).

Test hook, inert unless set: MEDHPC_FAULT=health@<node> makes the check fail on that node; health@first-run on
whatever node the job's first run (restart 0) lands on. Only the hook runs for a single-node job (`fault_point`):
the checks themselves are for multi-node jobs.
"""
from __future__ import annotations

import logging
import socket
import sys
import time
from typing import Any, Optional

from core import failure_mark
from core.run_folder import write_json_atomic
from core.watchdog import faults, safe_name

log = logging.getLogger("health")
CONNECT_TIMEOUT_S = 5.0


class NodeUnhealthy(SystemExit):
    """Raised (exit code 1) after the node mark is printed."""


def fail(host: str, what: str, ctx=None) -> None:
    """Print the node mark and end this rank (exit 1). With the task's context on a scheduler that requeues, the
    first rank of this node also decides with the retry policy (requeue off this node, or stop) first."""
    log.error("node %s failed its health check: %s", host, what)
    cause = f"{host}: {what}"
    if ctx is not None and ctx.requeues:
        from core import retry

        try:
            retry.in_task(ctx, "node", cause, node=host, decides=ctx.dist.local_rank == 0)
        except Exception as e:  # deciding must never hide why the task fails
            print(f"[retry] could not decide in the task: {type(e).__name__}: {e}", flush=True)
    else:
        failure_mark.report("node", cause)
    sys.stdout.flush()
    raise NodeUnhealthy(1)


def fault_point(host: str, ctx=None) -> None:
    """The test hook (MEDHPC_FAULT=health@<host> or health@first-run): fail this node's check on purpose."""
    from core.runtime import restart_count

    for point in (f"health@{host}", "health@first-run"):
        if point in faults() and (point != "health@first-run" or restart_count() == 0):
            fail(host, f"health check failed (injected by MEDHPC_FAULT={point})", ctx)


def reach(addr: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> tuple[bool, str]:
    """Whether this node reaches the rendezvous host: (ok, what happened)."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            pass
        return True, f"{addr}:{port} open ({1000 * (time.perf_counter() - t0):.1f} ms)"
    except ConnectionRefusedError:
        return True, f"{addr}:{port} answers (refused: not listening yet) ({1000 * (time.perf_counter() - t0):.1f} ms)"
    except socket.gaierror as e:
        return False, f"the rendezvous address {addr} does not resolve: {e}"
    except (socket.timeout, TimeoutError):
        return False, f"no answer from the rendezvous address {addr}:{port} within {timeout:g} s"
    except OSError as e:
        return False, f"cannot reach the rendezvous address {addr}:{port}: {e.strerror or e}"


def before_rendezvous(dist, acc, host: str, ctx=None) -> tuple[Any, dict]:
    """The device and the rendezvous address, checked on this rank; returns (the bound device, the findings).
    Ends the process with the node mark (and the retry decision, given the task's context) when a check fails."""
    from core.runtime import activate, device_check

    found: dict = {"rank": dist.rank, "host": host}
    fault_point(host, ctx)
    try:
        found["device"] = device_check(acc)
    except Exception as e:  # whatever the driver raises: the node is not usable
        fail(host, f"device check of {acc.device} failed: {' '.join(str(e).split())[:300]}", ctx)
    if dist.node_rank == 0:
        found["rendezvous"] = "this node hosts it"
    else:
        ok, what = reach(dist.master_addr, dist.master_port)
        if not ok:
            # this node or the rendezvous host may be the sick one: named with the mark, not decided here (every
            # node that cannot reach the host would otherwise requeue the job with itself excluded)
            fail(host, what)
        found["rendezvous"] = what
    return activate(acc), found


def after_rendezvous(dist, device, host: str, found: dict, run_dir, job_id: str, ctx=None) -> Optional[dict]:
    """One timed all-reduce of one-hot vectors, then the findings gathered (rank 0 writes and returns them)."""
    import torch
    import torch.distributed as tdist

    world = dist.world_size
    vec = torch.zeros(world, dtype=torch.float32, device=device)
    vec[dist.rank] = 1.0
    t0 = time.perf_counter()
    tdist.all_reduce(vec)
    got = vec.cpu().tolist()  # waits for the device
    ms = 1000 * (time.perf_counter() - t0)
    found["allreduce_ms"] = round(ms, 3)
    everyone: list = [None] * world
    tdist.all_gather_object(everyone, found)
    bad = [r for r, v in enumerate(got) if v != 1.0]
    if bad:
        hosts = {f["rank"]: f["host"] for f in everyone if f}
        names = sorted({hosts.get(r, "?") for r in bad})
        if host in names:
            fail(host, f"all-reduce check: ranks {bad} contributed {[got[r] for r in bad]} instead of 1", ctx)
        raise NodeUnhealthy(1)
    if dist.rank != 0:
        return None
    record = {"job": job_id, "world_size": world, "allreduce_ms": max(f["allreduce_ms"] for f in everyone),
              "ranks": everyone}
    write_json_atomic(run_dir / "health" / f"{safe_name(job_id)}.json", record)
    log.info("health: %d ranks on %d nodes ok; all-reduce over %d ranks in %.1f ms", world, dist.num_nodes, world,
             record["allreduce_ms"])
    return record
