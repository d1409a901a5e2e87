"""Pangu pruning: layer masks, the scan (in one process and as one Slurm array task per layer), the merge,
--resume-missing, pruning and its evaluation, and the cheaper BI / angular metrics."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from conftest import all_job_count, cli, queue_ids, record, run_folder, sacct_states, wait_terminal

from core.runtime import TaskContext
from core.spec import SpecError, load_spec

SCAN = "jobs/tiny/pangu_sensitivity.yaml"
PRUNE = "jobs/tiny/pangu_prune.yaml"
LAYERS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from core.models.pangu import write_tiny_pangu

    return write_tiny_pangu(tmp_path_factory.mktemp("m") / "pangu6", layers=LAYERS)


@pytest.fixture(scope="module")
def model(model_dir):
    import torch

    from core.models.pangu import load_pangu

    return load_pangu(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


def ids(model_dir):
    import torch

    return torch.tensor([[1, 25, 80, 7, 300, 42, 9, 11]])


def spec_for(model_dir, *sets, path=SCAN):
    spec, raw = load_spec(path, (f"model.path={model_dir}", "model.make_tiny=false", *sets))
    return spec, raw


def ctx_for(run_dir: Path, items=None, step="main") -> TaskContext:
    run_dir.mkdir(parents=True, exist_ok=True)
    return TaskContext(run_dir=run_dir, step=step, job_id="inproc", root_id=run_dir.name, items=items)


def in_process_scan(spec, run_dir: Path) -> dict:
    from core.workloads import sensitivity as sens

    sens.baseline(spec, ctx_for(run_dir, step="baseline"))
    sens.run(spec, ctx_for(run_dir, items=list(range(LAYERS))))
    return sens.merge(spec, ctx_for(run_dir, step="merge"))


def layer_values(run_dir: Path) -> dict[int, list[float]]:
    return {json.loads(p.read_text())["layer"]: json.loads(p.read_text())["values"]
            for p in (run_dir / "layers").glob("layer_*.json")}


# ---------------------------------------------------------------- masks
def test_masking_is_reversible_bit_for_bit(model, model_dir):
    import torch

    from core.workloads.sensitivity import LayerMask

    x = ids(model_dir)
    with torch.no_grad():
        before = model(input_ids=x).logits.clone()
        for mode in ("qv", "v", "attn", "block"):
            with LayerMask(model, 2, mode):
                masked = model(input_ids=x).logits
            assert not torch.equal(masked, before), mode
            assert torch.equal(model(input_ids=x).logits, before), mode


def test_mode_v_changes_only_the_v_projection_output(model, model_dir):
    import torch

    from core.workloads.sensitivity import LayerMask

    attn = model.model.layers[1].self_attn
    seen = {}

    def capture(name):
        def hook(module, args, output):
            seen.setdefault(name, []).append(output.detach().clone())
        return hook

    # registered after the mask's hook, so they see what the mask returned
    with torch.no_grad():
        model(input_ids=ids(model_dir))
        handles = [getattr(attn, n).register_forward_hook(capture(n)) for n in ("q_proj", "k_proj", "v_proj")]
        model(input_ids=ids(model_dir))
        for h in handles:
            h.remove()
        with LayerMask(model, 1, "v"):
            handles = [getattr(attn, n).register_forward_hook(capture(n)) for n in ("q_proj", "k_proj", "v_proj")]
            model(input_ids=ids(model_dir))
            for h in handles:
                h.remove()
    assert torch.equal(seen["q_proj"][0], seen["q_proj"][1]) and torch.equal(seen["k_proj"][0], seen["k_proj"][1])
    assert seen["v_proj"][0].abs().sum() > 0 and torch.count_nonzero(seen["v_proj"][1]) == 0


def test_starting_at_the_masked_layer_from_baseline_hidden_states_gives_identical_results(model_dir, tmp_path):
    """reuse_hidden (start at layer l) and the naive full masked pass give the same numbers."""
    fast, _ = spec_for(model_dir, "scan.reuse_hidden=true")
    slow, _ = spec_for(model_dir, "scan.reuse_hidden=false")
    in_process_scan(fast, tmp_path / "fast")
    in_process_scan(slow, tmp_path / "slow")
    a, b = layer_values(tmp_path / "fast"), layer_values(tmp_path / "slow")
    assert sorted(a) == list(range(LAYERS))
    for layer in a:
        assert a[layer] == pytest.approx(b[layer], abs=1e-6, rel=1e-5)


def test_bi_and_angular_agree_with_hidden_states(model, model_dir):
    import torch

    from core.models.pangu import load_tokenizer
    from core.workloads.sensitivity import encode, hidden_metrics

    tok = load_tokenizer(model_dir)
    prompts = encode(tok, ["The chest CT shows", "胸部CT平扫："], 32)
    per = hidden_metrics(model, prompts, "cpu")
    with torch.no_grad():
        hs = model(input_ids=prompts[1], output_hidden_states=True).hidden_states
    a, b = hs[3][0], hs[4][0]
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    assert per[3]["bi"][1] == pytest.approx(float((1 - cos).mean()), rel=1e-5)
    assert per[3]["angular"][1] == pytest.approx(float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean()), rel=1e-5)


# ---------------------------------------------------------------- through Slurm
@pytest.fixture(scope="module")
def local_scan(model_dir, tmp_path_factory):
    spec, _ = spec_for(model_dir)
    run_dir = tmp_path_factory.mktemp("inproc") / "scan"
    in_process_scan(spec, run_dir)
    return run_dir


def submit(*args, env=None):
    res = cli("submit", *args, env=env)
    assert res.returncode == 0, res.stderr + res.stdout
    return run_folder(res.stdout), res


def test_array_scan_through_slurm_equals_the_in_process_scan(slurm, model_dir, local_scan, tmp_path):
    run_dir, res = submit(SCAN, "-c", "local_slurm", "--set", f"model.path={model_dir}",
                          "--set", "model.make_tiny=false", "--set", f"outputs.logs_dir={tmp_path}")
    steps = {s["name"]: s for s in record(run_dir)["steps"]}
    assert list(steps) == ["baseline", "main", "merge"]
    (base_id,), (arr_id,), (merge_id,) = steps["baseline"]["job_ids"], steps["main"]["job_ids"], \
        steps["merge"]["job_ids"]
    assert steps["main"]["dependency"] == [base_id] and steps["merge"]["dependency"] == [arr_id]
    assert wait_terminal([merge_id], timeout=300) == {merge_id: "COMPLETED"}
    states = sacct_states([base_id, arr_id, merge_id])
    assert states == {base_id: "COMPLETED", merge_id: "COMPLETED",
                      **{f"{arr_id}_{i}": "COMPLETED" for i in range(LAYERS)}}  # L tasks + baseline + merge
    starts = subprocess.run(["sacct", "-X", "-n", "-P", "-j", f"{arr_id},{merge_id}", "-o", "JobID,Start,End"],
                            capture_output=True, text=True).stdout.split()
    times = {ln.split("|")[0]: ln.split("|")[1:] for ln in starts}
    assert times[merge_id][0] >= max(v[1] for k, v in times.items() if k.startswith(f"{arr_id}_"))
    assert layer_values(run_dir) == layer_values(local_scan)  # exactly the same numbers
    csv = (run_dir / "sensitivity.csv").read_text().splitlines()
    assert csv[0] == "layer,mean,std,rank,metric" and len(csv) == LAYERS + 1
    assert (run_dir / "sensitivity.png").stat().st_size > 1000
    assert (run_dir.parent / "latest").resolve() == run_dir


def test_failed_layer_fails_the_merge_and_resume_missing_runs_only_it(slurm, model_dir, tmp_path):
    args = (SCAN, "-c", "local_slurm", "--set", f"model.path={model_dir}", "--set", "model.make_tiny=false",
            "--set", f"outputs.logs_dir={tmp_path}")
    run_dir, _ = submit(*args, env={"MEDHPC_FAULT": "fail@layer:3"})
    steps = {s["name"]: s for s in record(run_dir)["steps"]}
    arr_id, merge_id = steps["main"]["job_ids"][0], steps["merge"]["job_ids"][0]
    states = wait_terminal([arr_id], expect_tasks=LAYERS, timeout=300)
    assert states[f"{arr_id}_3"] == "FAILED" and list(states.values()).count("COMPLETED") == LAYERS - 1
    assert wait_terminal([merge_id]) == {merge_id: "CANCELLED"}  # afterok never satisfied
    # a merge run by hand names the missing layer
    from core.workloads import sensitivity as sens

    spec, _ = spec_for(model_dir)
    with pytest.raises(RuntimeError, match=r"no result for layers \[3\]"):
        sens.merge(spec, ctx_for(run_dir, step="merge"))
    again, res = submit(*args, "--resume-missing", str(run_dir))
    assert again == run_dir and "missing layers: [3]" in res.stdout
    steps = {s["name"]: s for s in record(run_dir)["steps"]}
    assert list(steps) == ["main", "merge"] and steps["main"]["n_tasks"] == 1
    new_arr, new_merge = steps["main"]["job_ids"][0], steps["merge"]["job_ids"][0]
    assert wait_terminal([new_merge], timeout=300) == {new_merge: "COMPLETED"}
    assert list(sacct_states([new_arr]).values()) == ["COMPLETED"]  # one task (submitit sends 1 item as a job)
    assert len((run_dir / "sensitivity.csv").read_text().splitlines()) == LAYERS + 1
    assert sorted(layer_values(run_dir)) == list(range(LAYERS))


def test_bi_metric_is_one_task_then_merge(slurm, model_dir, tmp_path):
    run_dir, _ = submit(SCAN, "-c", "local_slurm", "--set", f"model.path={model_dir}", "--set", "model.make_tiny=false",
                        "--set", f"outputs.logs_dir={tmp_path}", "--set", "scan.metric=bi")
    steps = {s["name"]: s for s in record(run_dir)["steps"]}
    assert list(steps) == ["main", "merge"] and "chunks" not in steps["main"]
    assert wait_terminal(steps["merge"]["job_ids"], timeout=300) == {steps["merge"]["job_ids"][0]: "COMPLETED"}
    assert "bi" in (run_dir / "sensitivity.csv").read_text()


def test_prune_at_ratios_and_evaluate(slurm, model_dir, local_scan, tmp_path):
    from transformers import LlamaForCausalLM

    run_dir, _ = submit(PRUNE, "-c", "local_slurm", "--set", f"model.path={model_dir}", "--set", "model.make_tiny=false",
                        "--set", f"outputs.logs_dir={tmp_path}", "--set", f"prune.sensitivity_csv={local_scan}/sensitivity.csv",
                        "--set", "prune.ratios=[0.34, 0.5]")
    steps = {s["name"]: s for s in record(run_dir)["steps"]}
    assert steps["main"]["n_tasks"] == 3  # unpruned + two ratios
    assert wait_terminal(steps["merge"]["job_ids"], timeout=300) == {steps["merge"]["job_ids"][0]: "COMPLETED"}
    import pandas as pd

    table = pd.read_csv(run_dir / "pruning_eval.csv")
    assert list(table["layers"]) == [LAYERS, LAYERS - 2, LAYERS - 3]
    assert table["logprob_distance"].iloc[0] == 0 and (table["logprob_distance"].iloc[1:] > 0).all()
    sens = pd.read_csv(local_scan / "sensitivity.csv")
    folder = Path(table["folder"].iloc[2])
    pruned = json.loads((folder / "pruning.json").read_text())
    assert pruned["removed"] == sorted(sens.nsmallest(3, "mean")["layer"].tolist())
    model = LlamaForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == LAYERS - 3
    full = LlamaForCausalLM.from_pretrained(model_dir)
    per_layer = sum(p.numel() for p in full.model.layers[0].parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in full.parameters()) - 3 * per_layer
    import torch

    out = model.generate(torch.tensor([[1, 30, 40]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
    assert (run_dir / "pruning_eval.png").stat().st_size > 1000


@pytest.mark.parametrize("sets,needle", [
    (("scan.layers=[0, 9]",), "scan.layers: layer indices [9] are out of range: the model has 6 layers"),
    (("scan.prompts=/nonexistent/prompts.txt",), "scan.prompts: file /nonexistent/prompts.txt not found"),
    (("scan.prompts=EMPTY",), "has no non-empty line"),
])
def test_bad_scan_input_is_refused_before_submission(slurm, model_dir, tmp_path, sets, needle):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    sets = tuple(s.replace("EMPTY", str(empty)) for s in sets)
    before_q, before_all = queue_ids(), all_job_count()
    res = cli("submit", SCAN, "-c", "local_slurm", "--set", f"model.path={model_dir}", "--set", "model.make_tiny=false",
              *[x for s in sets for x in ("--set", s)])
    assert res.returncode != 0 and needle in res.stderr and "nothing was submitted" in res.stderr
    assert queue_ids() == before_q and all_job_count() == before_all


def test_ratio_outside_zero_one_is_refused(model_dir):
    with pytest.raises(SpecError, match=r"every ratio must lie in \(0, 1\)"):
        spec_for(model_dir, "prune.ratios=[0.2, 1.5]", path=PRUNE)
