"""Pangu pruning: layer masks, the scan (in one process and as one Slurm array task per layer), the merge,
--resume-missing, pruning and its evaluation, and the cheaper BI / angular metrics."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from conftest import cli, job_mark, new_jobs, record, run_folder, sacct_states, submit, wait_terminal

from core.runtime import TaskContext
from core.config import SpecError, load_spec

SCAN = "jobs/tiny/pangu_sensitivity.yaml"
PRUNE = "jobs/tiny/pangu_prune.yaml"
LAYERS = 6


@pytest.fixture(scope="module")
def model_dir(tiny_pangu_factory):
    return tiny_pangu_factory(layers=LAYERS)


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


def direct_states(model, ids):
    """X_0..X_L computed by hand: the embedding, then each decoder layer in turn (no final norm)."""
    import torch

    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        emb = model.model.rotary_emb(h, pos)
        xs = [h[0]]
        for layer in model.model.layers:
            out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=emb)
            h = out[0] if isinstance(out, tuple) else out
            xs.append(h[0])
    return xs


def test_bi_and_angular_agree_with_a_direct_computation(model, model_dir):
    """ShortGPT's BI: 1 - cos(X_l, X_{l+1}) over tokens, the last layer's X_L un-normed; Gromov's angular
    distance: arccos(cos) / pi between the inputs of layers l and l+n on the last token."""
    import torch

    from core.models.pangu import load_tokenizer
    from core.workloads.sensitivity import encode, hidden_metrics

    tok = load_tokenizer(model_dir)
    prompts = encode(tok, ["The chest CT shows", "胸部CT平扫："], 32)
    xs = direct_states(model, prompts[1])

    def cos(a, b):
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))

    for n in (1, 2, 3):
        per = hidden_metrics(model, prompts, "cpu", block_size=n)
        for layer in range(LAYERS):
            assert per[layer]["bi"][1] == pytest.approx(float((1 - cos(xs[layer], xs[layer + 1])).mean()),
                                                        rel=1e-4, abs=1e-6)
            if layer + n <= LAYERS:
                c = cos(xs[layer][-1], xs[layer + n][-1]).clamp(-1, 1)
                assert per[layer]["angular"][1] == pytest.approx(float(torch.arccos(c) / math.pi), rel=1e-4, abs=1e-6)
            else:
                assert "angular" not in per[layer]
    # the last layer's BI is taken before the final norm: transformers' hidden_states[L] is the normed one (the
    # tiny model's norm weight is all ones, a per-token scale that cos ignores: give it a real model's spread)
    norm = model.model.norm.weight
    saved = norm.detach().clone()
    try:
        with torch.no_grad():
            norm.copy_(torch.linspace(0.2, 3.0, norm.numel()))
            hs = model(input_ids=prompts[1], output_hidden_states=True).hidden_states
            assert torch.allclose(hs[LAYERS][0], model.model.norm(xs[LAYERS]), atol=1e-5)
            normed = float((1 - cos(hs[LAYERS - 1][0], hs[LAYERS][0])).mean())
            last = hidden_metrics(model, prompts, "cpu")[LAYERS - 1]["bi"][1]
        assert last == pytest.approx(float((1 - cos(xs[LAYERS - 1], xs[LAYERS])).mean()), rel=1e-4)
        assert abs(last - normed) > 1e-3
    finally:
        with torch.no_grad():
            norm.copy_(saved)


def test_angular_blocks_are_scanned_and_merged(model_dir, tmp_path):
    from core.workloads import sensitivity as sens

    spec, _ = spec_for(model_dir, "scan.metric=angular", "scan.block_size=2")
    sens.run(spec, ctx_for(tmp_path, items=None))
    out = sens.merge(spec, ctx_for(tmp_path, step="merge"))
    assert out["layers"] == LAYERS - 1  # blocks start at 0..L-2
    from core.config import FieldError

    with pytest.raises(FieldError, match="metric angular"):
        sens.plan(spec_for(model_dir, "scan.metric=bi", "scan.block_size=2")[0])
    with pytest.raises(FieldError, match=r"cannot start at \[5\]"):
        sens.plan(spec_for(model_dir, "scan.metric=angular", "scan.block_size=2", "scan.layers=[0, 5]")[0])


def test_qv_and_v_masks_give_the_same_scores_and_k_qkv_differ(model, model_dir, tmp_path):
    """Zero V and softmax(QK^T) V is 0 whatever Q is: qv and v give identical outputs; k (uniform attention
    over V) and qkv are other masks."""
    import torch

    from core.workloads.sensitivity import LayerMask

    x = ids(model_dir)
    out = {}
    with torch.no_grad():
        for mode in ("qv", "v", "k", "qkv"):
            with LayerMask(model, 2, mode):
                out[mode] = model(input_ids=x).logits.clone()
    assert torch.equal(out["qv"], out["v"]) and torch.equal(out["qkv"], out["v"])
    assert not torch.equal(out["k"], out["v"])
# ---------------------------------------------------------------- through Slurm
@pytest.fixture(scope="module")
def local_scan(model_dir, tmp_path_factory):
    spec, _ = spec_for(model_dir)
    run_dir = tmp_path_factory.mktemp("inproc") / "scan"
    in_process_scan(spec, run_dir)
    return run_dir


def test_array_scan_through_slurm_equals_the_in_process_scan(slurm, model_dir, local_scan, tmp_path):
    run_dir = run_folder(submit(SCAN, "-c", "local_slurm", "--set", f"model.path={model_dir}",
                                "--set", "model.make_tiny=false", "--set", f"outputs.logs_dir={tmp_path}").stdout)
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
    run_dir = run_folder(submit(*args, env={"MEDHPC_FAULT": "fail@layer:3"}).stdout)
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
    res = submit(*args, "--resume-missing", str(run_dir))
    again = run_folder(res.stdout)
    assert again == run_dir and "missing layers: [3]" in res.stdout
    steps = {s["name"]: s for s in record(run_dir)["steps"]}
    assert list(steps) == ["main", "merge"] and steps["main"]["n_tasks"] == 1
    new_arr, new_merge = steps["main"]["job_ids"][0], steps["merge"]["job_ids"][0]
    assert wait_terminal([new_merge], timeout=300) == {new_merge: "COMPLETED"}
    assert list(sacct_states([new_arr]).values()) == ["COMPLETED"]  # one task (submitit sends 1 item as a job)
    assert len((run_dir / "sensitivity.csv").read_text().splitlines()) == LAYERS + 1
    assert sorted(layer_values(run_dir)) == list(range(LAYERS))


def test_bi_metric_is_one_task_then_merge(slurm, model_dir, tmp_path):
    run_dir = run_folder(submit(SCAN, "-c", "local_slurm", "--set", f"model.path={model_dir}",
                                "--set", "model.make_tiny=false", "--set", f"outputs.logs_dir={tmp_path}",
                                "--set", "scan.metric=bi").stdout)
    steps = {s["name"]: s for s in record(run_dir)["steps"]}
    assert list(steps) == ["main", "merge"] and "chunks" not in steps["main"]
    assert wait_terminal(steps["merge"]["job_ids"], timeout=300) == {steps["merge"]["job_ids"][0]: "COMPLETED"}
    assert "bi" in (run_dir / "sensitivity.csv").read_text()


def test_prune_at_ratios_and_evaluate(slurm, model_dir, local_scan, tmp_path):
    from transformers import LlamaForCausalLM

    run_dir = run_folder(submit(PRUNE, "-c", "local_slurm", "--set", f"model.path={model_dir}",
                                "--set", "model.make_tiny=false", "--set", f"outputs.logs_dir={tmp_path}",
                                "--set", f"prune.sensitivity_csv={local_scan}/sensitivity.csv",
                                "--set", "prune.ratios=[0.34, 0.5]").stdout)
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
    mark = job_mark()
    res = cli("submit", SCAN, "-c", "local_slurm", "--set", f"model.path={model_dir}", "--set", "model.make_tiny=false",
              *[x for s in sets for x in ("--set", s)])
    assert res.returncode != 0 and needle in res.stderr and "nothing was submitted" in res.stderr
    assert not new_jobs(mark)


def test_ratio_outside_zero_one_is_refused(model_dir):
    with pytest.raises(SpecError, match=r"every ratio must lie in \(0, 1\)"):
        spec_for(model_dir, "prune.ratios=[0.2, 1.5]", path=PRUNE)


# ---------------------------------------------------------------- a task reads only what it needs
def shard_copy(src: Path, dst: Path, shards: int = 3) -> Path:
    """The model folder re-written as `shards` safetensors shards with model.safetensors.index.json."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    state = load_file(str(src / "model.safetensors"))
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        save_file(part, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_partial_load_scan_is_bit_identical_to_the_full_in_process_scan(model_dir, tmp_path, dtype):
    """Each task builds only layers min(its layers)..L-1 + norm + LM head from a sharded folder and reads only its
    layers' baseline rows; every layer and mode gives exactly the full model's numbers."""
    import torch

    from core.models.pangu import _header_bytes, load_pangu
    from core.workloads import sensitivity as sens

    sharded = shard_copy(model_dir, tmp_path / "sharded")
    spec, _ = spec_for(sharded, f"scan.dtype={dtype}")
    run_dir = tmp_path / "run"
    sens.baseline(spec, ctx_for(run_dir, step="baseline"))
    full = load_pangu(model_dir, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype],
                      attn_implementation="sdpa").eval()
    base = sens.read_baseline(run_dir)
    total_weights = sum(f.stat().st_size for f in sharded.glob("*.safetensors"))
    for mode in sens.MODES:
        spec, _ = spec_for(sharded, f"scan.dtype={dtype}", f"scan.mode={mode}")
        for layer in range(LAYERS):
            res = sens.run(spec, ctx_for(run_dir, items=[layer]))
            got = json.loads((run_dir / "layers" / f"layer_{layer:03d}.json").read_text())["values"]
            want = sens.scan_layer(full, base, layer, mode, True, "cpu")["logprob"]
            assert got == want, (mode, layer)
            assert res["weights_total_bytes"] == total_weights
            if mode == "qv":  # bytes read shrink with the start layer; the baseline: one layer's rows
                assert res["weights_read_bytes"] < total_weights * (LAYERS - layer + 1) / LAYERS
                header = _header_bytes(sens.baseline_path(run_dir))
                assert res["baseline_read_bytes"] <= res["baseline_total_bytes"] / LAYERS + header
    # the tail holds no embedding and no earlier layer
    from core.models.pangu import load_pangu_tail

    tail = load_pangu_tail(sharded, 4, dtype=torch.float32)
    names = {n for n, _ in tail.named_parameters()}
    assert not any("embed" in n for n in names) and len(tail.layers) == LAYERS - 4
    with pytest.raises(IndexError):
        tail.layer(3)


def test_baseline_stores_one_tensor_per_layer(model_dir, tmp_path):
    from safetensors import safe_open

    from core.workloads import sensitivity as sens

    spec, _ = spec_for(model_dir)
    sens.baseline(spec, ctx_for(tmp_path, step="baseline"))
    with safe_open(str(sens.baseline_path(tmp_path)), "pt") as st:
        keys = set(st.keys())
        n = int(st.metadata()["prompts"])
        assert {f"hidden.layer{i:03d}" for i in range(LAYERS)} <= keys
        tokens = sum(st.get_tensor(f"p{i}.ids").numel() for i in range(n))
        assert st.get_slice("hidden.layer002").get_shape()[0] == tokens
        assert all(f"p{i}.{f}" in keys for i in range(n) for f in ("ids", "target_lp", "last_lp"))
    only = sens.read_baseline(tmp_path, layers=[2], fields=("target_lp",))
    assert len(only) == n and all(set(b["hidden"]) == {2} and "last_lp" not in b for b in only)


# ---------------------------------------------------------------- lean task start
LEAN_STEPS = r'''
import json, sys
from core.runtime import TaskEntry
from core.config import load_spec

model, run_dir, out = sys.argv[1], sys.argv[2], {}
sets = (f"model.path={model}", "model.make_tiny=false")
scan = load_spec("jobs/tiny/pangu_sensitivity.yaml", sets)[1]
prune = load_spec("jobs/tiny/pangu_prune.yaml", sets + ("prune.layers=[1]",))[1]
cluster = {"accelerator": "cpu", "executor": "local"}
for name, raw, workload, entry, items in [("baseline", scan, "sensitivity", "baseline", None),
                                          ("scan", scan, "sensitivity", "run", [2, 3]),
                                          ("merge", {**scan, "scan": {**scan["scan"], "layers": [2, 3]}},
                                           "sensitivity", "merge", None),
                                          ("prune", prune, "prune", "run", [0.0, "layers"])]:
    step = {"baseline": "baseline", "scan": "main", "merge": "merge", "prune": "main"}[name]
    d = run_dir + ("/prune" if name == "prune" else "/scan")
    TaskEntry(spec_data=raw, cluster_data=cluster, workload=workload, entry=entry, step=step,
              run_dir_template=d)(0 if items else None, items)
    out[name] = sorted(m for m in sys.modules if m.split(".")[0] == "deepspeed")
print("LEAN " + json.dumps(out))
'''


def test_inference_steps_do_not_import_deepspeed(model_dir, tmp_path):
    """baseline, scan, merge and the prune evaluation run through the task entry in a fresh interpreter without
    DeepSpeed ever being imported."""
    import os
    import sys

    res = subprocess.run([sys.executable, "-c", LEAN_STEPS, str(model_dir), str(tmp_path)], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("LEAN "))[5:])
    assert out == {"baseline": [], "scan": [], "merge": [], "prune": []}
    assert (tmp_path / "scan" / "sensitivity.csv").is_file() and (tmp_path / "prune" / "evals").is_dir()


# ---------------------------------------------------------------- layers_per_task: auto
@pytest.mark.parametrize("start_s", [1e-4, 0.05, 1e6])
def test_auto_layers_per_task_keeps_the_start_share_under_the_limit(model_dir, start_s):
    from core.workloads import sensitivity as sens

    spec, _ = spec_for(model_dir, "scan.layers_per_task=auto", f"scan.task_start_s={start_s}",
                       "scan.device_tflops=0.001", "scan.read_gb_s=100")
    shape = sens.plan(spec)
    per, layers = shape.items_per_task, list(range(LAYERS))
    note = next(n for n in shape.notes if n.startswith("layers_per_task auto:"))
    assert f"auto: {per} (" in note and "start share" in note
    share = sens.start_share(sens.task_costs(spec, layers, per))
    if per < LAYERS or share <= 0.2:
        assert share <= 0.2 and "<= 20% (max_start_share)" in note
    else:
        assert "even with every layer in one task" in note
    if per > 1:  # one fewer per task would start too much
        assert sens.start_share(sens.task_costs(spec, layers, per - 1)) > 0.2
    if start_s == 1e-4:
        assert per == 1
    if start_s == 1e6:
        assert per == LAYERS


def test_layers_per_task_stays_one_by_default(model_dir):
    from core.workloads import sensitivity as sens

    shape = sens.plan(spec_for(model_dir)[0])
    assert shape.items_per_task == 1 and not shape.notes


# ---------------------------------------------------------------- the pruned folder
def test_pruned_folder_is_sharded_indexed_and_carries_every_non_weight_file(model_dir, tmp_path):
    """From a sharded source with tokenizer files, a generation config and auto_map code: shards streamed layer by
    layer (none above the size limit unless one layer is bigger), an index naming every tensor, every non-weight
    file copied, and from_pretrained gives what the full model gives with those layers skipped."""
    import torch
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    from core.workloads.prune import write_pruned
    from core.workloads.sensitivity import LayerMask

    src = shard_copy(model_dir, tmp_path / "src", shards=2)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_openpangu_dense.PanguEmbeddedForCausalLM"}
    (src / "config.json").write_text(json.dumps(cfg))
    extras = {"modeling_openpangu_dense.py": "# remote code\n", "configuration_openpangu_dense.py": "# config\n",
              "generation_config.json": "{}", "special_tokens_map.json": "{}"}
    for name, text in extras.items():
        (src / name).write_text(text)
    layer_bytes = sum(t.numel() * t.element_size() for n, t in
                      LlamaForCausalLM.from_pretrained(model_dir).state_dict().items() if n.startswith("model.layers.0."))
    limit = 2 * layer_bytes
    dst = tmp_path / "pruned"
    rec = write_pruned(src, dst, [1, 4], max_shard_bytes=limit)
    shards = sorted(dst.glob("*.safetensors"))
    assert rec["shards"] == len(shards) > 2 and all(f"-of-{len(shards):05d}" in s.name for s in shards)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    stored = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as st:
            keys = list(st.keys())
            stored.update({k: shard.name for k in keys})
            layers_in = {k.split(".")[2] for k in keys if k.startswith("model.layers.")}
            assert sum(st.get_tensor(k).numel() * st.get_tensor(k).element_size() for k in keys) <= limit \
                or len(layers_in) <= 1
    assert index["weight_map"] == stored
    assert {int(k.split(".")[2]) for k in stored if k.startswith("model.layers.")} == set(range(LAYERS - 2))
    for name in [*extras, "tokenizer.model", "tokenizer_config.json"]:
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert json.loads((dst / "config.json").read_text())["auto_map"] == cfg["auto_map"]
    pruned = LlamaForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    full = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert pruned.config.num_hidden_layers == LAYERS - 2
    x = ids(model_dir)
    with torch.no_grad(), LayerMask(full, 1, "block"), LayerMask(full, 4, "block"):
        want = full(input_ids=x).logits
    with torch.no_grad():
        got = pruned(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_kl_metric_reads_only_last_lp_and_matches_the_full_model(model_dir, model, tmp_path):
    from core.workloads import sensitivity as sens

    spec, _ = spec_for(model_dir, "scan.metric=kl")
    sens.baseline(spec, ctx_for(tmp_path, step="baseline"))
    res = sens.run(spec, ctx_for(tmp_path, items=[2, 3]))
    assert res["layers"] == [2, 3]
    base = sens.read_baseline(tmp_path)
    for layer in (2, 3):
        got = json.loads((tmp_path / "layers" / f"layer_{layer:03d}.json").read_text())
        assert got["metric"] == "kl" and got["values"] == sens.scan_layer(model, base, layer, "qv", True, "cpu")["kl"]
        assert all(v > 0 for v in got["values"])
