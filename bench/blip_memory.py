#!/usr/bin/env python
"""BLIP's memory estimate against a measured peak, on CPU, in one run (issue 26 / 27: every estimate within 25%).

The full-size BLIP (captioning-base: ViT-B/16 at 384 px = 577 image tokens, BERT-base text decoder with 12 heads
and cross-attention) at its REAL widths, with fewer layers per tower so that it trains on a CPU, under the full-size
spec's own training settings (jobs/blip_medtrinity.yaml: LoRA, ZeRO-2, micro-batch 4, seq_len) except the precision
(fp32: DeepSpeed has no fp16 on CPU). The estimate is what the planner computes for that model (core.models.blip
.meta_size -> core.memory.estimate); the measurement is the peak RSS growth of one process (peak minus the RSS
before the model existed) over a few real DeepSpeed training steps.

    .venv/bin/python bench/blip_memory.py [--layers 2] [--steps 3]

Prints the estimate's parts, the measured growth and their ratio (target 0.75 .. 1.25).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from _util import growth_gib, one_rank, peak_rss_mb, print_estimate  # noqa: E402
SPEC = REPO / "jobs" / "blip_medtrinity.yaml"



def reduced(layers: int) -> dict:
    """The preset's config (real widths, heads, image size) with `layers` layers per tower."""
    from core.models.blip import FULL_CONFIG

    cfg = copy.deepcopy(FULL_CONFIG)
    cfg.setdefault("text_config", {})["num_hidden_layers"] = layers
    cfg.setdefault("vision_config", {})["num_hidden_layers"] = layers
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="layers per tower (the real model has 12 each)")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    one_rank()
    from core.config import load_spec

    spec, _ = load_spec(SPEC, ("deepspeed.precision=fp32", "model.path=null", "model.preset=blip-captioning-base",
                               "data.path=null"))
    ds, cfg = spec.deepspeed, reduced(args.layers)

    from core.memory import estimate
    from core.models.blip import meta_size
    from core.workloads.blip_caption import HEAD

    size = meta_size(cfg, spec.peft, HEAD)
    est = estimate(size, size.trainable, stage=ds.stage, precision="fp32", offload_optimizer=ds.offload_optimizer,
                   offload_param=ds.offload_param, devices_per_node=1, nodes=1, seq=spec.model.seq_len,
                   micro_batch=ds.micro_batch, checkpointing=False, device_gib=None)

    import deepspeed
    import torch
    from transformers import BlipForConditionalGeneration

    from core.models.blip import blip_config
    from core.models.peft import apply_peft

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    base = peak_rss_mb()
    model = apply_peft(BlipForConditionalGeneration(blip_config(cfg)), spec.peft, HEAD)
    config = {"train_micro_batch_size_per_gpu": ds.micro_batch, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": ds.stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}
    trainable = [q for q in model.parameters() if q.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-4), config=config)
    v = model.config.vision_config
    g = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        pixels = torch.randn(ds.micro_batch, 3, v.image_size, v.image_size, generator=g)
        ids = torch.randint(1000, 20000, (ds.micro_batch, spec.model.seq_len), generator=g)
        loss = engine(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        engine.backward(loss)
        engine.step()
    measured = growth_gib(base)
    print(f"BLIP captioning-base widths, {args.layers} layer(s) per tower, {size.total:,} parameters "
          f"({size.trainable:,} trainable with the spec's LoRA), ZeRO-{ds.stage}, micro-batch {ds.micro_batch}, "
          f"seq_len {spec.model.seq_len}, fp32, {args.steps} steps on CPU")
    print_estimate(est, measured)


if __name__ == "__main__":
    main()
