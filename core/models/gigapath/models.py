"""Tile encoders are timm VisionTransformers (`vit_giant_patch14_dinov2` at patch 16 / 224 px for the teacher,
`vit_base_patch16_224` for the student); `encode_tiles` returns the last block's tokens (before the final norm,
the hidden states the distillation matches) and the tile embedding `forward_head(norm(tokens))`, equal to
`model(images)`. The student adds a feature
adaptor (its tokens to the teacher's width) and its own LongNet slide encoder with a head to the teacher's slide
width. Importing this module imports no torch.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache
from typing import Optional

from core.errors import FieldError
from core.models.gigapath.config import slide_config, teacher_width
from core.models.gigapath.longnet import LongNetViT


@lru_cache(maxsize=None)
def _classes():
    """The student's own modules, defined on first use (this module imports no torch at import time)."""
    import torch
    from torch import nn

    class FeatureAdaptor(nn.Module):
        """Student last-block tokens (.., student dim) -> the teacher's width."""

        def __init__(self, d_in, d_out, kind: str):
            super().__init__()
            self.kind = kind
            if kind == "linear":
                self.proj = nn.Linear(d_in, d_out)
            else:
                self.fc1, self.act, self.fc2 = nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out)

        def forward(self, x):
            return self.proj(x) if self.kind == "linear" else self.fc2(self.act(self.fc1(x)))

    class DistillStudent(nn.Module):
        """tiles (n, 3, S, S) + coords (n, 2) -> {"hidden": adapted last-block tokens (n, T', teacher dim),
        "tile_emb": the student's tile embeddings (n, D), "slide_emb": the slide embedding in the teacher's
        slide width}. Tiles go through the tile encoder `tile_chunk` at a time."""

        def __init__(self, tile, adaptor, slide, slide_head, tokens: str, hidden_norm: bool,
                     tile_chunk: Optional[int] = None):
            super().__init__()
            self.tile, self.adaptor, self.slide, self.slide_head = tile, adaptor, slide, slide_head
            self.tokens, self.hidden_norm, self.tile_chunk = tokens, hidden_norm, tile_chunk

        def encode(self, images):
            step = self.tile_chunk or images.shape[0]
            parts = [encode_tiles(self.tile, images[a:a + step]) for a in range(0, images.shape[0], step)]
            hidden = torch.cat([p[0] for p in parts])
            emb = torch.cat([p[1] for p in parts])
            return select_hidden(self.tile, hidden, self.tokens, self.hidden_norm), emb

        def forward(self, images, coords):
            hidden, emb = self.encode(images)
            slide = self.slide_head(self.slide(emb[None], coords[None])[0])[0]
            return {"hidden": self.adaptor(hidden), "tile_emb": emb, "slide_emb": slide}

    return {"FeatureAdaptor": FeatureAdaptor, "DistillStudent": DistillStudent}


def encode_tiles(net, images):
    """(last block's tokens before the final norm (B, T, D), tile embedding forward_head(norm(tokens)) (B, D))."""
    import torch
    from timm.models._manipulate import checkpoint_seq

    x = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(images))))
    if getattr(net, "grad_checkpointing", False) and torch.is_grad_enabled():
        x = checkpoint_seq(net.blocks, x)
    else:
        x = net.blocks(x)
    return x, net.forward_head(net.norm(x))


def select_hidden(net, hidden, tokens: str, hidden_norm: bool):
    """The hidden states the loss matches: all tokens or the class token, before or after the final norm."""
    if hidden_norm:
        hidden = net.norm(hidden)
    return hidden[:, :1] if tokens == "cls" else hidden


def create_tile_encoder(arch: str, model_args: dict, meta: bool = False, field: str = "distill.student_arch"):
    """timm.create_model(arch, pretrained=False, num_classes=0, **model_args); nothing is downloaded."""
    import timm
    import torch

    kwargs = {**model_args, "num_classes": 0}
    with torch.device("meta") if meta else nullcontext():
        try:
            return timm.create_model(arch, pretrained=False, **kwargs)
        except RuntimeError as e:  # timm: Unknown model
            raise FieldError(field, str(e)) from None
        except (TypeError, AssertionError, ValueError) as e:  # an argument or size this architecture does not take
            raise FieldError(field, f"{arch} with {kwargs}: {type(e).__name__} {e}") from None


def build_teacher(cfg: dict, meta: bool = False):
    """(tile encoder, slide encoder) of a teacher config, random weights (or on the meta device)."""
    import torch

    tile = create_tile_encoder(cfg["architecture"], cfg.get("model_args", {}), meta, "models.teacher")
    scfg = slide_config({"in_chans": tile.num_features, **cfg.get("slide_encoder", {})})
    with torch.device("meta") if meta else nullcontext():
        slide = LongNetViT(scfg)
    return tile, slide


def student_slide_config(section, in_chans: int) -> dict:
    return slide_config({"in_chans": in_chans, **section.student_slide})


def build_student(section, teacher_cfg: dict, meta: bool = False):
    """The student: timm tile encoder + feature adaptor + LongNet slide encoder + head to the teacher's slide width."""
    import torch
    from torch import nn

    cls = _classes()
    tile = create_tile_encoder(section.student_arch, section.student_kwargs, meta)
    t_dim = teacher_width(teacher_cfg)
    t_slide = slide_config({"in_chans": t_dim, **teacher_cfg.get("slide_encoder", {})})["embed_dim"]
    scfg = student_slide_config(section, tile.num_features)
    with torch.device("meta") if meta else nullcontext():
        adaptor = cls["FeatureAdaptor"](tile.num_features, t_dim, section.adaptor)
        slide = LongNetViT(scfg)
        head = nn.Linear(scfg["embed_dim"], t_slide) if scfg["embed_dim"] != t_slide else nn.Identity()
    return cls["DistillStudent"](tile, adaptor, slide, head, section.hidden_tokens, section.hidden_norm,
                                 section.tile_chunk)


def meta_counts(section, teacher_cfg: dict) -> dict:
    """Parameter counts on the meta device: teacher tile / slide encoders, student parts."""
    t_tile, t_slide = build_teacher(teacher_cfg, meta=True)
    student = build_student(section, teacher_cfg, meta=True)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"teacher_tile": n(t_tile), "teacher_slide": n(t_slide), "student_tile": n(student.tile),
            "adaptor": n(student.adaptor), "student_slide": n(student.slide) + n(student.slide_head),
            "student": n(student), "teacher_tokens": tokens_per_tile(t_tile), "student_tokens": tokens_per_tile(student.tile),
            "teacher_dim": int(t_tile.num_features), "student_dim": int(student.tile.num_features),
            "teacher_img": t_tile.patch_embed.img_size, "student_img": student.tile.patch_embed.img_size,
            "student_model": student}


def tokens_per_tile(net) -> int:
    return int(net.patch_embed.num_patches) + int(getattr(net, "num_prefix_tokens", 1))


def cosine(a, b):
    import torch

    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
