#!/usr/bin/env python
"""ViTP's InternVL memory estimate against a measured peak, on CPU, in one run (issue 27, item 5: every estimate
within 25%).

InternVL2.5-1B (InternViT-300M-448px + MLP projector + Qwen2.5-0.5B) at its REAL widths, heads, vocabulary and
image size, with fewer layers per tower so that it trains on a CPU, under the full-size spec's own training settings
(jobs/vitp_lung.yaml: full fine-tune, ZeRO-2, micro-batch, activation checkpointing on both towers, the dynamic
tiles of one slice: max_dynamic_patch + thumbnail) except the precision (fp32: DeepSpeed has no bf16 on CPU). The
estimate is what the planner computes for that model (core.workloads.vitp_lung.model_size -> core.memory.estimate,
through a config.json with the reduced depth); the measurement is the peak RSS growth of one process (peak minus
the RSS before the model existed) over a few real DeepSpeed training steps with the workload's own loss
(core.models.internvl.cls_losses).

    .venv/bin/python bench/internvl_memory.py [--layers 2] [--steps 2] [--tiles 7]

Prints the estimate's parts, the measured growth and their ratio (target 0.75 .. 1.25).
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

SPEC = REPO / "jobs" / "vitp_lung.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="layers per tower (the real model has 24 each)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--tiles", type=int, default=None, help="448-px tiles per slice (default: the spec's "
                                                            "max_dynamic_patch + thumbnail)")
    args = p.parse_args()
    one_rank()
    from core.models import internvl as iv

    cfg = copy.deepcopy(iv.INTERNVL2_5_1B)
    cfg["vision_config"]["num_hidden_layers"] = args.layers
    cfg["llm_config"]["num_hidden_layers"] = args.layers
    folder = Path(tempfile.mkdtemp(prefix="bench-internvl-"))
    (folder / "config.json").write_text(json.dumps(cfg))

    from core.config import load_spec
    from core.memory import estimate
    from core.plan import checkpointing
    from core.workloads.vitp_lung import internvl_tiles, model_size

    spec, _ = load_spec(SPEC, ("deepspeed.precision=fp32", f"model.path={folder}", "model.preset=null"))
    ds = spec.deepspeed
    tiles = args.tiles or internvl_tiles(spec)
    per_tile = iv.tokens_per_tile(cfg)
    seq = min(spec.model.seq_len, tiles * per_tile + 64)   # the image tokens + a prompt of about 64 tokens
    size = model_size(spec)
    trainable = size.trainable if size.trainable is not None else size.total
    est = estimate(size, trainable, stage=ds.stage, precision="fp32", offload_optimizer=ds.offload_optimizer,
                   offload_param=ds.offload_param, devices_per_node=1, nodes=1, seq=spec.model.seq_len,
                   micro_batch=ds.micro_batch, checkpointing=checkpointing(spec), device_gib=None)

    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    base = peak_rss_mb()
    model = iv.build(iv.native_config(cfg))
    if ds.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    config = {"train_micro_batch_size_per_gpu": ds.micro_batch, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": ds.stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}
    trainable_params = [q for q in model.parameters() if q.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable_params, lr=1e-5),
                                      config=config)
    image_id = model.config.image_token_id
    size_px = cfg.get("force_image_size") or cfg["vision_config"]["image_size"]
    g = torch.Generator().manual_seed(0)
    b = ds.micro_batch
    for _ in range(args.steps):
        pixels = torch.randn(b * tiles, 3, size_px, size_px, generator=g)
        ids = torch.randint(1000, 20000, (b, seq), generator=g)
        ids[:, 8:8 + tiles * per_tile] = image_id
        labels = torch.full_like(ids, -100)
        labels[:, -2:] = ids[:, -2:]
        out = engine(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), use_cache=False)
        cls_pos = torch.full((b,), seq - 3)
        lm, cls, _ = iv.cls_losses(out.logits, labels, cls_pos, [15, 16, 17, 18], torch.zeros(b, dtype=torch.long),
                                   spec.vitp.label_smoothing)
        engine.backward(lm + cls)
        engine.step()
    measured = growth_gib(base)
    print(f"InternVL2.5-1B widths, {args.layers} layer(s) per tower, {size.total:,} parameters ({trainable:,} "
          f"trainable), ZeRO-{ds.stage}, micro-batch {b}, {tiles} tiles x {per_tile} tokens, {seq} LLM tokens "
          f"(model.seq_len {spec.model.seq_len}), activation checkpointing {checkpointing(spec)}, fp32, "
          f"{args.steps} steps on CPU")
    print_estimate(est, measured)


if __name__ == "__main__":
    main()
