#!/usr/bin/env python
"""How long a checkpoint holds training: synchronous save vs background save (train.async_checkpoint), one run.

One rank, DeepSpeed ZeRO-2 on CPU over gloo, a stack of Linear layers of the given width (default 4096 x 4 layers,
67M parameters: ~1 GB of fp32 weights + Adam state on disk per checkpoint). For each mode: the median time
CheckpointManager.save() held the training loop over a few checkpoints, then the ratio background / sync
(target <= 0.1). Between checkpoints the bench "trains" (sleeps) 1.5x a synchronous save, so a background save
never waits for the previous one (on CPU the host copy is a memcpy bound by memory bandwidth, on a device a DMA into pinned memory).

  .venv/bin/python bench/checkpoint_stall.py [--width 4096] [--layers 4] [--saves 3] [--device cuda] [--json F]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _util import REPO

sys.path.insert(0, str(REPO))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the model and its optimizer "
                   "state on the GPU, so the background save's stall is the copy into pinned host memory")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29655", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    import torch

    from core.checkpoint import CheckpointManager

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])
    if cuda:
        model = model.cuda()
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=model.parameters(),
                                      config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}})
    tmp = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    held = {}
    try:
        for mode in ("sync", "background"):
            ck = CheckpointManager(tmp / mode, 0, 1, keep_last=1)
            times, copies = [], []
            for step in range(1, args.saves + 1):
                loss = engine(torch.randn(2, args.width, device=engine.device)).square().mean()
                engine.backward(loss)
                engine.step()
                t0 = time.perf_counter()
                ck.save(engine, step, {"step": step}, background=(mode == "background"))
                times.append(time.perf_counter() - t0)
                copies.append(ck.last_stall)
                # "training" between checkpoints, longer than a write (as with any sane checkpoint_every): a save
                # that still finds the previous one being written waits for it, and that wait would count here
                time.sleep(1.5 * held.get("sync", 0.1))
            waited = ck.finish()
            held[mode] = statistics.median(times)
            size = sum(f.stat().st_size for f in (tmp / mode).rglob("*") if f.is_file())
            print(f"{mode:10s} held training {held[mode] * 1000:8.1f} ms per checkpoint (median of {args.saves}); "
                  f"{size / 1e6:.0f} MB on disk; finish() waited {waited * 1000:.0f} ms"
                  + (f"; of which the host copy {statistics.median(copies) * 1000:.1f} ms" if mode == "background" else ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{n:,} parameters: background / sync stall = {held['background'] / held['sync']:.3f} (target <= 0.1)")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "params": n,
            "sync_stall_s": round(held["sync"], 4), "background_stall_s": round(held["background"], 4),
            "ratio": round(held["background"] / held["sync"], 4)}, indent=1))


if __name__ == "__main__":
    main()
