"""Loading untrusted YAML into the schemas: specs with `--set a.b=value` overrides typed by the schema, cluster
profiles and which one applies, errors that name the file, the field and the fix (closest valid key suggested),
literal secrets and control characters refused."""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel

from core.errors import SpecError
from core.safe_yaml import MAX_BYTES, YamlError, load_yaml
from core.secrets_guard import redact, secret_paths
from core.config.base import CONTROL, _model_at, validate
from core.config.cluster import Cluster
from core.config.job import JobSpec, _spec_class_for, parse_spec


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


CLUSTER_DIR = Path(__file__).resolve().parents[2] / "cluster_configs"


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
