"""A model's files as every model of the project reads them: the tensors of one weights file (`read_state_dict`)
and a local model folder's config.json (`find_config`, `read_config`). Importing this module imports no torch
(planners read config.json through it)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from core.errors import ModelFolderError

# wrappers a torch checkpoint may hold its state dict in: GigaPath's slide_encoder.pth {"model": ...}, timm /
# Lightning {"state_dict": ...}, DeepSpeed {"module": ...}; the first one present is unwrapped
WRAPPERS = ("model", "state_dict", "module")


def read_state_dict(path, wrappers: tuple[str, ...] = WRAPPERS, mmap: bool = False) -> dict:
    """The tensors of a .safetensors file or a torch file (.pth / .bin / .pt, read with torch.load(weights_only=True):
    tensors and plain containers only, no pickled code runs; memory-mapped with `mmap`, which needs the zip
    format torch.save writes). The first of `wrappers` that holds a dict is unwrapped, a 'module.' prefix is
    removed and entries that are not tensors are left out."""
    import torch

    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True, mmap=mmap)
    for key in wrappers:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k.removeprefix("module."): v for k, v in state.items() if hasattr(v, "shape")}


def find_config(folder) -> Optional[dict]:
    """config.json of a local model folder as a dict; None when no folder is given or it has no config.json."""
    if not folder:
        return None
    f = Path(folder) / "config.json"
    return json.loads(f.read_text()) if f.is_file() else None


def read_config(folder, wanted: str) -> dict:
    """config.json of a local model folder; without one, ModelFolderError "<folder>: no config.json; <wanted>"
    (`wanted` says what model.path must be)."""
    cfg = find_config(folder)
    if cfg is None:
        raise ModelFolderError(f"{folder}: no config.json; {wanted}")
    return cfg
