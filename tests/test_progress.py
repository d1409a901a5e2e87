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
