"""The trained student written in timm's layout (its tile encoder loads with timm strictly) plus its heads."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Optional


def timm_config(arch: str, model_args: dict, net, image_size: int, mean, std) -> dict:
    """config.json in timm's Hugging Face layout: timm.create_model(architecture, pretrained=False, **model_args)."""
    return {"architecture": arch, "num_classes": 0, "num_features": int(net.num_features),
            "global_pool": getattr(net, "global_pool", "token"), "model_args": {**model_args, "num_classes": 0},
            "pretrained_cfg": {"input_size": [3, image_size, image_size], "mean": list(mean), "std": list(std),
                               "interpolation": "bicubic", "crop_pct": 224 / 256, "num_classes": 0}}


def export_student(module, folder, section, image_size: int, mean, std, zero3: bool, rank: int) -> Optional[dict]:
    """Rank 0 writes the student: model.safetensors + config.json (the tile encoder, loadable with timm strictly),
    heads.safetensors (adaptor, slide encoder, slide head) + distill.json. Every rank must call it (ZeRO-3 gathers)."""
    import torch
    from safetensors.torch import save_file

    from core.run_folder import atomic_path, write_json_atomic

    params = list(module.parameters())
    gather = nullcontext()
    if zero3 and params and hasattr(params[0], "ds_id"):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather, torch.no_grad():
        if rank != 0:
            return None
        tile = {k: v.detach().float().cpu().contiguous() for k, v in module.tile.state_dict().items()}
        heads = {f"{name}.{k}": v.detach().float().cpu().contiguous()
                 for name in ("adaptor", "slide", "slide_head") for k, v in getattr(module, name).state_dict().items()}
    folder = Path(folder)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(tile, str(tmp), metadata={"format": "pt"})
    with atomic_path(folder / "heads.safetensors") as tmp:
        save_file(heads, str(tmp), metadata={"format": "pt"})
    cfg = timm_config(section.student_arch, section.student_kwargs, module.tile, image_size, mean, std)
    write_json_atomic(folder / "config.json", cfg)
    write_json_atomic(folder / "distill.json", {"adaptor": section.adaptor, "hidden_tokens": section.hidden_tokens,
                                                "hidden_norm": section.hidden_norm,
                                                "slide_encoder": module.slide.config,
                                                "slide_head": not isinstance(module.slide_head, torch.nn.Identity)})
    return {"model": str(folder / "model.safetensors"), "config": str(folder / "config.json"),
            "heads": str(folder / "heads.safetensors"), "tensors": len(tile)}
