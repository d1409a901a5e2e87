"""Who a task is, whatever scheduler started it: rank, world, local rank, node, hosts and the rendezvous address.
Each scheduler fills a DistEnv from its own variables (core/scheduler/slurm/env.py, core/scheduler/local/)."""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional


class DistEnvError(RuntimeError):
    """The scheduler handed the task an environment that cannot make a process group."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    job_id: str
    hosts: tuple[str, ...] = ()     # every node of the allocation, in the scheduler's order (the master first)

    def export(self, environ: Optional[dict] = None) -> None:
        environ = os.environ if environ is None else environ
        environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                       LOCAL_WORLD_SIZE=str(self.local_world_size), NODE_RANK=str(self.node_rank),
                       MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


MASTER_PORT_BASE, MASTER_PORT_SPAN = 20000, 40000


def master_port_for(job_id: str) -> int:
    """Deterministic per job (every rank computes the same), distinct for any two jobs whose ids differ by less
    than 40000, so jobs sharing a node never collide. Array tasks have their own job id."""
    return MASTER_PORT_BASE + int(re.sub(r"\D", "", job_id) or 0) % MASTER_PORT_SPAN


def single_process() -> DistEnv:
    """One process, no scheduler: rank 0 of 1 on this host."""
    import socket   # here, not at the top: status and cancel import this module and never need it

    return DistEnv(0, 1, 0, 1, 0, 1, "127.0.0.1", master_port_for(str(os.getpid())), str(os.getpid()),
                   (socket.gethostname(),))


# What torchrun habits or an earlier in-process run leave in the submitter's environment. A submitted task inherits
# that environment (sbatch exports it; the local executor's processes copy it), and both backends' dist_env honour
# MASTER_PORT: a leftover would put every job of a node on one port.
RANK_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
                  "WANDB_SERVICE")   # (the submitter's own W&B service token: another process's, never the task's)


@contextmanager
def without_rank_variables() -> Iterator[None]:
    """Submit with this process's rank variables out of the environment the task inherits; the task sets its own
    (a spec that wants a fixed port says so in its env: section, which the task itself sets)."""
    saved = {k: os.environ.pop(k) for k in RANK_VARIABLES if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
