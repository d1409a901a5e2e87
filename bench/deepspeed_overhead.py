#!/usr/bin/env python
"""DeepSpeed on CPU (gloo, 2 ranks), measured in one run:

1. tokens/s under ZeRO-2 and ZeRO-3 vs plain torch DDP, same model, same data (the tiny Pangu and a ~50M-param
   Pangu shape); target ZeRO-2 >= 0.8x DDP.
2. checkpoint save throughput (our atomic save: DeepSpeed's files + markers + fsync) vs the disk's sequential
   write speed from `dd ... conv=fdatasync` in the same run; target >= 0.5.
3. memory: the plan's per-device estimate (DeepSpeed's estimators + activations) vs the measured peak RSS
   growth per rank (peak minus the RSS before the model existed) for the tiny model and a ~300M-param shape.

  .venv/bin/python bench/deepspeed_overhead.py [--only throughput|checkpoint|memory]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from _util import rss_mb  # noqa: E402

SHAPES = {  # PanguEmbedded-style configs (q/k/v/o biases, GQA, untied embeddings)
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "50M": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2),
    "300M": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=20,
                 num_attention_heads=16, num_key_value_heads=4),
}


def cfg_of(shape: str) -> dict:
    return {**SHAPES[shape], "bias": True, "tie_word_embeddings": False, "max_position_embeddings": 512,
            "rope_theta": 16000000.0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}



def worker(rank: int, world: int, port: int, mode: str, shape: str, steps: int, seq: int, micro: int, out: str,
           ckpt_dir: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from core.models.pangu import llama_config

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    base_rss = rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = LlamaForCausalLM(llama_config(cfg_of(shape)))
    bf16 = mode.endswith("bf16")
    stage = {"ddp": None, "z2": 2, "z3": 3, "z2bf16": 2}[mode]
    if stage is None:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    else:
        cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
               "train_batch_size": micro * world, "zero_optimization": {"stage": stage},
               "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                          config=cfg)
    g = torch.Generator().manual_seed(rank)
    times = []
    for step in range(steps):
        batch = torch.randint(3, SHAPES[shape]["vocab_size"], (micro, seq), generator=g)
        t0 = time.perf_counter()
        if stage is None:
            loss = ddp(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        else:
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            engine.step()
        times.append(time.perf_counter() - t0)
    dist.barrier()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"step_s": sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0],
              "tokens_per_s": micro * seq * world / (sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1
                                                     else times[0]),
              "rss_growth_mb": peak - max(base_rss, peak_before), "params": sum(p.numel() for p in model.parameters())}
    if ckpt_dir and stage is not None:
        from core.checkpoint import CheckpointManager

        mgr = CheckpointManager(Path(ckpt_dir), rank, world, keep_last=1, barrier=dist.barrier)
        dist.barrier()
        t0 = time.perf_counter()
        mgr.save(engine, 1, {"step": 1})
        os.sync()
        dist.barrier()
        result["save_s"] = time.perf_counter() - t0
        result["save_bytes"] = sum(p.stat().st_size for p in Path(ckpt_dir).rglob("*") if p.is_file())
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def run(mode, shape, steps, seq, micro, ckpt_dir=""):
    import torch.multiprocessing as mp

    out = tempfile.mktemp(suffix=".json")
    port = 29500 + (os.getpid() + hash((mode, shape))) % 1000
    mp.start_processes(worker, args=(2, port, mode, shape, steps, seq, micro, out, ckpt_dir), nprocs=2,
                       start_method="spawn")
    return json.loads(Path(out).read_text())


def dd_mb_per_s(folder: Path, mb: int = 512) -> float:
    target = folder / "dd.bin"
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={mb // 16}", "conv=fdatasync"],
                   check=True, capture_output=True)
    speed = mb / (time.perf_counter() - t0)
    target.unlink()
    return speed


def estimate_mb(shape: str, seq: int, micro: int, stage: int) -> float:
    from core.memory import estimate
    from core.models.pangu import meta_size

    size = meta_size(cfg_of(shape))
    m = estimate(size, size.total, stage=stage, precision="fp32", offload_optimizer=False, offload_param=False,
                 devices_per_node=2, nodes=1, seq=seq, micro_batch=micro, checkpointing=False, device_gib=None)
    return m.total / 2 ** 20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["throughput", "checkpoint", "memory"], default=None)
    args = ap.parse_args()
    want = (lambda part: args.only in (None, part))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if want("throughput"):
        throughput()
    if want("checkpoint"):
        checkpoint()
    if want("memory"):
        memory()


def throughput():
    print("== throughput (2 ranks, gloo, fp32, median step) ==")
    for shape, steps, seq, micro in (("tiny", 30, 64, 4), ("50M", 6, 128, 2)):
        r = {m: run(m, shape, steps, seq, micro) for m in ("ddp", "z2", "z3")}
        print(f"{shape:5s} ({r['ddp']['params'] / 1e6:.1f}M params): DDP {r['ddp']['tokens_per_s']:.0f} tok/s | "
              f"ZeRO-2 {r['z2']['tokens_per_s']:.0f} tok/s = {r['z2']['tokens_per_s'] / r['ddp']['tokens_per_s']:.2f}x"
              f" (target >= 0.8x) | ZeRO-3 {r['z3']['tokens_per_s']:.0f} tok/s = "
              f"{r['z3']['tokens_per_s'] / r['ddp']['tokens_per_s']:.2f}x")


def checkpoint():
    print("== checkpoint save vs dd (same disk) ==")
    with tempfile.TemporaryDirectory(dir=REPO / "logs") as tmp:
        disk = dd_mb_per_s(Path(tmp))
        r = run("z2", "50M", 2, 64, 2, ckpt_dir=str(Path(tmp) / "ck"))
        ours = r["save_bytes"] / 2 ** 20 / r["save_s"]
        print(f"dd sequential write {disk:.0f} MB/s | our ZeRO-2 save of {r['save_bytes'] / 2 ** 20:.0f} MB: "
              f"{ours:.0f} MB/s = {ours / disk:.2f}x (target >= 0.5)")


def memory():
    print("== memory: plan estimate vs measured peak RSS growth per rank (ZeRO-2 fp32, 2 ranks) ==")
    for shape, seq, micro in (("tiny", 64, 4), ("300M", 128, 1)):
        r = run("z2", shape, 2, seq, micro)
        est = estimate_mb(shape, seq, micro, 2)
        print(f"{shape:5s} ({r['params'] / 1e6:.0f}M params): estimate {est:.0f} MB, measured {r['rss_growth_mb']:.0f} MB"
              f" -> estimate/measured {est / max(r['rss_growth_mb'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
