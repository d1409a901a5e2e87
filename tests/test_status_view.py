"""status.py as a person reads it, on rows recorded from the local Slurm (no cluster needed): active first and
newest first, finished runs and studies folded, a failed array task's own error line, Slurm's pending reasons in
plain words with the expected start, device-hours kept and lost, the --since window, and --wait's progress lines."""
from __future__ import annotations

import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from core import device_hours, monitor
from core.scheduler import Attempt, JobRow
from core.scheduler.slurm.queue import charged, merge_rows
from core.scheduler.slurm.reasons import explain

# squeue -h -r -o '%i|%j|%T|%M|%D|%R|%S|%k' and sacct -X -D -n -P -o JobID,JobName,State,ExitCode,Elapsed,NNodes,
# NodeList,ElapsedRaw,AllocTRES,Start,End,Reason,DerivedExitCode,Comment as the local cluster printed them (run
# folders replaced by {...})
SQUEUE = """\
205_[2-3]|arr|PENDING|0:00|1|(JobArrayTaskLimit)|N/A|run={arr}
205_1|arr|RUNNING|0:05|1|n1|2026-12-06T10:00:00|run={arr}
206|arr-merge|PENDING|0:00|1|(Dependency)|N/A|run={arr}
207|big|PENDING|0:00|2|(Resources)|2026-12-06T11:30:00|(null)
"""
SACCT = """\
100|train|REQUEUED|0:0|00:10:00|1|g1|600|billing=8,cpu=64,gres/gpu=8,node=1|2026-12-05T08:00:00|2026-12-05T08:10:00|None|0:0|run={train}
100|train|COMPLETED|0:0|01:00:00|1|g1|3600|cpu=64,gres/gpu=8,gres/gpu:a100=8,node=1|2026-12-05T08:11:00|2026-12-05T09:11:00|None|0:0|run={train}
150_0|bad|COMPLETED|0:0|00:00:10|1|n1|10|billing=1,cpu=1,node=1|2026-12-05T10:00:00|2026-12-05T10:00:10|None|0:0|run={bad}
150_1|bad|FAILED|1:0|00:00:20|1|n1|20|billing=1,cpu=1,node=1|2026-12-05T10:00:00|2026-12-05T10:00:20|None|1:0|run={bad}
150_2|bad|COMPLETED|0:0|00:00:30|1|n2|30|billing=1,cpu=1,node=1|2026-12-05T10:00:00|2026-12-05T10:00:30|None|0:0|run={bad}
205_0|arr|COMPLETED|0:0|00:00:10|1|n1|10|billing=1,cpu=1,node=1|2026-12-06T09:59:00|2026-12-06T09:59:10|None|0:0|run={arr}
205_1|arr|RUNNING|0:0|00:00:05|1|n1|5|billing=1,cpu=1,node=1|2026-12-06T10:00:00|Unknown|None|0:0|run={arr}
"""

LOG_OK = ("submitit INFO (2026-12-05 10:00:00,000) - Starting with JobEnvironment(job_id={t})\n[smoke] array item\n"
          "submitit INFO (2026-12-05 10:00:01,000) - Job completed successfully\n[submitit] Job completed successfully\n"
          "submitit INFO (2026-12-05 10:00:01,000) - Exiting after successful completion\n"
          "[submitit] Exiting after successful completion\n")
LOG_BAD = ("submitit INFO (2026-12-05 10:00:00,000) - Starting with JobEnvironment(job_id=150_1)\n"
           "Traceback (most recent call last):\n  File \"core/workloads/smoke.py\", line 39, in run\n"
           "    raise RuntimeError(f\"smoke: items {bad} are listed in smoke.fail_items\")\n"
           "RuntimeError: smoke: items [1] are listed in smoke.fail_items\n"
           "srun: error: n1: task 0: Exited with exit code 1\n")


def _run_folder(root: Path, name: str, rid: str, study: dict | None = None) -> Path:
    d = root / name / rid
    (d / "submitit").mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"name": name, "steps": [{"name": "main"}], **(study or {})}))
    return d


@pytest.fixture
def recorded(tmp_path):
    """The recorded rows with run folders: a requeued GPU training run with a checkpoint in its first attempt,
    a finished array with one failed task (the newest log is a successful task's), an active array + merge."""
    train = _run_folder(tmp_path, "train", "100")
    bad = _run_folder(tmp_path, "bad", "150")
    arr = _run_folder(tmp_path, "arr", "205")
    ck = train / "checkpoints" / "step00000100"
    ck.mkdir(parents=True)
    (ck / "COMPLETE").write_text("{}")
    saved = time.mktime(time.strptime("2026-12-05T08:06:00", "%Y-%m-%dT%H:%M:%S"))
    os.utime(ck / "COMPLETE", (saved, saved))
    for i, text in ((0, LOG_OK.format(t="150_0")), (1, LOG_BAD), (2, LOG_OK.format(t="150_2"))):
        log = bad / "submitit" / f"150_{i}_0_log.out"
        log.write_text(text)
        os.utime(log, (1000 + i, 1000 + i))  # task 2's log is the newest
    folders = {"train": train, "bad": bad, "arr": arr}
    rows = merge_rows(SQUEUE.format(**folders), SACCT.format(**folders))
    return {r.job_id: r for r in rows}, folders


def test_pending_reasons_in_plain_words_with_the_expected_start(recorded):
    rows, _ = recorded
    assert rows["206"].reason == "(Dependency)" and "depends on" in rows["206"].why
    assert rows["207"].why.startswith("not enough free nodes") and rows["207"].expected_start == "2026-12-06T11:30:00"
    assert rows["205"].state == "RUNNING" and "throttle" in rows["205"].why  # the pending tasks' reason
    assert rows["207"].run_dir == ""  # (null): not ours
    # requeued after a node failure and waiting again: the old attempt's NODE_FAIL is history, not its state
    again = merge_rows("300|again|PENDING|0:00|1|(BeginTime)|N/A|(null)\n",
                       "300|again|NODE_FAIL|0:0|00:05:00|1|n2|300|billing=1,cpu=1,node=1|2026-12-06T09:00:00|"
                       "2026-12-06T09:05:00|NodeDown|0:0|(null)\n300|again|PENDING|0:0|00:00:00|1|None assigned|0|"
                       "billing=1,cpu=1,node=1|Unknown|Unknown|BeginTime|0:0|(null)\n")[0]
    assert again.state == "PENDING" and [a.state for a in again.attempts] == ["NODE_FAIL", "PENDING"]
    for code in ("Priority", "Resources", "Dependency", "DependencyNeverSatisfied", "QOSMaxGRESPerUser",
                 "ReqNodeNotAvail", "AssocGrpGRES", "BeginTime", "JobHeldUser", "PartitionDown"):
        assert explain(f"({code})") != code and explain(code)[0].islower()
    assert "never start" in explain("DependencyNeverSatisfied")
    assert explain("ReqNodeNotAvail, UnavailableNodes:n3") == explain("ReqNodeNotAvail")
    assert explain("QOSGrpSubmitJobsLimit").endswith("(QOSGrpSubmitJobsLimit)")  # a family: named by what it limits
    assert explain("SomethingNew") == "SomethingNew"


def test_a_requeued_job_waiting_again_shows_its_last_log_line_and_one_never_started_is_not_searched(tmp_path,
                                                                                                    monkeypatch):
    run = _run_folder(tmp_path, "again", "300")
    (run / "submitit" / "300_0_log.out").write_text("step 39: loss 1.3\nstep 40: loss 1.2\n")
    squeue = (f"300|again|PENDING|0:00|1|(BeginTime)|N/A|run={run}\n"
              f"301_[0-9]|wide|PENDING|0:00|1|(Priority)|N/A|run={run}\n")
    sacct = (f"300|again|NODE_FAIL|0:0|00:05:00|1|n2|300|billing=1,cpu=1,node=1|2026-12-06T09:00:00|"
             f"2026-12-06T09:05:00|NodeDown|0:0|run={run}\n300|again|PENDING|0:0|00:00:00|1|None assigned|0|"
             f"billing=1,cpu=1,node=1|Unknown|Unknown|BeginTime|0:0|run={run}\n"
             f"301_[0-9]|wide|PENDING|0:0|00:00:00|1|None assigned|0|billing=1,cpu=1,node=1|Unknown|Unknown|"
             f"Priority|0:0|run={run}\n")
    looked = []
    real = monitor._logs
    monkeypatch.setattr(monitor, "_logs", lambda row, task_id=None: (looked.append(row.job_id), real(row, task_id))[1])
    rows = {r.job_id: r for r in merge_rows(squeue, sacct)}
    assert monitor.last_log_line(rows["300"]) == "step 40: loss 1.2"   # its first attempt's log
    assert monitor.last_log_line(rows["301"]) == "" and looked == ["300"]   # ten tasks, none ever started


def test_a_failed_array_task_shows_its_own_error_line_not_another_tasks(recorded):
    rows, _ = recorded
    bad = rows["150"]
    assert bad.state == "FAILED"
    line = monitor.last_log_line(bad)
    assert line == "RuntimeError: smoke: items [1] are listed in smoke.fail_items"
    assert monitor.error_line(["[submitit] Exiting after successful completion"]) == ""
    assert monitor.error_line(["step 1", "slurmstepd: error: *** STEP 9.0 ON n1 CANCELLED AT 2026 DUE TO JOB REQUEUE "
                               "***", "[rank0]: core.engine.Preempted: SIGUSR2 received"]) == \
        "[rank0]: core.engine.Preempted: SIGUSR2 received"
    assert "DUE TO TIME LIMIT" in monitor.error_line(["x", "slurmstepd: error: *** JOB 9 ON n1 CANCELLED AT 2026 DUE "
                                                      "TO TIME LIMIT ***", "srun: error: n1: task 0: Killed"])


def test_device_hours_kept_and_lost(recorded):
    rows, folders = recorded
    train = device_hours.usage([rows["100"]])
    # two attempts on 8 GPUs: 600 s (requeued 240 s after its checkpoint) + 3600 s
    assert train == {"gpu": {"hours": pytest.approx((600 + 3600) * 8 / 3600),
                             "lost": pytest.approx(240 * 8 / 3600), "kept": pytest.approx((360 + 3600) * 8 / 3600)}}
    bad = device_hours.usage([rows["150"]])
    assert bad["cpu"]["hours"] == pytest.approx(60 / 3600) and bad["cpu"]["lost"] == pytest.approx(20 / 3600)
    assert charged("billing=2,cpu=2,node=2") == ("cpu", 2)
    assert charged("cpu=192,gres/npu=8,node=1") == ("npu", 8)
    assert device_hours.describe(train) == "9.33 GPU-h (0.53 lost)"
    # a failed attempt without any checkpoint of its own loses all of it; a running one loses nothing yet
    a = Attempt("1", "TIMEOUT", 3600, "gpu", 4, start=1000.0, end=4600.0)
    assert device_hours.lost_seconds(a, [900.0]) == 3600 and device_hours.lost_seconds(a, [4000.0]) == 600
    assert device_hours.lost_seconds(Attempt("1", "RUNNING", 50, "gpu", 4, 1.0), []) == 0


def test_the_view_puts_active_first_newest_first_and_folds_finished(recorded, tmp_path):
    rows, folders = recorded
    text = monitor.format_view(list(rows.values()), since="2d")
    lines = text.splitlines()
    assert lines[0].startswith("ACTIVE: 2")
    active_end = next(i for i, ln in enumerate(lines) if ln.startswith("FINISHED"))
    assert lines[active_end] == "FINISHED since 2d: 2 (newest first, one line each; --all for every job)"
    finished = lines[active_end + 1:]
    assert len(finished) == 2  # one line per finished run, newest (150) first
    assert finished[0].startswith(f"  run {folders['bad']}: FAILED, tasks 2/0/0/1 of 3")
    assert finished[0].endswith("150_1 FAILED: exception: RuntimeError: smoke: items [1] are listed in "
                                "smoke.fail_items (at core/workloads/smoke.py:39 in run)")
    assert finished[1].startswith(f"  run {folders['train']}: COMPLETED") and "9.33 GPU-h (0.53 lost)" in finished[1]
    active = "\n".join(lines[:active_end])
    assert active.index(str(folders["arr"])) < active.index("207")  # our newest active run first, others' last
    at = {ln.split()[0]: i for i, ln in enumerate(lines) if ln.startswith("  2")}
    assert lines[at["206"] + 1] == "        pending: starts when the jobs it depends on have completed (afterok)"
    assert lines[at["207"] + 1].startswith("        pending: not enough free nodes")
    assert lines[at["207"] + 1].endswith("; expected to start 2026-12-06 11:30:00")
    assert not [ln for ln in lines[:active_end] if ln.split()[0] in ("100", "150")]  # finished: no job lines
    everything = monitor.format_table(list(rows.values()))
    assert all(f"  {j}" in everything for j in ("100", "150", "205", "206", "207"))
    limited = monitor.format_view(list(rows.values()), max_finished=1)
    assert limited.splitlines()[-1] == "  ... and 1 older (status.py --all)"


def test_json_keeps_every_field(recorded):
    rows, folders = recorded
    runs = {r["run_dir"]: r for r in monitor.as_json(list(rows.values()))}
    bad = runs[str(folders["bad"])]
    job = bad["jobs"][0]
    assert job["errors"] == {"150_1": "RuntimeError: smoke: items [1] are listed in smoke.fail_items"}
    assert [a["elapsed_s"] for a in job["attempts"]] == [10, 20, 30] and job["tasks"]["150_1"] == "FAILED"
    assert bad["device_hours"]["cpu"]["lost"] == pytest.approx(20 / 3600)
    arr = runs[str(folders["arr"])]
    merge = next(j for j in arr["jobs"] if j["job_id"] == "206")
    assert merge["reason"] == "(Dependency)" and "depends on" in merge["why"]
    assert runs[None]["jobs"][0]["expected_start"] == "2026-12-06T11:30:00"


def test_a_study_folds_to_one_line_with_its_steps_and_the_failed_steps_error(tmp_path):
    study = {"study": str(tmp_path / "st" / "1"), "study_name": "st"}
    a = _run_folder(tmp_path, "a", "300", {**study, "study_step": "a"})
    b = _run_folder(tmp_path, "b", "301", {**study, "study_step": "b"})
    (b / "submitit" / "301_0_log.out").write_text(LOG_BAD.replace("150_1", "301"))
    c = _run_folder(tmp_path, "c", "302", {**study, "study_step": "c"})
    rows = [JobRow("300", "a", {"300": "COMPLETED"}, run_dir=str(a),
                   attempts=[Attempt("300", "COMPLETED", 36, "cpu", 2, 1.0, 37.0)]),
            JobRow("301", "b", {"301": "FAILED"}, run_dir=str(b),
                   attempts=[Attempt("301", "FAILED", 18, "cpu", 2, 40.0, 58.0)]),
            JobRow("302", "c", {"302": "CANCELLED by 0"}, run_dir=str(c))]
    text = monitor.format_view(rows)
    assert text.splitlines()[1] == (f"  study st {tmp_path / 'st' / '1'}: FAILED at step b (301 FAILED: exception: "
                                    f"RuntimeError: smoke: items [1] are listed in smoke.fail_items (at "
                                    f"core/workloads/smoke.py:39 in run)); steps: a COMPLETED, "
                                    f"b FAILED, c CANCELLED; 0.030 CPU-h (0.010 lost)")
    assert len(text.splitlines()) == 2


def test_since_window():
    assert monitor.since_arg("2d") == "now-2days" and monitor.since_arg("12h") == "now-12hours"
    assert monitor.since_arg("1w") == "now-7days" and monitor.since_arg("2026-12-01") == "2026-12-01"
    with pytest.raises(ValueError, match="--since 'yesterday'"):
        monitor.since_arg("yesterday")


def test_wait_prints_a_line_per_step_start_and_end():
    """--wait's progress: the scheduler's states over rounds -> one line when a step starts and when it ends."""
    rounds = iter([{"7": "PENDING"}, {"7": "RUNNING", "8": "PENDING"}, {"7": "RUNNING", "8": "PENDING"},
                   {"7": "COMPLETED", "8": "RUNNING"}, {"7": "COMPLETED", "8": "FAILED"}])

    class Recorded:  # the states a real scheduler answered, round by round
        def states(self, ids):
            return next(rounds), True

    out = io.StringIO()
    ends = monitor.follow(Recorded(), {"main": ["7"], "merge": ["8"]}, out, sleep=lambda s: None)
    assert ends == {"main": "COMPLETED", "merge": "FAILED"}
    said = [ln.split(" ", 1)[1] for ln in out.getvalue().splitlines()]
    assert said == ["step main: started (job 7)", "step main: ended COMPLETED (job 7)",
                    "step merge: started (job 8)", "step merge: ended FAILED (job 8)"]


def test_wait_ends_a_step_whose_jobs_neither_queue_nor_accounting_know():
    """A job purged from accounting (or never recorded) while --wait follows it: LOST after a few answered rounds,
    not a wait forever; rounds in which the queue did not answer do not count."""
    calls = []

    class Forgotten:
        def states(self, ids):
            calls.append(ids)
            return {}, len(calls) % 2 == 0   # every other round squeue did not answer

    out = io.StringIO()
    assert monitor.follow(Forgotten(), {"main": ["9"]}, out, sleep=lambda s: None) == {"main": "LOST"}
    assert len(calls) == 2 * monitor.LOST_AFTER_ROUNDS
    assert out.getvalue().split(" ", 1)[1] == "step main: ended LOST (job 9)\n"


# ---------------------------------------------------------------- through the real local Slurm
@pytest.fixture(scope="module")
def busy(slurm, tmp_path_factory):
    """One finished array run with a failed task, then a running two-step study (its second step waits on the
    first): shared by the Slurm tests below (2 submit.py calls, 3 jobs)."""
    from conftest import cli, record, run_folder, submit, wait_terminal

    root = tmp_path_factory.mktemp("busy")
    tag = f"v{os.urandom(4).hex()}"
    common = ("-c", "local_slurm", "--no-preflight", "--set", f"outputs.logs_dir={root / 'logs'}")
    bad = run_folder(submit("jobs/tiny/smoke_array.yaml", *common, "--set", f"name={tag}bad",
                            "--set", "resources.array.items=3", "--set", "smoke.fail_items=[1]",
                            "--set", "resources.array.merge=false").stdout)
    bad_id = record(bad)["steps"][0]["job_ids"][0]
    wait_terminal([bad_id], expect_tasks=3)
    spec = root / "study.yaml"
    go = root / "go"   # the first step runs until the tests that need it running touch this file
    spec.write_text(f"study: {tag}st\nsteps:\n  first: {{spec: jobs/tiny/smoke.yaml, set: [smoke.sleep_s=600, "
                    f"'smoke.release_file={go}']}}\n  second: {{spec: jobs/tiny/smoke.yaml, after: [first]}}\n")
    res = cli("submit", str(spec), *common, "--set", f"name={tag}s")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "released the 2 held jobs of this submission" in res.stdout
    study_dir = Path(next(ln for ln in res.stdout.splitlines() if ln.startswith("study folder: ")).split(": ", 1)[1])
    steps = json.loads((study_dir / "study.json").read_text())["steps"]
    _scheduled(steps["second"]["job_ids"][0])
    yield {"tag": tag, "bad": bad, "bad_id": bad_id, "study_dir": study_dir, "steps": steps, "go": go,
           "first": steps["first"]["job_ids"][0], "second": steps["second"]["job_ids"][0]}
    go.touch()   # whatever the tests did: the study ends


def _scheduled(job: str, timeout: float = 300) -> None:
    """Until Slurm's scheduler has looked at a fresh (or just released) job: its reason is no longer None."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        said = subprocess.run(["squeue", "-h", "-j", job, "-o", "%r"], capture_output=True, text=True).stdout
        if said.strip() != "None":
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job}: Slurm's scheduler gave no reason within {timeout} s")


def _shim(tmp_path) -> tuple[dict, Path]:
    """A PATH in front of Slurm's clients that logs each squeue / sacct call and runs the real one."""
    import shutil

    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("squeue", "sacct"):
        real = shutil.which(tool)
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} >> {log}\nexec {real} \"$@\"\n")
        (bin_dir / tool).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


def test_status_shows_the_active_study_first_explains_waiting_and_folds_the_finished(busy, tmp_path):
    from conftest import cli

    env, log = _shim(tmp_path)
    res = cli("status", "--name", busy["tag"], env=env)
    assert res.returncode == 0, res.stderr
    assert log.read_text().split() == ["squeue", "sacct"]  # one of each, with reasons and start times in them
    lines = res.stdout.splitlines()
    assert lines[0] == "ACTIVE: 1 (newest first)"
    assert lines[2].startswith(f"study {busy['tag']}st ") and "steps: first " in lines[2]
    fin = next(i for i, ln in enumerate(lines) if ln.startswith("FINISHED since 2d: 1"))
    assert fin <= 9  # the study in a few lines: its line, each step's run and job, why the second waits
    second = next(i for i, ln in enumerate(lines) if ln.startswith(f"  {busy['second']} "))
    assert lines[second + 1] == "        pending: starts when the jobs it depends on have completed (afterok)"
    assert lines[fin + 1].startswith(f"  run {busy['bad']}: FAILED, tasks 2/0/0/1 of 3")
    assert f"{busy['bad_id']}_1 FAILED: exception: RuntimeError: smoke: items [1] are listed in smoke.fail_items " \
           f"(at core/workloads/smoke.py:" in lines[fin + 1]
    assert len(lines) == fin + 2  # the finished run folded to one line
    everything = cli("status", "--name", busy["tag"], "--all").stdout
    assert all(f"  {j} " in everything for j in (busy["bad_id"], busy["first"], busy["second"]))
    data = json.loads(cli("status", "--name", busy["tag"], "--json").stdout)
    bad = next(r for r in data if r.get("run_dir") == str(busy["bad"]))
    assert bad["jobs"][0]["errors"] == {f"{busy['bad_id']}_1": "RuntimeError: smoke: items [1] are listed in "
                                                                "smoke.fail_items"}
    study = next(g for g in data if g.get("study_dir") == str(busy["study_dir"]))
    waiting = next(j for r in study["runs"] for j in r["jobs"] if j["job_id"] == busy["second"])
    assert waiting["reason"] == "(Dependency)" and waiting["why"].startswith("starts when")


def test_status_explains_a_job_pending_for_resources_with_its_expected_start(busy, uname, tmp_path):
    """A job that needs both nodes whole while the study's first step holds a CPU: Resources (or Priority behind
    other jobs on the shared cluster), in plain words, with Slurm's expected start; one squeue + one sacct."""
    import subprocess

    from conftest import cli, record, run_folder, submit

    big = run_folder(submit("jobs/tiny/smoke.yaml", "-c", "local_slurm", "--no-preflight", "--set", f"name={uname}",
                            "--set", "resources.nodes=2", "--set", "resources.cpus_per_task=8",
                            "--set", f"outputs.logs_dir={tmp_path}").stdout)
    job = record(big)["steps"][0]["job_ids"][0]
    try:
        _scheduled(job)
        env, log = _shim(tmp_path)
        rows = {r["job_id"]: r for r in json.loads(cli("status", "--name", uname, "--json", env=env).stdout)[0]["jobs"]}
        assert log.read_text().split() == ["squeue", "sacct"]
        assert rows[job]["state"] == "PENDING"   # the study's first step holds a CPU until the last test
        assert rows[job]["reason"] in ("(Resources)", "(Priority)")
        assert rows[job]["why"] == explain(rows[job]["reason"]) != rows[job]["reason"]
        text = cli("status", "--name", uname).stdout
        assert f"pending: {rows[job]['why']}" in text
    finally:
        subprocess.run(["scancel", job], capture_output=True)


def test_device_hours_of_the_finished_study_and_a_failed_attempt_equal_sacct(busy):
    """The study's device-hours (CPU-hours on this CPU cluster) equal sacct's ElapsedRaw x allocated CPUs within 1%;
    the failed array task's hours are counted as lost, the completed ones as kept."""
    import subprocess

    from conftest import cli, wait_terminal

    ids = [busy["first"], busy["second"]]
    busy["go"].touch()   # the first step may end now
    wait_terminal(ids)
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", ",".join(ids + [busy["bad_id"]]), "-o",
                          "JobID,State,ElapsedRaw,AllocTRES"], capture_output=True, text=True, check=True).stdout
    acct = [ln.split("|") for ln in out.splitlines() if "|" in ln]

    def cpu_h(rows):
        return sum(int(r[2]) * charged(r[3])[1] for r in rows) / 3600

    study_h = cpu_h([r for r in acct if r[0].split("_")[0] in ids])
    failed_h = cpu_h([r for r in acct if r[0].startswith(busy["bad_id"]) and r[1] == "FAILED"])
    data = json.loads(cli("status", "--name", busy["tag"], "--json").stdout)
    study = next(g for g in data if g.get("study_dir") == str(busy["study_dir"]))
    assert study["state"] == "COMPLETED" and study_h > 0
    assert study["device_hours"]["cpu"]["hours"] == pytest.approx(study_h, rel=0.01)
    assert study["device_hours"]["cpu"]["lost"] == 0
    bad = next(r for r in data if r.get("run_dir") == str(busy["bad"]))["device_hours"]["cpu"]
    assert bad["lost"] == pytest.approx(failed_h, rel=0.01) and bad["kept"] == pytest.approx(bad["hours"] - failed_h)
    assert "CPU-h" in cli("status", "--name", busy["tag"]).stdout
    # the study's summary (submit.py --wait prints it): the same figure, per step too
    from core.study import device_hours_line

    line = device_hours_line(json.loads((busy["study_dir"] / "study.json").read_text()))
    total = device_hours.describe(study["device_hours"])
    assert line.startswith(f"device-hours: {total}; first ") and ", second " in line


def test_wait_shows_what_the_run_did_between_a_steps_start_and_end(tmp_path):
    """--wait on a queue: the run's training steps and notes (its metrics.csv and progress.json, written by the job
    on the shared file system) between 'started' and 'ended', the last step and the last note before the end."""
    from core.results.progress import RunProgress, note

    metrics = tmp_path / "metrics.csv"
    writes = iter([lambda: None,
                   lambda: note(tmp_path, "starting DeepSpeed (ZeRO-2)"),
                   lambda: metrics.write_text("step,loss\n1,2.0\n2,1.5\n"),
                   lambda: (metrics.write_text("step,loss\n1,2.0\n2,1.5\n3,1.0\n4,0.5\n"),
                            note(tmp_path, "writing the test reports", 2, 2, every_s=0))])
    rounds = iter([{"7": "PENDING"}, {"7": "RUNNING"}, {"7": "RUNNING"}, {"7": "COMPLETED"}])
    clock = [0.0]

    class Recorded:  # the scheduler's answers; the job writes its files between two rounds
        def states(self, ids):
            next(writes)()
            clock[0] += 5
            return next(rounds), True

    out = io.StringIO()
    progress = RunProgress(tmp_path, total_steps=4, every_s=10, clock=lambda: clock[0])
    assert monitor.follow(Recorded(), {"main": ["7"]}, out, sleep=lambda s: None, progress=progress.lines) == \
        {"main": "COMPLETED"}
    said = [ln.split(" ", 1)[1] if ln[:2].isdigit() else ln for ln in out.getvalue().splitlines()]
    assert said == ["step main: started (job 7)", "  starting DeepSpeed (ZeRO-2) (10 s)",
                    "  step 2/4: loss 1.5000 (15 s)", "  step 4/4: loss 0.5000 (20 s)",
                    "  writing the test reports: 2/2 (20 s)", "step main: ended COMPLETED (job 7)"], said
