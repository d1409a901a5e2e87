"""Job specs and cluster profiles: YAML -> validated pydantic models.

One generic schema (name, workload, model(s), data, train, peft, resources, deepspeed, outputs, env); each
workload's own section and data fields come from its module through the registry (`spec_class`), without
importing torch. Loading applies defaults and `--set a.b=value` overrides (typed by the
schema), rejects unknown keys with the closest valid key suggested, and refuses literal secrets.
Every failure is a `SpecError` that names the file, the field path and the fix; nothing here submits
anything and nothing here imports torch.
"""
from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from functools import lru_cache
from typing import Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, PositiveInt, ValidationError, create_model, field_validator,
                      model_validator)

from core import workloads
from core.safe_yaml import MAX_BYTES, YamlError, load_yaml
from core.secrets_guard import HIDDEN, redact, safe_quote, secret_paths
from core.workloads import WORKLOADS

ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
FILE_REF = re.compile(r"\$\{file:([^{}\x00-\x1f]+)\}")
ANY_REF = re.compile(ENV_REF.pattern + "|" + FILE_REF.pattern)
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class SpecError(Exception):
    """A bad spec or profile: the message names the file, the field and the fix."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems  # (field path, message incl. fix)
        lines = [f"{source}: {field}: {msg}" if field else f"{source}: {msg}" for field, msg in problems]
        super().__init__("\n".join(lines))


class Strict(BaseModel):
    # inf / nan are refused everywhere: a time, a memory size or a parameter count must be a real number
    model_config = ConfigDict(extra="forbid", defer_build=True, allow_inf_nan=False)


def _pattern(regex: str, what: str, example: str):
    """A validator for a value that reaches an sbatch line: the whole value must match `regex`."""
    compiled = re.compile(regex)

    def check(v):
        if v is not None and not compiled.fullmatch(v):
            raise ValueError(f"'{redact(v)}' is not a valid {what}: use only {example}")
        return v
    return check


SLURM_NAME = _pattern(r"[A-Za-z0-9][A-Za-z0-9_.+\-]{0,127}(,[A-Za-z0-9][A-Za-z0-9_.+\-]{0,127})*",
                      "Slurm name", "letters, digits, '_', '.', '+', '-' (a comma-separated list for several)")
SLURM_CONSTRAINT = _pattern(r"[A-Za-z0-9_.,:|&!*()\[\]+\-]{1,512}", "Slurm constraint",
                            "feature names and the operators & | , [ ] ( ) * !")
SLURM_HOSTLIST = _pattern(r"[A-Za-z0-9_.,\[\]\-]{1,4096}", "Slurm host list", "host names and ranges like n[1-4],gpu7")
SLURM_GRES = _pattern(r"[A-Za-z0-9_:.,\-]*(\{devices\}[A-Za-z0-9_:.,\-]*)*", "GRES",
                      "a Slurm GRES like gpu:{devices} or gpu:a100:8 ({devices} is the only placeholder)")


# ---------------------------------------------------------------- job spec
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


class FieldError(ValueError):
    """A problem found while planning, tied to one spec field (the plan adds the file name)."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


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
    seed: int = 0
    checkpoint_every: int = Field(50, ge=0, description="0: only at the end and on Slurm's signal")
    keep_last: PositiveInt = 2
    fresh: bool = Field(False, description="move existing checkpoints aside and start over (--fresh)")


class Outputs(Strict):
    logs_dir: str = Field("logs", min_length=1, max_length=1024,
                          description="run folders go to <logs_dir>/<name>/<jobid>/: relative to the checkout and "
                                      "inside its logs/, or absolute inside one of the profile's logs_roots")


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
    env: dict[str, str] = Field(default_factory=dict, description="variables exported in the job; ${env:VAR} allowed")

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
        info = workloads.get(self.workload)
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
        info = workloads.get(self.workload)
        return getattr(self, info.section) if info.section else None


@lru_cache(maxsize=None)
def spec_class(workload: str) -> type[JobSpec]:
    """JobSpec plus the workload's own section (`Workload.section: Workload.Section`) and data schema."""
    if workload not in WORKLOADS:
        return JobSpec
    info = workloads.get(workload)
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


# ---------------------------------------------------------------- cluster profile
def check_env_names(env: dict) -> dict:
    bad = [k for k in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", k)]
    if bad:
        raise ValueError(f"variable names {[redact(k, 40) for k in bad]} are not valid: use letters, digits and '_', "
                         f"not starting with a digit")
    return env


class Cluster(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
    executor: Literal["slurm", "local"]
    description: str = ""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    logs_roots: list[str] = Field(default_factory=list, description="absolute folders where a spec's absolute "
                                                                    "outputs.logs_dir may put run folders")
    max_nodes: Optional[PositiveInt] = Field(None, description="most nodes one job may ask for here")
    loopback_rendezvous: bool = Field(False, description="multi-node jobs may meet on a loopback address (only "
                                                         "where every node is this one host: the local cluster)")
    accelerator: Literal["cuda", "npu", "cpu"] = "cpu"
    devices_per_node: int = Field(0, ge=0)
    device_mem_gb: Optional[float] = Field(None, gt=0, description="memory of one device, for the plan's estimate")
    gres: Optional[str] = Field(None, description="e.g. gpu:{devices} ({devices} = devices_per_node)")
    cpus_per_task: PositiveInt = 1
    mem_gb_per_node: Optional[float] = Field(None, gt=0)
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    setup: list[str] = Field(default_factory=list, description="shell lines run before the job (module load ...)")
    env: dict[str, str] = Field(default_factory=dict)
    max_array_size: PositiveInt = Field(1001, description="Slurm MaxArraySize fallback (read from scontrol when possible)")
    max_jobs_per_user: Optional[PositiveInt] = Field(None, description="queue limit that chunking cannot get around")
    hccl_connect_timeout: PositiveInt = Field(1200, description="HCCL_CONNECT_TIMEOUT (npu)")
    hccl_exec_timeout: PositiveInt = Field(1800, description="HCCL_EXEC_TIMEOUT (npu)")
    hccl_if_base_port: PositiveInt = Field(60000, description="HCCL_IF_BASE_PORT; each job gets a 256-port window")
    task_start_s: float = Field(20.0, gt=0, description="seconds one array task spends starting (scheduling, "
                                                         "imports, reading the model's config) before its work; "
                                                         "planners size tasks with it (scan.layers_per_task: auto)")
    signal_s_before_timeout: PositiveInt = 120
    max_requeues: int = Field(3, ge=0)
    python: Optional[str] = Field(None, description="python command on the nodes; default: this interpreter")

    _partition = field_validator("partition", "account", "qos")(classmethod(lambda cls, v: SLURM_NAME(v)))
    _constraint = field_validator("constraint")(classmethod(lambda cls, v: SLURM_CONSTRAINT(v)))
    _exclude = field_validator("exclude")(classmethod(lambda cls, v: SLURM_HOSTLIST(v)))
    _gres = field_validator("gres")(classmethod(lambda cls, v: SLURM_GRES(v)))
    _env = field_validator("env")(classmethod(lambda cls, v: check_env_names(v)))

    @field_validator("logs_roots")
    @classmethod
    def _roots(cls, v):
        bad = [r for r in v if not Path(r).is_absolute()]
        if bad:
            raise ValueError(f"logs_roots must be absolute folders, got {[redact(r, 60) for r in bad]}")
        return v


# ---------------------------------------------------------------- loading
def _read_yaml(path: Path, what: str) -> dict:
    """An untrusted YAML file -> a mapping (core.safe_yaml: size, UTF-8, duplicate keys, alias and depth limits),
    with every string checked for control characters. Any problem is a SpecError naming the file."""
    if not path.is_file():
        raise SpecError(str(path), [("", f"{what} file not found; check the path (cwd: {os.getcwd()})")])
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
        data = load_yaml(raw, str(path))
    except OSError as e:
        raise SpecError(str(path), [("", f"cannot read the {what}: {e.strerror}")]) from None
    except YamlError as e:
        rest = str(e).removeprefix(f"{path}: ")
        raise SpecError(str(path), [("", f"malformed YAML at {rest}" if rest.startswith("line")
                                     else f"malformed YAML: {rest}")]) from None
    if not isinstance(data, dict):
        raise SpecError(str(path), [("", f"a {what} must be a YAML mapping of keys to values, got {type(data).__name__}")])
    problems = control_characters(data)
    if problems:
        raise SpecError(str(path), problems)
    return data


def control_characters(data: Any, path: str = "") -> list[tuple[str, str]]:
    """(field, message) for every key or string value holding a control character (a newline in a value that
    reaches an sbatch line would end the #SBATCH header and run the rest as shell)."""
    out: list[tuple[str, str]] = []
    stack: list[tuple[str, Any]] = [(path, data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                sub = f"{where}.{k}" if where else str(k)
                if isinstance(k, str) and CONTROL.search(k):
                    out.append((redact(sub, 80), "a key holds a control character (newline, tab, ...); remove it"))
                    continue
                stack.append((sub, v))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, str) and CONTROL.search(value):
            out.append((where, "holds a control character (newline, tab, ...): values must be one line of "
                               "printable text"))
    return sorted(out)


def _model_at(model: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model class that owns the field at `loc` (for 'did you mean' suggestions)."""
    free = False
    for part in loc:
        if isinstance(part, int) or free:  # a list index, or the key of a mapping field (models.<name>)
            free = False
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        free = getattr(ann, "__origin__", None) is dict
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def _explain(model: type[BaseModel], err: dict) -> tuple[str, str]:
    loc = err["loc"]
    field = ".".join(str(p) for p in loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        if len(loc) == 1 and issubclass(model, JobSpec):
            owner = workloads.sections().get(str(loc[0]))
            if owner:
                return field, f"section '{loc[0]}' belongs to workload '{owner}'; remove it or set workload: {owner}"
        parent = _model_at(model, loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{near[0]}'? " if near else ""
        return field, f"unknown key. {hint}Valid keys here: {', '.join(valid)}"
    if kind == "missing":
        return field, "required key is missing; add it"
    msg = err["msg"]
    if kind.startswith(("int_", "float_", "bool_", "string_", "list_", "dict_", "literal_")) or "greater" in kind:
        got = err.get("input")
        shown = safe_quote(field, got)
        msg = f"{msg} (got {shown if shown == HIDDEN or not isinstance(got, str) else repr(shown)}); fix the value"
    return field, msg


def _clean_loc(err: dict) -> dict:
    # drop pydantic's union-branch markers ('int', 'list[any]', 'function-after[...]') from the location
    parts = [p for p in err["loc"] if not (isinstance(p, str) and (p in {"int", "str", "float", "bool"} or "[" in p))]
    return {**err, "loc": tuple(parts)}


def validate(model: type[BaseModel], data: dict, source: str):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        seen, problems = set(), []
        for err in e.errors():
            item = _explain(model, _clean_loc(err))
            if item not in seen:
                seen.add(item)
                problems.append(item)
        raise SpecError(source, problems) from None


def apply_override(data: dict, assignment: str, model: type[BaseModel]) -> None:
    """`a.b=value` into the raw dict; the value is parsed as YAML and typed later by the schema."""
    if "=" not in assignment:
        raise SpecError("--set", [(assignment, "expected KEY=VALUE, e.g. --set resources.nodes=2")])
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = load_yaml(raw, "--set") if raw.strip() else ""
    except YamlError:
        value = raw
    node, cls, free = data, model, False
    for i, part in enumerate(parts):
        owner = cls
        if free:  # a key of a mapping field (models.<name>): any name, then the mapping's value schema
            free = False
        elif owner is not None and part not in owner.model_fields:
            near = difflib.get_close_matches(part, list(owner.model_fields), n=1, cutoff=0.5)
            hint = f"did you mean '{'.'.join(parts[:i] + [near[0]])}'? " if near else ""
            raise SpecError("--set", [(key, f"unknown key. {hint}Valid keys here: {', '.join(sorted(owner.model_fields))}")])
        if owner is not None and part in getattr(owner, "model_fields", {}):
            free = getattr(owner.model_fields[part].annotation, "__origin__", None) is dict
        cls = _model_at(owner, (part,)) if owner is not None else None
        if i == len(parts) - 1:
            node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child


def load_spec(path: Union[str, Path], overrides: tuple[str, ...] = ()) -> tuple[JobSpec, dict]:
    """-> (validated spec, raw dict after overrides). Raises SpecError."""
    path = Path(path)
    data = _read_yaml(path, "job spec")
    first = sorted(overrides, key=lambda a: not a.strip().startswith("workload="))  # the workload decides the schema
    for assignment in first:
        apply_override(data, assignment, _spec_class_for(data))
    problems = control_characters(data)  # overrides are untrusted text too
    if problems:
        raise SpecError("--set" if overrides else str(path), problems)
    secrets = secret_paths(data)
    if secrets:
        raise SpecError(str(path), [(s, "looks like a secret written literally; put it in an environment variable "
                                        "and write '${env:VAR_NAME}' here, or in a file only you can read and write "
                                        "'${file:/path}' (both resolved only inside the job)") for s in secrets])
    spec = parse_spec(data, str(path) + (" (with --set overrides)" if overrides else ""))
    return spec, data


CLUSTER_DIR = Path(__file__).resolve().parent.parent / "cluster_configs"


def choose_cluster(flag: Optional[str], spec_cluster: Optional[str],
                   environ: Optional[dict] = None) -> tuple[Optional[str], str]:
    """Which profile a submission uses, and why: --cluster, then the spec's `cluster:`, then $MEDHPC_CLUSTER, then
    the site default cluster_configs/default.yaml (not in the repository), then the local executor."""
    environ = os.environ if environ is None else environ
    if flag:
        return flag, "--cluster"
    if spec_cluster:
        return spec_cluster, "the spec's cluster: key"
    if environ.get("MEDHPC_CLUSTER"):
        return environ["MEDHPC_CLUSTER"], "$MEDHPC_CLUSTER"
    if (CLUSTER_DIR / "default.yaml").is_file():
        return str(CLUSTER_DIR / "default.yaml"), "the site default cluster_configs/default.yaml"
    return None, "the built-in default"


def resolve_cluster_path(name_or_path: Optional[str]) -> Path:
    """A profile is a path, or a bare name looked up in cluster_configs/ (default: local)."""
    if not name_or_path:
        return CLUSTER_DIR / "local.yaml"
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"} or p.exists() or "/" in name_or_path:
        return p
    return CLUSTER_DIR / f"{name_or_path}.yaml"


def load_cluster(name_or_path: Optional[str]) -> Cluster:
    path = resolve_cluster_path(name_or_path)
    if not path.is_file():
        known = sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml"))
        raise SpecError(str(path), [("", f"cluster profile not found; use one of {', '.join(known)} "
                                         f"or a path to a profile YAML (--cluster)")])
    data = _read_yaml(path, "cluster profile")
    secrets = secret_paths(data)
    if secrets:
        raise SpecError(str(path), [(s, "literal secret in a cluster profile; use '${env:VAR_NAME}'") for s in secrets])
    return validate(Cluster, data, str(path))


def secret_file_problem(path: str) -> Optional[str]:
    """Why a ${file:PATH} secret may not be used (None when it may): it must be a regular file that only its
    owner can read (mode 0600 or 0400), as ssh demands of a private key."""
    p = Path(path)
    if not p.is_absolute():
        return f"${{file:{redact(path, 80)}}}: give an absolute path"
    try:
        st = p.stat()
    except OSError as e:
        return f"${{file:{redact(path, 80)}}}: {e.strerror}"
    if not p.is_file():
        return f"${{file:{redact(path, 80)}}}: not a regular file"
    if st.st_mode & 0o077:
        return (f"${{file:{redact(path, 80)}}} is readable by others (mode {st.st_mode & 0o777:o}); "
                f"run chmod 600 {redact(path, 80)}")
    return None


def secret_references(data: Any, path: str = "") -> list[tuple[str, str]]:
    """(field, file path) of every ${file:PATH} reference in a spec's raw data."""
    out = []
    if isinstance(data, dict):
        for k, v in data.items():
            out += secret_references(v, f"{path}.{k}" if path else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += secret_references(v, f"{path}[{i}]")
    elif isinstance(data, str):
        out += [(path, m.group(1)) for m in FILE_REF.finditer(data)]
    return out


def resolve_refs(value: str, environ: Optional[dict] = None) -> str:
    """Replace ${env:VAR} with the variable's value and ${file:PATH} with the file's content (without its
    trailing newline; the file must be readable by its owner only). Called only inside the running job."""
    environ = os.environ if environ is None else environ

    def sub(m):
        var, file = m.group(1), m.group(2)
        if var is not None:
            if var not in environ:
                raise KeyError(f"environment variable {var} is not set in the job (referenced as ${{env:{var}}})")
            return environ[var]
        problem = secret_file_problem(file)
        if problem:
            raise PermissionError(problem)
        return Path(file).read_text(encoding="utf-8").rstrip("\r\n")

    return ANY_REF.sub(sub, value)
