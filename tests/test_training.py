"""DeepSpeed ZeRO on CPU over gloo through the real local Slurm (2 ranks on n1 + n2): training, exact resume
after requeue / signal / SIGKILL during a save, universal conversion to 1 rank, zero_to_fp32, bad checkpoints."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli, final_state, losses, rank0_result, record, run_folder, log_tails, submit, submit_run

SPEC = "jobs/tiny/pangu_lm.yaml"
STEPS = 240


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def common(tiny_pangu, logs, name, *extra):
    return (SPEC, "-c", "local_slurm", "--set", f"name={name}", "--set", f"model.path={tiny_pangu}",
            "--set", f"outputs.logs_dir={logs}", "--set", "resources.nodes=2", "--set", f"train.steps={STEPS}",
            "--set", "train.checkpoint_every=20", *extra)


def wait_for(pred, timeout=300, what="condition"):
    t0 = time.time()
    while not pred():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)



def assert_same_losses(run_dir: Path, reference: list[tuple[int, float]]):
    got = losses(run_dir)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))  # no step repeated or skipped
    worst = max(abs(a - b) for (_, a), (_, b) in zip(got, reference))
    assert worst <= 1e-6, f"largest loss difference {worst}"


@pytest.fixture(scope="module")
def reference(slurm, tiny_pangu, logs):
    """An uninterrupted 2-rank ZeRO-2 fp32 run: the losses every interrupted run must reproduce."""
    run_dir, job = submit_run(*common(tiny_pangu, logs, "ref"))
    assert final_state(job) == "COMPLETED", log_tails(run_dir)
    return run_dir, losses(run_dir)


def test_zero2_two_nodes_loss_goes_down_and_both_ranks_report(reference):
    run_dir, curve = reference
    assert len(curve) == STEPS
    first, last = sum(l for _, l in curve[:10]) / 10, sum(l for _, l in curve[-10:]) / 10
    assert last < first - 0.5
    tasks = [json.loads(p.read_text()) for p in (run_dir / "tasks").glob("main.rank*.json")]
    assert sorted((t["rank"], t["host"]) for t in tasks) == [(0, "n1"), (1, "n2")]
    assert {t["result"]["world_size"] for t in tasks} == {2}
    ck = sorted(p.name for p in (run_dir / "checkpoints").glob("step*"))
    assert ck == ["step00000220", "step00000240"]  # keep_last 2, the rest pruned
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000240"
    assert (run_dir / "tensorboard").is_dir()
    # periodic checkpoints went to the background writer; the final one was written before the job ended
    rows = list(csv.DictReader((run_dir / "checkpoint_times.csv").open()))
    assert [(int(r["step"]), r["mode"]) for r in rows] == [(s, "background") for s in range(20, 240, 20)] + [(240, "sync")]
    assert all(float(r["host_copy_s"]) <= float(r["held_s"]) for r in rows[:-1])


def test_zero3_bf16_two_nodes_trains(slurm, tiny_pangu, logs):
    run_dir, job = submit_run(*common(tiny_pangu, logs, "z3", "--set", "deepspeed.stage=3",
                                  "--set", "deepspeed.precision=bf16", "--set", "train.steps=40"))
    assert final_state(job) == "COMPLETED", log_tails(run_dir)
    loss = [l for _, l in losses(run_dir)]
    assert len(loss) == 40 and sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.2
    meta = json.loads((run_dir / "checkpoints" / "step00000040" / "COMPLETE").read_text())
    assert meta["zero_stage"] == 3 and meta["world_size"] == 2
    names = {p.name for p in (run_dir / "checkpoints" / "step00000040").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= names


FAKE_KEY = "wandbfake0123456789abcdefSECRET"   # what ${env:WANDB_API_KEY} resolves to in the job


def test_scontrol_requeue_resumes_exactly(reference, tiny_pangu, logs):
    """Also the trackers (issue 25): W&B offline and MLflow on, requeued once, are one run each with every step
    of metrics.csv exactly once, and the key given through ${env:} is nowhere in the run folder."""
    from core import tracking

    tracked = ("--set", "tracking.wandb=offline", "--set", "tracking.mlflow=true",
               "--set", "tracking.wandb_key=${env:WANDB_API_KEY}")
    run_dir, job = submit_run(*common(tiny_pangu, logs, "requeue", *tracked), env={"WANDB_API_KEY": FAKE_KEY})
    wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), what="a first checkpoint")
    subprocess.run(["scontrol", "requeue", job], check=True)
    assert final_state(job) == "COMPLETED", log_tails(run_dir)
    res = rank0_result(run_dir)
    assert res["start_step"] > 0 and res["steps"] == STEPS
    assert_same_losses(run_dir, reference[1])

    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    want = [(int(r["step"]), float(r["loss"])) for r in rows]
    offline = tracking.wandb_offline_runs(run_dir)
    assert len(offline) == 1, offline                      # one W&B run across the requeue
    w = tracking.read_wandb_offline(offline[0])
    assert w["id"] == json.loads((run_dir / "tracking" / "main" / "ids.json").read_text())["wandb_id"]
    assert [(s, v["train/loss"]) for s, v in w["history"]] == want   # each step once, the values of metrics.csv
    assert w["config"]["job"]["restart"] == 1 and w["config"]["git"]["commit"]
    runs = tracking.mlflow_runs(run_dir / "tracking" / "main" / "mlruns")
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED"
    assert runs[0]["metrics"]["train/loss"] == want
    assert runs[0]["tags"]["medhpc.restart"] == "1" and runs[0]["params"]["tracking.wandb_key"] == "${env:WANDB_API_KEY}"
    assert {"torch", "deepspeed", "transformers"} <= set(record(run_dir)["packages"])
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == []
    report = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in report and f"{want[-1][1]!r}" in report


def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(reference, tiny_pangu, logs):
    run_dir, job = submit_run(*common(tiny_pangu, logs, "signal", "--set", "train.checkpoint_every=0"))
    wait_for(lambda: (run_dir / "metrics.csv").exists() and len(losses(run_dir)) > 15, what="training to start")
    # the signal Slurm sends before the time limit (--signal=USR2@N), delivered to every task of the step
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    assert final_state(job) == "COMPLETED", log_tails(run_dir)
    log = next((run_dir / "submitit").glob(f"{job}_0_log.out")).read_text()
    assert "received SIGUSR2" in log and "requeue" in log
    res = rank0_result(run_dir)
    assert 0 < res["start_step"] < STEPS  # the second run started from the signal's checkpoint
    rows = list(csv.DictReader((run_dir / "checkpoint_times.csv").open()))
    assert (res["start_step"], "sync") in [(int(r["step"]), r["mode"]) for r in rows]  # written before the requeue
    assert_same_losses(run_dir, reference[1])
    from core import retry   # the engine's own requeue is recorded with the retry policy's decisions

    assert [(d["task"], d["job_id"], d["class"], d["action"], d["step"], d["by"], d["detail"])
            for d in retry.decisions(run_dir)] == [("main", job, "timeout", "requeue", res["start_step"], "signal",
                                                    "requeued")]


def test_sigkill_during_a_background_save_resumes_from_the_last_complete_checkpoint(reference, tiny_pangu, logs):
    # the checkpoint at step 40 is written by the ranks' background writers (train.async_checkpoint, the default):
    # both ranks are killed in the middle of writing its files, while training has gone on past step 40
    run_dir, job = submit_run(*common(tiny_pangu, logs, "killed"), env={"MEDHPC_FAULT": "kill@during_write:40"})
    assert final_state(job) == "FAILED"
    ck = run_dir / "checkpoints"
    assert (ck / "latest").read_text() == "step00000020"
    assert (ck / ".staging" / "step00000040").is_dir() and not (ck / "step00000040").exists()
    res = cli("submit", *common(tiny_pangu, logs, "killed"), "--resume", str(run_dir))
    assert res.returncode == 0, res.stderr
    assert final_state(job) in {"FAILED"}  # the old job stays failed; the new one continues in the same folder
    new_job = record(run_dir)["steps"][0]["job_ids"][0]
    assert new_job != job and final_state(new_job) == "COMPLETED"
    assert rank0_result(run_dir)["start_step"] == 20
    assert_same_losses(run_dir, reference[1])
    assert len(record(run_dir)["submissions"]) == 2


def test_two_rank_zero2_checkpoint_resumes_on_one_rank_through_universal(reference, tiny_pangu, logs):
    src, _ = reference
    run_dir = src.parent / "copy"
    shutil.copytree(src, run_dir)
    res = cli("submit", *common(tiny_pangu, logs, "ref"), "--set", "resources.nodes=1",
              "--set", f"train.steps={STEPS + 5}", "--resume", str(run_dir))
    assert res.returncode == 0, res.stderr
    job = record(run_dir)["steps"][0]["job_ids"][0]
    assert final_state(job) == "COMPLETED"
    out = rank0_result(run_dir)
    assert out["world_size"] == 1 and out["start_step"] == STEPS and out["steps"] == STEPS + 5
    assert out["resumed_checksum"] == pytest.approx(out["saved_checksum"], rel=1e-6, abs=1e-5)
    assert (run_dir / "checkpoints" / "universal" / f"step{STEPS:08d}" / "COMPLETE").is_file()


def test_zero_to_fp32_output_loads_into_the_hf_model_strictly(reference, tiny_pangu, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from core.models.pangu import llama_config, read_config

    run_dir, _ = reference
    tag = f"step{STEPS:08d}"
    subprocess.run([sys.executable, "-m", "deepspeed.utils.zero_to_fp32", str(run_dir / "checkpoints"),
                    str(tmp_path / "fp32"), "--tag", tag, "--safe_serialization"], check=True, capture_output=True)
    state = {}
    for f in (tmp_path / "fp32").glob("*.safetensors"):
        state.update(load_file(f))
    model = LlamaForCausalLM(llama_config(read_config(tiny_pangu)))
    model.load_state_dict(state, strict=True)
    meta = json.loads((run_dir / "checkpoints" / tag / "COMPLETE").read_text())
    total = sum(float(p.detach().float().sum()) for p in model.parameters())
    assert total == pytest.approx(meta["checksum"], rel=1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


def test_incomplete_checkpoints_stop_the_run_and_fresh_moves_them_aside(slurm, tiny_pangu, logs):
    run_dir, job = submit_run(*common(tiny_pangu, logs, "corrupt", "--set", "train.steps=20"))
    assert final_state(job) == "COMPLETED", log_tails(run_dir)
    ck = run_dir / "checkpoints"
    # a save that never completed: no marker. Remove the complete ones so only the broken one is left.
    for d in ck.glob("step*"):
        (d / "COMPLETE").unlink()
    before = sorted(str(p.relative_to(ck)) for p in ck.rglob("*"))
    res = cli("submit", *common(tiny_pangu, logs, "corrupt", "--set", "train.steps=30"), "--resume", str(run_dir))
    job2 = record(run_dir)["steps"][0]["job_ids"][0]
    assert final_state(job2) == "FAILED"
    log = next((run_dir / "submitit").glob(f"{job2}_0_log.out")).read_text()
    assert "none is complete" in log and "--fresh" in log
    assert sorted(str(p.relative_to(ck)) for p in ck.rglob("*")) == before  # nothing overwritten
    res = cli("submit", *common(tiny_pangu, logs, "corrupt", "--set", "train.steps=30"), "--resume", str(run_dir),
              "--fresh")
    assert res.returncode == 0, res.stderr
    job3 = record(run_dir)["steps"][0]["job_ids"][0]
    assert final_state(job3) == "COMPLETED"
    assert rank0_result(run_dir)["start_step"] == 0
    assert list(run_dir.glob("checkpoints.discarded-*"))


def test_truncated_complete_checkpoint_is_a_clear_error(slurm, tiny_pangu, logs):
    run_dir, job = submit_run(*common(tiny_pangu, logs, "trunc", "--set", "train.steps=20"))
    assert final_state(job) == "COMPLETED", log_tails(run_dir)
    victim = run_dir / "checkpoints" / "step00000020" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:1000])
    cli("submit", *common(tiny_pangu, logs, "trunc", "--set", "train.steps=30"), "--resume", str(run_dir))
    job2 = record(run_dir)["steps"][0]["job_ids"][0]
    assert final_state(job2) == "FAILED"
    log = next((run_dir / "submitit").glob(f"{job2}_0_log.out")).read_text()
    assert "step00000020 is marked complete but cannot be loaded" in log
    assert victim.stat().st_size == 1000


def test_real_time_limit_signal_requeues_and_finishes_every_step_once(slurm, tiny_pangu, logs, tmp_path):
    """1-minute runs of a training far longer than that: Slurm's own --signal=USR2@45 before the time limit makes
    every rank save, the job requeues itself once (the profile allows one), the second run resumes from that
    checkpoint and makes progress, and at its own time limit saves again and stops with the --resume command.
    Each step is trained exactly once. Nothing here depends on how many steps this machine manages per minute."""
    import yaml

    profile = yaml.safe_load((Path("cluster_configs") / "local_slurm.yaml").read_text())
    # Slurm checks time limits about every 30 s, so a signal asked for 30 s ahead can come too late to act on (seen:
    # TIMEOUT, no signal): 45 s ahead leaves 15 s or more at whatever moment the check runs
    (tmp_path / "one_requeue.yaml").write_text(yaml.safe_dump({**profile, "max_requeues": 1,
                                                              "signal_s_before_timeout": 45}))
    run_dir, job = submit_run(SPEC, "-c", str(tmp_path / "one_requeue.yaml"), "--set", "name=timelimit",
                          "--set", f"model.path={tiny_pangu}", "--set", f"outputs.logs_dir={logs}",
                          "--set", "resources.nodes=2", "--set", "train.steps=1000000",
                          "--set", "train.checkpoint_every=0", "--set", "resources.time=1")
    assert final_state(job, timeout=600) == "FAILED"  # stopped after its one requeue, checkpoint saved
    log = next((run_dir / "submitit").glob(f"{job}_0_log.out")).read_text()
    assert log.count("received SIGUSR2") >= 2 and "requeue" in log
    saved = [int(m) for m in re.findall(r"checkpoint step(\d{8}) saved", log)]
    resumed = [int(m) for m in re.findall(r"resumed from step\d{8} at step (\d+)", log)]
    assert len(saved) == 2 and resumed == saved[:1], (saved, resumed)
    assert 0 < saved[0] < saved[1]  # the requeued run resumed and made progress
    assert "not requeued (1 requeues used)" in log and f"--resume {run_dir}" in log
    got = losses(run_dir)
    assert [s for s, _ in got] == list(range(1, saved[1] + 1))  # every step once, none lost, none repeated
    from core import retry

    assert [(d["class"], d["action"], d["step"], d["by"]) for d in retry.decisions(run_dir)] == \
        [("timeout", "requeue", saved[0], "signal"), ("timeout", "stop", saved[1], "signal")]
    assert "not requeued (1 requeues used)" in retry.decisions(run_dir)[1]["why"]


def test_frozen_base_with_lora_trains_only_adapters_and_saves_only_them(tmp_path, tiny_pangu):
    """lm_finetune with a peft: section (LoRA) on the local executor: only LoRA tensors get optimizer state and checkpoints."""
    res = submit(SPEC, "--set", "name=lora", "--set", f"model.path={tiny_pangu}", "--set", "model.make_tiny=false",
                 "--set", f"outputs.logs_dir={tmp_path}", "--set", "train.steps=30", "--set", "peft.r=4",
                 "--set", "peft.alpha=8", "--set", "train.lr=0.01", "--set", "deepspeed.stage=2")
    run_dir = run_folder(res.stdout)
    out = rank0_result(run_dir)
    # q, k, v, o of 4 layers; A: r x in, B: out x r (hidden 64, 2 KV heads x 16 = 32 for k and v)
    expected = 4 * sum(4 * i + o * 4 for i, o in ((64, 64), (64, 32), (64, 32), (64, 64)))
    assert out["trainable"] == expected
    loss = [l for _, l in losses(run_dir)]
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5
    import torch

    state = torch.load(run_dir / "checkpoints" / "step00000030" / "mp_rank_00_model_states.pt", weights_only=False)
    keys = list(state["module"])
    assert keys and all("lora_" in k for k in keys)
    assert out["frozen_checksum_before"] == out["frozen_checksum_after"]
