"""Slurm's grammars: what a value may look like before it reaches an #SBATCH line, Slurm's time format, and its
array-task and host-list notations. Imports nothing of the project but the redaction of values in messages."""
from __future__ import annotations

import re
from typing import Optional

from core.secrets_guard import redact


def _pattern(regex: str, what: str, example: str):
    """A validator for a value that reaches an sbatch line: the whole value must match `regex`."""
    compiled = re.compile(regex)

    def check(v):
        if v is not None and not compiled.fullmatch(v):
            raise ValueError(f"'{redact(v)}' is not a valid {what}: use only {example}")
        return v
    return check


NAME = _pattern(r"[A-Za-z0-9][A-Za-z0-9_.+\-]{0,127}(,[A-Za-z0-9][A-Za-z0-9_.+\-]{0,127})*",
                "Slurm name", "letters, digits, '_', '.', '+', '-' (a comma-separated list for several)")
CONSTRAINT = _pattern(r"[A-Za-z0-9_.,:|&!*()\[\]+\-]{1,512}", "Slurm constraint",
                      "feature names and the operators & | , [ ] ( ) * !")
HOSTLIST = _pattern(r"[A-Za-z0-9_.,\[\]\-]{1,4096}", "Slurm host list", "host names and ranges like n[1-4],gpu7")
GRES = _pattern(r"[A-Za-z0-9_:.,\-]*(\{devices\}[A-Za-z0-9_:.,\-]*)*", "GRES",
                "a Slurm GRES like gpu:{devices} or gpu:a100:8 ({devices} is the only placeholder)")


def minutes(text: str) -> Optional[int]:
    """Slurm's MaxTime ('UNLIMITED', '30:00', '1-00:00:00', '2-12') -> minutes (None: no limit)."""
    if not text or text.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        return None
    days, a, b, c = m.groups()
    if days is not None and b is None:        # D-HH
        return int(days) * 1440 + int(a) * 60
    if days is not None:                      # D-HH:MM[:SS]
        return int(days) * 1440 + int(a) * 60 + int(b)
    if c is not None:                         # HH:MM:SS
        return int(a) * 60 + int(b) + (1 if int(c) else 0)
    if b is not None:                         # MM:SS
        return int(a) + (1 if int(b) else 0)
    return int(a)                             # MM


def expand_task_ids(job_id: str) -> list[str]:
    """'12_[3-5,9%2]' -> ['12_3', '12_4', '12_5', '12_9']; plain ids come back unchanged."""
    if "[" not in job_id:   # most ids of a refresh: no pattern to match
        return [job_id]
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not m:
        return [job_id]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += [f"{base}_{i}" for i in range(int(a), int(b or a) + 1)]
    return out


def pairs(line: str) -> dict[str, str]:
    """`Key=Value Key2=Value2 ...` (scontrol -o) -> dict."""
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))


def parse_node_list(nodelist: str) -> list[str]:
    """'n[1-3],gpu7' -> ['n1', 'n2', 'n3', 'gpu7'] (submitit's own parser of Slurm's host lists)."""
    from submitit.slurm.slurm import _parse_node_list

    return _parse_node_list(nodelist)
