"""The local backend: submitit's LocalExecutor on this machine. No queue: every step runs to its end, in order,
inside the submit command (an array `parallelism` tasks at a time); no scripts, no preflight, no requeue. Inside a
task, who it is comes from submitit's SUBMITIT_LOCAL_* variables."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from core.scheduler.base import Scheduler
from core.scheduler.task_env import DistEnv, master_port_for, without_rank_variables


class Local(Scheduler):
    name = "local"
    has_queue = False
    single_host = True
    requeues = False

    def submit_step(self, plan, step, root: Optional[str], deps: list[str], make_entry):
        import submitit

        from core import run_folder

        c = plan.cluster
        run_dir = run_folder.run_dir_template(plan.spec, root)
        ex = submitit.LocalExecutor(folder=Path(run_dir) / "submitit", max_num_timeout=c.max_requeues,
                                    python=c.python)
        ex.update_parameters(timeout_min=step.minutes, tasks_per_node=step.tasks_per_node, nodes=1,
                             signal_delay_s=c.signal_s_before_timeout, stderr_to_stdout=True)
        entry = make_entry(step, run_dir)
        if not step.is_array:
            with without_rank_variables():
                return [ex.submit(entry)], run_dir
        jobs: list = []
        for a, b in step.chunks:  # no scheduler to throttle: run `parallelism` tasks at a time
            idx = list(range(a, b))
            width = step.parallelism or os.cpu_count() or 1
            for s in range(0, len(idx), width):
                with without_rank_variables():
                    batch = ex.map_array(entry, idx[s:s + width], [step.task_items[i] for i in idx[s:s + width]])
                for j in batch:
                    j.wait()
                jobs += batch
        return jobs, run_dir

    @classmethod
    def detect(cls, environ: dict) -> bool:
        return environ.get("SUBMITIT_EXECUTOR") == "local" or (not environ.get("SLURM_JOB_ID")
                                                               and bool(environ.get("SUBMITIT_LOCAL_JOB_ID")))

    def dist_env(self, environ: dict) -> DistEnv:
        world = int(environ.get("SUBMITIT_LOCAL_NTASKS", "1"))
        rank = int(environ.get("SUBMITIT_LOCAL_GLOBALID", environ.get("SUBMITIT_LOCAL_LOCALID", "0")))
        job_id = environ.get("SUBMITIT_LOCAL_JOB_ID", str(os.getpid()))
        port = int(environ["MASTER_PORT"]) if environ.get("MASTER_PORT") else master_port_for(job_id)
        import socket   # here: every launcher loads this backend (prepare_clients), few need a host name

        return DistEnv(rank, world, rank, world, 0, 1, "127.0.0.1", port, job_id, (socket.gethostname(),))

    def job_ref(self, environ: dict) -> str:
        return environ.get("SUBMITIT_LOCAL_JOB_ID") or str(os.getpid())
