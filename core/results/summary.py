"""The short summary a finished submission prints: per step its state and time, then each task's typed result
(core.results.TaskResult): the training line, the result files and the headline metrics, trained next to untrained
where the workload scored both. The full results stay in the run folder (tasks/*.json, results/)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import run_folder
from core.results.task_result import RESULT_FILE_SUFFIXES, TaskResult

if TYPE_CHECKING:
    from core.submit import Submission

HEADLINE_ROWS = 16
TEXT_WIDTH = 60


def report_results(submission: "Submission", out=None) -> int:
    """Wait for every job of a submission and print a short summary a person reads: per step its state and time,
    for training the steps, first and last loss and throughput, the result files and the headline metrics in a
    small table. The full results stay in the run folder (tasks/*.json, results/). Exit code 1 if any failed."""
    out = out or sys.stdout
    failed = 0
    run_dir = submission.run_dir
    for step, jobs in submission.jobs.items():
        results = []
        for j in jobs:
            try:
                results.append(j.results()[0])
            except Exception as e:  # the job's own traceback is in its log
                failed += 1
                out.write(f"{step} {j.job_id}: FAILED ({type(e).__name__}); log: {j.paths.stdout}\n")
        if not results:
            continue
        records = [r for r in run_folder.task_records(run_dir, step) if r["rank"] == 0]
        seconds = max((r["seconds"] for r in records), default=None)
        took = f" in {seconds:.0f} s" if seconds is not None else ""
        out.write(f"{step}: {len(results)} task{'s' if len(results) > 1 else ''} done{took} "
                  f"(job {', '.join(dict.fromkeys(j.job_id.split('_')[0] for j in jobs))})\n")
        for line in summary_lines([TaskResult.from_dict(r) for r in results], run_dir):
            out.write(f"  {line}\n")
    page = run_dir / "report.html"
    out.write(f"full results and logs under {run_dir}" + (f"; the run's page: {page}" if page.is_file() else "")
              + "\n")
    return 1 if failed else 0


def summary_lines(results: list[TaskResult], run_dir: Path) -> list[str]:
    """The lines under a step: the first task's training and metrics, every task's result files (once each)."""
    first = results[0]
    lines = []
    line = training_line(first, Path(run_dir) / "metrics.csv")
    if line:
        lines.append(line)
    files = [(name, path) for r in results for name, path in r.files.items()]
    for name, path in dict.fromkeys(files):
        lines.append(f"{name}: {path}")
    table = headline(first.headline())
    before = dict(headline(first.untrained)) if first.untrained is not None else {}
    if table and before:  # the workload also scored the untrained model: both side by side
        width = max(len(k) for k, _ in table)
        cols = max(9, *(len(v) for _, v in table))
        lines.append(f"{'':<{width}}  {'untrained':>{cols}}  {'trained':>{cols}}")
        lines += [f"{k:<{width}}  {before.get(k, ''):>{cols}}  {v:>{cols}}" for k, v in table]
    elif table:
        width = max(len(k) for k, _ in table)
        lines += [f"{k:<{width}}  {v}" for k, v in table]
    return lines


def training_line(result: TaskResult, metrics_csv: Path) -> str:
    """`training: N steps (resumed at step S), loss A -> B, R steps/s in the train loop` from the Trainer's
    metrics.csv (its loss per step and the seconds each took); empty without training or rows."""
    if result.training is None or not metrics_csv.is_file():
        return ""
    import csv

    with metrics_csv.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return ""
    step_s = sum(float(r.get("seconds") or 0) for r in rows)
    rate = f", {len(rows) / step_s:.2f} steps/s in the train loop" if step_s else ""
    resumed = f" (resumed at step {result.training.start_step})" if result.training.resumed_at else ""
    return (f"training: {result.training.steps} steps{resumed}, loss {float(rows[0]['loss']):.4f} -> "
            f"{float(rows[-1]['loss']):.4f}{rate}")


def headline(values: dict[str, Any]) -> list[tuple[str, str]]:
    """Short scalar results as (name, text): numbers to 4 decimals, short labels as they are (not paths, not
    flags), at most HEADLINE_ROWS."""
    out = []
    for key, value in values.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, float):
            out.append((key, f"{value:.4f}"))
        elif isinstance(value, int):
            out.append((key, str(value)))
        elif isinstance(value, str) and len(value) <= TEXT_WIDTH and not value.endswith(RESULT_FILE_SUFFIXES) \
                and "/" not in value:
            out.append((key, value))
    return out[:HEADLINE_ROWS]
