"""BLIP LoRA captioning: the lab's full-size adapter count on the meta device, the three MedTrinity formats, bad input
refused before submission, 2-rank ZeRO-2 / ZeRO-3 training through the real local Slurm (loss falls, only adapter
tensors checkpointed, an exact resume after a requeue, captions better than the untrained model's, the saved
adapter loads with PeftModel and gives the same captions), and QLoRA (4 / 8 bit through bitsandbytes) on the CPU."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import (cli, final_state, job_mark, losses, new_jobs, rank0_result, record, requeue_once_checkpointed, log_tails,
                      submit_run)

SPEC = "jobs/tiny/blip_medtrinity.yaml"


def test_full_size_blip_and_the_labs_lora_counts_on_meta():
    from core.models.blip import meta_size
    from core.config import PeftSpec
    from core.workloads.blip_caption import HEAD

    assert meta_size({}).total == 223_971_644
    lab = PeftSpec(r=16, alpha=32, dropout=0.1, target_modules=["qkv", "query", "key", "value"])
    size = meta_size({}, lab, HEAD)
    assert size.trainable == 2_359_296 and size.total == 226_330_940


def test_full_size_memory_estimate_is_per_tower_without_checkpointing():
    """The plan's activations: the vision tower over 577 tokens (384 px, 16 px patches + CLS), the text decoder with
    its real 12 heads cross-attending to them, and no activation checkpointing (the workload does not switch it on)."""
    from core.config import load_cluster, load_spec
    from core.memory import tower_activation_bytes
    from core.models.blip import meta_size
    from core.plan import make_plan

    vision, text = meta_size({}).towers
    assert (vision.layers, vision.tokens, vision.heads, vision.cross_tokens) == (12, 577, 12, 0)
    assert (text.layers, text.tokens, text.heads, text.cross_tokens) == (12, None, 12, 577)
    spec = load_spec("jobs/blip_medtrinity.yaml")[0]
    plan = make_plan(spec, load_cluster("cuda_a100"), keep_going=True)
    expected = tower_activation_bytes(meta_size({}), 256, 4, checkpointing=False, half=True)
    assert plan.memory.activations == expected and expected > 2 * 1024 ** 3
    assert "activation checkpointing" not in plan.describe().split("deepspeed:")[1].split("\n")[0]


def test_no_java_is_refused_before_a_local_run_not_after_training():
    """METEOR needs Java: on a machine without it the plan refuses a local run that evaluates (a Slurm task checks
    at its start, before any training step)."""
    import sys

    res = cli("submit", SPEC, "--dry-run", "--no-preflight", env={"PATH": str(Path(sys.executable).parent)})
    assert res.returncode == 2 and "caption.evaluate" in res.stderr and "java" in res.stderr, res.stderr
    off = cli("submit", SPEC, "--dry-run", "--no-preflight", "--set", "caption.evaluate=false",
              env={"PATH": str(Path(sys.executable).parent)})
    assert off.returncode == 0, off.stderr
    # a Slurm profile: the login node's missing java is said in the plan (the nodes may have it; each task checks)
    slurm = cli("submit", SPEC, "-c", "local_slurm", "--dry-run", "--no-preflight",
                env={"PATH": str(Path(sys.executable).parent)})
    assert slurm.returncode == 0, slurm.stderr
    assert "java: not on this machine; the evaluation's METEOR needs it on the compute nodes" in slurm.stdout
    assert "java:" not in cli("submit", SPEC, "-c", "local_slurm", "--dry-run", "--no-preflight").stdout


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from core.data.medtrinity import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("medtrinity"))


def test_the_three_formats_read_the_same_rows_and_a_bad_image_is_skipped_and_named(synthetic):
    from core.data.medtrinity import open_rows

    sets = [open_rows(str(synthetic / name)) for name in ("hf", "rows.parquet", "rows.jsonl")]
    assert all(s.ids == sets[0].ids and s.captions == sets[0].captions for s in sets) and len(sets[0]) == 48
    for s in sets:
        decoded = [s.image(i) for i in range(len(s))]
        assert sum(img is not None for img in decoded) == 47 and list(s.failed) == ["syn00047"]
        assert decoded[0].mode == "RGB" and decoded[0].size == (48, 48)
    # the caption is learnable from the image: each kind of image has its own caption
    kinds = {c for c in sets[0].captions}
    assert len(kinds) == 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, synthetic):
    from core.data.medtrinity import open_rows, synthetic_captions
    from core.models.blip import write_tiny_blip
    from core.workloads.blip_caption import CaptionSection

    root = tmp_path_factory.mktemp("blip")
    rows = open_rows(str(synthetic / "rows.jsonl"))
    model = write_tiny_blip(root / "blip", rows.captions + synthetic_captions() + [CaptionSection().prefix])
    return {"root": root, "model": model, "data": synthetic}


def args(workdir, name, *extra, data="rows.jsonl"):
    return (SPEC, "--set", f"name={name}", "--set", f"model.path={workdir['model']}", "--set", "model.make_tiny=false",
            "--set", f"data.path={workdir['data'] / data}", "--set", "data.make_synthetic=false",
            "--set", f"outputs.logs_dir={workdir['root'] / 'logs'}", *extra)


BAD = {
    "unknown target module": (("--set", "peft.target_modules=[qkv, nosuchproj]"), "peft.target_modules"),
    "unreadable dataset folder": (("--set", "data.path={root}"), "data.path"),
    "caption column that does not exist": (("--set", "data.caption_column=text"), "data.caption_column"),
    "quantize with ZeRO-3": (("--set", "peft.quantize=4bit", "--set", "deepspeed.stage=3"), "peft.quantize"),
    "quantize on npu": (("--set", "peft.quantize=4bit", "-c", "ascend_910b"), "peft.quantize"),
}


@pytest.mark.slurm  # job_mark / new_jobs ask sacct and squeue
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_before_submission_naming_the_field(workdir, case):
    extra, field = BAD[case]
    extra = tuple(e.replace("{root}", str(workdir["root"])) for e in extra)
    mark = job_mark()
    res = cli("submit", *args(workdir, "bad"), *extra)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("error: ") and field in res.stderr and "Traceback" not in res.stderr
    assert "nothing was submitted" in res.stderr and not new_jobs(mark)
    assert not (workdir["root"] / "logs" / "bad").exists()


TWO_NODES = ("-c", "local_slurm", "--set", "resources.nodes=2")
STEPS = ("--set", "train.steps=120", "--set", "train.checkpoint_every=40")


@pytest.fixture(scope="module")
def zero2(slurm, workdir):
    run_dir, job = submit_run(*args(workdir, "blip_z2", *TWO_NODES, *STEPS), timeout=600)
    assert final_state(job) == "COMPLETED", log_tails(run_dir)
    return run_dir


def test_zero2_two_ranks_train_checkpoint_adapters_and_beat_the_untrained_captions(zero2):
    got = losses(zero2)
    assert [s for s, _ in got] == list(range(1, 121))
    first, last = sum(v for _, v in got[:10]) / 10, sum(v for _, v in got[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    # checkpoints hold only the adapters and the modules_to_save copies (frozen BLIP weights are left out)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(zero2 / "checkpoints"), tag="step00000120")
    assert state and all("lora_" in k or "modules_to_save" in k for k in state), sorted(state)[:5]
    trained = json.loads((zero2 / "results" / "metrics.json").read_text())
    untrained = json.loads((zero2 / "results" / "metrics_untrained.json").read_text())
    assert trained["BLEU-4"] > untrained["BLEU-4"] + 0.2 and trained["CIDEr"] > untrained["CIDEr"]
    rows = list(csv.DictReader((zero2 / "results" / "captions.csv").open()))
    split = json.loads((zero2 / "split.json").read_text())
    assert [r["id"] for r in rows] == split["test"] and len(rows) == trained["images"] >= 8
    assert split["skipped_images"] == {"syn00047": split["skipped_images"]["syn00047"]}
    assert (zero2 / "results" / "metrics.png").stat().st_size > 1000
    assert (zero2 / "results" / "loss.png").stat().st_size > 1000  # the engine draws every training run's loss


def adapter_captions(run_dir: Path, workdir) -> tuple[dict, dict]:
    """(captions the run wrote, captions of the tiny base + the run's saved adapter loaded with PeftModel)."""
    import torch
    from peft import PeftModel

    from core.data.medtrinity import open_rows
    from core.models.blip import load_blip
    from core.config import parse_spec
    from core.workloads.blip_caption import Batches

    spec = parse_spec(record(run_dir)["spec"])
    base, processor = load_blip(workdir["model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    rows = open_rows(str(workdir["data"] / "rows.jsonl"))
    batches = Batches(processor, spec, "cpu", torch.float32)
    expected = {r["id"]: r["prediction"] for r in csv.DictReader((run_dir / "results" / "captions.csv").open())}
    by_id = {rid: i for i, rid in enumerate(rows.ids)}
    got = {}
    with torch.no_grad():
        for rid in expected:
            pixels, prompt = batches.prompt([rows.image(by_id[rid])])
            out = model.generate(pixel_values=pixels, input_ids=prompt, max_new_tokens=spec.caption.max_new_tokens)
            got[rid] = batches.caption(out[0], prompt.shape[1])
    return expected, got


def test_saved_adapter_loads_with_peft_and_gives_the_same_captions(zero2, workdir):
    expected, got = adapter_captions(zero2, workdir)
    assert got == expected


def test_requeue_resumes_exactly(zero2, workdir):
    run_dir, job = submit_run(*args(workdir, "blip_requeue", *TWO_NODES, *STEPS, "--set", "caption.evaluate=false"),
                              timeout=600)
    requeue_once_checkpointed(run_dir, job)
    assert final_state(job) == "COMPLETED", log_tails(run_dir)
    result = rank0_result(run_dir)
    assert result["start_step"] > 0 and result["restart_count"] >= 1
    got, ref = losses(run_dir), losses(zero2)
    assert [s for s, _ in got] == list(range(1, 121))
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, ref)) <= 1e-5


def test_zero3_two_ranks_train_and_caption(slurm, workdir):
    run_dir, job = submit_run(*args(workdir, "blip_z3", *TWO_NODES, "--set", "deepspeed.stage=3",
                                    "--set", "train.steps=80", "--set", "train.checkpoint_every=40",
                                    "--set", "caption.baseline_eval=false"), timeout=600)
    assert final_state(job) == "COMPLETED", log_tails(run_dir)
    got = losses(run_dir)
    assert len(got) == 80 and sum(v for _, v in got[-10:]) < 0.7 * sum(v for _, v in got[:10])
    metrics = json.loads((run_dir / "results" / "metrics.json").read_text())
    assert metrics["images"] >= 8 and metrics["BLEU-4"] > 0.2
    expected, got = adapter_captions(run_dir, workdir)  # gathered from both ranks' shards
    assert got == expected


def lab_download(workdir, layout: str) -> tuple[str, str]:
    """The synthetic rows as the lab's `load_dataset("UCSC-VLAA/MedTrinity-25M", "25M_demo")` leaves them: a hub
    snapshot (a config folder of parquet shards) or a datasets cache folder. (data.path, data.hf_config)"""
    import pyarrow.parquet as pq

    from conftest import write_snapshot

    table = pq.read_table(str(workdir["data"] / "rows.parquet"))
    root = workdir["root"] / layout
    if not root.exists():
        write_snapshot(root, table, ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"])
    if layout == "snapshot":
        return str(root), "25M_demo"
    from datasets import load_dataset

    ds = load_dataset("parquet", data_dir=str(root / "25M_demo"), cache_dir=str(root / "cache"))
    return str(root / "cache"), getattr(ds["train"], "config_name", None) or "default"


@pytest.mark.parametrize("bits,layout", [("4bit", "snapshot"), ("8bit", "cache")])
def test_qlora_runs_on_the_cpu_with_bitsandbytes_on_the_labs_download(workdir, bits, layout):
    """bitsandbytes 0.50 has a CPU backend: a 4-bit (NF4, double quant, bf16 compute on fp32 training, ZeRO-2: the
    combination that used to fail in a LayerNorm) or 8-bit frozen base trains its adapters through bitsandbytes
    layers (every linear layer but the LM head and the modules_to_save). The data are read as the lab has them: a
    hub snapshot of parquet shards (4bit) or a datasets cache folder (8bit), images one row group at a time."""
    path, config = lab_download(workdir, layout)
    run_dir, _ = submit_run(*args(workdir, f"blip_{bits}", "--set", f"peft.quantize={bits}",
                                  "--set", "deepspeed.stage=2", "--set", "train.steps=20",
                                  "--set", "train.checkpoint_every=0", "--set", "caption.evaluate=false",
                                  "--set", f"data.hf_config={config}", data=path), timeout=600)
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["train"]) + len(split["test"]) == 48      # every row of the shards / the cache
    assert set(split["skipped_images"]) <= {"syn00047"}        # its truncated PNG, counted if the loop met it
    got = losses(run_dir)
    assert len(got) == 20 and sum(v for _, v in got[-5:]) < sum(v for _, v in got[:5])
    # 2 vision layers x (qkv, projection, fc1, fc2) + 2 text layers x (query, key, value and output dense of the self-
    # and the cross-attention, intermediate, output) + the head transform: 29 linear layers, all but the tied LM head
    assert rank0_result(run_dir)["quantized_modules"] == 29
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
