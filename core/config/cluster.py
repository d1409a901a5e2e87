"""The cluster profile schema (cluster_configs/*.yaml): where jobs go, what the nodes have, the scheduler's
limits and the in-task settings (HCCL, requeues)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, PositiveInt, field_validator, model_validator

from core.secrets_guard import redact
from core.config.base import SLURM_CONSTRAINT, SLURM_GRES, SLURM_HOSTLIST, SLURM_NAME, Strict, check_env_names


HCCL_PORT_WINDOWS, HCCL_PORT_WINDOW = 16, 256  # core.runtime: a job's HCCL ports are base + (job id % 16) x 256
HCCL_BASE_PORT_MAX = 65535 - HCCL_PORT_WINDOWS * HCCL_PORT_WINDOW + 1


SLURM_KEYS = ("cluster_name", "partition", "account", "qos", "constraint", "exclude", "gres")


class SlurmSection(Strict):
    """The profile's Slurm-only settings: they reach #SBATCH lines, so each is checked against Slurm's grammar."""
    cluster_name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$",
                                        description="Slurm's ClusterName of this cluster: limits read from the "
                                                    "cluster that answers (MaxArraySize, MaxJobCount) count only "
                                                    "when it is this one")
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    gres: Optional[str] = Field(None, description="e.g. gpu:{devices} ({devices} = the tasks of the node)")

    _partition = field_validator("partition", "account", "qos")(classmethod(lambda cls, v: SLURM_NAME(v)))
    _constraint = field_validator("constraint")(classmethod(lambda cls, v: SLURM_CONSTRAINT(v)))
    _exclude = field_validator("exclude")(classmethod(lambda cls, v: SLURM_HOSTLIST(v)))
    _gres = field_validator("gres")(classmethod(lambda cls, v: SLURM_GRES(v)))


class TrackingDefaults(Strict):
    """The profile's defaults for a spec's `tracking:` section, and whether its nodes reach the W&B server."""
    wandb: Literal["off", "offline", "online"] = Field("off", description="off, offline or online (online needs "
                                                                          "wandb_reachable)")
    mlflow: bool = False
    tensorboard: bool = True
    project: str = Field("medhpc", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
    wandb_reachable: bool = Field(False, description="compute nodes reach the W&B server (else online is refused)")


RetryAction = Literal["requeue", "resubmit", "stop"]


class RetryPolicy(Strict):
    """What to do when a job or array task fails, per failure class (core.failures, docs/failures.md): `requeue`
    (the same job back in the queue, kept off the node that failed), `resubmit` (a new job in the same run folder,
    continuing from its newest complete checkpoint) or `stop`. A workload bug (`exception`) or bad data (`data`)
    fails the same way every time: they always stop, and a profile that says otherwise is refused. Retries are
    bounded per job (`max_retries`), and the same class at the same training step twice stops (loop guard)."""
    max_retries: int = Field(2, ge=0, le=20, description="retries per job or array task, all classes together")
    timeout: RetryAction = Field("resubmit", description="time limit: a new job continues from the checkpoint "
                                                         "(the in-task requeue on Slurm's warning signal comes first)")
    preempted: RetryAction = Field("requeue", description="preempted by a higher-priority job")
    node: RetryAction = Field("requeue", description="node failure or failed health check: requeue, that node "
                                                     "excluded")
    comm: RetryAction = Field("requeue", description="NCCL / HCCL / gloo failure or timeout (often one bad node or "
                                                     "link; the loop guard stops a second one at the same step)")
    hang: RetryAction = Field("requeue", description="stopped by the hang watchdog")
    host_oom: RetryAction = Field("stop", description="host memory: the same job runs out again (raise mem_gb)")
    device_oom: RetryAction = Field("stop", description="device memory: the same job runs out again (smaller "
                                                        "micro-batch, ZeRO stage, more devices)")
    cancelled: RetryAction = Field("stop", description="a person cancelled it: never undone")
    dependency: RetryAction = Field("stop", description="a step it waits for failed: retrying that step brings it")
    unknown: RetryAction = Field("stop", description="nothing says why: a person looks first")
    exception: Literal["stop"] = Field("stop", description="a Python exception in the workload: always stop")
    data: Literal["stop"] = Field("stop", description="bad input data (DatasetError / FieldError): always stop")

    @model_validator(mode="before")
    @classmethod
    def _never_retry_a_bug(cls, data):
        if isinstance(data, dict):
            for klass in ("exception", "data"):
                if klass in data and data[klass] != "stop":
                    what = "a workload bug" if klass == "exception" else "bad input data"
                    raise ValueError(f"retry.{klass}: {data[klass]!r}: {what} fails the same way on every retry; "
                                     f"it is always 'stop' (remove retry.{klass} or set it to stop)")
        return data


class Cluster(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
    executor: Literal["slurm", "local"]
    description: str = ""
    slurm: SlurmSection = Field(default_factory=lambda: SlurmSection(),
                                description="what only Slurm reads (partition, account, qos, gres, ...); the same "
                                            "keys at the top of a profile are read into this section")
    logs_roots: list[str] = Field(default_factory=list, description="absolute folders where a spec's absolute "
                                                                    "outputs.logs_dir may put run folders")
    scratch_roots: list[str] = Field(default_factory=list, description="absolute folders (node-local or parallel "
                                                                       "scratch) where a workload's caches may go "
                                                                       "(e.g. distill.cache_root)")
    max_nodes: Optional[PositiveInt] = Field(None, description="most nodes one job may ask for here")
    loopback_rendezvous: bool = Field(False, description="multi-node jobs may meet on a loopback address (only "
                                                         "where every node is this one host: the local cluster)")
    accelerator: Literal["cuda", "npu", "cpu"] = "cpu"
    devices_per_node: int = Field(0, ge=0)
    device_mem_gb: Optional[float] = Field(None, gt=0, description="memory of one device, for the plan's estimate")
    cpus_per_task: PositiveInt = 1
    mem_gb_per_node: Optional[float] = Field(None, gt=0)
    setup: list[str] = Field(default_factory=list, description="shell lines run before the job (module load ...)")
    env: dict[str, str] = Field(default_factory=dict)
    max_array_size: PositiveInt = Field(1001, description="Slurm MaxArraySize fallback (read from scontrol when possible)")
    max_jobs_per_user: Optional[PositiveInt] = Field(None, description="queue limit that chunking cannot get around")
    hccl_connect_timeout: PositiveInt = Field(1200, description="HCCL_CONNECT_TIMEOUT (npu)")
    hccl_exec_timeout: PositiveInt = Field(1800, description="HCCL_EXEC_TIMEOUT (npu)")
    hccl_if_base_port: int = Field(60000, ge=1024, le=HCCL_BASE_PORT_MAX,
                                   description="HCCL_IF_BASE_PORT; each job gets one of 16 windows of 256 ports above "
                                               "it, so base + 16 x 256 must stay within 65535")
    hccl_port_wait_s: int = Field(120, ge=0, description="seconds a task waits, before HCCL starts (npu), for its "
                                                         "16 HCCL_IF_BASE_PORT host ports to be free on its node "
                                                         "(a requeue on the same node: HCCP may still hold them); "
                                                         "still busy then stops the task naming them; 0 = no wait")
    task_start_s: float = Field(20.0, gt=0, description="seconds one array task spends starting (scheduling, "
                                                         "imports, reading the model's config) before its work; "
                                                         "planners size tasks with it (scan.layers_per_task: auto)")
    signal_s_before_timeout: PositiveInt = 120
    max_requeues: int = Field(3, ge=0)
    retry: RetryPolicy = Field(default_factory=lambda: RetryPolicy(),
                               description="what happens when a job fails, per failure class (docs/failures.md)")
    python: Optional[str] = Field(None, description="python command on the nodes; default: this interpreter")
    tracking: TrackingDefaults = Field(default_factory=lambda: TrackingDefaults(),
                                       description="defaults of the specs' tracking: section (docs/tracking.md)")

    _env = field_validator("env")(classmethod(lambda cls, v: check_env_names(v)))

    @model_validator(mode="before")
    @classmethod
    def _scheduler_keys_in_their_section(cls, data):
        """Profiles written before the slurm: section put its keys at the top: read them into the section (a key
        given in both places is refused: which one would win is not obvious)."""
        if not isinstance(data, dict) or not any(k in data for k in SLURM_KEYS):
            return data
        section = data.get("slurm")
        if section is not None and not isinstance(section, dict):
            return data  # the section's own validation says what is wrong
        both = sorted(k for k in SLURM_KEYS if k in data and k in (section or {}))
        if both:
            raise ValueError(f"{', '.join(both)} given both at the top of the profile and under slurm:; keep one "
                             f"(under slurm:)")
        return {**{k: v for k, v in data.items() if k not in SLURM_KEYS},
                "slurm": {**(section or {}), **{k: data[k] for k in SLURM_KEYS if k in data}}}

    @field_validator("logs_roots", "scratch_roots")
    @classmethod
    def _roots(cls, v, info):
        bad = [r for r in v if not Path(r).is_absolute()]
        if bad:
            raise ValueError(f"{info.field_name} must be absolute folders, got {[redact(r, 60) for r in bad]}")
        return v
