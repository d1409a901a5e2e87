"""The plain sbatch scripts in slurm/ (no submitit): the layer array with its baseline and merge gives the same
sensitivity.csv as launchers/submit.py, and a two-node training job trains every step on both ranks."""
from __future__ import annotations

import csv
import json
import os
import subprocess

from conftest import REPO, cli, record, run_folder, wait_terminal

ENV = {**os.environ, "MEDHPC_CLUSTER": "local_slurm"}


def sbatch(*args) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def table(path):
    return [{k: r[k] for k in ("layer", "mean", "std", "rank")} for r in csv.DictReader(open(path))]


def test_sensitivity_array_by_hand_equals_submit(slurm, tmp_path):
    spec = "jobs/tiny/pangu_sensitivity.yaml"
    via_submit = cli("submit", spec, "-c", "local_slurm", "--set", f"outputs.logs_dir={tmp_path / 'submit'}")
    assert via_submit.returncode == 0, via_submit.stderr
    submitted = run_folder(via_submit.stdout)
    merge_id = [s for s in record(submitted)["steps"] if s["name"] == "merge"][0]["job_ids"][0]
    run = tmp_path / "manual" / "pangu_sensitivity_tiny" / "1"
    base = sbatch("slurm/sensitivity_baseline.sbatch", spec, str(run))
    arr = sbatch(f"--dependency=afterok:{base}", "--array=0-3", "slurm/sensitivity_array.sbatch", spec, str(run))
    merge = sbatch(f"--dependency=afterok:{arr}", "--kill-on-invalid-dep=yes", "slurm/sensitivity_merge.sbatch", spec,
                   str(run))
    assert wait_terminal([merge_id], timeout=600) == {merge_id: "COMPLETED"}
    assert wait_terminal([merge], timeout=600) == {merge: "COMPLETED"}
    assert set(wait_terminal([arr], expect_tasks=4).values()) == {"COMPLETED"}
    assert table(run / "sensitivity.csv") == table(submitted / "sensitivity.csv")
    assert sorted(p.name for p in (run / "layers").glob("layer_*.json")) == [f"layer_{i:03d}.json" for i in range(4)]


def test_two_node_training_by_hand(slurm, tmp_path):
    run = tmp_path / "pangu_lm" / "manual"
    job = sbatch("--nodes=2", "slurm/train.sbatch", "jobs/tiny/pangu_lm.yaml", str(run))
    assert wait_terminal([job], timeout=600) == {job: "COMPLETED"}
    steps = [int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open())]
    assert steps == list(range(1, 31))
    ranks = [json.loads(p.read_text()) for p in (run / "tasks").glob("main.rank*.json")]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert {r["host"] for r in ranks} == {"n1", "n2"}
