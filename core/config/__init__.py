"""Configuration: the job spec and cluster profile schemas and their loading, as validated pydantic models.

- core/config/base.py     strict models, validation with errors that name the field and the fix, Slurm-bound grammars
- core/config/job.py      the job spec (generic sections + each workload's own, from the registry)
- core/config/cluster.py  the cluster profile (where jobs go, what nodes have, scheduler limits, in-task settings)
- core/config/loading.py  untrusted YAML -> models: `--set` overrides, choosing and loading a profile
- core/config/refs.py     `${env:VAR}` / `${file:PATH}` references, resolved only inside the job

Every failure is a `SpecError` that names the file, the field path and the fix; nothing here submits anything and
nothing here imports torch. Import from `core.config`: the names below are its interface.
"""
from __future__ import annotations

from core.config.base import (ANY_REF, CONTROL, ENV_REF, FILE_REF, Strict, check_env_names, validate)  # noqa: F401
from core.config.job import (ArraySpec, DataSpec, DeepSpeedSpec, HangSpec, JobSpec, MAX_ARRAY_ITEMS, MAX_MINUTES, MAX_NODES,
                             MAX_TASKS_PER_NODE, ModelSpec, Outputs, PeftSpec, Resources, TrainSection,
                             parse_minutes, parse_spec, spec_class)  # noqa: F401
from core.config.cluster import (Cluster, HCCL_BASE_PORT_MAX)  # noqa: F401
from core.config.loading import (CLUSTER_DIR, _read_yaml, apply_override, choose_cluster, control_characters,
                                 load_cluster, load_spec, resolve_cluster_path)  # noqa: F401
from core.config.refs import (resolve_refs, secret_file_problem, secret_references)  # noqa: F401
from core.errors import FieldError, SpecError  # noqa: F401
