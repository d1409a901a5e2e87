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
           "tiling": [d.tile_px, d.wsi_level, d.occupancy, d.tissue_threshold]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def features_path(run_dir, slide_id: str) -> Path:
    return Path(run_dir) / FEATURES / f"{slide_id}.safetensors"


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


def done_slides(run_dir, ids: list[str], fp: str) -> set[str]:
    out = set()
    for sid in ids:
        meta = safetensors_metadata(features_path(run_dir, sid))
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
        info = tile_wsi(src, folder, d.wsi_level, d.tile_px, d.occupancy, d.tissue_threshold)
        log.info("tiled %s: %d tiles at level %d (downsample %g)", src, info["tiles"], d.wsi_level, info["downsample"])
    return folder


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
        meta = safetensors_metadata(features_path(ctx.run_dir, sid))
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
    dtype, cache = torch_dtype(s.teacher_precision), torch_dtype(s.cache_dtype)
    t0 = time.time()
    cfg = gp.teacher_config(spec.models["teacher"])
    tile_enc, slide_enc = gp.load_teacher(spec.models["teacher"], cfg, s.ignore_unexpected_keys)
    tile_enc, slide_enc = tile_enc.to(device, dtype), slide_enc.to(device, dtype)
    load_s, forward_s, n_tiles, computed = time.time() - t0, 0.0, 0, []
    for sid in todo:
        fault_point("slide", sid)
        folder = tile_folder(spec, ctx.run_dir, sid, make=True)
        tiles = list_tiles(folder)
        names = [n for n, _, _ in tiles]
        coords = torch.tensor([[x, y] for _, x, y in tiles], dtype=torch.int64)
        hidden, emb = [], []
        with torch.no_grad():
            for a in range(0, len(names), s.teacher_batch):
                images = load_tiles(folder, names[a:a + s.teacher_batch], d).to(device, dtype)
                t1 = time.perf_counter()
                h, e = gp.encode_tiles(tile_enc, images)
                hidden.append(gp.select_hidden(tile_enc, h, s.hidden_tokens, s.hidden_norm).to(cache).cpu())
                emb.append(e.float().cpu())
                forward_s += time.perf_counter() - t1
            emb_t = torch.cat(emb)
            t1 = time.perf_counter()
            slide = slide_enc(emb_t[None].to(device, dtype), coords[None].to(device))[0][0].float().cpu()
            forward_s += time.perf_counter() - t1
        n_tiles += len(names)
        tensors = {"hidden": torch.cat(hidden).contiguous(), "tile_emb": emb_t.contiguous(),
                   "slide_emb": slide.contiguous(), "coords": coords}
        meta = {"format": FORMAT, "slide": sid, "fingerprint": fp, "tiles": str(len(names)),
                "names": json.dumps(names), "folder": str(folder)}
        with atomic_path(features_path(ctx.run_dir, sid)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        computed.append(sid)
        log.info("slide %s: %d tiles -> %s", sid, len(names), features_path(ctx.run_dir, sid))
    return {"slides": list(ctx.items), "computed": computed, "skipped": skipped, "tiles": n_tiles,
            "teacher_load_s": round(load_s, 3), "teacher_forward_s": round(forward_s, 4),
            "seconds_per_tile": forward_s / max(n_tiles, 1)}


def read_features(run_dir, slide_id: str, rows=None) -> dict:
    """A slide's cached teacher features (rows: tile indices, sorted; None: all)."""
    from safetensors import safe_open

    path = features_path(run_dir, slide_id)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        out = {k: f.get_tensor(k) for k in ("tile_emb", "slide_emb", "coords")}
        if rows is None:
            out["hidden"] = f.get_tensor("hidden")
        else:
            import torch

            sl = f.get_slice("hidden")
            out["hidden"] = torch.cat([sl[i:i + 1] for i in rows])
    if rows is not None:
        out["tile_emb"], out["coords"] = out["tile_emb"][rows], out["coords"][rows]
    out["names"] = json.loads(meta["names"])
    out["folder"] = meta["folder"]
    return out
