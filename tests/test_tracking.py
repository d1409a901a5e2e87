"""Where the lab looks at its runs (issue 25): the tracking: section and its refusals, W&B offline and MLflow
file stores that stay one run across a resume (in-process here; through a real Slurm requeue in
tests/test_training.py::test_scontrol_requeue_resumes_exactly), the key only ever a reference, launchers/sync.py,
and report.html in headless Chromium."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import chromium, cli, html_tables

SPEC = "jobs/tiny/pangu_lm.yaml"
FAKE_KEY = "fakeWandbKey0123456789abcdefXYZ"
TRACKED = ("tracking.wandb=offline", "tracking.mlflow=true", "tracking.wandb_key=${env:WANDB_API_KEY}")


def _loss(step: int) -> float:
    return 3.0 / (step + 1) + step * 1e-3


def _append_rows(metrics: Path, first: int, last: int) -> None:
    new = not metrics.exists()
    with metrics.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["step", "loss", "lr", "seconds"])
        for s in range(first, last + 1):
            w.writerow([s, repr(_loss(s)), 0.001, 0.01])


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A task's trackers as the engine drives them: steps 1..9 logged, the task dies, metrics.csv is cut back to
    the checkpoint's step 6 (as core.engine does on resume), the task starts again from 6 and replays 5..12."""
    from core import tracking
    from core.config import load_spec
    from core.runtime import TaskContext

    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_API_KEY", FAKE_KEY)
    run_dir = tmp_path_factory.mktemp("tracked") / "4242"
    run_dir.mkdir()
    spec, _ = load_spec(SPEC, TRACKED)
    ctx = TaskContext(run_dir=run_dir, step="main", job_id="4242", root_id="4242", cluster={"name": "local_slurm"})
    metrics = run_dir / "metrics.csv"
    first = tracking.open_tracker(spec, ctx, 0, metrics)
    _append_rows(metrics, 1, 9)
    for s in range(1, 10):
        first.log(s, {"train/loss": _loss(s), "train/lr": 0.001})
    first.close("KILLED")
    rows = list(csv.DictReader(metrics.open()))
    metrics.unlink()
    _append_rows(metrics, 1, 6)
    assert len(rows) == 9
    again = tracking.open_tracker(spec, ctx, 6, metrics)
    _append_rows(metrics, 7, 12)
    for s in range(5, 13):
        again.log(s, {"train/loss": _loss(s), "train/lr": 0.001})
    # the workload's evaluation after training, then the task's end (core.runtime.TaskEntry) closes the runs
    (run_dir / "results" / "untrained").mkdir(parents=True)
    (run_dir / "results" / "metrics.json").write_text(json.dumps({"BLEU-4": 0.375, "head": {"micro_f1": 0.5}}))
    (run_dir / "results" / "untrained" / "metrics.json").write_text(json.dumps({"BLEU-4": 0.125}))
    tracking.finish_task(run_dir)
    mp.undo()
    return run_dir


def test_a_resumed_task_is_one_wandb_and_one_mlflow_run_with_each_step_once(resumed):
    from core import tracking

    want = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader((resumed / "metrics.csv").open())]
    assert [s for s, _ in want] == list(range(1, 13))
    ids = json.loads((resumed / "tracking" / "main" / "ids.json").read_text())
    offline = tracking.wandb_offline_runs(resumed)
    assert len(offline) == 1 and offline[0].name.endswith(ids["wandb_id"])
    w = tracking.read_wandb_offline(offline[0])
    assert (w["id"], w["project"], w["group"]) == (ids["wandb_id"], "medhpc", "pangu_lm")
    assert [(s, v["train/loss"]) for s, v in w["history"]] == want
    assert w["config"]["spec"]["tracking"]["wandb_key"] == "${env:WANDB_API_KEY}"  # the reference, not the key
    assert w["config"]["job"]["job_id"] == "4242" and "torch" in w["config"]["packages"]
    runs = tracking.mlflow_runs(resumed / "tracking" / "main" / "mlruns")
    assert len(runs) == 1 and runs[0]["id"] == ids["mlflow_run_id"] and runs[0]["status"] == "FINISHED"
    assert runs[0]["metrics"]["train/loss"] == want
    assert [s for s, _ in runs[0]["metrics"]["train/lr"]] == list(range(1, 13))
    assert runs[0]["params"]["name"] == "pangu_lm" and runs[0]["params"]["tracking.wandb"] == "offline"
    assert runs[0]["tags"]["medhpc.job_id"] == "4242"
    # the evaluation after training: W&B summary and MLflow metrics
    assert {k: w["summary"].get(k) for k in ("eval.BLEU-4", "eval.head.micro_f1", "untrained.BLEU-4")} == \
        {"eval.BLEU-4": 0.375, "eval.head.micro_f1": 0.5, "untrained.BLEU-4": 0.125}
    assert runs[0]["metrics"]["eval.BLEU-4"] == [(0, 0.375)] and runs[0]["metrics"]["untrained.BLEU-4"] == [(0, 0.125)]


def test_the_key_set_through_env_is_nowhere_in_the_run_folder(resumed):
    files = [p for p in resumed.rglob("*") if p.is_file()]
    assert len(files) > 10
    assert [p for p in files if FAKE_KEY.encode() in p.read_bytes()] == []


def test_online_wandb_is_refused_unless_the_profile_says_nodes_reach_the_server():
    from core.config import SpecError, load_cluster, load_spec
    from core.plan import make_plan

    spec, _ = load_spec(SPEC, ("tracking.wandb=online", "tracking.wandb_key=${env:WANDB_API_KEY}"))
    cluster = load_cluster("local_slurm")
    with pytest.raises(SpecError) as e:
        make_plan(spec, cluster)
    assert "tracking.wandb" in str(e.value) and "sync.py" in str(e.value)
    reachable = cluster.model_copy(update={"tracking": cluster.tracking.model_copy(update={"wandb_reachable": True})})
    plan = make_plan(spec, reachable)
    assert any("W&B online (project medhpc, group pangu_lm)" in n for n in plan.notes)
    keyless, _ = load_spec(SPEC, ("tracking.wandb=online",))
    with pytest.raises(SpecError) as e:
        make_plan(keyless, reachable)
    assert "tracking.wandb_key" in str(e.value)


def test_a_literal_key_and_a_bad_mode_are_refused_naming_the_field():
    res = cli("submit", SPEC, "--dry-run", "--no-preflight", "--set", "tracking.wandb_key=0123456789abcdef0123")
    assert res.returncode == 2 and "tracking.wandb_key" in res.stderr and "0123456789abcdef0123" not in res.stderr
    res = cli("submit", SPEC, "--dry-run", "--no-preflight", "--set", "tracking.wandb=cloud")
    assert res.returncode == 2 and "tracking.wandb" in res.stderr and "Traceback" not in res.stderr
    res = cli("submit", SPEC, "--dry-run", "--no-preflight", "-c", "local_slurm", *[x for t in TRACKED
                                                                                 for x in ("--set", t)])
    assert res.returncode == 0, res.stderr
    assert "tracking: metrics.csv, TensorBoard (tensorboard/), W&B offline" in res.stdout and "MLflow" in res.stdout


def test_sync_finds_the_offline_runs_and_refuses_without_a_key(resumed, tmp_path):
    from core import tracking

    res = cli("sync", str(resumed), "--dry-run")
    assert res.returncode == 0, res.stderr
    run = tracking.wandb_offline_runs(resumed)[0]
    assert f"  {run}\n" in res.stdout and "command: " in res.stdout and f"sync {run}" in res.stdout
    res = cli("sync", str(resumed), env={"WANDB_API_KEY": "", "HOME": str(tmp_path)})
    assert res.returncode == 2 and "no W&B key" in res.stderr and "nothing was uploaded" in res.stderr
    res = cli("sync", str(tmp_path))
    assert res.returncode == 2 and "no W&B offline runs" in res.stderr


def test_run_report_shows_the_metrics_of_metrics_json_in_chromium(resumed, tmp_path):
    """The run page in a real browser: its tables hold metrics.json's values (untrained beside trained) and the
    final loss of metrics.csv; the screenshot is a PNG."""
    from core.report import write_run_report

    results = resumed / "results"
    (results / "untrained").mkdir(parents=True, exist_ok=True)
    trained = {"BLEU-4": 0.1234567, "ROUGE-L": 0.25, "head": {"micro_f1": 0.5}}
    untrained = {"BLEU-4": 0.0, "ROUGE-L": 0.03125, "head": {"micro_f1": 0.125}}
    (results / "metrics.json").write_text(json.dumps(trained))
    (results / "untrained" / "metrics.json").write_text(json.dumps(untrained))
    page = write_run_report(resumed)
    tables = html_tables(chromium(page, tmp_path))
    got = tables["metrics-untrained-trained"]
    assert got[0] == ["metric", "untrained", "trained"]
    assert got[1:] == [["BLEU-4", "0.0", "0.1234567"], ["ROUGE-L", "0.03125", "0.25"], ["head.micro_f1", "0.125", "0.5"]]
    final = [r for r in tables["training"] if r[0] == "final"][0]
    assert final == ["final", "12", repr(_loss(12))]
    shot = tmp_path / "run_report.png"
    chromium(page, tmp_path, screenshot=shot)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_study_merge_gives_one_parent_with_each_steps_runs_as_children_and_the_table(resumed, tmp_path):
    """The table step's merge (core.tracking.merge_study) on a study whose dia step kept an MLflow store (the
    resumed task above) and whose scan step kept none."""
    from core import tracking

    study_dir = tmp_path / "study" / "20261206-000000"
    scan = tmp_path / "scan"
    scan.mkdir()
    study_dir.mkdir(parents=True)
    (study_dir / "study.json").write_text(json.dumps({"study": "s_tiny", "steps": {
        "dia": {"run_dir": str(resumed), "job_ids": ["4242"]}, "scan": {"run_dir": str(scan), "job_ids": ["4243"]}}}))
    table = tmp_path / "study_table.csv"
    table.write_text("ratio,layers,removed,perplexity\n0.0,4,,12.5\n0.5,2,1 2,40.25\n")
    store = tracking.merge_study(study_dir, table, "s_tiny")
    runs = {r["name"]: r for r in tracking.mlflow_runs(store)}
    assert set(runs) == {"s_tiny", "dia: pangu_lm", "scan: scan"}
    parent = runs["s_tiny"]
    assert all(runs[n]["tags"]["mlflow.parentRunId"] == parent["id"] for n in runs if n != "s_tiny")
    assert runs["dia: pangu_lm"]["metrics"]["train/loss"] == tracking.mlflow_runs(
        resumed / "tracking" / "main" / "mlruns")[0]["metrics"]["train/loss"]
    assert parent["metrics"]["ratio_0.5/perplexity"] == [(0, 40.25)] and parent["metrics"]["ratio_0.0/layers"] == [(0, 4.0)]
    assert (next(store.rglob("artifacts/study_table.csv"))).read_text() == table.read_text()
