"""QLoRA where a spec accepts `peft.quantize`: the frozen openPangu of lm_finetune and of Dia-Pangu stage 2 is loaded
through bitsandbytes (Linear4bit layers, NF4 + double quantisation, the LM head in full precision) by the workloads'
own loading code, the adapters train on it (the loss falls), and the plan's frozen-weight bytes match what was
loaded. Single process, no Slurm (bitsandbytes 0.50's CPU backend). BLIP's QLoRA runs end to end in
tests/test_blip_caption.py."""
from __future__ import annotations

import pytest

from conftest import REPO


def loaded_frozen_bytes(model) -> int:
    """Bytes the frozen tensors of a loaded model take: parameters as stored (packed 4-bit weights are uint8) plus
    the 4-bit quantisation constants (absmax, and the second level of double quantisation)."""
    total = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        total += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
            if qs.state2 is not None:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    return total


def spec_for(yaml: str, *sets: str):
    from core.config import load_spec

    return load_spec(REPO / yaml, ("deepspeed.stage=2", "peft.quantize=4bit", *sets))[0]


def frozen_estimate(spec) -> float:
    from core.config import load_cluster
    from core.plan import make_plan

    plan = make_plan(spec, load_cluster("local"), keep_going=True)
    assert "frozen base in 4bit" in "\n".join(plan.notes)
    return plan.memory.frozen


def train_a_little(model, batch_fn, steps: int = 12, lr: float = 0.01) -> list[float]:
    import torch

    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = []
    for _ in range(steps):
        loss = batch_fn()
        loss.backward()
        loss = loss.detach()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def test_lm_finetune_loads_a_4bit_base_trains_lora_and_the_plan_counts_what_is_loaded(tiny_pangu):
    import bitsandbytes as bnb
    import torch

    from core.models.pangu import HEAD, load_pangu
    from core.models.peft import apply_peft, quantization_config, quantized_modules

    spec = spec_for("jobs/tiny/pangu_lm.yaml", f"model.path={tiny_pangu}", "model.make_tiny=false",
                    "peft.target_modules=all-linear")
    quant = quantization_config(spec.peft, HEAD)
    assert quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    model = load_pangu(tiny_pangu, dtype=torch.float32, quantization_config=quant, device="cpu")
    # 4 layers x (q, k, v, o, gate, up, down) packed in 4 bit; the LM head stays a full-precision Linear
    assert quantized_modules(model) == 28 and type(model.lm_head) is torch.nn.Linear
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert isinstance(weight, bnb.nn.Params4bit) and weight.dtype == torch.uint8
    model = apply_peft(model, spec.peft, HEAD)
    loaded = loaded_frozen_bytes(model)
    estimate = frozen_estimate(spec)
    assert abs(estimate - loaded) <= 0.10 * loaded, (estimate, loaded)

    ids = torch.randint(4, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = train_a_little(model, lambda: model(input_ids=ids, labels=ids).loss)
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses
    assert quantized_modules(model) == 28  # the adapters wrap the 4-bit layers, they do not replace them


def test_dia_pangu_stage2_quantizes_its_llm_and_refuses_quantize_in_stage_1(tiny_pangu):
    import torch

    from core.config import SpecError, load_cluster
    from core.models.dia_pangu import DiaPangu, vision_configs
    from core.models.pangu import HEAD, load_pangu, load_tokenizer
    from core.models.peft import apply_peft, quantization_config, quantized_modules
    from core.plan import make_plan

    data = ("data.path=/nonexistent/volumes", "data.make_synthetic=true")
    spec = spec_for("jobs/tiny/dia_pangu_stage2.yaml", f"model.path={tiny_pangu}", "model.make_tiny=false", *data)
    llm = load_pangu(tiny_pangu, dtype=torch.float32, quantization_config=quantization_config(spec.peft, HEAD),
                     device="cpu")
    assert quantized_modules(llm) == 28 and type(llm.lm_head) is torch.nn.Linear
    vit, per = vision_configs("tiny")
    torch.manual_seed(0)
    model = DiaPangu(llm, load_tokenizer(tiny_pangu), vit, per, train_head=True)
    model.llm = apply_peft(model.llm, spec.peft, HEAD)
    loaded = loaded_frozen_bytes(model)
    estimate = frozen_estimate(spec)
    assert abs(estimate - loaded) <= 0.10 * loaded, (estimate, loaded)
    # the LLM's own LoRA path through the 4-bit layers trains (the vision side is the workload's own test)
    ids = torch.randint(4, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    losses = train_a_little(model.llm, lambda: model.llm(input_ids=ids, labels=ids).loss)
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses

    stage1 = spec_for("jobs/tiny/dia_pangu_stage2.yaml", f"model.path={tiny_pangu}", "dia.stage=1", *data)
    with pytest.raises(SpecError) as err:
        make_plan(stage1, load_cluster("local"))
    assert "peft.quantize" in str(err.value) and "stage 1" in str(err.value)
