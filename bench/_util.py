"""Small helpers for the bench scripts: wall-time of whole processes, medians."""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def wall(cmd, repeat: int = 5, **kw) -> float:
    """Median wall time in seconds of running `cmd` as a fresh process."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=False, capture_output=True, cwd=REPO, **kw)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
