"""Optimizer parameter groups from the spec (core.engine.param_groups): a learning rate per module
(train.lr_groups), no weight decay on biases and norm weights (the Hugging Face Trainer's rule, switchable),
peft.bias; the groups are what DeepSpeed's optimizer holds, they are saved with the checkpoint and a resume continues
them exactly. lm_finetune on the tiny openPangu, one process, no Slurm."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, losses


def spec_for(tiny_pangu, logs, *sets: str):
    from core.config import load_spec

    return load_spec(REPO / "jobs/tiny/pangu_lm.yaml", (
        "name=groups", f"model.path={tiny_pangu}", "model.make_tiny=false", f"outputs.logs_dir={logs}",
        "train.warmup_steps=0", *sets))[0]


def run_here(spec, run_dir: Path) -> dict:
    """The workload's own run() in this process (rank 0 of 1, gloo)."""
    from core import registry
    from core.runtime import TaskContext

    run_dir.mkdir(parents=True, exist_ok=True)
    return registry.get(spec.workload).run(spec, TaskContext(run_dir, "main", "1", "1"))


def test_no_decay_on_biases_and_norm_weights_unless_switched_off(tiny_pangu):
    import torch

    from core.engine import param_groups
    from core.models.pangu import load_pangu

    model = load_pangu(tiny_pangu, dtype=torch.float32)
    spec = spec_for(tiny_pangu, "logs", "train.weight_decay=0.05")
    groups = {g["name"]: g for g in param_groups(model, spec.train)}
    assert set(groups) == {"default", "default no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in groups["default no_decay"]["params"]}
    # q/k/v/o biases (openPangu's attention bias) and every RMSNorm weight, nothing else
    expected = {n for n in names.values() if n.endswith(".bias") or "norm" in n}
    assert exempt == expected and len(expected) == 4 * 4 + 4 * 2 + 1
    assert groups["default no_decay"]["weight_decay"] == 0.0 and groups["default"]["weight_decay"] == 0.05
    every = param_groups(model, spec_for(tiny_pangu, "logs", "train.weight_decay=0.05",
                                         "train.decay_norms_and_biases=true").train)
    assert [(g["name"], g["weight_decay"]) for g in every] == [("default", 0.05)]


def test_peft_bias_and_an_unknown_lr_group_is_named(tiny_pangu):
    import torch

    from core.engine import param_groups
    from core.models.pangu import HEAD, load_pangu
    from core.models.peft import apply_peft

    spec = spec_for(tiny_pangu, "logs", "peft.bias=lora_only", "train.lr_groups={nosuchmodule: 0.001}")
    model = apply_peft(load_pangu(tiny_pangu, dtype=torch.float32), spec.peft, HEAD)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # lora_only: the biases of the adapted layers (q, k, v, o) train with the adapters
    assert {n for n in trainable if n.endswith(".bias")} == {
        f"base_model.model.model.layers.{i}.self_attn.{m}.base_layer.bias" for i in range(4)
        for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    with pytest.raises(ValueError, match=r"train.lr_groups: \['nosuchmodule'\]"):
        param_groups(model, spec.train)


def test_two_lr_groups_reach_the_optimizer_and_survive_a_resume(tiny_pangu, tmp_path):
    sets = ("peft.target_modules=all-linear", "peft.modules_to_save=[lm_head]", "train.lr_groups={lm_head: 0.0002}",
            "peft.bias=all",
            "train.lr=0.003", "train.weight_decay=0.01", "train.steps=4", "train.checkpoint_every=2",
            "train.scheduler=linear")
    spec = spec_for(tiny_pangu, tmp_path, *sets)
    run_dir = tmp_path / "run"
    first = run_here(spec, run_dir)
    reference = losses(run_dir)
    groups = {g["name"]: g for g in first["param_groups"]}
    assert groups["default"]["initial_lr"] == 0.003 and groups["lm_head"]["initial_lr"] == 0.0002
    assert groups["default no_decay"]["weight_decay"] == 0.0 and groups["lm_head"]["weight_decay"] == 0.01
    saved = json.loads((run_dir / "checkpoints" / "step00000004" / "COMPLETE").read_text())
    assert saved["step"] == 4
    # drop the last checkpoint: the second run resumes at step 2 and must repeat steps 3-4 exactly
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step00000004")
    (run_dir / "checkpoints" / "latest").write_text("step00000002")
    second = run_here(spec, run_dir)
    assert second["start_step"] == 2
    assert second["param_groups"] == first["param_groups"]
    got = losses(run_dir)
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, reference)) <= 1e-6
    # a spec whose groups differ from the checkpoint's is stopped, not silently overruled by it
    changed = spec_for(tiny_pangu, tmp_path, *sets[:2], "train.lr_groups={lm_head: 0.001}", *sets[3:])
    with pytest.raises(ValueError, match="train.lr_groups: checkpoint step00000004"):
        run_here(changed, run_dir)


def test_the_dry_run_refuses_an_lr_group_that_names_no_module():
    """The planner counts the model on the meta device: a pattern that names no module above a trainable parameter
    is refused before anything is submitted, with real module paths to choose from; a real one plans."""
    from conftest import cli

    bad = cli("submit", "jobs/tiny/pangu_lm.yaml", "--dry-run", "--no-preflight", "--set", "train.lr_groups.mm_projector=2e-5")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert ("error: jobs/tiny/pangu_lm.yaml: train.lr_groups: ['mm_projector'] name no module above a trainable "
            "parameter of the model lm_finetune builds; give a module name or dotted path, e.g. of the model's "
            "modules: lm_head, model.layers.0.mlp.up_proj") in bad.stderr
    good = cli("submit", "jobs/tiny/pangu_lm.yaml", "--dry-run", "--no-preflight", "--set", "train.lr_groups.lm_head=2e-5")
    assert good.returncode == 0, good.stderr
