"""Teacher and student weights: each file read with core.models.checkpoint_files.read_state_dict (memory-mapped)
and loaded strictly, or a FieldError naming the missing, unexpected and wrong-shaped keys."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from core.errors import FieldError
from core.models import checkpoint_files
from core.models.gigapath.config import SLIDE_WEIGHTS, TILE_WEIGHTS, weights_in
from core.models.gigapath.models import build_teacher

log = logging.getLogger("gigapath_distill")


def read_state_dict(path) -> dict:
    """Tensors of a .safetensors / .pth / .bin file; {"model": ...} / {"state_dict": ...} wrappers and a 'module.'
    prefix removed (GigaPath's slide_encoder.pth is {"model": state_dict})."""
    return checkpoint_files.read_state_dict(path, mmap=True)


def key_problems(model, state: dict) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong shape) of a state dict against a model's own."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
                    if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    return missing, unexpected, shapes


def _listed(name: str, keys: list[str], n: int = 6) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return f"{len(keys)} {name}: {', '.join(keys[:n])}{more}"


def fit_state(model, state: dict, file, field: str, what: str, ignore_unexpected: bool = False) -> dict:
    """The state dict as it loads strictly into `model`, else a FieldError naming the missing, unexpected and
    wrong-shaped keys. A timm tile encoder's own checkpoint_filter_fn is tried when the keys do not fit as they are."""
    missing, unexpected, shapes = key_problems(model, state)
    if missing or shapes or unexpected:
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                filtered = filter_fn(dict(state), model)
                m2, u2, s2 = key_problems(model, filtered)
                if len(m2) + len(u2) + len(s2) < len(missing) + len(unexpected) + len(shapes):
                    state, missing, unexpected, shapes = filtered, m2, u2, s2
            except Exception:  # noqa: BLE001  (a checkpoint not in the original repo's layout)
                pass
    if ignore_unexpected:
        for k in unexpected:
            state.pop(k, None)
        unexpected = []
    if missing or unexpected or shapes:
        parts = [_listed(n, ks) for n, ks in (("missing keys", missing), ("unexpected keys", unexpected),
                                              ("wrong shapes", shapes)) if ks]
        raise FieldError(field, f"{file}: does not fit the {what}: " + "; ".join(parts))
    return state


def check_teacher_files(model_spec, cfg: dict, ignore_unexpected: bool = False) -> dict:
    """Build the teacher on the meta device and check its weight files' keys (planner; FieldError naming the keys).
    Returns {"tile": params, "slide": params, "tile_file": ..., "slide_file": ...}."""
    tile, slide = build_teacher(cfg, meta=True)
    out = {"tile": sum(p.numel() for p in tile.parameters()), "slide": sum(p.numel() for p in slide.parameters()),
           "tile_file": None, "slide_file": None}
    if not model_spec.path or not Path(model_spec.path).is_dir():
        return out
    folder = Path(model_spec.path)
    tile_file, slide_file = weights_in(folder, TILE_WEIGHTS), weights_in(folder, SLIDE_WEIGHTS)
    if tile_file is None:
        raise FieldError("models.teacher.path", f"{folder}: no tile encoder weights ({', '.join(TILE_WEIGHTS)})")
    if slide_file is None:
        raise FieldError("models.teacher.path", f"{folder}: no slide encoder weights ({', '.join(SLIDE_WEIGHTS)})")
    fit_state(tile, read_state_dict(tile_file), tile_file, "models.teacher.path",
              f"tile encoder {cfg['architecture']}", ignore_unexpected)
    fit_state(slide, read_state_dict(slide_file), slide_file, "models.teacher.path",
              "slide encoder (GigaPath LongNetViT)", ignore_unexpected)
    out.update(tile_file=str(tile_file), slide_file=str(slide_file))
    return out


def load_teacher(model_spec, cfg: dict, ignore_unexpected: bool = False):
    """The frozen teacher (eval mode, no grad) with its weights; a preset without a folder is random (logged)."""
    import torch

    torch.manual_seed(0)
    tile, slide = build_teacher(cfg)
    if model_spec.path and Path(model_spec.path).is_dir():
        folder = Path(model_spec.path)
        for net, names, what in ((tile, TILE_WEIGHTS, f"tile encoder {cfg['architecture']}"),
                                 (slide, SLIDE_WEIGHTS, "slide encoder (GigaPath LongNetViT)")):
            f = weights_in(folder, names)
            if f is None:
                raise FieldError("models.teacher.path", f"{folder}: no weights for the {what} ({', '.join(names)})")
            net.load_state_dict(fit_state(net, read_state_dict(f), f, "models.teacher.path", what, ignore_unexpected),
                                strict=True)
    else:
        log.warning("teacher without weights (models.teacher.preset only): random initialisation")
    for net in (tile, slide):
        net.eval().requires_grad_(False)
    return tile, slide


def load_teacher_slide(model_spec, cfg: dict, ignore_unexpected: bool = False):
    """The frozen teacher slide encoder alone (eval, no grad) with its weights: the training step computes the slide
    target with it on the cached tile embeddings of the tiles the student sees. A preset without weights is random
    (seed 0; not the random slide encoder load_teacher builds after the tile encoder: dry runs only)."""
    import torch

    from core.models.gigapath.config import slide_config, teacher_width
    from core.models.gigapath.longnet import LongNetViT

    torch.manual_seed(0)
    slide = LongNetViT(slide_config({"in_chans": teacher_width(cfg), **cfg.get("slide_encoder", {})}))
    if model_spec.path and Path(model_spec.path).is_dir():
        f = weights_in(Path(model_spec.path), SLIDE_WEIGHTS)
        if f is None:
            raise FieldError("models.teacher.path", f"{model_spec.path}: no slide encoder weights "
                                                    f"({', '.join(SLIDE_WEIGHTS)})")
        slide.load_state_dict(fit_state(slide, read_state_dict(f), f, "models.teacher.path",
                                        "slide encoder (GigaPath LongNetViT)", ignore_unexpected), strict=True)
    return slide.eval().requires_grad_(False)


def student_state(student, path) -> tuple[Path, dict]:
    """model.path (a timm checkpoint of the student's architecture: a file, or a folder with model.safetensors /
    pytorch_model.bin) as it fits the student's tile encoder; a classifier head in the file is left out."""
    p = Path(path)
    f = weights_in(p, TILE_WEIGHTS) if p.is_dir() else p
    if f is None or not f.is_file():
        raise FieldError("model.path", f"{p}: no student weights ({', '.join(TILE_WEIGHTS)})")
    own = student.tile.state_dict()
    state = {k: v for k, v in read_state_dict(f).items() if not k.startswith("head.") or k in own}
    return f, fit_state(student.tile, state, f, "model.path", "student tile encoder")


def check_student_weights(student, path) -> None:
    student_state(student, path)


def load_student_weights(student, path) -> dict:
    f, state = student_state(student, path)
    student.tile.load_state_dict(state, strict=True)
    return {"file": str(f), "tensors": len(state)}
