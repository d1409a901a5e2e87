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

# the scheduler's clients find the right cluster (the project's local Slurm keeps its slurm.conf in its own folder)
from core import scheduler  # noqa: E402

scheduler.prepare_clients()


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
