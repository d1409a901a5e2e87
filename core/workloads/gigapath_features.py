"""The teacher feature cache of the Prov-GigaPath distillation (core.workloads.gigapath_distill), its `features`
step: a Slurm array of single-device tasks, `distill.slides_per_task` slides each. A task tiles the slides that are
whole-slide images (core.data.slides.tile_wsi), runs the frozen teacher once over every tile and writes
`features/<slide>.safetensors` atomically: the last block's tokens (`hidden`, in distill.cache_dtype), the tile
embeddings, the slide embedding and the tile coordinates, with the tile names and a fingerprint of the teacher and
the preprocessing. A slide whose file is there with the same fingerprint and tiles is skipped, so a resubmission
(`--resume`) recomputes nothing and `--resume-missing` submits only the slides without a file. The training step
reads the cache back (`read_features`) and never runs the teacher. Not a workload of its own (no WORKLOAD)."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Optional

from core.run_folder import atomic_path
from core.runtime import TaskContext
from core.config import JobSpec

log = logging.getLogger("gigapath_distill")

FEATURES = "features"
FORMAT = "gigapath_distill/1"


# ---------------------------------------------------------------- the cache files (torch-free)
def fingerprint(spec: JobSpec) -> str:
    """What the cached features depend on: the teacher (config and weight files), the preprocessing, the cache
    layout. Torch-free (the planner compares it for --resume-missing)."""
    from core.models.gigapath import SLIDE_WEIGHTS, TILE_WEIGHTS, teacher_config, weights_in

    t, s, d = spec.models["teacher"], spec.distill, spec.data
    files = {}
    if t.path and Path(t.path).is_dir():
        for names in (TILE_WEIGHTS, SLIDE_WEIGHTS):
            f = weights_in(t.path, names)
            if f is not None:
                st = f.stat()
                files[f.name] = [st.st_size, st.st_mtime_ns]
    key = {"teacher": teacher_config(t), "files": files, "preset": t.preset, "tokens": s.hidden_tokens,
           "norm": s.hidden_norm, "cache": s.cache_dtype, "precision": s.teacher_precision,
           "image": [d.image_size, list(d.mean), list(d.std)],
           "tiling": [d.tile_px, d.wsi_level, d.occupancy, d.tissue_threshold, d.target_mpp, d.mpp_tolerance,
                      d.base_mpp], "slide_max_tiles": s.slide_max_tiles, "seed": d.seed}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def features_dir(run_dir, spec: Optional[JobSpec] = None) -> Path:
    """Where the teacher features go: <run>/features, or with distill.cache_root <cache_root>/<name>-<fingerprint>
    (a scratch folder under the profile's scratch_roots; runs of the same name, teacher and preprocessing share it)."""
    if spec is not None and spec.distill.cache_root:
        from core.run_folder import REPO

        root = Path(spec.distill.cache_root)
        root = root if root.is_absolute() else REPO / root
        return root / f"{spec.name}-{fingerprint(spec)}"
    return Path(run_dir) / FEATURES


def features_path(run_dir, slide_id: str, spec: Optional[JobSpec] = None) -> Path:
    return features_dir(run_dir, spec) / f"{slide_id}.safetensors"


def cache_bytes_per_tile(tokens: int, dim: int, cache_dtype: str) -> dict:
    """Bytes per tile of a feature file: `hidden` (tokens x dim in cache_dtype), `tile_emb` (dim float32, the input
    of the teacher slide encoder for the slide target), `coords` (2 int64)."""
    hidden = tokens * dim * (4 if cache_dtype == "fp32" else 2)
    return {"hidden": hidden, "tile_emb": 4 * dim, "coords": 16, "total": hidden + 4 * dim + 16}


def slide_rows(n: int, cap: Optional[int], seed: int):
    """The tiles a slide encoder sees in evaluation and in the cached slide embedding: all n, or (n > cap) a seeded
    sorted subset of cap of them (the same for the teacher and the student)."""
    if not cap or n <= cap:
        return None
    import numpy as np

    rng = np.random.default_rng([seed, n, 7919])
    return sorted(int(i) for i in rng.choice(n, cap, replace=False))


def safetensors_metadata(path) -> Optional[dict]:
    """The __metadata__ of a .safetensors file from its header alone (torch-free); None if unreadable."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 1 << 30:
                return None
            return json.loads(f.read(n)).get("__metadata__", {})
    except (OSError, ValueError):
        return None


def done_slides(run_dir, ids: list[str], fp: str, spec: Optional[JobSpec] = None) -> set[str]:
    out = set()
    for sid in ids:
        meta = safetensors_metadata(features_path(run_dir, sid, spec))
        if meta and meta.get("fingerprint") == fp and meta.get("format") == FORMAT:
            out.add(sid)
    return out


# ---------------------------------------------------------------- slides inside the job
def slide_source(d, slide_id: str) -> tuple[str, Path]:
    """('tiles' | 'wsi', path) of a slide id under data.path."""
    from core.data.slides import WSI_SUFFIXES

    root = Path(d.path)
    if (root / slide_id).is_dir():
        return "tiles", root / slide_id
    for p in sorted(root.glob(f"{slide_id}.*")):
        if p.suffix.lower() in WSI_SUFFIXES:
            return "wsi", p
    raise FileNotFoundError(f"slide {slide_id}: no folder or whole-slide image in {root}")


def tiles_root(spec: JobSpec, run_dir) -> Path:
    return Path(spec.data.tiles_dir) if spec.data.tiles_dir else Path(run_dir) / "tiles"


def tile_folder(spec: JobSpec, run_dir, slide_id: str, make: bool = False) -> Path:
    """The slide's tile folder: its own, or (a whole-slide image) tiled into tiles_dir, now if `make`."""
    from core.data.slides import tile_folder_ready, tile_wsi

    kind, src = slide_source(spec.data, slide_id)
    if kind == "tiles":
        return src
    folder = tiles_root(spec, run_dir) / slide_id
    if make and not tile_folder_ready(folder):
        d = spec.data
        info = tile_wsi(src, folder, d.tile_px, d.occupancy, d.tissue_threshold, target_mpp=d.target_mpp,
                        tolerance=d.mpp_tolerance, base_mpp=d.base_mpp, level=d.wsi_level)
        log.info("tiled %s: %d tiles at level %d (%s um/px, %s; %d px read per %d px tile: %s um/px)", src,
                 info["tiles"], info["level"], _g(info["level_mpp"]), info["mpp_source"], info["read_px"],
                 info["tile_px"], _g(info["tile_mpp"]))
    return folder


def _g(v) -> str:
    return "?" if v is None else f"{v:.4g}"


def tiling_of(folder: Path) -> Optional[dict]:
    """The level choice recorded by the tiling (tiling.json), None for a folder of tiles given as such."""
    from core.data.slides import TILING

    p = Path(folder) / TILING
    return json.loads(p.read_text()) if p.is_file() else None


def load_tiles(folder: Path, names: list[str], d):
    import numpy as np
    import torch

    from core.data.slides import tile_array

    return torch.from_numpy(np.stack([tile_array(folder / n, d.image_size, d.mean, d.std) for n in names]))


# ---------------------------------------------------------------- step 1: teacher features
def features(spec: JobSpec, ctx: TaskContext) -> dict:
    """Teacher features of this task's slides, one safetensors file each; slides already done are skipped."""
    from core.data.slides import list_tiles
    from core.runtime import fault_point

    s, d = spec.distill, spec.data
    fp = fingerprint(spec)
    todo, skipped = [], []
    for sid in ctx.items or []:
        meta = safetensors_metadata(features_path(ctx.run_dir, sid, spec))
        ok = bool(meta) and meta.get("fingerprint") == fp and meta.get("format") == FORMAT
        if ok and slide_source(d, sid)[0] == "tiles":
            ok = json.loads(meta["names"]) == [n for n, _, _ in list_tiles(tile_folder(spec, ctx.run_dir, sid))]
        (skipped if ok else todo).append(sid)
    if skipped:
        log.info("skipping %d slide(s) with features: %s", len(skipped), ", ".join(skipped))
    if not todo:
        return {"slides": list(ctx.items or []), "computed": [], "skipped": skipped}
    import torch
    from safetensors.torch import save_file

    from core.models import gigapath as gp
    from core.runtime import task_device, torch_dtype

    device = task_device(ctx)
    dtype, autocast = teacher_dtype(s.teacher_precision, device)
    cache = torch_dtype(s.cache_dtype)
    t0 = time.time()
    cfg = gp.teacher_config(spec.models["teacher"])
    tile_enc, slide_enc = gp.load_teacher(spec.models["teacher"], cfg, s.ignore_unexpected_keys)
    tile_enc, slide_enc = tile_enc.to(device, dtype), slide_enc.to(device, dtype)
    load_s, forward_s, n_tiles, computed, tiling = time.time() - t0, 0.0, 0, [], {}
    for sid in todo:
        fault_point("slide", sid)
        folder = tile_folder(spec, ctx.run_dir, sid, make=True)
        tiles = list_tiles(folder)
        names = [n for n, _, _ in tiles]
        coords = torch.tensor([[x, y] for _, x, y in tiles], dtype=torch.int64)
        hidden, emb = [], []
        with torch.no_grad(), autocast():
            for a in range(0, len(names), s.teacher_batch):
                images = load_tiles(folder, names[a:a + s.teacher_batch], d).to(device, dtype)
                t1 = time.perf_counter()
                h, e = gp.encode_tiles(tile_enc, images)
                h = gp.select_hidden(tile_enc, h, s.hidden_tokens, s.hidden_norm)
                hidden.append(to_cache(h, cache, sid, a))
                emb.append(e.float().cpu())
                forward_s += time.perf_counter() - t1
            emb_t = torch.cat(emb)
            rows = slide_rows(len(names), s.slide_max_tiles, d.seed)
            sel = slice(None) if rows is None else rows
            t1 = time.perf_counter()
            slide = slide_enc(emb_t[sel][None].to(device, dtype), coords[sel][None].to(device))[0][0].float().cpu()
            forward_s += time.perf_counter() - t1
        n_tiles += len(names)
        tensors = {"hidden": torch.cat(hidden).contiguous(), "tile_emb": emb_t.contiguous(),
                   "slide_emb": slide.contiguous(), "coords": coords}
        tiling[sid] = tiling_of(folder)
        meta = {"format": FORMAT, "slide": sid, "fingerprint": fp, "tiles": str(len(names)),
                "names": json.dumps(names), "folder": str(folder), "tiling": json.dumps(tiling[sid]),
                "slide_tiles": str(len(names) if rows is None else len(rows)), "cache_dtype": s.cache_dtype}
        with atomic_path(features_path(ctx.run_dir, sid, spec)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        computed.append(sid)
        log.info("slide %s: %d tiles -> %s", sid, len(names), features_path(ctx.run_dir, sid, spec))
    return {"slides": list(ctx.items), "computed": computed, "skipped": skipped, "tiles": n_tiles,
            "tiling": tiling, "teacher_load_s": round(load_s, 3), "teacher_forward_s": round(forward_s, 4),
            "seconds_per_tile": forward_s / max(n_tiles, 1)}


def teacher_dtype(precision: str, device):
    """(weights dtype, autocast context factory) of the teacher: 'autocast' is Prov-GigaPath's own way (fp32 weights
    under torch.autocast float16 on CUDA; plain fp32 elsewhere); bf16 / fp16 / fp32 cast the weights."""
    from contextlib import nullcontext

    import torch

    from core.runtime import torch_dtype

    if precision == "autocast":
        if getattr(device, "type", str(device)) == "cuda":
            return torch.float32, lambda: torch.autocast("cuda", dtype=torch.float16)
        return torch.float32, nullcontext
    return torch_dtype(precision), nullcontext


def to_cache(h, cache, sid: str, first: int):
    """Hidden states in the cache dtype, on the CPU; values fp16 cannot hold are refused naming the slide (fp16
    reaches 65504: a teacher with larger activations needs distill.cache_dtype bf16 or fp32)."""
    import torch

    out = h.to(cache).cpu()
    if cache == torch.float16 and not torch.isfinite(out).all():
        big = float(h.float().abs().max())
        raise ValueError(f"slide {sid}, tiles from {first}: hidden states up to {big:.4g} overflow fp16 "
                         f"(distill.cache_dtype fp16 holds up to 65504); use cache_dtype bf16 or fp32")
    return out


def read_features(run_dir, slide_id: str, rows=None, spec: Optional[JobSpec] = None, hidden: bool = True) -> dict:
    """A slide's cached teacher features (rows: tile indices, sorted; None: all; hidden=False leaves the tokens)."""
    from safetensors import safe_open

    path = features_path(run_dir, slide_id, spec)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        out = {k: f.get_tensor(k) for k in ("tile_emb", "slide_emb", "coords")}
        if not hidden:
            pass
        elif rows is None:
            out["hidden"] = f.get_tensor("hidden")
        else:
            import torch

            sl = f.get_slice("hidden")
            out["hidden"] = torch.cat([sl[i:i + 1] for i in rows])
    if rows is not None:
        out["tile_emb"], out["coords"] = out["tile_emb"][rows], out["coords"][rows]
    out["names"] = json.loads(meta["names"])
    out["folder"] = meta["folder"]
    out["path"] = str(path)
    return out


def read_hidden(path, a: int, b: int):
    """Rows a..b of a feature file's cached tokens (reads only those)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_slice("hidden")[a:b]
