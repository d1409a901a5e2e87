#!/usr/bin/env python
"""GigaPath distillation's memory estimate against a measured peak, on CPU, in one run (issue 27, item 5: every
estimate within 25%).

The student of the full-size spec (jobs/gigapath_distill.yaml: timm ViT-B/16 at 224 px, the linear adaptor to the
ViT-giant teacher's 1536 width on all 197 tokens, the LongNet student slide encoder and its head, and the frozen
teacher slide encoder that computes the slide target on the same tiles) at its REAL widths, with fewer ViT blocks
(`distill.student_kwargs.depth`), under the spec's own settings (ZeRO-2, micro-batch = tiles per micro-step,
tile_chunk, the tile encoder's activation checkpointing) except the precision (fp32: DeepSpeed has no bf16 on CPU).
The teacher targets are random tensors of the cached shapes. The estimate is what the planner computes
(core.workloads.gigapath_distill.model_size -> core.memory.estimate); the measurement is the peak RSS growth of one
process over a few real DeepSpeed steps with the workload's loss (beta x hidden MSE + (1 - beta) x slide MSE).

    .venv/bin/python bench/gigapath_memory.py [--depth 4] [--steps 2] [--tiles 256]

Prints the estimate's parts, the measured growth and their ratio (target 0.75 .. 1.25).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from _util import growth_gib, one_rank, peak_rss_mb, print_estimate  # noqa: E402

SPEC = REPO / "jobs" / "gigapath_distill.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4, help="student ViT blocks (ViT-B has 12)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--tiles", type=int, default=None, help="tiles per micro-step (default: the spec's micro_batch)")
    args = p.parse_args()
    one_rank()
    from core.config import load_spec
    from core.memory import estimate
    from core.plan import checkpointing
    from core.workloads.gigapath_distill import distance, model_size

    sets = ["deepspeed.precision=fp32", "models.teacher.path=null", "data.path=null", "model.path=null",
            f"distill.student_kwargs={{depth: {args.depth}}}"]
    if args.tiles:
        sets.append(f"deepspeed.micro_batch={args.tiles}")
    spec, _ = load_spec(SPEC, tuple(sets))
    ds, s = spec.deepspeed, spec.distill
    size = model_size(spec)
    est = estimate(size, size.trainable, stage=ds.stage, precision="fp32", offload_optimizer=ds.offload_optimizer,
                   offload_param=ds.offload_param, devices_per_node=1, nodes=1, seq=spec.model.seq_len,
                   micro_batch=ds.micro_batch, checkpointing=checkpointing(spec), device_gib=None)

    import deepspeed
    import torch

    from core.models import gigapath as gp

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    base = peak_rss_mb()
    cfg = gp.teacher_config(spec.models["teacher"])
    model = gp.build_student(s, cfg)
    if ds.activation_checkpointing:
        model.tile.set_grad_checkpointing(True)
    # the workload's own loader: the teacher's slide encoder alone (the ViT-giant tile encoder is not on this path)
    teacher_slide = gp.load_teacher_slide(spec.models["teacher"], cfg) if s.slide_target == "subset" else None
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": ds.stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}
    trainable = [q for q in model.parameters() if q.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-4), config=config)
    n, g = ds.micro_batch, torch.Generator().manual_seed(0)
    width = gp.teacher_width(cfg)
    for _ in range(args.steps):
        images = torch.randn(n, 3, spec.data.image_size, spec.data.image_size, generator=g)
        coords = torch.randint(0, 50_000, (n, 2), generator=g).float()
        t_hidden = torch.randn(n, spec.model.seq_len, width, generator=g).half().float()   # the fp16 cache, read
        t_emb = torch.randn(n, width, generator=g)
        with torch.no_grad():
            t_slide = teacher_slide(t_emb[None], coords[None])[0][0] if teacher_slide is not None else None
        out = engine(images, coords)
        loss = s.beta * distance(s.loss, out["hidden"], t_hidden) + \
            (1 - s.beta) * distance(s.loss, out["slide_emb"], t_slide)
        engine.backward(loss)
        engine.step()
    measured = growth_gib(base)
    print(f"GigaPath student {s.student_arch} with {args.depth} block(s) at real widths, {size.total:,} parameters "
          f"({size.trainable:,} trainable; the rest: the frozen teacher slide encoder), ZeRO-{ds.stage}, {n} tiles "
          f"per micro-step in chunks of {s.tile_chunk}, {spec.model.seq_len} tokens per tile, activation "
          f"checkpointing {checkpointing(spec)}, fp32, {args.steps} steps on CPU")
    print_estimate(est, measured)


if __name__ == "__main__":
    main()
