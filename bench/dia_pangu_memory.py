#!/usr/bin/env python
"""Dia-Pangu's memory estimate against a measured peak, on CPU, in one run (issue 27, item 5: every estimate
within 25%).

Dia-Pangu stage 1 (the lab's first stage: frozen openPangu-7B and frozen 3D ViT, trained perceiver, fc, markers and
disease head) with openPangu-7B at its REAL widths (hidden 4096, its heads, intermediate size and 153k vocabulary,
from the preset) but fewer decoder layers, and the full-size 3D ViT and perceiver, under the full-size spec's own
settings (jobs/dia_pangu.yaml: ZeRO-3, micro-batch, model.seq_len, the LLM's activation checkpointing) except the
precision (fp32: DeepSpeed has no bf16 on CPU) and the world (one rank). The estimate is what the planner computes
for that model (core.workloads.dia_pangu.model_size -> core.memory.estimate, through a config.json with the reduced
depth); the measurement is the peak RSS growth of one process over a few real DeepSpeed steps of DiaPangu.forward
(LM + contrastive loss).

    .venv/bin/python bench/dia_pangu_memory.py [--layers 1] [--steps 2]
    python bench/dia_pangu_memory.py --device cuda --precision bf16 --layers 4 --steps 6 --json out.json   # a GPU

Prints the estimate's parts, the measured growth and their ratio (target 0.75 .. 1.25). On a CUDA device
(bench/device_check.sh) the measurement is torch.cuda.max_memory_allocated over the steps, and it also prints the
step time (the median of the steps after the first) and the model FLOPs utilisation: the frozen LLM's forward and
input-gradient backward (4 x its non-embedding parameters x tokens: the perceiver's latents enter the LLM, so the
gradient flows back through every layer, but no LLM weight gradient is formed), the ViT's forward and the trained
parts' 6 x parameters x tokens, over the step time and the device's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from _util import growth_gib, one_rank, peak_rss_mb, print_estimate  # noqa: E402

SPEC = REPO / "jobs" / "dia_pangu.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=1, help="decoder layers (openPangu-7B has 34)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    one_rank()
    from core.model_sizes import PRESETS

    cfg = copy.deepcopy(PRESETS["openpangu-7b"])
    cfg["num_hidden_layers"] = args.layers
    folder = Path(tempfile.mkdtemp(prefix="bench-dia-"))
    (folder / "config.json").write_text(json.dumps(cfg))

    from core.config import load_spec
    from core.memory import GiB, estimate
    from core.plan import checkpointing
    from core.workloads.dia_pangu import enable_activation_checkpointing, model_size

    spec, _ = load_spec(SPEC, (f"deepspeed.precision={args.precision}", f"model.path={folder}", "model.preset=null",
                               "dia.stage=1", "peft=null", "dia.init_from=null", "dia.chexbert=null",
                               "data.path=null"))
    ds, seq = spec.deepspeed, spec.model.seq_len
    size = model_size(spec)
    est = estimate(size, size.trainable, stage=ds.stage, precision=args.precision, offload_optimizer=ds.offload_optimizer,
                   offload_param=ds.offload_param, devices_per_node=1, nodes=1, seq=seq,
                   micro_batch=ds.micro_batch, checkpointing=checkpointing(spec), device_gib=None)

    import deepspeed
    import torch
    from transformers import LlamaForCausalLM

    from core.models.dia_pangu import DiaPangu, vision_configs
    from core.models.pangu import llama_config

    import time

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    torch.manual_seed(0)
    base = peak_rss_mb()
    base_dev = torch.cuda.memory_allocated() if cuda else 0
    vit_cfg, per_cfg = vision_configs(spec.dia.size)
    model = DiaPangu(LlamaForCausalLM(llama_config(cfg)), None, vit_cfg, per_cfg, spec.dia.contrastive_weight,
                     train_head=spec.dia.train_head)
    ckpt = enable_activation_checkpointing(model.llm) if ds.activation_checkpointing else False
    config = {"train_micro_batch_size_per_gpu": ds.micro_batch, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": ds.stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}
    if args.precision == "bf16":
        config["bf16"] = {"enabled": True}
    if cuda:
        model = model.to("cuda")
    trainable = [q for q in model.parameters() if q.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=5e-5), config=config)
    b, g = ds.micro_batch, torch.Generator().manual_seed(0)
    dev, dtype = engine.device, torch.bfloat16 if args.precision == "bf16" else torch.float32
    times = []
    for _ in range(args.steps):
        volume = torch.randn(b, vit_cfg.channels, vit_cfg.image_size, vit_cfg.image_size, vit_cfg.frames, generator=g)
        ids = torch.randint(1000, cfg["vocab_size"], (b, seq), generator=g)
        labels = torch.randint(0, 2, (b, len(model.disease.group_cls_head)), generator=g)
        volume, ids, labels = volume.to(dev, dtype), ids.to(dev), labels.to(dev)
        t0 = time.perf_counter()
        out = engine(volume=volume, input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids),
                     disease_labels=labels)
        engine.backward(out["loss"])
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        measured = (torch.cuda.max_memory_allocated() - base_dev) / 2 ** 30
    else:
        measured = growth_gib(base)
    total = est.total / GiB
    print(f"Dia-Pangu stage 1, openPangu-7B widths with {args.layers} decoder layer(s), {size.total:,} parameters "
          f"({size.trainable:,} trainable), ZeRO-{ds.stage} on one rank, micro-batch {b}, seq_len {seq}, LLM "
          f"activation checkpointing {ckpt}, fp32, {args.steps} steps on CPU")
    print_estimate(est, measured, "peak device memory" if getattr(args, "device", "cpu") == "cuda" else "peak RSS growth")
    step_s = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    llm_body = sum(p.numel() for n, p in model.llm.named_parameters() if "embed_tokens" not in n)
    vit = sum(p.numel() for p in model.vit.parameters())
    vit_tokens = (vit_cfg.image_size // vit_cfg.patch) ** 2 * (vit_cfg.frames // vit_cfg.frame_patch)
    flops = b * (4 * llm_body * seq + 2 * vit * vit_tokens + 6 * size.trainable * vit_tokens)
    peak = peak_flops(torch) if cuda else None
    mfu = flops / step_s / peak if peak else None
    print(f"step time {step_s * 1000:.0f} ms (median of {max(len(times) - 1, 1)}); model FLOPs per step "
          f"{flops / 1e12:.1f} T" + (f"; MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s" if mfu else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "layers": args.layers,
            "precision": args.precision, "params": size.total, "trainable": size.trainable,
            "estimate_gib": round(total, 3), "measured_gib": round(measured, 3),
            "estimate_over_measured": round(total / measured, 3), "step_s": round(step_s, 4),
            "model_tflops_per_step": round(flops / 1e12, 2), "mfu": round(mfu, 4) if mfu else None}, indent=1))


def peak_flops(torch) -> float | None:
    """Dense bf16 peak of the device (None when not one of these)."""
    name = torch.cuda.get_device_name(0)
    for key, tflops in (("H200", 989), ("H100", 989), ("A100", 312), ("L40S", 362), ("A10", 125)):
        if key in name:
            return tflops * 1e12
    return None


if __name__ == "__main__":
    main()
