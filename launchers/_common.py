"""Shared by the launchers: make `core` importable from a checkout and print errors the same way."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import warnings  # noqa: E402

# libraries' deprecation notices (transformers, peft) are for their callers' developers, not for a person submitting
warnings.filterwarnings("ignore", category=FutureWarning)
# pydantic otherwise scans every installed package's entry points for plugins at first use (~20 ms per launch)
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The project's local Slurm (slurm/local_cluster.sh) keeps its slurm.conf in its own state dir, never in /etc/slurm.
# Slurm's clients (sbatch via submitit, squeue, sacct, scancel, scontrol; jobs inherit it from sbatch) find it
# through SLURM_CONF: set it when nothing else is configured, so the README's commands work without exporting it.
LOCAL_SLURM_CONF = Path(os.environ.get("SLURM_LOCAL_STATE") or "/var/lib/slurm-local") / "etc" / "slurm.conf"
if not os.environ.get("SLURM_CONF") and not Path("/etc/slurm/slurm.conf").exists() and LOCAL_SLURM_CONF.is_file():
    os.environ["SLURM_CONF"] = str(LOCAL_SLURM_CONF)


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def unexpected(what: str, error: BaseException) -> NoReturn:
    """An error nobody planned for: one line naming the stage; MEDHPC_DEBUG=1 re-raises for the traceback."""
    if os.environ.get("MEDHPC_DEBUG"):
        raise error
    from core.secrets_guard import redact

    fail(f"{what} failed: {type(error).__name__}: {redact(str(error), 300)} (MEDHPC_DEBUG=1 shows the traceback)\n"
         f"nothing was submitted")
