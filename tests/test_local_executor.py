"""The embedded default: the local executor runs the job on this machine and the launcher prints the result."""
from __future__ import annotations

import json

from conftest import cli, record, run_folder
from core.scheduler import master_port_for


def test_local_smoke_runs_and_reports(tmp_path, uname):
    res = cli("submit", "jobs/tiny/smoke.yaml", "--set", f"name={uname}", "--set", f"outputs.logs_dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    run_dir = run_folder(res.stdout)
    rec = record(run_dir)
    assert rec["executor"] == "local" and run_dir.parent == tmp_path / uname and run_dir.name.startswith("local-")
    (task,) = [json.loads(p.read_text()) for p in (run_dir / "tasks").glob("*.json")]
    assert task["result"]["message"] == "hello from the smoke workload"
    assert task["result"]["context"]["run_dir"] == str(run_dir)
    assert "message  hello from the smoke workload" in res.stdout and "main: 1 task done in" in res.stdout


def test_local_two_nodes_become_two_processes_and_array_with_merge(tmp_path, uname):
    # rank variables left in the submitter's environment (an in-process run, torchrun habits) stay out of the tasks
    res = cli("submit", "jobs/tiny/smoke.yaml", "--set", "resources.nodes=2", "--set", f"name={uname}",
              "--set", f"outputs.logs_dir={tmp_path}", env={"MASTER_PORT": "1", "RANK": "5", "WORLD_SIZE": "9"})
    assert res.returncode == 0, res.stderr
    tasks = [json.loads(p.read_text()) for p in (run_folder(res.stdout) / "tasks").glob("*.json")]
    assert sorted(t["rank"] for t in tasks) == [0, 1] and {t["world_size"] for t in tasks} == {2}
    job = record(run_folder(res.stdout))["steps"][0]["job_ids"][0]
    assert {t["result"]["master"] for t in tasks} == {f"127.0.0.1:{master_port_for(job)}"}
    res = cli("submit", "jobs/tiny/smoke_array.yaml", "--set", "resources.array.items=5", "--set", f"name={uname}a",
              "--set", f"outputs.logs_dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    merged = json.loads((run_folder(res.stdout) / "merged.json").read_text())
    assert merged["items"] == 5 and merged["duplicates"] == []


def test_local_failure_skips_merge_and_exits_nonzero(tmp_path, uname):
    res = cli("submit", "jobs/tiny/smoke_array.yaml", "--set", "resources.array.items=3", "--set", f"name={uname}",
              "--set", "smoke.fail_items=[1]", "--set", f"outputs.logs_dir={tmp_path}")
    assert res.returncode == 1 and "FAILED" in res.stdout and "skipped merge" in res.stdout
    assert not (run_folder(res.stdout) / "merged.json").exists()
