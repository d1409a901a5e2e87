"""Report pages (core/report.py) beyond the Chromium tests of test_tracking / test_study, without Slurm: a study
page names each step's state and the failure class its tasks printed; an array without a merge step gets a page
from its tasks. (A local-executor run's page holding its plan: test_study's local-executor study test.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import html_tables

ROOT = Path(__file__).resolve().parents[1]


def test_study_page_shows_each_steps_state_and_failure_class(tmp_path):
    """A study record (local executor: its states come from the record, as core.study.step_states gives them) with
    a done step, a failed one whose task log carries a failure mark, and one never run: the steps table says so."""
    from core.failure_mark import mark_line
    from core.report import study_report

    runs = {n: tmp_path / f"run_{n}" for n in ("scan", "prune")}
    for d in runs.values():
        (d / "submitit").mkdir(parents=True)
    (runs["prune"] / "submitit" / "7_1_0_log.err").write_text(
        "Traceback (most recent call last):\nRuntimeError: boom\n" + mark_line("data", "ratio 0.5: bad heldout line 3")
        + "\n")
    (runs["scan"] / "submitit" / "6_0_log.err").write_text("all fine\n")
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({"study": "pages", "executor": "local", "steps": {
        "scan": {"run_dir": str(runs["scan"]), "job_ids": ["local"], "state": "done", "dependency": []},
        "prune": {"run_dir": str(runs["prune"]), "job_ids": ["local"], "state": "failed",
                  "detail": "ratio 0.5 raised", "dependency": []},
        "table": {"job_ids": [], "state": "not run", "dependency": []}}}))
    rows = html_tables(study_report(study))["steps"]
    head = rows[0]
    got = {r[0]: dict(zip(head, r)) for r in rows[1:]}
    assert head[:7] == ["step", "jobs", "waited for", "state", "detail", "failure class", "failure cause"]
    assert got["scan"]["state"] == "done" and got["scan"]["failure class"] == ""
    assert got["prune"]["state"] == "failed" and got["prune"]["detail"] == "ratio 0.5 raised"
    assert got["prune"]["failure class"] == "data"
    assert got["prune"]["failure cause"] == "data: ratio 0.5: bad heldout line 3"
    assert got["table"]["state"] == "not run" and got["table"]["run page"] == ""


ARRAY_TASKS = r'''
import sys
from core.config import load_spec
from core.runtime import TaskEntry

run_dir = sys.argv[1]
raw = load_spec("jobs/tiny/smoke.yaml", ("resources.array.items=2", "resources.array.merge=false"))[1]
for i in (0, 1):  # what each array task of a plan without a merge step runs (core.submit._entry: last_step)
    TaskEntry(spec_data=raw, cluster_data={"accelerator": "cpu", "executor": "local"}, workload="smoke",
              entry="run", step="main", run_dir_template=run_dir, last_step=True)(i, [i])
'''


def test_an_array_without_a_merge_step_gets_a_page_from_its_tasks(tmp_path):
    """Two array tasks of a step no later step waits for, through the task entry as Slurm runs them: after the
    second, report.html lists both tasks."""
    run_dir = tmp_path / "arr" / "123"
    res = subprocess.run([sys.executable, "-c", ARRAY_TASKS, str(run_dir)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    tasks = html_tables((run_dir / "report.html").read_text())["tasks"]
    assert tasks[0][:2] == ["step", "task"]
    assert sorted((r[0], r[1]) for r in tasks[1:]) == [("main", "0"), ("main", "1")]


def test_failure_marks_are_read_from_the_logs_tail_only(tmp_path):
    """A task's failure mark is found in the last 20 kB of its log; a long log is not read whole (a mark buried
    before that is an earlier attempt's, and reading gigabytes of a chatty log would stall the page)."""
    from core.failure_mark import mark_line
    from core.report import step_failures

    sub = tmp_path / "submitit"
    sub.mkdir()
    (sub / "7_0_log.err").write_text(mark_line("hang", "old attempt") + "\n" + "x" * 50_000 + "\n"
                                     + mark_line("node", "n2: device check failed") + "\n")
    (sub / "7_1_log.err").write_text(mark_line("node", "n2: device check failed") + "\n")
    (sub / "8_0_log.err").write_text(mark_line("hang", "buried") + "\n" + "y" * 30_000 + "\n")
    assert step_failures(tmp_path) == [("node", "n2: device check failed")]
