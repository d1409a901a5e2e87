"""core.results.progress: a local run's training shows a line as metrics.csv moves on (at most every every_s
seconds), the last step always, nothing when nothing moved; read from the file's tail as the engine writes it."""
import io

from core.results.progress import follow_training, last_row


class Job:
    def __init__(self, polls_until_done: int):
        self.left = polls_until_done

    def done(self) -> bool:
        return self.left <= 0


def test_lines_follow_the_metrics_file_and_end_on_the_last_step(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,loss,lr\n")
    job, clock, out = Job(12), [0.0], io.StringIO()

    def sleep(s):  # one poll: a step of training is written every second, for 9 steps
        clock[0] += s
        job.left -= 1
        step = int(clock[0])
        if step <= 9:
            with csv.open("a") as f:
                f.write(f"{step},{10.0 / step:.6f},0.001\n")

    n = follow_training(tmp_path, [job], out, total_steps=9, every_s=4, poll_s=1, clock=lambda: clock[0],
                        sleep=sleep)
    lines = out.getvalue().splitlines()
    assert lines == ["  step 1/9: loss 10.0000 (1 s)", "  step 5/9: loss 2.0000 (5 s)",
                     "  step 9/9: loss 1.1111 (9 s)"] and n == 3


def test_no_metrics_yet_prints_nothing_and_a_torn_last_line_is_skipped(tmp_path):
    out = io.StringIO()
    assert follow_training(tmp_path, [Job(0)], out, poll_s=0, sleep=lambda s: None) == 0 and out.getvalue() == ""
    (tmp_path / "metrics.csv").write_text("step,loss\n3,0.5\n4,0.")  # the engine is writing row 4
    assert last_row(tmp_path / "metrics.csv") == {"step": "3", "loss": "0.5"}
    (tmp_path / "metrics.csv").write_text("step,loss\n")
    assert last_row(tmp_path / "metrics.csv") is None


def test_other_long_work_shows_its_notes_a_new_piece_at_once_and_each_ones_end(tmp_path):
    """Before training, scoring the untrained model (8 reports, one every 3 s), then 6 steps, then the test
    reports: each piece's first note at once (after the last step not shown yet), then at most one line per
    every_s, and its end always."""
    from core.results.progress import NOTE, note, read_note

    csv = tmp_path / "metrics.csv"
    job, clock, out = Job(70), [0.0], io.StringIO()
    events = {3 + 3 * i: ("scoring the untrained model", i, 8) for i in range(9)}        # seconds 3..27
    events.update({29 + s: "step" for s in range(1, 7)})                                 # steps 1..6 at 30..35 s
    events.update({38 + 3 * i: ("writing the test reports", i, 8) for i in range(9)})    # seconds 38..62

    def sleep(s):
        clock[0] += s
        job.left -= 1
        ev = events.get(int(clock[0]))
        if ev == "step":
            step = int(clock[0]) - 29
            with csv.open("a") as f:
                f.write(("step,loss\n" if step == 1 else "") + f"{step},{1.0 / step:.6f}\n")
        elif ev is not None:
            note(tmp_path, *ev, every_s=0)

    note(tmp_path, "scoring the untrained model", 0, 8, rank=1)   # only rank 0 writes
    assert not (tmp_path / NOTE).exists()
    n = follow_training(tmp_path, [job], out, total_steps=6, every_s=10, poll_s=1, clock=lambda: clock[0],
                        sleep=sleep)
    lines = out.getvalue().splitlines()
    assert lines == ["  scoring the untrained model: 0/8 (3 s)", "  scoring the untrained model: 3/8 (13 s)",
                     "  scoring the untrained model: 6/8 (23 s)", "  scoring the untrained model: 8/8 (27 s)",
                     "  step 1/6: loss 1.0000 (30 s)", "  step 6/6: loss 0.1667 (38 s)",   # before the reports
                     "  writing the test reports: 0/8 (38 s)", "  writing the test reports: 3/8 (48 s)",
                     "  writing the test reports: 6/8 (58 s)", "  writing the test reports: 8/8 (62 s)"], lines
    assert n == len(lines) and read_note(tmp_path) == ("writing the test reports", 8, 8)


def test_notes_are_written_at_most_every_few_seconds_but_the_first_and_last_always(tmp_path):
    from core.results.progress import note, read_note

    for i in range(5):
        note(tmp_path, "writing the test reports", i, 4, every_s=3600)
        if i in (0, 4):
            assert read_note(tmp_path) == ("writing the test reports", i, 4)
        else:   # within the hour after the first: not written
            assert read_note(tmp_path) == ("writing the test reports", 0, 4)


def test_a_note_and_steps_seen_in_one_look_are_shown_in_the_order_they_were_written(tmp_path):
    import os

    from core.results.progress import NOTE, RunProgress, note

    note(tmp_path, "starting DeepSpeed (ZeRO-2)")
    (tmp_path / "metrics.csv").write_text("step,loss\n1,2.0\n2,1.5\n")
    os.utime(tmp_path / NOTE, ns=(1_000_000_000, 1_000_000_000))          # written before the steps
    progress = RunProgress(tmp_path, total_steps=4, clock=lambda: 3.0)
    assert progress.lines() == ["  starting DeepSpeed (ZeRO-2) (0 s)", "  step 2/4: loss 1.5000 (0 s)"]
    (tmp_path / "metrics.csv").write_text("step,loss\n1,2.0\n2,1.5\n3,1.0\n4,0.5\n")
    note(tmp_path, "writing the test reports", 0, 2)
    os.utime(tmp_path / "metrics.csv", ns=(2_000_000_000, 2_000_000_000))  # the last step, then the reports
    assert progress.lines(ended=True) == ["  step 4/4: loss 0.5000 (0 s)", "  writing the test reports: 0/2 (0 s)"]


def test_noted_items_say_how_many_are_done(tmp_path):
    from core.results.progress import noted, read_note

    seen = []
    for item in noted(["a", "b", "c"], (tmp_path, "writing the test reports"), rank=0):
        seen.append((item, read_note(tmp_path)))
    assert [item for item, _ in seen] == ["a", "b", "c"] and seen[0][1] == ("writing the test reports", 0, 3)
    assert all(got[1] <= i for i, (_, got) in enumerate(seen)), seen   # never ahead of the items handed out
    assert read_note(tmp_path) == ("writing the test reports", 3, 3)
    assert list(noted([1, 2], None)) == [1, 2] and read_note(tmp_path)[1] == 3   # no progress: no note
