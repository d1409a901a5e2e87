"""Shared by the launchers: make `core` importable from a checkout and print errors the same way."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

# pydantic otherwise scans every installed package's entry points for plugins at first use (~20 ms per launch)
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


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
