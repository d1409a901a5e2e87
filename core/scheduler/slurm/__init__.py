"""The Slurm backend: submitit's SlurmExecutor for submission, squeue / sacct / scancel for jobs, scontrol /
sinfo / sacctmgr / sbatch --test-only for the cluster's limits and the preflight, and Slurm's variables inside a
task. Every Slurm command of the project is run from this package."""
from __future__ import annotations

import os
import re
from typing import Optional

from core.scheduler.base import JobRow, Preflight, QueuedJob, QueueEntry, Scheduler
from core.scheduler.task_env import DistEnv


class Slurm(Scheduler):
    name = "slurm"
    has_queue = True
    single_host = False
    requeues = True
    holds = True

    # ---------------------------------------------------------------- planning and submission
    def limits(self, cluster) -> dict[str, int]:
        """MaxArraySize and MaxJobCount from `scontrol show config`, counted only when the cluster answering is
        the one the profile names (its `slurm.cluster_name` equals Slurm's ClusterName): a dry run for another site's
        profile on a machine whose Slurm is a different cluster keeps the profile's own limits."""
        from core.scheduler.slurm.commands import call, have

        if not have("scontrol"):
            return {}
        code, out = call(["scontrol", "show", "config"], timeout=10)
        if code != 0:
            return {}
        found = re.search(r"^ClusterName\s*=\s*(\S+)", out, re.M)
        if not cluster.slurm.cluster_name or not found or found.group(1) != cluster.slurm.cluster_name:
            return {}
        limits = {}
        for key in ("MaxArraySize", "MaxJobCount"):
            m = re.search(rf"^{key}\s*=\s*(\d+)", out, re.M)
            if m:
                limits[key] = int(m.group(1))
        return limits

    def render(self, plan) -> dict[str, list[str]]:
        from core.scheduler.slurm.submit import render

        return render(plan)

    def preflight(self, plan, scripts: dict[str, list[str]]) -> Preflight:
        from core.scheduler.slurm.preflight import check

        return check(plan, scripts)

    def submit_step(self, plan, step, root: Optional[str], deps: list[str], make_entry):
        from core.scheduler.slurm.submit import submit_step

        return submit_step(plan, step, root, deps, make_entry, hold=self.holding, held=self.held_ids)

    def release(self, ids: list[str]) -> None:
        """`scontrol release` of held jobs (an array job id releases every task of it)."""
        from core.scheduler.slurm.commands import run

        if ids:
            run(["scontrol", "release", ",".join(ids)])

    # ---------------------------------------------------------------- jobs
    def query(self, user: Optional[str] = None, since: str = "now-2days") -> list[JobRow]:
        from core.scheduler.slurm.queue import query

        return query(user, since)

    def refresher(self, user: Optional[str] = None, since: str = "now-2days"):
        from core.scheduler.slurm.queue import Refresher

        return Refresher(user, since)

    def states(self, job_ids: list[str]) -> tuple[dict[str, str], bool]:
        from core.scheduler.slurm.queue import states

        return states(job_ids)

    def accounting(self, job_ids: list[str]) -> list[JobRow]:
        from core.scheduler.slurm.queue import accounting

        return accounting(job_ids)

    def queued(self, ids: list[str]) -> list[QueueEntry]:
        from core.scheduler.slurm.queue import queued

        return queued(ids)

    def queued_of(self, user: str) -> list[QueuedJob]:
        from core.scheduler.slurm.queue import queued_of

        return queued_of(user)

    def cancel(self, ids: list[str]) -> None:
        from core.scheduler.slurm.queue import cancel

        if ids:
            cancel(ids)

    def write_profile(self, name: Optional[str], partition: Optional[str], repo) -> str:
        from core.scheduler.slurm.profile_writer import write_profile

        return write_profile(name, partition, repo)

    def explain_reason(self, reason: str) -> str:
        from core.scheduler.slurm.reasons import explain

        return explain(reason)

    def classify_end(self, end, lines: list[str]):
        from core.scheduler.slurm.ends import classify

        return classify(end, lines)

    def exit_text(self, end) -> str:
        from core.scheduler.slurm.ends import exit_text

        return exit_text(end)

    def unhealthy(self, nodes: str) -> str:
        from core.scheduler.slurm.ends import unhealthy

        return unhealthy(nodes)

    def nodes_left(self, job_id: str, exclude: str) -> Optional[tuple[int, list[str]]]:
        from core.scheduler.slurm.nodes import nodes_left

        return nodes_left(job_id, exclude)

    def requeue_excluding(self, job_id: str, nodes: str) -> tuple[bool, str]:
        """`scontrol requeue` (a finished or running batch job goes back to pending, same id), then, when a node
        failed, `scontrol update ExcNodeList=<node>` on the pending job so the retry does not land on it again.
        A task may requeue its own job: the requeue sends the job SIGTERM (SIGKILL KillWait later), so both
        commands run with SIGTERM ignored, and the update is tried again for a few seconds until Slurm has put the
        job back to pending (it refuses to change a running job's ExcNodeList)."""
        import time

        from core.scheduler.slurm.commands import call
        from core.scheduler.slurm.nodes import excluded_with

        keep_off = excluded_with(job_id, nodes) if nodes else ""  # an earlier retry's exclusion stays
        code, said = call(["scontrol", "requeue", job_id], timeout=60, ignore_term=True)
        if code != 0:
            return False, said
        if nodes:
            for _ in range(10):
                code, said2 = call(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={keep_off}"], timeout=60,
                                   ignore_term=True)
                if code == 0 or "no longer pending" not in said2.lower():
                    break
                time.sleep(0.3)
            if code != 0:
                return True, f"requeued, but excluding {nodes} failed: {said2}"
            return True, f"requeued excluding {nodes}" + (f" (excluded now: {keep_off})" if keep_off != nodes else "")
        return True, "requeued"

    # ---------------------------------------------------------------- inside a task
    @classmethod
    def detect(cls, environ: dict) -> bool:
        from core.scheduler.slurm.env import in_slurm_task

        return in_slurm_task(environ)

    def dist_env(self, environ: dict) -> DistEnv:
        from core.scheduler.slurm.env import dist_env_from_slurm

        return dist_env_from_slurm(environ)

    def job_ref(self, environ: dict) -> str:
        from core.scheduler.slurm.env import job_ref

        return job_ref(environ)

    def restart_count(self, environ: dict) -> int:
        from core.scheduler.slurm.env import restart_count

        return restart_count(environ)

    def node_name(self, environ: dict) -> Optional[str]:
        return environ.get("SLURMD_NODENAME") or None

    def array_index(self, environ: dict) -> Optional[str]:
        return environ.get("SLURM_ARRAY_TASK_ID")

    def root_job_id(self, environ: dict) -> Optional[str]:
        return environ.get("SLURM_ARRAY_JOB_ID") or environ.get("SLURM_JOB_ID") or None

    def variables(self, environ: dict) -> dict[str, str]:
        from core.scheduler.slurm.env import RECORDED_VARS

        return {k: v for k, v in environ.items() if k in RECORDED_VARS}

    def client_env(self, environ: dict) -> None:
        from core.scheduler.slurm.env import use_local_cluster_conf

        use_local_cluster_conf(environ)

    def device_vars(self) -> tuple[str, ...]:
        from core.scheduler.slurm.env import DEVICE_VARS

        return DEVICE_VARS

    def can_requeue(self, cluster: dict, environ: Optional[dict] = None) -> bool:
        environ = os.environ if environ is None else environ
        return self.restart_count(environ) < int(cluster.get("max_requeues", 0))

    def requeue(self, job_id: str) -> tuple[bool, str]:
        """`scontrol requeue` this job (an array task as ARRAYID_TASKID): Slurm stops the allocation and runs the
        job again later. Returns (accepted, scontrol's message)."""
        from core.scheduler.slurm.commands import call

        code, said = call(["scontrol", "requeue", job_id], timeout=60)
        return code == 0, said
