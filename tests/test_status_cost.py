"""What makes a status refresh cheap must not change what it says (issue 27, item 3): Slurm's times parsed by hand
equal time.strptime's, and a run's study is read from run.json again exactly when the file changed."""
import json
import random
import time

from core import monitor
from core.scheduler.slurm.queue import _epoch


def test_slurm_times_parse_as_strptime_does():
    rnd = random.Random(0)
    texts = ["Unknown", "None", "", "2026-02-30T00:00:00", "2026-12-06T24:00:00", "2026-12-06 17:11:20",
             "2026-03-29T02:30:00", "2026-10-25T02:30:00", "2024-02-29T23:59:59", " 2026-12-06T17:11:20 "]
    texts += [f"{rnd.randint(1999, 2030):04d}-{rnd.randint(0, 13):02d}-{rnd.randint(0, 32):02d}T{rnd.randint(0, 24):02d}:"
              f"{rnd.randint(0, 60):02d}:{rnd.randint(0, 59):02d}" for _ in range(3000)]
    for text in texts:
        try:
            want = time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            want = 0.0
        assert _epoch(text) == want, text


def test_a_runs_study_is_read_again_only_when_its_record_changed(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"name": "x"}))
    reads = []
    real = monitor._read_study
    monkeypatch.setattr(monitor, "_read_study", lambda p: (reads.append(p), real(p))[1])
    assert monitor.study_of(str(run)) is None and monitor.study_of(str(run)) is None and len(reads) == 1
    (run / "run.json").write_text(json.dumps({"name": "x", "study": "/s/1", "study_name": "s", "study_step": "scan"}))
    assert monitor.study_of(str(run)) == ("/s/1", "s", "scan") and len(reads) == 2
    assert monitor.study_of(str(run)) == ("/s/1", "s", "scan") and len(reads) == 2
    (run / "run.json").unlink()   # gone: nothing to read, and its absence is remembered too
    assert monitor.study_of(str(run)) is None and monitor.study_of(str(run)) is None and len(reads) == 2
    (run / "run.json").write_text(json.dumps({"name": "x", "study": "/s/2", "study_name": "s", "study_step": "prune"}))
    assert monitor.study_of(str(run)) == ("/s/2", "s", "prune") and len(reads) == 3   # a record written later


# sacct -X -D -n -P lines as the local cluster printed them: an array of 1,000 tasks cancelled before any started
# is ONE accounting line; one task that did run has its own line
CANCELLED_ARRAY = (
    "500_[1-999]|scan|CANCELLED by 0|0:0|00:00:00|1|None assigned|0|billing=1,cpu=1,node=1|Unknown|"
    "2026-12-06T20:00:00|None|0:0|run=/logs/scan/500\n"
    "500_0|scan|COMPLETED|0:0|00:00:10|1|n1|10|billing=1,cpu=1,node=1|2026-12-06T19:59:00|2026-12-06T19:59:10|None|"
    "0:0|run=/logs/scan/500\n")


def test_an_array_accounted_in_one_line_gives_every_task_its_state_attempt_and_end():
    from core.scheduler.slurm.queue import merge_rows

    (row,) = merge_rows("", CANCELLED_ARRAY)
    assert len(row.states) == 1000 and row.progress == {"done": 1, "running": 0, "pending": 0, "failed": 999}
    assert row.states["500_731"] == "CANCELLED by 0" and row.ends["500_731"].started is False
    assert len(row.attempts) == 1000 and {(a.task_id, a.state, a.elapsed_s) for a in row.attempts[:2]} == \
        {("500_1", "CANCELLED", 0), ("500_2", "CANCELLED", 0)} and row.attempts[-1].task_id == "500_0"
    assert row.ends["500_1"] is row.ends["500_999"]   # one line, one end shared by its tasks
    assert row.run_dir == "/logs/scan/500" and row.state == "CANCELLED"


def test_a_watch_refresh_parses_saccts_answer_once_and_leaves_it_unchanged(monkeypatch):
    """--watch: while sacct is not asked again its parsed answer is reused; squeue's live lines go on top of copies,
    so the next refresh starts from accounting as it was."""
    from core.scheduler.slurm import queue

    acct = CANCELLED_ARRAY + ("600|train|RUNNING|0:0|00:00:04|1|n2|4|billing=1,cpu=1,node=1|2026-12-06T20:01:00|Unknown|"
                              "None|0:0|run=/logs/train/600\n")
    live = ["600|train|RUNNING|0:05|1|n2|2026-12-06T20:01:00|run=/logs/train/600\n",
            "600|train|RUNNING|0:09|1|n2|2026-12-06T20:01:00|run=/logs/train/600\n"
            "601|train|PENDING|0:00|1|(Dependency)|N/A|run=/logs/train/600\n"]
    calls = {"squeue": 0, "sacct": 0, "parsed": 0}
    real_parse = queue.accounted_rows

    def squeue(user):
        calls["squeue"] += 1
        return live[min(calls["squeue"], 2) - 1]

    monkeypatch.setattr(queue, "_squeue", squeue)
    monkeypatch.setattr(queue, "_sacct", lambda user, since: (calls.__setitem__("sacct", calls["sacct"] + 1), acct)[1])
    monkeypatch.setattr(queue, "accounted_rows", lambda text: (calls.__setitem__("parsed", calls["parsed"] + 1),
                                                              real_parse(text))[1])
    refresher = queue.Refresher("me", full_every_s=60, clock=lambda: 0.0)
    first, second = refresher.query(), refresher.query()
    assert calls == {"squeue": 2, "sacct": 1, "parsed": 1}   # no job left the queue: sacct neither asked nor parsed
    assert [r.job_id for r in first] == ["600", "500"] and [r.job_id for r in second] == ["601", "600", "500"]
    assert [r.seconds for r in (first[0], second[1])] == [5, 9] and second[1].nodes == "n2"
    assert second[1].attempts == refresher.acct["600"].attempts and "depends on" in second[0].why
    assert second[2] is refresher.acct["500"] and second[2].states["500_0"] == "COMPLETED"
    assert refresher.acct["600"].seconds == 4 and refresher.acct["600"].states == {"600": "RUNNING"}  # as sacct said


def test_a_requeued_task_of_an_array_counts_its_newest_attempt_and_details_wait_until_read():
    from core.scheduler.slurm.queue import accounted_rows

    tres = "billing=1,cpu=1,node=1"
    acct = (f"700_0|scan|COMPLETED|0:0|00:00:10|1|n1|10|{tres}|2026-12-06T19:00:00|2026-12-06T19:00:10|None|0:0|run=/l\n"
            f"700_1|scan|COMPLETED|0:0|00:00:20|1|n2|20|{tres}|2026-12-06T19:10:00|2026-12-06T19:10:20|None|0:0|run=/l\n"
            f"700_1|scan|NODE_FAIL|1:0|00:05:00|1|n1|300|{tres}|2026-12-06T19:00:00|2026-12-06T19:05:00|None|0:0|run=/l\n")
    row = accounted_rows(iter(acct.splitlines()))["700"]   # lines as they come (commands.lines)
    assert "attempts" not in row.__dict__ and "ends" not in row.__dict__   # built only when a view reads them
    assert row.states == {"700_0": "COMPLETED", "700_1": "COMPLETED"} and row.seconds == 300
    assert row.progress == {"done": 2, "running": 0, "pending": 0, "failed": 0} and row.state == "COMPLETED"
    assert [(a.task_id, a.state) for a in row.attempts] == [("700_0", "COMPLETED"), ("700_1", "COMPLETED"),
                                                            ("700_1", "NODE_FAIL")]
    assert row.ends["700_1"].nodes == "n2" and row.ends["700_0"].nodes == "n1"   # the newest attempt's end


def test_a_clients_lines_as_they_come_equal_its_whole_answer_and_errors_are_the_same():
    """commands.lines (status reads sacct line by line while it writes) against commands.run: the same text across
    read boundaries that split a character, the same errors, and a client killed when its reader stops early."""
    import os
    import sys

    import pytest

    from core.scheduler.base import SchedulerUnavailable
    from core.scheduler.slurm.commands import lines, run

    py = sys.executable
    many = [py, "-c", "import sys\nfor i in range(30000): sys.stdout.write(f'{i}|é線|{\"x\" * (i % 97)}\\n')\n"
                      "sys.stdout.write('last line without a newline')"]
    whole = run(many)
    assert list(lines(many)) == whole.split("\n") and len(whole) > 10 * 65536
    with pytest.raises(SchedulerUnavailable, match="failed: no such partition"):
        list(lines([py, "-c", "import sys; print('1|a'); sys.exit('no such partition')"]))
    with pytest.raises(SchedulerUnavailable, match="not found"):
        list(lines(["no-such-slurm-client-here"]))
    with pytest.raises(SchedulerUnavailable, match="did not answer within 1 s"):
        list(lines([py, "-c", "import time; time.sleep(60)"], timeout=1))
    reader = lines([py, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(60)"])
    pid = int(next(reader))
    reader.close()   # the caller stopped reading: the client is killed and reaped, not left running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
