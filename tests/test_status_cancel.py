"""status.py / cancel.py against the real local Slurm: states as sacct reports them, one call each per refresh."""
from __future__ import annotations

import getpass
import json
import os
import subprocess
import time

import pytest

from conftest import cli, queue_ids, record, run_folder, sacct_states, submit, wait_terminal

from core import monitor
from core.cancel import belongs_to_run
from core.scheduler.slurm import queue as slurm_queue
from core.scheduler.slurm.names import expand_task_ids

ARRAY = "jobs/tiny/smoke_array.yaml"


def submit_record(*args):
    """`submit` of one run: its run record (run.json)."""
    return record(run_folder(submit(*args).stdout))


def wait_until(pred, timeout=60):
    t0 = time.time()
    while not pred():
        assert time.time() - t0 < timeout, "condition not reached"
        time.sleep(0.5)


def rows_by_id(name):
    return {r.job_id: r for r in monitor.query() if r.name.startswith(name)}


def test_status_shows_completed_failed_pending_cancelled_and_cancel_by_id_and_name(slurm, uname, tmp_path):
    common = ("-c", "local_slurm", "--set", f"outputs.logs_dir={tmp_path}")
    ok = submit_record(ARRAY, *common, "--set", f"name={uname}ok", "--set", "resources.array.items=3",
                       "--set", "resources.array.merge=false")
    bad = submit_record(ARRAY, *common, "--set", f"name={uname}bad", "--set", "resources.array.items=2",
                        "--set", "smoke.fail_items=[1]", "--set", "resources.array.merge=false")
    slow = submit_record(ARRAY, *common, "--set", f"name={uname}slow", "--set", "resources.array.items=2",
                         "--set", "smoke.sleep_s=120", "--set", "resources.array.parallelism=2")
    single = submit_record("jobs/tiny/smoke.yaml", *common, "--set", f"name={uname}one", "--set", "smoke.sleep_s=120")
    ok_id, bad_id = ok["steps"][0]["job_ids"][0], bad["steps"][0]["job_ids"][0]
    slow_id, merge_id = slow["steps"][0]["job_ids"][0], slow["steps"][1]["job_ids"][0]
    single_id = single["steps"][0]["job_ids"][0]
    wait_terminal([ok_id], expect_tasks=3)
    wait_terminal([bad_id], expect_tasks=2)
    wait_until(lambda: rows_by_id(uname).get(slow_id) and rows_by_id(uname)[slow_id].state == "RUNNING")

    rows = rows_by_id(uname)
    assert rows[ok_id].state == "COMPLETED" and rows[ok_id].progress == {"done": 3, "running": 0, "pending": 0,
                                                                          "failed": 0}
    assert rows[bad_id].state == "FAILED" and rows[bad_id].progress["failed"] == 1
    assert rows[merge_id].state == "PENDING" and "Dependency" in rows[merge_id].reason
    assert rows[slow_id].run_dir == slow["run_dir"] and rows[merge_id].run_dir == slow["run_dir"]
    table = cli("status", "--name", uname, "--all")
    assert table.returncode == 0
    lines = {ln.split()[0]: ln for ln in table.stdout.splitlines()[1:] if not ln.lstrip().startswith("pending:")}
    assert "COMPLETED" in lines[ok_id] and "3/0/0/0 of 3" in lines[ok_id]
    assert "FAILED" in lines[bad_id] and "1/0/0/1 of 2" in lines[bad_id]
    assert "PENDING" in lines[merge_id]
    # one block per run: the slow array and its merge step sit under the same run line
    runs = {r["run_dir"]: r for r in json.loads(cli("status", "--name", uname, "--json").stdout)}
    slow_run = runs[slow["run_dir"]]
    assert [j["job_id"] for j in slow_run["jobs"]] == [slow_id, merge_id] and slow_run["state"] == "RUNNING"
    assert sum(1 for ln in table.stdout.splitlines() if ln.startswith("run ")) == len(runs)

    by_id = cli("cancel", single_id)
    assert by_id.returncode == 0 and single_id in by_id.stdout
    by_name = cli("cancel", f"{uname}slow")  # the array and its merge step
    assert by_name.returncode == 0 and slow_id in by_name.stdout and merge_id in by_name.stdout
    assert wait_terminal([single_id]) == {single_id: "CANCELLED"}
    assert wait_terminal([merge_id]) == {merge_id: "CANCELLED"}
    assert set(wait_terminal([slow_id], expect_tasks=2).values()) == {"CANCELLED"}
    wait_until(lambda: rows_by_id(uname)[single_id].state == "CANCELLED")
    assert rows_by_id(uname)[slow_id].state == "CANCELLED"
    assert cli("cancel", "no_such_job_name").returncode != 0


def counted_clients(monkeypatch) -> list[str]:
    """The Slurm clients status runs, in order: both ways it runs one (its answer whole: run, or line by line while
    the client writes: lines) are counted."""
    calls: list[str] = []
    for way in ("run", "lines"):
        real = getattr(slurm_queue, way)
        monkeypatch.setattr(slurm_queue, way, lambda cmd, real=real: (calls.append(cmd[0]), real(cmd))[1])
    return calls


def test_one_squeue_and_one_sacct_call_per_refresh(slurm, monkeypatch):
    calls = counted_clients(monkeypatch)
    monitor.query()
    monitor.query()
    assert calls == ["squeue", "sacct", "squeue", "sacct"]


def test_watch_backs_off_while_nothing_changes_and_stops_when_idle(capsys):
    frames = iter([("a", True)] * 5 + [("b", True), ("b", False)])
    waits = []
    n = monitor.watch(lambda: next(frames), interval=2, max_interval=10, sleep=waits.append)
    assert n == 7 and waits == [2, 4, 8, 10, 10, 2]
    assert capsys.readouterr().out.split() == ["a", "b"]


def test_expand_task_ids():
    assert expand_task_ids("12_[3-5,9%2]") == ["12_3", "12_4", "12_5", "12_9"]
    assert expand_task_ids("12_7") == ["12_7"] and expand_task_ids("12") == ["12"]


def test_watch_asks_sacct_only_when_a_job_left_the_queue(slurm, uname, tmp_path, monkeypatch):
    calls = counted_clients(monkeypatch)
    rec = submit_record("jobs/tiny/smoke.yaml", "-c", "local_slurm", "--set", f"name={uname}",
                        "--set", "smoke.sleep_s=120", "--set", f"outputs.logs_dir={tmp_path}")
    job = rec["steps"][0]["job_ids"][0]
    now = [0.0]
    refresher = slurm_queue.Refresher(full_every_s=60, clock=lambda: now[0])
    wait_until(lambda: job in {r.job_id for r in refresher.query() if r.state == "RUNNING"})
    # Other jobs of this user (an earlier test's, draining) may leave the queue meanwhile, and then sacct is right
    # to be asked: every refresh must ask sacct exactly when a job left the queue, and a quiet refresh must not.
    quiet = 0
    for _ in range(20):
        before = set(refresher.live_ids)
        calls.clear()
        rows = {r.job_id: r for r in refresher.query()}
        left = before - refresher.live_ids
        assert rows[job].state == "RUNNING" and calls == ["squeue"] + (["sacct"] if left else []), left
        quiet += not left
        if quiet >= 2:
            break
    assert quiet >= 2  # refreshes where nothing left the queue asked squeue only
    now[0] = 61.0
    refresher.query()
    assert calls[-2:] == ["squeue", "sacct"]  # the periodic full refresh
    assert cli("cancel", job).returncode == 0
    wait_terminal([job])
    wait_until(lambda: job not in queue_ids())  # gone from squeue (after COMPLETING)
    calls.clear()
    rows = {r.job_id: r for r in refresher.query()}
    assert calls == ["squeue", "sacct"] and rows[job].state == "CANCELLED"  # it left the queue: sacct asked


def test_cancel_by_name_cancels_only_that_runs_steps(slurm, uname, tmp_path):
    """`cancel x` cancels run x (its array and its x-merge step) but neither run `x-test` (reads like x + step
    test) nor run `x-merge` (its job has the very name of x's merge step): the run folder in the comment decides."""
    common = ("-c", "local_slurm", "--set", f"outputs.logs_dir={tmp_path}", "--set", "smoke.sleep_s=60")
    x = submit_record(ARRAY, *common, "--set", f"name={uname}x", "--set", "resources.array.items=2")
    x_test = submit_record("jobs/tiny/smoke.yaml", *common, "--set", f"name={uname}x-test")
    x_merge = submit_record("jobs/tiny/smoke.yaml", *common, "--set", f"name={uname}x-merge")
    x_ids = [i for st in x["steps"] for i in st["job_ids"]]
    others = [x_test["steps"][0]["job_ids"][0], x_merge["steps"][0]["job_ids"][0]]
    assert [st["name"] for st in x["steps"]] == ["main", "merge"]

    try:
        res = cli("cancel", f"{uname}x")
        assert res.returncode == 0, res.stderr
        assert sorted(res.stdout.split()[1:]) == sorted(x_ids)
        assert set(wait_terminal(x_ids).values()) == {"CANCELLED"}  # tasks (or the pending array) and merge
        assert set(others) <= queue_ids()  # both other runs are still queued or running
        assert all(s in ("PENDING", "RUNNING") for s in sacct_states(others).values())

        again = cli("cancel", f"{uname}x")  # nothing of x is left: an error that names the run
        assert again.returncode == 1 and f"no queued job of a run named {uname}x" in again.stderr
        assert set(others) <= queue_ids()
        assert cli("cancel", *others).returncode == 0
        wait_terminal(others)
    finally:
        subprocess.run(["scancel", *x_ids, *others], capture_output=True)


def test_belongs_to_run_uses_the_run_folder_then_known_step_names(tmp_path):
    def folder(name, steps):
        d = tmp_path / name / "7"
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"name": name, "steps": [{"name": s} for s in steps]}))
        return f"run={d}"

    own, longer = folder("smoke", ["main", "merge"]), folder("smoke-test", ["main"])
    assert belongs_to_run("smoke", "smoke", own, "7")
    assert belongs_to_run("smoke", "smoke-merge", own, "7")
    assert not belongs_to_run("smoke", "smoke-baseline", own, "7")  # not a step of this run
    assert not belongs_to_run("smoke", "smoke-test", longer, "7")
    assert not belongs_to_run("smoke", "smoke-merge", f"run={tmp_path / 'smoke-merge' / '8'}", "8")
    assert belongs_to_run("smoke", "smoke", f"run={tmp_path / 'smoke' / '%A'}", "9")  # no run.json yet
    # jobs without our comment (sbatch by hand): the run's name or one of our step names only
    assert belongs_to_run("smoke", "smoke-merge", "(null)", "5")
    assert not belongs_to_run("smoke", "smoke-test", "(null)", "5")
    assert not belongs_to_run("smoke", "smoked", "(null)", "5")


def sbatch(*args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", "--chdir=/tmp", "-o", "/dev/null", *args, "--wrap", "sleep 60"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def test_cancel_by_id_refuses_another_users_job_unless_any_user(slurm, uname):
    me = getpass.getuser()
    if os.geteuid() != 0:
        pytest.skip("submitting as another user needs root (sbatch --uid)")
    other = "nobody" if me != "nobody" else "daemon"
    theirs = sbatch(f"--uid={other}", "-J", f"{uname}theirs")
    mine = sbatch("-J", f"{uname}mine")
    wait_until(lambda: {theirs, mine} <= queue_ids())

    try:
        res = cli("cancel", mine, theirs)  # mine is cancelled, theirs refused: exit 1, one line naming job and owner
        assert res.returncode == 1 and res.stdout.split() == ["cancelled", mine]
        assert res.stderr.strip() == (f"error: refused {theirs}: job {theirs} ({uname}theirs) belongs to user "
                                      f"{other}, not {me}; add --any-user to cancel another user's job")
        assert wait_terminal([mine]) == {mine: "CANCELLED"}
        assert theirs in queue_ids()

        missing = cli("cancel", "999999")
        assert missing.returncode == 1 and "no queued job 999999" in missing.stderr
        assert "Traceback" not in missing.stderr

        res = cli("cancel", theirs, "--any-user")
        assert res.returncode == 0 and res.stdout.split() == ["cancelled", theirs], res.stderr
        assert wait_terminal([theirs]) == {theirs: "CANCELLED"}
    finally:
        subprocess.run(["scancel", mine, theirs], capture_output=True)
