"""What every configuration model shares: strict pydantic models (unknown keys and inf / nan refused), the
reference patterns (${env:VAR}, ${file:PATH}) and the grammar of values that reach an #SBATCH line."""
from __future__ import annotations

import difflib
import re
from typing import Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from core import registry
from core.errors import SpecError
from core.scheduler.slurm import names as slurm_names
from core.secrets_guard import HIDDEN, redact, safe_quote


ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
FILE_REF = re.compile(r"\$\{file:([^{}\x00-\x1f]+)\}")
ANY_REF = re.compile(ENV_REF.pattern + "|" + FILE_REF.pattern)
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class Strict(BaseModel):
    # inf / nan are refused everywhere: a time, a memory size or a parameter count must be a real number
    model_config = ConfigDict(extra="forbid", defer_build=True, allow_inf_nan=False)


# the values that reach an #SBATCH line are checked against Slurm's grammars (core/scheduler/slurm/names.py)
SLURM_NAME, SLURM_CONSTRAINT, SLURM_HOSTLIST, SLURM_GRES = slurm_names.NAME, slurm_names.CONSTRAINT, \
    slurm_names.HOSTLIST, slurm_names.GRES


def check_env_names(env: dict) -> dict:
    bad = [k for k in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", k)]
    if bad:
        raise ValueError(f"variable names {[redact(k, 40) for k in bad]} are not valid: use letters, digits and '_', "
                         f"not starting with a digit")
    return env


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
        if len(loc) == 1 and "workload" in model.model_fields:  # a job spec: its sections come from the registry
            owner = registry.sections().get(str(loc[0]))
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
