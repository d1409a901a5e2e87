#!/usr/bin/env python
"""Dia-Pangu data loading vs training-step consumption, measured in one run (CPU):

volumes/s of the CTRG loader (Dia-LLaMA's steps: read .nii.gz, SimpleITK axis order, slices resized to 512 x 512,
depth zoomed to 64 by nearest neighbour, min-max, 3 channels, nearest resize to 256 x 256 x 64) at full size (from
512 x 512 x 64 int16 volumes, like CTRG's) and at the tiny shape, against the time of one training micro-step of the
tiny model; target: loader time per step < 20% of the step time.
On a GPU/NPU the full-size step is seconds long, so the full-size loader figure is reported beside it.

  .venv/bin/python bench/dia_pangu_loader.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def loader_rate(paths: list[Path], size: int, frames: int, resize: int) -> float:
    from core.data.ctrg import load_volume

    t0 = time.perf_counter()
    for p in paths:
        load_volume(p, size, frames, resize)
    return len(paths) / (time.perf_counter() - t0)


def main():
    import nibabel as nib
    import numpy as np
    import torch

    from core.data.ctrg import write_synthetic
    from core.models.dia_pangu import DiaPangu
    from core.models.pangu import load_pangu, load_tokenizer, write_tiny_pangu
    from core.models.perceiver import TINY_PERCEIVER
    from core.models.vit3d import TINY_VIT
    from core.config import load_spec
    from core.workloads.dia_reports import Prompts

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        full = []
        for i in range(4):
            p = tmp / f"full{i}.nii.gz"
            ct = (np.random.rand(512, 512, 64) * 4000 - 1024).astype(np.int16)
            nib.save(nib.Nifti1Image(ct, np.eye(4)), str(p))
            full.append(p)
        full_rate = loader_rate(full, 256, 64, 512)
        from core.data.ctrg import load_volume as lv
        from core.data.prefetch import Prefetcher

        torch.set_num_threads(1)
        pre = Prefetcher(lambda i: lv(full[i % len(full)], 256, 64, 512), workers=2)
        t0 = time.perf_counter()
        pre.ahead(range(8))
        for i in range(8):
            pre.get(i)
        full_rate_2 = 8 / (time.perf_counter() - t0)
        data = write_synthetic(tmp / "ctrg", n_train=16, n_val=1, n_test=1)
        small = sorted(Path(data["data_dir"]).glob("*.nii.gz"))[:16]
        tiny_rate = loader_rate(small, TINY_VIT.image_size, TINY_VIT.frames, TINY_VIT.design_size)
        folder = write_tiny_pangu(tmp / "pangu")
        tok = load_tokenizer(folder)
        model = DiaPangu(load_pangu(folder, dtype=torch.float32), tok, TINY_VIT, TINY_PERCEIVER, train_head=True)
        spec, _ = load_spec(REPO / "jobs/tiny/dia_pangu.yaml")
        from core.data.ctrg import check_dataset, load_volume

        case = check_dataset(data["data_dir"], data["annotation"], data["labels_csv"], splits=("train",))["train"][0]
        ids, labels = Prompts(tok, model, spec).training(case)
        vol = load_volume(case.volume, TINY_VIT.image_size, TINY_VIT.frames, TINY_VIT.design_size).unsqueeze(0)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            out = model(vol, ids, labels, torch.tensor([case.labels]))
            out["loss"].backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
        step = sorted(times[1:])[len(times[1:]) // 2]
    print(f"loader, full-size preprocessing (512x512x64 int16 -> 3x256x256x64): {full_rate:.2f} volumes/s "
          f"({1 / full_rate:.2f} s per volume) in the step's thread; {full_rate_2:.2f} volumes/s with the "
          f"2-thread prefetcher (data.workers: 2) = {full_rate_2 / full_rate:.2f}x")
    print(f"loader, tiny shape (40x40x10 -> 3x32x32x8): {tiny_rate:.1f} volumes/s")
    print(f"tiny training micro-step (1 volume, CPU, 1 thread): {step * 1000:.0f} ms -> loader time per step "
          f"{100 / tiny_rate / step:.0f}% of the step (target < 20%)")


if __name__ == "__main__":
    main()
