#!/usr/bin/env python
"""Peak host memory of the GigaPath distillation's evaluation of one long slide (CPU, this machine): the code before
(every tile of the slide at once: all images, all student tokens and all cached teacher tokens on the device, then
the agreement) against `evaluate_slide` (tiles in chunks, sums kept, only the tile embeddings kept for the slide
encoder). Each mode runs in its own process; the figure is the peak of its anonymous resident memory (RssAnon,
sampled every 2 ms: the file pages of the memory-mapped feature file, which the kernel can drop, are left out) minus
that just before the evaluation (the model, torch and the imports). Not a test: it prints the numbers and their
ratio.

The slide: N synthetic tiles (PNG, cut from scikit-image's immunohistochemistry sample) at 64 px, a feature file
with 17 tokens x 1536 (the full teacher's width) fp16 per tile as the features step writes it, a small ViT student
(patch 16, width 192, depth 2) with a linear adaptor to 1536 and a 1-layer LongNet slide encoder.

  .venv/bin/python bench/gigapath_eval_memory.py                 # 4000 tiles, chunks of 64, slide encoder <= 1000
  .venv/bin/python bench/gigapath_eval_memory.py --tiles 8000 --chunk 128 --slide-max-tiles 0
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIZE, TOKENS, WIDTH = 64, 17, 1536


def rss_mib(key: str = "RssAnon:") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakAnon:
    """The largest RssAnon seen by a thread sampling every 2 ms while the block runs."""

    def __enter__(self):
        import threading

        self.peak, self.stop = rss_mib(), False

        def watch():
            while not self.stop:
                self.peak = max(self.peak, rss_mib())
                time.sleep(0.002)

        self.thread = threading.Thread(target=watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, rss_mib())


def make_slide(root: Path, n: int) -> None:
    """N tiles + a feature file in the features step's format under root/run/features/long.safetensors."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from skimage import data

    from core.workloads.gigapath_features import FORMAT

    ihc = data.immunohistochemistry()
    folder = root / "tiles" / "long"
    folder.mkdir(parents=True, exist_ok=True)
    side = int(np.ceil(np.sqrt(n)))
    names, coords = [], []
    rng = np.random.default_rng(0)
    for i in range(n):
        x, y = (i % side) * 256, (i // side) * 256
        name = f"{x:05d}x_{y:05d}y.png"
        a, b = rng.integers(0, 512 - SIZE, 2)
        Image.fromarray(ihc[a:a + SIZE, b:b + SIZE]).save(folder / name)
        names.append(name)
        coords.append([x, y])
    g = torch.Generator().manual_seed(0)
    feats = root / "run" / "features"
    feats.mkdir(parents=True, exist_ok=True)
    save_file({"hidden": torch.randn(n, TOKENS, WIDTH, generator=g).half(),
               "tile_emb": torch.randn(n, WIDTH, generator=g), "slide_emb": torch.randn(768, generator=g),
               "coords": torch.tensor(coords, dtype=torch.int64)}, str(feats / "long.safetensors"),
              metadata={"format": FORMAT, "slide": "long", "tiles": str(n), "names": json.dumps(names),
                        "folder": str(folder)})


def spec_and_model(chunk: int, cap: int):
    import torch

    from core.config import load_spec
    from core.models import gigapath as gp

    spec, _ = load_spec(str(REPO / "jobs/tiny/gigapath_distill.yaml"), (
        "data.image_size=64", "data.make_synthetic=false", "data.path=/nonexistent",
        "models={teacher: {preset: prov-gigapath}}", f"distill.tile_chunk={chunk}",
        f"distill.slide_max_tiles={cap or 'null'}",
        "distill.student_kwargs={img_size: 64, patch_size: 16, embed_dim: 192, depth: 2, num_heads: 3}",
        "distill.student_slide={embed_dim: 64, depth: 1, num_heads: 4, ffn_dim: 128, dropout: 0.0, "
        "drop_path_rate: 0.0}"))
    cfg = gp.teacher_config(spec.models["teacher"])
    torch.manual_seed(0)
    return spec, gp.build_student(spec.distill, cfg).eval()


def child(root: Path, mode: str, chunk: int, cap: int) -> None:
    import resource

    import torch

    from core.metrics.embedding import embedding_agreement
    from core.workloads.gigapath_distill import evaluate_slide, load_tiles, read_features

    torch.set_num_threads(1)
    spec, model = spec_and_model(chunk, cap)
    run = root / "run"
    base = rss_mib()
    with torch.no_grad(), PeakAnon() as peak:
        if mode == "chunked":
            row = evaluate_slide(spec, run, "long", model, torch.device("cpu"), torch.float32, chunk)
        else:  # the code before: the whole slide at once (student tile encoder chunked inside, as it was)
            f = read_features(run, "long", spec=spec)
            images = load_tiles(Path(f["folder"]), f["names"], spec.data)
            out = model(images, f["coords"])
            th = f["hidden"].float()
            row = embedding_agreement(out["hidden"].float(), th, out["slide_emb"], f["slide_emb"].float())
    print(json.dumps({"mode": mode, "base_mib": base, "peak_mib": peak.peak, "tile_cos": row["tile_cos"],
                      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles", type=int, default=4000)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--slide-max-tiles", type=int, default=1000,
                    help="distill.slide_max_tiles of the chunked run (0: the slide encoder sees every tile)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(Path(args.child[0]), args.child[1], args.chunk, args.slide_max_tiles)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_slide(root, args.tiles)
        res = {}
        for mode in ("all_at_once", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--chunk", str(args.chunk), "--slide-max-tiles",
                                  str(args.slide_max_tiles), "--child", str(root), mode],
                                 capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1",
                                                                                   "PATH": "/usr/bin:/bin"})
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    a, c = res["all_at_once"], res["chunked"]
    grow = {k: v["peak_mib"] - v["base_mib"] for k, v in res.items()}
    print(f"evaluation of one slide of {args.tiles} tiles ({SIZE} px, {TOKENS} x {WIDTH} cached tokens each), "
          f"chunks of {args.chunk}, slide encoder over "
          + (f"at most {args.slide_max_tiles} tiles (distill.slide_max_tiles):" if args.slide_max_tiles else
             "every tile:"))
    print(f"  all tiles at once (before): peak anonymous memory {a['peak_mib']:.0f} MiB, +{grow['all_at_once']:.0f} "
          f"MiB over the process before evaluating (ru_maxrss with file pages {a['maxrss_mib']:.0f} MiB)")
    print(f"  in chunks (evaluate_slide): peak anonymous memory {c['peak_mib']:.0f} MiB, +{grow['chunked']:.0f} MiB "
          f"(ru_maxrss {c['maxrss_mib']:.0f} MiB)")
    print(f"  growth ratio before / chunked: {grow['all_at_once'] / max(grow['chunked'], 1):.1f}x; "
          f"tile cosine {a['tile_cos']:.6f} vs {c['tile_cos']:.6f} (the same figure)")
    print("  (the chunked growth is the slide encoder's attention over the tiles it sees: it grows with that count, "
          "not with the slide's)")


if __name__ == "__main__":
    main()
