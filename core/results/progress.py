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


def noted(items: list, progress: Optional[tuple[Path, str]], rank: int = 0):
    """The items, one by one, with rank 0's notes of how many are done (`progress`: (run folder, what); None: no
    notes): 0 of N before the first, n of N after each."""
    if progress is not None:
        note(progress[0], progress[1], 0, len(items), rank)
    for n, item in enumerate(items, 1):
        yield item
        if progress is not None:
            note(progress[0], progress[1], n, len(items), rank)


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


class RunProgress:
    """What a run has done since the last look, as lines to print: 'step N/T: loss L (S s)' as it trains (its
    metrics.csv) and '<what>: D/T (S s)' as its other long work advances (`note`). At most one step line and one
    note line every `every_s` seconds; a new piece of work at once (after the last step not shown yet); when the
    run has ended, its last step and its last note."""

    def __init__(self, run_dir: Path, total_steps: Optional[int] = None, every_s: float = 10.0,
                 clock=time.monotonic):
        self.run_dir, self.every_s, self.clock = Path(run_dir), every_s, clock
        self.of = f"/{total_steps}" if total_steps else ""
        self.start = clock()
        self.shown_step: Optional[str] = None
        self.step_at = -every_s
        self.shown_note: Optional[tuple[str, int, int]] = None
        self.note_at = -every_s

    def lines(self, ended: bool = False) -> list[str]:
        now = self.clock()
        step_line = note_line = None
        row = last_row(self.run_dir / "metrics.csv")
        found = read_note(self.run_dir)
        new_piece = found is not None and (self.shown_note is None or found[0] != self.shown_note[0])
        if row is not None and row["step"] != self.shown_step and (ended or new_piece
                                                                   or now - self.step_at >= self.every_s):
            loss = row.get("loss", "")
            try:
                loss = f"{float(loss):.4f}"
            except ValueError:
                pass
            step_line = f"  step {row['step']}{self.of}: loss {loss} ({now - self.start:.0f} s)"
            self.shown_step, self.step_at = row["step"], now
        if found is not None and found != self.shown_note:
            if new_piece or ended or found[1] >= found[2] or now - self.note_at >= self.every_s:
                text = f"{found[0]}: {found[1]}/{found[2]}" if found[2] else found[0]
                note_line = f"  {text} ({now - self.start:.0f} s)"
                self.shown_note, self.note_at = found, now
        if step_line and note_line and _mtime(self.run_dir / NOTE) < _mtime(self.run_dir / "metrics.csv"):
            return [note_line, step_line]   # the note came first (starting DeepSpeed, then the steps)
        return [line for line in (step_line, note_line) if line]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def follow_training(run_dir: Path, jobs: list, out, total_steps: Optional[int] = None, every_s: float = 10.0,
                    poll_s: float = 1.0, clock=time.monotonic, sleep=time.sleep) -> int:
    """RunProgress's lines for a run on the local executor until every job is done; returns the lines printed."""
    progress, printed, ended = RunProgress(run_dir, total_steps, every_s, clock), 0, False
    while not ended:
        ended = all(j.done() for j in jobs)
        if not ended:
            sleep(poll_s)
        for line in progress.lines(ended):
            out.write(line + "\n")
            out.flush()
            printed += 1
    return printed
