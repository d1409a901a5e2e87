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

Prints the estimate's parts, the measured growth and their ratio (target 0.75 .. 1.25).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from _util import rss_mb  # noqa: E402

SPEC = REPO / "jobs" / "dia_pangu.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=1, help="decoder layers (openPangu-7B has 34)")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(20000 + os.getpid() % 20000), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    from core.model_sizes import PRESETS

    cfg = copy.deepcopy(PRESETS["openpangu-7b"])
    cfg["num_hidden_layers"] = args.layers
    folder = Path(tempfile.mkdtemp(prefix="bench-dia-"))
    (folder / "config.json").write_text(json.dumps(cfg))

    from core.config import load_spec
    from core.memory import GiB, estimate
    from core.plan import checkpointing
    from core.workloads.dia_pangu import enable_activation_checkpointing, model_size

    spec, _ = load_spec(SPEC, ("deepspeed.precision=fp32", f"model.path={folder}", "model.preset=null",
                               "dia.stage=1", "peft=null", "dia.init_from=null", "dia.chexbert=null",
                               "data.path=null"))
    ds, seq = spec.deepspeed, spec.model.seq_len
    size = model_size(spec)
    est = estimate(size, size.trainable, stage=ds.stage, precision="fp32", offload_optimizer=ds.offload_optimizer,
                   offload_param=ds.offload_param, devices_per_node=1, nodes=1, seq=seq,
                   micro_batch=ds.micro_batch, checkpointing=checkpointing(spec), device_gib=None)

    import deepspeed
    import torch
    from transformers import LlamaForCausalLM

    from core.models.dia_pangu import DiaPangu, vision_configs
    from core.models.pangu import llama_config

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    base = max(rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    vit_cfg, per_cfg = vision_configs(spec.dia.size)
    model = DiaPangu(LlamaForCausalLM(llama_config(cfg)), None, vit_cfg, per_cfg, spec.dia.contrastive_weight,
                     train_head=spec.dia.train_head)
    ckpt = enable_activation_checkpointing(model.llm) if ds.activation_checkpointing else False
    config = {"train_micro_batch_size_per_gpu": ds.micro_batch, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": ds.stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}
    trainable = [q for q in model.parameters() if q.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=5e-5), config=config)
    b, g = ds.micro_batch, torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        volume = torch.randn(b, vit_cfg.channels, vit_cfg.image_size, vit_cfg.image_size, vit_cfg.frames, generator=g)
        ids = torch.randint(1000, cfg["vocab_size"], (b, seq), generator=g)
        out = engine(volume=volume, input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids),
                     disease_labels=torch.randint(0, 2, (b, len(model.disease.group_cls_head)), generator=g))
        engine.backward(out["loss"])
        engine.step()
    measured = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base) / 1024   # GiB
    total = est.total / GiB
    print(f"Dia-Pangu stage 1, openPangu-7B widths with {args.layers} decoder layer(s), {size.total:,} parameters "
          f"({size.trainable:,} trainable), ZeRO-{ds.stage} on one rank, micro-batch {b}, seq_len {seq}, LLM "
          f"activation checkpointing {ckpt}, fp32, {args.steps} steps on CPU")
    print(f"estimate: model states {est.model_states / GiB:.3f} GiB + frozen {est.frozen / GiB:.3f} GiB + activations "
          f"{est.activations / GiB:.3f} GiB = {total:.3f} GiB")
    print(f"measured peak RSS growth: {measured:.3f} GiB")
    print(f"estimate / measured = {total / measured:.2f} (target 0.75 .. 1.25)")


if __name__ == "__main__":
    main()
