"""While a run on the local executor works in a child process, the submitting terminal shows how far it got: a line
whenever the run's metrics.csv (written by core.engine on rank 0, one row per optimizer step) has moved on, and a
line as a task's other long work advances (scoring, generation: `note`, written by rank 0 to <run>/progress.json),
at most every `every_s` seconds each, until the run's jobs have ended. On a scheduler with a queue `--wait` follows
the jobs' states instead (core.submission.follow_job)."""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Optional

NOTE = "progress.json"
_NOTED: dict[str, tuple[str, float]] = {}   # run folder -> (what, when) of the last note written


def note(run_dir: Path, what: str, done: int = 0, total: int = 0, rank: int = 0, every_s: float = 2.0) -> None:
    """Rank 0 says what the task is doing besides training steps, and how far a counted piece of it has got
    ('starting DeepSpeed (ZeRO-3)'; 'scoring the untrained model', 3, 8): <run>/progress.json, replaced
    atomically, at most every `every_s` seconds per run (the first and the last of a piece always). Other ranks
    write nothing."""
    if rank != 0:
        return
    from core.run_folder import write_json_atomic

    key, now = str(run_dir), time.monotonic()
    last = _NOTED.get(key)
    if last is not None and last[0] == what and 0 < done < total and now - last[1] < every_s:
        return
    _NOTED[key] = (what, now)
    write_json_atomic(Path(run_dir) / NOTE, {"what": what, "done": int(done), "total": int(total)})


def read_note(run_dir: Path) -> Optional[tuple[str, int, int]]:
    """(what, done, total) of the run's latest note; None without one (or while it cannot be read)."""
    try:
        data = json.loads((Path(run_dir) / NOTE).read_text())
        return str(data["what"]), int(data["done"]), int(data["total"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    """Print 'step N/T: loss L (S s)' as the run trains and '<what>: D/T (S s)' as its other long work advances
    (`note`), until every job is done; returns the lines printed. A new piece of work is shown at once; the last
    step, and the end of each piece, always."""
    start, printed = clock(), 0
    of = f"/{total_steps}" if total_steps else ""
    shown_step, step_at = None, -every_s
    shown_note: Optional[tuple[str, int, int]] = None
    note_at = -every_s

    def say(text: str, now: float) -> None:
        nonlocal printed
        out.write(f"  {text} ({now - start:.0f} s)\n")
        out.flush()
        printed += 1

    ended = False
    while not ended:
        ended = all(j.done() for j in jobs)
        if not ended:
            sleep(poll_s)
        now = clock()
        row = last_row(Path(run_dir) / "metrics.csv")
        found = read_note(run_dir)
        new_piece = found is not None and (shown_note is None or found[0] != shown_note[0])
        # a step not shown yet goes first when the jobs end or other work starts (the last step before evaluation)
        if row is not None and row["step"] != shown_step and (ended or new_piece or now - step_at >= every_s):
            loss = row.get("loss", "")
            try:
                loss = f"{float(loss):.4f}"
            except ValueError:
                pass
            say(f"step {row['step']}{of}: loss {loss}", now)
            shown_step, step_at = row["step"], now
        if found is not None and found != shown_note:
            if new_piece or ended or found[1] >= found[2] or now - note_at >= every_s:
                say(f"{found[0]}: {found[1]}/{found[2]}" if found[2] else found[0], now)
                shown_note, note_at = found, now
    return printed
