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
    real = monitor.record_if_any
    monkeypatch.setattr(monitor, "record_if_any", lambda p: (reads.append(p), real(p))[1])
    assert monitor.study_of(str(run)) is None and monitor.study_of(str(run)) is None and len(reads) == 1
    (run / "run.json").write_text(json.dumps({"name": "x", "study": "/s/1", "study_name": "s", "study_step": "scan"}))
    assert monitor.study_of(str(run)) == ("/s/1", "s", "scan") and len(reads) == 2
    assert monitor.study_of(str(run)) == ("/s/1", "s", "scan") and len(reads) == 2
    (run / "run.json").unlink()
    assert monitor.study_of(str(run)) is None and len(reads) == 3
