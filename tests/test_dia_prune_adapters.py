"""A stage-2 (LoRA) Dia-Pangu on a pruned openPangu (core.workloads.dia_reports.assemble / remap_layers, what the
pruning study's evaluation loads): the adapters of the removed layers are dropped, those of the kept layers land on
their new indices (pruning.json's kept_original_layers), every other trained tensor loads; a tensor that fits
neither is an error naming it. Tiny real models, no Slurm, no DeepSpeed checkpoint (the study test covers that)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def trained(tiny_pangu, tmp_path_factory):
    """A stage-2 Dia-Pangu on the tiny openPangu with every trainable tensor set to distinct random values (what a
    checkpoint holds), its frozen vision tensors, the spec, and a copy of the LLM without layer 1."""
    import torch

    from core.config import load_spec
    from core.models.dia_pangu import DiaPangu, vision_configs
    from core.models.pangu import HEAD, load_pangu, load_tokenizer
    from core.models.peft import apply_peft
    from core.workloads.dia_reports import frozen_vision
    from core.workloads.prune import write_pruned

    spec, _ = load_spec("jobs/tiny/dia_pangu_stage2.yaml", (f"model.path={tiny_pangu}", "model.make_tiny=false"))
    torch.manual_seed(0)
    vit_cfg, per_cfg = vision_configs(spec.dia.size)
    model = DiaPangu(load_pangu(tiny_pangu, dtype=torch.float32), load_tokenizer(tiny_pangu), vit_cfg, per_cfg,
                     spec.dia.contrastive_weight, train_head=spec.dia.train_head)
    frozen = {k: v.detach().clone() for k, v in frozen_vision(model).items()}
    model.llm = apply_peft(model.llm, spec.peft, HEAD)
    state = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    folder = tmp_path_factory.mktemp("pruned") / "ratio_0.25"
    record = write_pruned(tiny_pangu, folder, [1])
    return {"spec": spec, "frozen": frozen, "state": state, "folder": folder, "record": record,
            "total": model.llm.config.num_hidden_layers}


LORA_A = "llm.base_model.model.model.layers.{}.self_attn.q_proj.lora_A.default.weight"
LORA_B = "llm.base_model.model.model.layers.{}.mlp.down_proj.lora_B.default.weight"
EMBED = "llm.base_model.model.model.embed_tokens.modules_to_save.default.weight"


def test_kept_adapters_land_on_the_renumbered_layers_and_the_removed_layers_are_dropped(trained):
    import torch

    from core.workloads.dia_reports import assemble, remap_layers

    pr, state = trained["record"], trained["state"]
    assert pr["kept_original_layers"] == [0, 2, 3] and trained["total"] == 4
    model, _ = assemble(trained["spec"], trained["folder"], trained["frozen"], state, torch.float32, source="test")
    params = dict(model.named_parameters())
    for new, old in enumerate(pr["kept_original_layers"]):
        for key in (LORA_A, LORA_B):
            assert torch.equal(params[key.format(new)], state[key.format(old)]), (key, old, new)
    assert LORA_A.format(3) not in params  # three layers left
    assert torch.equal(params[EMBED], state[EMBED])  # modules_to_save: no layer, loaded as it is
    assert torch.equal(params["perceiver.latents"], state["perceiver.latents"])  # the vision side as it is
    _, dropped = remap_layers(state, pr["kept_original_layers"], 4, set(model.state_dict()))
    assert dropped and all(n.startswith("llm.base_model.model.model.layers.1.") for n in dropped)
    assert len(dropped) == sum(n.startswith("llm.base_model.model.model.layers.1.") for n in state)  # all of layer 1


def test_a_tensor_that_fits_neither_the_model_nor_a_removed_layer_is_an_error_naming_it(trained):
    import torch

    from core.workloads.dia_reports import remap_layers

    want = {LORA_A.format(0), LORA_A.format(1)}
    state = {LORA_A.format(0): torch.zeros(1), LORA_A.format(2): torch.zeros(1)}
    out, dropped = remap_layers(state, [0, 2], 3, want)
    assert set(out) == {LORA_A.format(0), LORA_A.format(1)} and dropped == []
    bad = "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_C.default.weight"
    with pytest.raises(ValueError, match=r"lora_C"):
        remap_layers({**state, bad: torch.zeros(1)}, [0, 2], 3, want, source="run x")
    with pytest.raises(ValueError, match=r"layer 7 of a 3-layer original"):
        remap_layers({LORA_A.format(7): torch.zeros(1)}, [0, 2], 3, want)
    with pytest.raises(ValueError, match=r"perceiver\.nope"):  # unpruned: names must match as they are
        remap_layers({"perceiver.nope": torch.zeros(1)}, None, None, want)
