"""While a run on the local executor trains in a child process, the submitting terminal shows how far it got: a line
whenever the run's metrics.csv (written by core.engine on rank 0, one row per optimizer step) has moved on, at most
every `every_s` seconds, until the run's jobs have ended. On a scheduler with a queue `--wait` follows the jobs'
states instead (core.submission.follow_job)."""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Optional


def last_row(metrics_csv: Path) -> Optional[dict]:
    """The newest row of metrics.csv (its header and last complete line; None before the first step)."""
    try:
        with open(metrics_csv, "rb") as f:
            header = f.readline().decode(errors="replace")
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 4096))
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    tail = data.splitlines()
    if not data.endswith("\n"):   # the engine is writing that row: the one before is the newest complete one
        tail = tail[:-1]
    lines = [ln for ln in tail if ln.strip() and ln.strip() != header.strip()]
    if not header or not lines:
        return None
    rows = list(csv.DictReader(io.StringIO(header + lines[-1] + "\n")))
    return rows[0] if rows and rows[0].get("step", "").isdigit() else None


def follow_training(run_dir: Path, jobs: list, out, total_steps: Optional[int] = None, every_s: float = 10.0,
                    poll_s: float = 1.0, clock=time.monotonic, sleep=time.sleep) -> int:
    """Print 'step N/T: loss L (S s)' as the run advances until every job is done; returns the lines printed."""
    start, shown, last_print, printed = clock(), None, -every_s, 0
    of = f"/{total_steps}" if total_steps else ""

    def show(row: dict, now: float) -> None:
        loss = row.get("loss", "")
        try:
            loss = f"{float(loss):.4f}"
        except ValueError:
            pass
        out.write(f"  step {row['step']}{of}: loss {loss} ({now - start:.0f} s)\n")
        out.flush()

    ended = False
    while not ended:
        ended = all(j.done() for j in jobs)
        if not ended:
            sleep(poll_s)
        now = clock()
        if not ended and now - last_print < every_s:
            continue
        row = last_row(Path(run_dir) / "metrics.csv")
        if row is None or row["step"] == shown:
            continue
        show(row, now)    # and once more when the jobs have ended: the last step is always shown
        shown, last_print, printed = row["step"], now, printed + 1
    return printed
