"""References instead of secrets: `${env:VAR}` and `${file:PATH}` (a file only its owner can read), found in a
spec and resolved only inside the running job."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional


from core.secrets_guard import redact
from core.config.base import ANY_REF, FILE_REF


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
