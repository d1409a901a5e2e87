"""The typed task result, the result-folder writer and the printed summary (no Slurm, no torch)."""
import csv
import json
import pickle

import pytest

from core.results import ResultFolder, TaskResult, Training
from core.results.task_result import UNSET
from core.results.summary import summary_lines

TRAINER = {"steps": 4, "start_step": 2, "loss_plot": "/r/results/loss.png", "final_loss": 0.5,
           "resumed_checksum": "a", "saved_checksum": "b", "checksum": "c", "restart_count": 1,
           "frozen_checksum_before": "d", "frozen_checksum_after": "d"}
EVALUATED = {**TRAINER, "first_loss": 1.5, "rank": 0, "world_size": 2,
             "evaluation": {"csv": "/r/results/c.csv", "metrics": "/r/results/metrics.json", "BLEU-4": 0.25,
                            "CIDEr": 1.0, "skipped": None, "images": 8},
             "untrained": {"csv": "/r/results/u.csv", "BLEU-4": 0.0125, "CIDEr": 0.5, "images": 8},
             "train_rows": 30, "ok": True}
FLAT = {"message": "hello", "context": {"run_dir": "/r"}, "pid": 7, "rank": 0, "csv": "/r/t.csv", "rows": 3,
        "candidates": [1, 2], "markdown": "/r/t.md"}


@pytest.mark.parametrize("result", [EVALUATED, FLAT, {**TRAINER, "losses": [1.0, 0.5], "blocks": 2}, {}])
def test_to_dict_gives_back_the_workloads_dict_and_pickles(result):
    typed = TaskResult.from_dict(result)
    assert typed.to_dict() == result and json.dumps(typed.to_dict(), sort_keys=True) == json.dumps(result, sort_keys=True)
    assert pickle.loads(pickle.dumps(typed)) == typed


def test_parts_are_named():
    typed = TaskResult.from_dict(EVALUATED)
    assert typed.training == Training(**{k: v for k, v in EVALUATED.items() if k in Training.keys()})
    assert typed.training.first_loss == 1.5 and typed.training.losses is UNSET  # absent, not None
    assert "losses" not in typed.training.to_dict()
    assert typed.metrics == {"BLEU-4": 0.25, "CIDEr": 1.0, "skipped": None, "images": 8} and typed.evaluated
    assert list(typed.files) == ["loss_plot", "evaluation.csv", "evaluation.metrics", "untrained.csv"]
    assert typed.extra == {"rank": 0, "world_size": 2, "train_rows": 30, "ok": True}
    flat = TaskResult.from_dict(FLAT)
    assert flat.training is None and flat.metrics == {"message": "hello", "rows": 3, "markdown": "/r/t.md"}
    assert flat.files == {"csv": "/r/t.csv"} and set(flat.extra) == {"context", "pid", "rank", "candidates"}


def test_summary_prints_training_files_and_untrained_next_to_trained(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,loss,seconds\n2,1.5,0.5\n3,0.5,0.5\n")
    lines = summary_lines([TaskResult.from_dict(EVALUATED)], tmp_path)
    assert lines == [
        "training: 4 steps (resumed at step 2), loss 1.5000 -> 0.5000, 2.00 steps/s in the train loop",
        "loss_plot: /r/results/loss.png", "evaluation.csv: /r/results/c.csv",
        "evaluation.metrics: /r/results/metrics.json", "untrained.csv: /r/results/u.csv",
        "        untrained    trained", "BLEU-4     0.0125     0.2500",
        "CIDEr      0.5000     1.0000", "images          8          8"]
    assert summary_lines([TaskResult.from_dict(FLAT), TaskResult.from_dict(7)], tmp_path) == [
        "csv: /r/t.csv", "message  hello", "rows     3"]


def test_result_folder_writes_whole_files_only(tmp_path):
    out = ResultFolder(tmp_path / "results")
    a = out.csv("a.csv", ["id", "text"], [[1, "x,y"], [2, "line\nbreak"]])
    b = out.csv("b.csv", ["id"], [{"id": 1, "other": 2}], fieldnames=True, extrasaction="ignore")
    m = out.json("metrics.json", {"x": 1.5})
    from core.plotting import pyplot

    fig, ax = pyplot().subplots()
    ax.plot([0, 1])
    p = out.figure("plot.png", fig)
    assert out.written == [a, b, m, p] and sorted(x.name for x in (tmp_path / "results").iterdir()) == \
        ["a.csv", "b.csv", "metrics.json", "plot.png"]
    assert list(csv.reader(a.open(newline=""))) == [["id", "text"], ["1", "x,y"], ["2", "line\nbreak"]]
    assert b.read_bytes() == b"id\r\n1\r\n" and json.loads(m.read_text()) == {"x": 1.5}
    assert p.read_bytes()[:4] == b"\x89PNG" and not pyplot().get_fignums()
    with pytest.raises(ValueError):
        out.csv("b.csv", ["id"], [{"id": 1, "other": 2}], fieldnames=True)
    assert b.read_bytes() == b"id\r\n1\r\n"  # a failed write leaves the old file
