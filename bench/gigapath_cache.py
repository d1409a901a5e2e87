#!/usr/bin/env python
"""What the teacher-feature cache saves per epoch of GigaPath distillation (CPU, this machine, measured once):
the frozen teacher's forward time per tile against reading that tile's cached features back (the features file the
`features` step writes: 197 x 1536 bf16 last-block tokens + the tile embedding), and the ratio; then the epoch
time per 10,000 tiles with and without the cache, next to the student's own training step.

- full size: timm vit_giant_patch14_dinov2 at patch 16 / 224 px (1,134,953,984 parameters; built on the meta device
  and filled with random values, which costs the same forward time as the released weights), bf16 cache of 197
  tokens; student ViT-B/16 forward + backward + AdamW;
- tiny: the tiny teacher of jobs/tiny/gigapath_distill.yaml (17 x 64 fp32 cache).
Reads are from the page cache (a file written just before); a cold read from disk is bounded by the disk's
bandwidth (0.58 MiB per tile at full size: ~0.6 ms at 1 GB/s), still thousands of times below the forward.

  .venv/bin/python bench/gigapath_cache.py            # full size + tiny (about two minutes on 2 cores)
  .venv/bin/python bench/gigapath_cache.py --tiny     # tiny only
  .venv/bin/python bench/gigapath_cache.py --cache-dtype   # what fp16 / bf16 caches change in L_hidden vs fp32

--cache-dtype: the teacher's last-block tokens of real tiles (the synthetic slides cut from scikit-image's
immunohistochemistry sample) are cached in fp32, fp16 and bf16 and L_hidden (MSE, as the training computes it in
float32) is taken against two students: an untrained one (random adaptor output, the start of training) and one near
the teacher (the teacher's tokens plus noise of 3% of their variance, about where the tiny run ends); printed: the
loss per cache dtype, its relative change from fp32, the largest |value| (fp16 holds up to 65504) and the bytes per
tile. Tiny teacher and the full-size architecture (random weights: the released ones are not here, so the value
range of the real teacher is not measured; the features step refuses values that overflow fp16).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def timed(fn, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def random_model(build):
    """A model built on the meta device, then given storage and random values (a fast stand-in for a real init)."""
    import torch

    with torch.device("meta"):
        net = build()
    net = net.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02, generator=g)
        for b in net.buffers():
            b.zero_()
    return net.eval()


def cache_read(tmp: Path, n_tiles: int, tokens: int, dim: int, dtype) -> float:
    """Seconds per tile to read a slide's cached features (all rows) back with the workload's reader."""
    import torch
    from safetensors.torch import save_file

    from core.workloads.gigapath_distill import FORMAT, read_features

    run = tmp / "run"
    (run / "features").mkdir(parents=True, exist_ok=True)
    names = [f"{i * 256:05d}x_00000y.png" for i in range(n_tiles)]
    import json

    save_file({"hidden": torch.randn(n_tiles, tokens, dim).to(dtype), "tile_emb": torch.randn(n_tiles, dim),
               "slide_emb": torch.randn(768), "coords": torch.zeros(n_tiles, 2, dtype=torch.int64)},
              str(run / "features" / "s.safetensors"),
              metadata={"format": FORMAT, "names": json.dumps(names), "folder": str(tmp), "tiles": str(n_tiles)})
    read_features(run, "s")                                                 # into the page cache
    return timed(lambda: read_features(run, "s")["hidden"].float(), 5) / n_tiles


def teacher_forward(net, batch: int, size: int, dtype, repeat: int) -> float:
    import torch

    from core.models.gigapath import encode_tiles

    x = torch.randn(batch, 3, size, size, dtype=dtype)
    net = net.to(dtype)
    with torch.no_grad():
        encode_tiles(net, x)                                                 # warm-up
        return timed(lambda: encode_tiles(net, x), repeat) / batch


def student_step(net, batch: int, size: int, repeat: int) -> float:
    import torch

    from core.models.gigapath import encode_tiles

    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    net.train()

    def step():
        h, e = encode_tiles(net, x)
        (h.float().pow(2).mean() + e.float().pow(2).mean()).backward()
        opt.step()
        opt.zero_grad()

    step()
    return timed(step, repeat) / batch


def report(name: str, fwd: float, read: float, student: float) -> None:
    per = 10_000
    print(f"{name}: teacher forward {fwd * 1e3:.3f} ms/tile, cached read {read * 1e3:.4f} ms/tile, "
          f"ratio {fwd / read:,.0f}x")
    with_teacher, cached = per * (student + fwd), per * (student + read)
    print(f"  per epoch of {per:,} tiles: student step {per * student:,.1f} s; with the teacher in the loop "
          f"{with_teacher:,.1f} s, from the cache {cached:,.1f} s: the cache saves {with_teacher - cached:,.1f} s "
          f"({100 * (with_teacher - cached) / with_teacher:.0f}% of the epoch)")


def cache_dtype_effect(name: str, net, images) -> None:
    """L_hidden against the teacher's tokens cached in fp32 / fp16 / bf16, for an untrained and a near student."""
    import torch

    from core.models.gigapath import encode_tiles

    with torch.no_grad():
        t = encode_tiles(net, images)[0].float()
    g = torch.Generator().manual_seed(0)
    students = {"untrained": torch.randn(t.shape, generator=g) * t.std(),
                "near the teacher": t + torch.randn(t.shape, generator=g) * (0.03 ** 0.5) * t.std()}
    print(f"{name}: {tuple(t.shape)} tokens, max |value| {float(t.abs().max()):.4g}, "
          f"{t[0].numel() * 2:,} bytes per tile in fp16 / bf16, {t[0].numel() * 4:,} in fp32")
    for who, s in students.items():
        ref = float(((s - t) ** 2).mean())
        parts = []
        for dt in (torch.float16, torch.bfloat16):
            loss = float(((s - t.to(dt).float()) ** 2).mean())
            parts.append(f"{str(dt).split('.')[-1]} {loss:.7g} ({(loss - ref) / ref:+.2e} relative)")
        print(f"  L_hidden, {who} student: fp32 {ref:.7g}; " + "; ".join(parts))


def dtype_main() -> int:
    import numpy as np
    import torch

    from core.data.slides import list_tiles, write_synthetic
    from core.models import gigapath as gp
    from core.workloads.gigapath_distill import IMAGENET_MEAN, IMAGENET_STD
    from core.data.slides import tile_array

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_synthetic(Path(tmp), slides=3, wsi=0, tile_px=64, seed=0)
        files = [paths["slides"] / sid / n for sid in ("slide_001", "slide_002")
                 for n, _, _ in list_tiles(paths["slides"] / sid)]

        def images(size, k):
            return torch.from_numpy(np.stack([tile_array(f, size, IMAGENET_MEAN, IMAGENET_STD) for f in files[:k]]))

        torch.manual_seed(0)
        tiny = gp.create_tile_encoder(gp.TINY_TEACHER["architecture"], gp.TINY_TEACHER["model_args"]).eval()
        cache_dtype_effect("tiny teacher (random init, 32 px)", tiny, images(32, len(files)))
        cfg = gp.TEACHER_PRESETS["prov-gigapath"]
        giant = random_model(lambda: gp.create_tile_encoder(cfg["architecture"], cfg["model_args"]))
        cache_dtype_effect("full-size ViT-g/16 (random weights, 224 px)", giant, images(224, 2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="only the tiny twins (seconds)")
    p.add_argument("--batch", type=int, default=2, help="tiles per full-size forward")
    p.add_argument("--cache-dtype", action="store_true", help="only: L_hidden with fp32 / fp16 / bf16 caches")
    args = p.parse_args(argv)
    if args.cache_dtype:
        return dtype_main()
    import torch

    from core.models import gigapath as gp

    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = gp.create_tile_encoder(gp.TINY_TEACHER["architecture"], gp.TINY_TEACHER["model_args"]).eval()
        tiny_student = gp.create_tile_encoder(gp.TINY_STUDENT_ARCH, gp.TINY_STUDENT_KWARGS)
        report("tiny (jobs/tiny/gigapath_distill.yaml, fp32)", teacher_forward(tiny, 64, 32, torch.float32, 20),
               cache_read(tmp, 64, 17, 64, torch.float32), student_step(tiny_student, 64, 32, 10))
        if args.tiny:
            return 0
        cfg = gp.TEACHER_PRESETS["prov-gigapath"]
        t0 = time.perf_counter()
        giant = random_model(lambda: gp.create_tile_encoder(cfg["architecture"], cfg["model_args"]))
        print(f"full-size teacher: {sum(q.numel() for q in giant.parameters()):,} parameters, random fill "
              f"{time.perf_counter() - t0:.1f} s")
        fwd32 = teacher_forward(giant, args.batch, 224, torch.float32, 1)
        del giant
        student = random_model(lambda: gp.create_tile_encoder("vit_base_patch16_224", {}))
        report("full size (ViT-g/16 teacher fp32, bf16 cache of 197 x 1536, ViT-B/16 student step fp32)", fwd32,
               cache_read(tmp, 64, 197, 1536, torch.bfloat16), student_step(student, args.batch, 224, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
