"""The job spec schema: the generic sections (model, data, train, peft, resources, deepspeed, outputs, env) and
each workload's own section and data fields from the registry (`spec_class`), without importing torch."""
from __future__ import annotations

import difflib
import math
import re
from functools import lru_cache
from typing import Any, Literal, Optional, Union

from pydantic import Field, PositiveInt, create_model, field_validator, model_validator

from core import registry
from core.registry import WORKLOADS
from core.secrets_guard import redact
from core.config.base import Strict, check_env_names, validate


def parse_minutes(value: Union[int, float, str]) -> int:
    """Slurm time formats -> minutes: 90, "90", "01:30:00", "1-00:00:00", "30:00" (MM:SS)."""
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ValueError(f"'{value}' is not a Slurm time; write minutes (90) or HH:MM:SS (01:30:00) or D-HH:MM:SS")
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is None and len(parts) == 1:
        minutes = parts[0]
    elif len(parts) == 3:
        minutes = parts[0] * 60 + parts[1] + (1 if parts[2] else 0)
    elif len(parts) == 2:
        minutes = parts[0] * 60 + parts[1] if days is not None else parts[0] + (1 if parts[1] else 0)
    else:
        minutes = parts[0] * 60
    return int(days or 0) * 1440 + minutes


MAX_ARRAY_ITEMS = 100_000


class ArraySpec(Strict):
    items: Union[PositiveInt, list[Any], None] = Field(
        None, description="a count n (items 0..n-1) or an explicit list; workloads that make their own items "
                          "(layers, ratios) leave it out")
    items_per_task: int = Field(1, gt=0, le=MAX_ARRAY_ITEMS)
    parallelism: Optional[int] = Field(None, gt=0, le=MAX_ARRAY_ITEMS,
                                       description="throttle: at most this many tasks at once (%N)")
    merge: bool = Field(False, description="add a merge step that runs after every task succeeded (afterok)")

    @field_validator("items")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("the item list is empty; give a count or at least one item")
        n = v if isinstance(v, int) else len(v or [])
        if n > MAX_ARRAY_ITEMS:
            raise ValueError(f"{n} items is over the limit of {MAX_ARRAY_ITEMS}; group work into fewer items")
        return v

    def item_list(self) -> list[Any]:
        if self.items is None:
            return []
        return list(range(self.items)) if isinstance(self.items, int) else list(self.items)


MAX_NODES = 10_000         # schema bounds; the profile (and the local machine) bound them further in the plan
MAX_TASKS_PER_NODE = 1024
MAX_MINUTES = 365 * 1440


class Resources(Strict):
    nodes: int = Field(1, gt=0, le=MAX_NODES)
    tasks_per_node: Optional[int] = Field(None, gt=0, le=MAX_TASKS_PER_NODE,
                                          description="default: the profile's devices_per_node, or 1")
    cpus_per_task: Optional[int] = Field(None, gt=0, le=4096)
    mem_gb: Optional[float] = Field(None, gt=0, le=1_000_000, description="per node; at least 0.001 (1 MB)")
    time: Union[int, str] = Field("00:30:00", description="minutes or HH:MM:SS or D-HH:MM:SS")
    array: Optional[ArraySpec] = None

    @field_validator("time")
    @classmethod
    def _time(cls, v):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("time must be a finite number of minutes")
        minutes = parse_minutes(v)
        if minutes <= 0:
            raise ValueError("time must be at least one minute")
        if minutes > MAX_MINUTES:
            raise ValueError(f"time of {minutes} minutes is over a year; give the real limit (the partition's "
                             f"MaxTime bounds it anyway)")
        return v

    @field_validator("mem_gb")
    @classmethod
    def _mem(cls, v):
        if v is not None and int(v * 1024) < 1:
            raise ValueError(f"{v} GB is less than 1 MB (Slurm would read --mem=0 as the whole node); give at "
                             f"least 0.001")
        return v

    @property
    def minutes(self) -> int:
        return parse_minutes(self.time)


class DeepSpeedSpec(Strict):
    stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    offload_optimizer: bool = False
    offload_param: bool = False
    micro_batch: PositiveInt = 1
    grad_accum: PositiveInt = 1
    grad_clip: float = Field(1.0, ge=0)
    activation_checkpointing: bool = True


class ModelSpec(Strict):
    path: Optional[str] = Field(None, description="local folder with config.json (+ safetensors)")
    preset: Optional[str] = Field(None, description="a built-in size, e.g. openpangu-7b (see core/model_sizes.py)")
    trainable: Literal["all", "none"] | float = Field(
        "all", description="'all', 'none' (frozen) or the trainable parameter count (e.g. adapters)")
    seq_len: PositiveInt = 2048
    make_tiny: bool = Field(False, description="write the workload's tiny random twin at model.path if missing")


class DataSpec(Strict):
    """The fields every dataset has; a workload extends it with its own (its `Workload.Data`)."""
    path: Optional[str] = Field(None, description="dataset folder or file")
    make_synthetic: bool = Field(False, description="write a small synthetic dataset in the real format first")
    workers: int = Field(2, ge=0, description="background threads that load and preprocess upcoming samples")
    seed: int = 0


class PeftSpec(Strict):
    """Frozen base + LoRA adapters (peft), for every workload that trains (core/models/peft.py); with `quantize`
    the frozen base is loaded in 4 or 8 bit through bitsandbytes (QLoRA)."""
    method: Literal["lora"] = "lora"
    r: PositiveInt = 16
    alpha: float = 32
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="module names (a name matches every module whose path ends with it), full module paths, or "
                    "'all-linear' (every linear layer but the output head)")
    exclude: list[str] = Field(default_factory=list, description="full module paths (or path prefixes) that get no "
                                                                  "adapter, e.g. vision_tower, multi_modal_projector")
    modules_to_save: list[str] = Field(default_factory=list, description="non-LoRA modules trained and saved in "
                                                                          "full (e.g. a projector)")
    quantize: Optional[Literal["4bit", "8bit"]] = Field(None, description="load the frozen base in 4 or 8 bit "
                                                                          "(bitsandbytes; not on npu)")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="biases trained with the adapters (peft's LoraConfig.bias): none, all, or those of the "
                            "adapted layers (lora_only)")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("give at least one module name, or 'all-linear'")
        return v


class TrainSection(Strict):
    """The engine's train loop (core/engine.py): read by every workload that trains."""
    steps: PositiveInt = Field(100, description="optimizer steps in total (across requeues)")
    epochs: Optional[float] = Field(None, gt=0, description="train this many passes over the training set instead: "
                                                            "steps = epochs x samples / (micro x accum x ranks)")
    lr: float = Field(5e-5, gt=0)
    warmup_steps: int = Field(0, ge=0)
    scheduler: Literal["constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    weight_decay: float = Field(0.0, ge=0)
    decay_norms_and_biases: bool = Field(False, description="apply weight_decay to biases and norm weights too "
                                                            "(false: exempt, as the Hugging Face Trainer does)")
    lr_groups: dict[str, float] = Field(default_factory=dict, description="learning rate per module: a name "
                                        "(matches every parameter under a module path ending with it, e.g. "
                                        "mm_projector) or a full path -> lr; the rest train at train.lr")
    seed: int = 0
    checkpoint_every: int = Field(50, ge=0, description="0: only at the end and on Slurm's signal")
    keep_last: PositiveInt = 2
    async_checkpoint: bool = Field(True, description="write periodic checkpoints in the background: training waits "
                                                     "only for the copy into host memory (the final checkpoint and "
                                                     "the one on Slurm's signal are always written before going on)")
    fresh: bool = Field(False, description="move existing checkpoints aside and start over (--fresh)")

    @field_validator("lr_groups")
    @classmethod
    def _lr_groups(cls, v):
        for name, lr in v.items():
            if not re.fullmatch(r"[A-Za-z0-9_.]{1,200}", name) or name.startswith(".") or name.endswith("."):
                raise ValueError(f"'{redact(name)[:80]}' is not a module name or path (letters, digits, '_', '.')")
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"{name}: the learning rate must be a positive number, not {lr}")
        return v


class HangSpec(Strict):
    """The hang watchdog (core/watchdog.py, docs/hangs.md): read by the train loop of every workload that trains and by
    the sensitivity scan's per-layer array tasks."""
    enabled: bool = Field(True, description="false: no watchdog (a hung job runs until its time limit)")
    factor: float = Field(10.0, ge=1, le=1000, description="a step must end within factor x the p95 of the rank's "
                                                           "step times (or floor_s, whichever is longer)")
    floor_s: float = Field(300.0, ge=1, le=7 * 86400, description="the shortest step limit, in seconds")
    first_step_s: float = Field(1800.0, ge=1, le=7 * 86400, description="allowance for loading and the first step "
                                                                        "(compile), and for each checkpoint save")


class Outputs(Strict):
    logs_dir: str = Field("logs", min_length=1, max_length=1024,
                          description="run folders go to <logs_dir>/<name>/<jobid>/: relative to the checkout and "
                                      "inside its logs/, or absolute inside one of the profile's logs_roots")


TRACKER_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"


class TrackingSection(Strict):
    """Where a run's metrics go besides metrics.csv (core/tracking.py); unset fields take the profile's
    `tracking:` defaults. Rank 0 of each task logs; nothing ever needs a server while the job runs unless
    wandb is online (which the profile must allow)."""
    wandb: Optional[Literal["off", "offline", "online"]] = Field(
        None, description="Weights & Biases: off, offline (the run folder holds the offline run; upload it later "
                          "with python launchers/sync.py RUN) or online (only where the profile says nodes reach "
                          "the server); default: the profile's")
    mlflow: Optional[bool] = Field(None, description="an MLflow file store per task inside the run folder "
                                                     "(tracking/<task>/mlruns); default: the profile's")
    tensorboard: Optional[bool] = Field(None, description="TensorBoard events in <run>/tensorboard; default: the "
                                                          "profile's (on)")
    project: Optional[str] = Field(None, pattern=TRACKER_NAME, description="W&B project / MLflow experiment "
                                                                            "(default: the profile's, else medhpc)")
    group: Optional[str] = Field(None, pattern=TRACKER_NAME, description="W&B group / MLflow tag: runs that "
                                                                          "belong together (default: the spec's name)")
    wandb_key: Optional[str] = Field(None, description="the W&B API key as a reference only: ${env:WANDB_API_KEY} "
                                                       "or ${file:/path} (mode 600); needed for online")

    @field_validator("wandb_key")
    @classmethod
    def _key_is_reference(cls, v):
        from core.secrets_guard import REFERENCE

        if v is not None and not REFERENCE.fullmatch(v):
            raise ValueError("give the key as a reference, never the key itself: '${env:WANDB_API_KEY}' or "
                             "'${file:/path/to/key}' (a file only you can read)")
        return v


class JobSpec(Strict):
    """The generic schema. Each workload's spec class (`spec_class`) adds its own section and data schema."""
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=100,
                      description="job name and folder name: letters, digits, '_', '.', '-'; at most 100 characters")
    workload: str
    description: str = ""
    cluster: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_./\-]{1,200}$",
                                   description="the profile this job runs on unless --cluster says otherwise")
    model: ModelSpec = Field(default_factory=ModelSpec)
    models: dict[str, ModelSpec] = Field(default_factory=dict, description="further named models of a workload "
                                                                           "(e.g. teacher, student)")
    data: DataSpec = Field(default_factory=DataSpec)
    train: Optional[TrainSection] = None
    peft: Optional[PeftSpec] = Field(None, description="LoRA adapters on a frozen base; omit for a full fine-tune")
    resources: Resources = Field(default_factory=Resources)
    deepspeed: Optional[DeepSpeedSpec] = None
    outputs: Outputs = Field(default_factory=Outputs)
    hang: HangSpec = Field(default_factory=HangSpec, description="the hang watchdog (docs/hangs.md)")
    env: dict[str, str] = Field(default_factory=dict, description="variables exported in the job; ${env:VAR} allowed")
    tracking: TrackingSection = Field(default_factory=TrackingSection, description="W&B / MLflow / TensorBoard "
                                                                                   "(docs/tracking.md)")

    @field_validator("workload")
    @classmethod
    def _known_workload(cls, v):
        if v not in WORKLOADS:
            near = difflib.get_close_matches(v, list(WORKLOADS), n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise ValueError(f"unknown workload '{redact(v)}'; {hint}known workloads: {', '.join(sorted(WORKLOADS))}")
        return v

    @field_validator("env")
    @classmethod
    def _env_names(cls, v):
        return check_env_names(v)

    @model_validator(mode="after")
    def _complete_for_workload(self):
        info = registry.get(self.workload)
        if info.section and getattr(self, info.section, None) is None:  # the workload's own section, with defaults
            required = [n for n, f in info.Section.model_fields.items() if f.is_required()]
            if required:
                raise ValueError(f"workload '{self.workload}' needs a '{info.section}:' section "
                                 f"(required: {', '.join(required)})")
            self.__dict__[info.section] = info.Section()
        if info.trains:
            if self.train is None:
                self.__dict__["train"] = TrainSection()
        else:
            for key in ("train", "peft"):
                if getattr(self, key) is not None:
                    raise ValueError(f"'{key}:' is read by workloads that train; '{self.workload}' does not: remove it")
        unknown = sorted(set(self.models) - set(info.models))
        missing = [m for m in info.models if m not in self.models]
        if unknown or missing:
            wanted = ", ".join(info.models) or "none"
            raise ValueError(f"models: workload '{self.workload}' takes the named models [{wanted}]; "
                             + (f"unknown: {unknown}" if unknown else f"missing: {missing}"))
        if self.peft and self.peft.quantize and self.deepspeed and self.deepspeed.stage == 3:
            raise ValueError("peft.quantize: a 4/8-bit base cannot be partitioned by ZeRO-3 here; use "
                             "deepspeed.stage 0-2 (the quantized base is small already) or drop quantize")
        if self.resources.array and self.resources.array.merge and not info.has_merge:
            raise ValueError(f"resources.array.merge: workload '{self.workload}' has no merge step; remove 'merge'")
        return self

    @property
    def section(self):
        """The workload's own section (e.g. spec.scan for the sensitivity workload)."""
        info = registry.get(self.workload)
        return getattr(self, info.section) if info.section else None


@lru_cache(maxsize=None)
def spec_class(workload: str) -> type[JobSpec]:
    """JobSpec plus the workload's own section (`Workload.section: Workload.Section`) and data schema."""
    if workload not in WORKLOADS:
        return JobSpec
    info = registry.get(workload)
    fields: dict[str, Any] = {}
    if info.section:
        fields[info.section] = (Optional[info.Section], None)
    if info.Data is not None:
        fields["data"] = (info.Data, Field(default_factory=info.Data))
    if not fields:
        return JobSpec
    return create_model(f"JobSpec_{workload}", __base__=JobSpec, **fields)


def _spec_class_for(data: dict) -> type[JobSpec]:
    w = data.get("workload")
    return spec_class(w) if isinstance(w, str) else JobSpec


def parse_spec(data: dict, source: str = "spec") -> JobSpec:
    """A raw spec dict (a YAML file's, a run record's, a task's) -> the validated spec of its workload."""
    return validate(_spec_class_for(data), data, source)
