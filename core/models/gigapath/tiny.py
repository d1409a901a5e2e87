"""The tiny teacher (tests, jobs/tiny): random weights in the released Prov-GigaPath folder layout."""
from __future__ import annotations

import json
from pathlib import Path

from core.models.gigapath.config import SLIDE_WEIGHTS, TINY_TEACHER, weights_in
from core.models.gigapath.models import build_teacher


def write_tiny_teacher(folder, seed: int = 0) -> Path:
    """A tiny random teacher in the released folder layout: config.json (timm), model.safetensors (tile encoder),
    slide_encoder.pth ({"model": state_dict}, as GigaPath ships it). Its LayerScale gammas are set to 0.5 so that
    the tiny blocks are not near-identities (a trained DINOv2's are of that order)."""
    import torch
    from safetensors.torch import save_file

    from core.run_folder import atomic_path, write_json_atomic

    folder = Path(folder)
    if (folder / "config.json").is_file() and weights_in(folder, SLIDE_WEIGHTS):
        return folder
    torch.manual_seed(seed)
    cfg = json.loads(json.dumps(TINY_TEACHER))
    tile, slide = build_teacher(cfg)
    with torch.no_grad():
        for name, p in tile.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(0.5)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tile.state_dict().items()}, str(tmp))
    with atomic_path(folder / "slide_encoder.pth") as tmp:
        torch.save({"model": slide.state_dict()}, tmp)
    write_json_atomic(folder / "config.json", cfg)   # last: its presence marks the folder complete
    return folder
