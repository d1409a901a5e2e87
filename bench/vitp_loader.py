#!/usr/bin/env python
"""ViTP lung loader vs training step, measured once (CPU): images/s the slice loader delivers against images/s the
training step consumes, and their ratio (> 1: the loader keeps up with the step on its own thread(s)).

Loader (core.workloads.vitp_lung.SliceLoader: decode, lung window for DICOM, resize, 3 channels, normalise):
- full size: 512 x 512 lung-window PNGs (8 bit) and 512 x 512 int16 DICOM slices -> 3 x 224 x 224, in the
  step's thread and with the 2-thread prefetcher (data.workers: 2);
- tiny: the synthetic 64 x 64 PNGs -> 3 x 32 x 32.
Step (forward + backward + AdamW, fp32, 1 thread): the tiny ViT (jobs/tiny/vitp_lung.yaml) at micro-batch 16,
and ViT-B/16 at 224 px (jobs/vitp_lung.yaml's model) at micro-batch 4.

  .venv/bin/python bench/vitp_loader.py
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def median_of(fn, times: int = 3) -> float:
    """The median of a few measurements (the machine is shared: one figure alone is noisy)."""
    return statistics.median(fn() for _ in range(times))


def rate(fn, items) -> float:
    """images/s of fn over the items in the calling thread."""
    def once():
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        return len(items) / (time.perf_counter() - t0)
    return median_of(once)


def prefetched_rate(fn, items, workers: int) -> float:
    """images/s when the step's thread takes each item from the workload's prefetcher (threads load ahead)."""
    from core.data.prefetch import Prefetcher

    def once():
        pre = Prefetcher(lambda i: fn(items[i % len(items)]), workers, keep=256)
        n = 2 * len(items)
        t0 = time.perf_counter()
        for i in range(n):
            pre.ahead(range(i + 1, min(i + 1 + 4 * workers, n)))
            pre.get(i)
        return n / (time.perf_counter() - t0)
    return median_of(once)


def step_rate(spec, micro: int, repeat: int) -> float:
    import torch
    import torch.nn.functional as F

    from core.models.classifier import build

    torch.manual_seed(0)
    model = build(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = spec.data.image_size
    x, y = torch.randn(micro, 3, size, size), torch.randint(0, 4, (micro,))
    times = []
    for _ in range(repeat + 1):  # the first step (allocations) is left out
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return micro / statistics.median(times[1:])


def main():
    import numpy as np
    import torch
    from PIL import Image

    from core.data.lung_ct import _synthetic_slice, _write_dicom, write_synthetic
    from core.config import load_spec
    from core.workloads.vitp_lung import SliceLoader

    torch.set_num_threads(1)
    # the timm baseline switch (vitp.method timm_classifier) for the ViT rows; the lab's InternVL tiling below
    full, _ = load_spec(REPO / "jobs/vitp_lung.yaml", ("vitp.method=timm_classifier", "model.path=null",
                                                       "model.preset=null", "data.image_size=224", "model.seq_len=197"))
    tiny, _ = load_spec(REPO / "jobs/tiny/vitp_lung.yaml", ("vitp.method=timm_classifier", "model.path=null",
                                                            "model.make_tiny=false", "model.seq_len=17"))
    lab, _ = load_spec(REPO / "jobs/vitp_lung.yaml")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        pngs, dcms = [], []
        for i in range(16):
            img = _synthetic_slice(i % 4, 0.5, 512, rng)
            Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L").save(tmp / f"s{i}.png")
            _write_dicom(tmp / f"s{i}.dcm", img, "P0", i + 1, float(i))
            pngs.append(str(tmp / f"s{i}.png"))
            dcms.append(str(tmp / f"s{i}.dcm"))
        full_loader, tiny_loader = SliceLoader(full.data), SliceLoader(tiny.data)
        png_rate = rate(full_loader.image, pngs)
        dcm_rate = rate(full_loader.image, dcms)
        png_rate_2 = prefetched_rate(full_loader.image, pngs, 2)
        from core.data.lung_ct import load_slice
        from core.models.internvl import dynamic_tiles

        v, d = lab.vitp, lab.data
        tiles_rate = rate(lambda f: dynamic_tiles(load_slice(f), d.image_size, v.max_dynamic_patch, v.use_thumbnail,
                                                  d.mean, d.std), pngs)
        small = sorted(str(p) for p in (write_synthetic(tmp / "ds", patients_per_class=1)["slices"]).rglob("*.png"))
        tiny_rate = rate(tiny_loader.image, small[:64])
    tiny_step = step_rate(tiny, tiny.deepspeed.micro_batch, 10)
    full_step = step_rate(full, 4, 3)
    print(f"loader, full size (512x512 -> 3x224x224): PNG {png_rate:.0f} images/s, DICOM {dcm_rate:.0f} images/s in "
          f"the step's thread; PNG {png_rate_2:.0f} images/s with the 2-thread prefetcher (data.workers: 2) = "
          f"{png_rate_2 / png_rate:.2f}x")
    print(f"loader, tiny (64x64 PNG -> 3x32x32): {tiny_rate:.0f} images/s")
    print(f"loader, the lab's InternVL input (512x512 PNG -> one 3x448x448 tile, max_dynamic_patch "
          f"{lab.vitp.max_dynamic_patch}): {tiles_rate:.0f} images/s in the step's thread")
    print(f"step, tiny ViT (32 px, micro-batch {tiny.deepspeed.micro_batch}, CPU, 1 thread): {tiny_step:.0f} images/s"
          f" -> loader/step = {tiny_rate / tiny_step:.1f}")
    print(f"step, ViT-B/16 (224 px, micro-batch 4, CPU, 1 thread): {full_step:.1f} images/s -> loader/step = "
          f"{png_rate / full_step:.0f} (PNG), {dcm_rate / full_step:.0f} (DICOM); a device step consuming N images/s "
          f"needs N / {png_rate:.0f} loader threads (data.workers)")


if __name__ == "__main__":
    main()
