"""The Prov-GigaPath configs, torch-free (the planner reads them): weight file names, GigaPath's slide encoder
archs and defaults, the teacher preset and the tiny twins' sizes, and the teacher's config from its folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from core.errors import FieldError
from core.models.checkpoint_files import find_config

TILE_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pt", "model.pth")
SLIDE_WEIGHTS = ("slide_encoder.pth", "slide_encoder.safetensors", "slide_encoder.bin")

# Prov-GigaPath's LongNet configs (gigapath/torchscale/model/LongNetConfig.py) for its registered slide encoders
SLIDE_ARCHS: dict[str, dict] = {
    "gigapath_slide_enc12l768d": {"embed_dim": 768, "depth": 12, "num_heads": 16, "ffn_dim": 3072},
    "gigapath_slide_enc24l1024d": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "ffn_dim": 4096},
    "gigapath_slide_enc12l1536d": {"embed_dim": 1536, "depth": 12, "num_heads": 16, "ffn_dim": 6144},
}

SLIDE_DEFAULTS: dict[str, Any] = {
    "in_chans": 1536, "embed_dim": 768, "depth": 12, "num_heads": 16, "ffn_dim": 3072,
    "dilated_ratio": [1, 2, 4, 8, 16], "segment_length": None,   # None: GigaPath's from max_wsi_size / tile_size
    "slide_ngrids": 1000, "tile_size": 256, "max_wsi_size": 262144, "global_pool": False,
    "dropout": 0.25, "drop_path_rate": 0.1, "norm_eps": 1e-6, "layernorm_eps": 1e-5,
}

# hf_hub:prov-gigapath/prov-gigapath as released: config.json (timm) + pytorch_model.bin + slide_encoder.pth
TEACHER_PRESETS: dict[str, dict] = {
    "prov-gigapath": {
        "architecture": "vit_giant_patch14_dinov2", "num_classes": 0, "num_features": 1536, "global_pool": "token",
        "model_args": {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                       "num_heads": 24, "init_values": 1e-05, "mlp_ratio": 5.33334, "num_classes": 0},
        "slide_encoder": {"arch": "gigapath_slide_enc12l768d", "in_chans": 1536, "global_pool": False},
    },
}

# The tiny twins: the same classes (DINOv2-giant-style ViT with SwiGLU and LayerScale, ViT-B-style student,
# LongNet slide encoders with two dilation branches) at sizes a 2-core CPU trains in seconds.
TINY_TEACHER: dict = {
    "architecture": "vit_giant_patch14_dinov2", "num_classes": 0, "num_features": 64, "global_pool": "token",
    "model_args": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2,
                   "init_values": 1e-05, "mlp_ratio": 4.0, "num_classes": 0},
    "slide_encoder": {"in_chans": 64, "embed_dim": 32, "depth": 2, "num_heads": 4, "ffn_dim": 64,
                      "dilated_ratio": [1, 2], "segment_length": [16, 64], "slide_ngrids": 1000, "tile_size": 256},
}
TINY_STUDENT_ARCH = "vit_base_patch16_224"
TINY_STUDENT_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def gigapath_segment_length(max_wsi_size: int, tile_size: int) -> list[int]:
    """LongNetViT.get_optimal_segment_length: 5 lengths from 1024 to the longest tile sequence, log-spaced."""
    import numpy as np

    max_seq_len = (max_wsi_size // tile_size) ** 2
    return [int(v) for v in np.power(2, np.linspace(np.log2(1024), int(np.log2(max_seq_len)), 5)).astype(int)]


def slide_config(cfg: Optional[dict]) -> dict:
    """A slide encoder config (a GigaPath arch name and/or explicit sizes) completed with GigaPath's defaults."""
    cfg = dict(cfg or {})
    arch = cfg.pop("arch", None)
    if arch is not None and arch not in SLIDE_ARCHS:
        raise ValueError(f"unknown slide encoder arch {arch!r}; known: {', '.join(SLIDE_ARCHS)}")
    out = {**SLIDE_DEFAULTS, **(SLIDE_ARCHS[arch] if arch else {}), **cfg}
    unknown = sorted(set(out) - set(SLIDE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown slide encoder keys {unknown}; known: {', '.join(sorted(SLIDE_DEFAULTS))}")
    if out["segment_length"] is None:
        out["segment_length"] = gigapath_segment_length(out["max_wsi_size"], out["tile_size"])
    if len(out["segment_length"]) != len(out["dilated_ratio"]):
        raise ValueError(f"segment_length {out['segment_length']} and dilated_ratio {out['dilated_ratio']} must "
                         f"have one entry per branch")
    if out["embed_dim"] % out["num_heads"] or (out["embed_dim"] // 2) % 2:
        raise ValueError(f"embed_dim {out['embed_dim']} must divide by num_heads {out['num_heads']} and by 4 "
                         f"(2-D sin-cos position embedding)")
    return out


def teacher_config(model_spec) -> dict:
    """The teacher's config: config.json of models.teacher.path, else the preset (torch-free)."""
    cfg = find_config(model_spec.path)
    if cfg is None and model_spec.preset:
        if model_spec.preset not in TEACHER_PRESETS:
            raise FieldError("models.teacher.preset", f"{model_spec.preset!r} is not a teacher preset; known: "
                                                      f"{', '.join(TEACHER_PRESETS)}")
        cfg = json.loads(json.dumps(TEACHER_PRESETS[model_spec.preset]))
    elif cfg is None and model_spec.make_tiny:
        cfg = json.loads(json.dumps(TINY_TEACHER))
    elif cfg is None:
        where = f"{model_spec.path}/config.json" if model_spec.path else "models.teacher.path"
        raise FieldError("models.teacher.path", f"no teacher config: {where} not found; give the Prov-GigaPath "
                                                f"folder (config.json, pytorch_model.bin, slide_encoder.pth), a "
                                                f"preset (models.teacher.preset: prov-gigapath) or make_tiny: true")
    if "architecture" not in cfg:
        raise FieldError("models.teacher.path", f"{model_spec.path}/config.json names no timm 'architecture'")
    cfg.setdefault("model_args", {})
    cfg.setdefault("slide_encoder", {"arch": "gigapath_slide_enc12l768d"})
    return cfg


def weights_in(folder, names) -> Optional[Path]:
    for name in names:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def tokens_of(img_size, patch_size, prefix: int) -> int:
    size = img_size[0] if isinstance(img_size, (list, tuple)) else img_size
    patch = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size
    return (size // patch) ** 2 + prefix


def teacher_width(cfg: dict) -> int:
    return int(cfg.get("num_features") or cfg["model_args"].get("embed_dim") or 1536)
