"""The one line a task prints when it knows why it is ending (a hang caught by the watchdog, a node that failed its
health check, a data error): `[medhpc] failure <class>: <cause>`. Whoever classifies a finished job (status, the
retry policy, `submit.py --wait`) trusts the last such line of a task's log over any guess from the log's text.

Classes are lower-case words (hang, node, data, exception, ...); the cause is one line, with no secrets."""
from __future__ import annotations

import re
import sys
from typing import Optional, TextIO

MARK = "[medhpc] failure"
PATTERN = re.compile(r"^\[medhpc\] failure (?P<klass>[a-z][a-z_]*): (?P<cause>.*)$", re.M)


def mark_line(klass: str, cause: str) -> str:
    """The line for a class and a cause (the cause flattened to one line)."""
    if not re.fullmatch(r"[a-z][a-z_]*", klass):
        raise ValueError(f"failure class {klass!r}: lower-case letters and _ only")
    return f"{MARK} {klass}: {' '.join(str(cause).split())}"


def report(klass: str, cause: str, stream: Optional[TextIO] = None) -> str:
    """Print the mark to the task's log (stderr by default) and flush it; returns the line."""
    line = mark_line(klass, cause)
    stream = sys.stderr if stream is None else stream
    print(line, file=stream, flush=True)
    return line


def find(text: str) -> Optional[tuple[str, str]]:
    """(class, cause) of the last mark in a log's text; None when the task printed none."""
    found = None
    for m in PATTERN.finditer(text):
        found = (m.group("klass"), m.group("cause").strip())
    return found


def find_in_file(path, tail_bytes: int = 20000) -> Optional[tuple[str, str]]:
    """find() over the last `tail_bytes` of a log file (a mark is among a task's last lines; a long log is not
    read whole); None when the file cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - tail_bytes))
            return find(f.read().decode(errors="replace"))
    except OSError:
        return None
