"""End to end against the real local Slurm (slurmctld + n1/n2 + slurmdbd): submit, arrays, afterok, dry-run."""
from __future__ import annotations

import hashlib
import re
import subprocess

from conftest import job_mark, new_jobs, record, run_folder, sacct_states, submit, task_records, wait_terminal
from core.scheduler import master_port_for

SMOKE = "jobs/tiny/smoke.yaml"
ARRAY = "jobs/tiny/smoke_array.yaml"


def test_single_job_result_and_run_record(slurm, uname, tmp_path):
    res = submit(SMOKE, "--cluster", "cluster_configs/local_slurm.yaml", "--set", f"name={uname}",
                 "--set", f"outputs.logs_dir={tmp_path}", "--wait")
    run_dir = run_folder(res.stdout)
    rec = record(run_dir)
    (jid,) = rec["steps"][0]["job_ids"]
    assert run_dir == tmp_path / uname / jid and rec["root_id"] == jid
    assert wait_terminal([jid]) == {jid: "COMPLETED"}
    (task,) = task_records(run_dir)
    assert task["result"]["slurm"]["SLURM_JOB_ID"] == jid and task["host"] in {"n1", "n2"}
    assert task["result"]["context"]["run_dir"] == str(run_dir)
    # the record: spec after overrides, cluster, git commit, the exact sbatch script, job ids
    assert rec["spec"]["name"] == uname and rec["cluster"]["name"] == "local_slurm"
    assert re.fullmatch(r"[0-9a-f]{40}", rec["git"]["commit"])
    script = (run_dir / "submitit" / f"{jid}_submission.sh").read_text()
    assert rec["steps"][0]["sbatch"] == [script]
    assert f"#SBATCH --job-name={uname}" in script and "#SBATCH --partition=debug" in script
    # squeue/sacct find the run folder from the job comment
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", jid, "-o", "Comment"], capture_output=True, text=True).stdout
    assert out.strip().replace("%A", jid) == f"run={run_dir}"


def test_two_node_job_reports_ranks_from_n1_and_n2(slurm, uname, tmp_path):
    # rank variables left in the submitter's shell (torchrun habits, an in-process run) must not reach the job:
    # sbatch exports the environment, and a MASTER_PORT there would put every job of a node on one port
    leftovers = {"MASTER_PORT": "1", "MASTER_ADDR": "elsewhere", "RANK": "7", "WORLD_SIZE": "9"}
    res = submit(SMOKE, "-c", "local_slurm", "--set", "resources.nodes=2", "--set", f"name={uname}",
                 "--set", f"outputs.logs_dir={tmp_path}", "--wait", env=leftovers)
    run_dir = run_folder(res.stdout)
    tasks = task_records(run_dir)
    assert sorted(t["rank"] for t in tasks) == [0, 1]
    assert {t["world_size"] for t in tasks} == {2}
    assert sorted(t["host"] for t in tasks) == ["n1", "n2"]
    assert tasks[0]["result"]["context"]["hostnames"] == ["n1", "n2"]
    job = record(run_dir)["steps"][0]["job_ids"][0]
    assert {t["result"]["master"] for t in tasks} == {f"n1:{master_port_for(job)}"}


def test_array_of_five_with_throttle(slurm, uname, tmp_path):
    res = submit(ARRAY, "-c", "local_slurm", "--set", f"name={uname}", "--set", f"outputs.logs_dir={tmp_path}",
                 "--set", "resources.array.items=5", "--set", "resources.array.parallelism=2",
                 "--set", "resources.array.merge=false", "--set", "smoke.sleep_s=2")
    run_dir = run_folder(res.stdout)
    rec = record(run_dir)
    (jid,) = rec["steps"][0]["job_ids"]
    assert "#SBATCH --array=0-4%2" in rec["steps"][0]["sbatch"][0]
    states = wait_terminal([jid], expect_tasks=5)
    assert states == {f"{jid}_{i}": "COMPLETED" for i in range(5)}
    tasks = task_records(run_dir)
    assert sorted(i for t in tasks for i in t["items"]) == [0, 1, 2, 3, 4]
    # the throttle held: never more than 2 tasks ran at the same moment
    spans = [(t["started"], t["started"] + t["seconds"]) for t in tasks]
    overlap = max(sum(a <= s < b for a, b in spans) for s, _ in spans)
    assert overlap <= 2


def test_array_over_max_array_size_is_chunked_and_merge_runs_after(slurm, uname, tmp_path):
    res = submit(ARRAY, "-c", "local_slurm", "--set", f"name={uname}", "--set", f"outputs.logs_dir={tmp_path}",
                 "--set", "resources.array.parallelism=30")
    assert "exceed MaxArraySize=11" in res.stdout
    run_dir = run_folder(res.stdout)
    main, merge = record(run_dir)["steps"]
    assert len(main["job_ids"]) == 3 and [c["tasks"] for c in main["chunks"]] == [[0, 11], [11, 22], [22, 25]]
    assert merge["dependency"] == main["job_ids"]
    assert f"#SBATCH --dependency=afterok:{':'.join(main['job_ids'])}" in merge["sbatch"][0]
    (merge_id,) = merge["job_ids"]
    wait_terminal([merge_id])
    states = wait_terminal(main["job_ids"], expect_tasks=25)
    assert len(states) == 25 and set(states.values()) == {"COMPLETED"}
    tasks = task_records(run_dir)
    assert sorted(i for t in tasks for i in t["items"]) == list(range(25))  # every index exactly once
    assert sacct_states([merge_id]) == {merge_id: "COMPLETED"}
    (merged,) = task_records(run_dir, "merge")
    assert merged["result"]["items"] == 25 and merged["result"]["duplicates"] == []
    assert merged["started"] >= max(t["started"] + t["seconds"] for t in tasks)


def test_merge_does_not_run_when_a_task_fails(slurm, uname, tmp_path):
    res = submit(ARRAY, "-c", "local_slurm", "--set", f"name={uname}", "--set", f"outputs.logs_dir={tmp_path}",
                 "--set", "resources.array.items=4", "--set", "smoke.fail_items=[2]")
    run_dir = run_folder(res.stdout)
    main, merge = record(run_dir)["steps"]
    states = wait_terminal(main["job_ids"], expect_tasks=4)
    assert states[f"{main['job_ids'][0]}_2"] == "FAILED"
    assert sorted(states.values()).count("COMPLETED") == 3
    (merge_id,) = merge["job_ids"]
    assert wait_terminal([merge_id]) == {merge_id: "CANCELLED"}  # DependencyNeverSatisfied, never ran
    assert not (run_dir / "merged.json").exists() and not task_records(run_dir, "merge")


def test_dry_run_submits_nothing_and_prints_the_real_script(slurm, uname, tmp_path):
    mark = job_mark()
    args = (SMOKE, "-c", "local_slurm", "--set", f"name={uname}", "--set", f"outputs.logs_dir={tmp_path}")
    dry = submit(*args, "--dry-run")
    assert "nothing submitted" in dry.stdout
    assert not new_jobs(mark)
    assert not (tmp_path / uname).exists()
    printed = dry.stdout.split("# ---- sbatch script: step main ----\n", 1)[1].split("\ndry run:")[0]
    real = submit(*args)
    run_dir = run_folder(real.stdout)
    (jid,) = record(run_dir)["steps"][0]["job_ids"]
    written = (run_dir / "submitit" / f"{jid}_submission.sh").read_text()
    assert printed.rstrip("\n") == written.rstrip("\n")
    wait_terminal([jid])


def test_dry_run_of_chunked_array_shows_every_chunk(slurm, uname, tmp_path):
    dry = submit(ARRAY, "-c", "local_slurm", "--set", f"name={uname}", "--dry-run")
    assert dry.stdout.count("#SBATCH --array=0-10%1") == 2 and "#SBATCH --array=0-2%1" in dry.stdout
    assert "#SBATCH --dependency='afterok:<main>'" in dry.stdout


def test_secret_reference_resolved_only_inside_the_job(slurm, uname, tmp_path):
    spec = tmp_path / "secret.yaml"
    spec.write_text(f"name: {uname}\nworkload: smoke\nenv:\n  HF_TOKEN: ${{env:TEST_HF_TOKEN}}\n"
                    f"outputs: {{logs_dir: {tmp_path}}}\nresources: {{time: 5}}\nsmoke: {{report_env: [HF_TOKEN]}}\n")
    value = "hf_TOPSECRETVALUE123"
    res = submit(str(spec), "-c", "local_slurm", "--wait", env={"TEST_HF_TOKEN": value})
    run_dir = run_folder(res.stdout)
    (task,) = task_records(run_dir)
    assert task["rank"] == 0
    assert task["result"]["env_sha256"]["HF_TOKEN"] == hashlib.sha256(value.encode()).hexdigest()
    for p in run_dir.rglob("*"):
        if p.is_file() and p.suffix != ".pkl":
            assert value not in p.read_text(errors="replace"), p
    assert value not in res.stdout + res.stderr
