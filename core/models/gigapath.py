"""Prov-GigaPath models for the distillation workload: the teacher (timm tile encoder + LongNet slide encoder), the
student (timm tile encoder + feature adaptor + a smaller LongNet slide encoder and its head), their builders on the
meta device, the tiny twins, checkpoint loading with the missing / unexpected keys named, and the student's export.

Slide encoder. Prov-GigaPath's `gigapath/slide_encoder.py` (`LongNetViT`) runs torchscale's LongNet encoder with
dilated attention. It is rebuilt here with the same module and parameter names, so the released `slide_encoder.pth`
(`torch.load(...)["model"]`) loads strictly:

  patch_embed.proj.{weight,bias}   cls_token   norm.{weight,bias}   encoder.layer_norm.{weight,bias}
  encoder.layers.<i>.self_attn.{q,k,v,out}_proj.{weight,bias}   encoder.layers.<i>.self_attn.inner_attn_ln.*
  encoder.layers.<i>.self_attn_layer_norm.*   encoder.layers.<i>.ffn.{fc1,fc2,ffn_layernorm}.*
  encoder.layers.<i>.final_layer_norm.*

(torchscale's EncoderConfig as GigaPath sets it: pre-norm with sub-LN, no output projection, no relative position,
no xpos, no MoE, so these are all the tensors there are.) torchscale itself cannot serve: the PyPI release
(0.3.0) has no LongNet and no dilated attention (those live only in its GitHub tree and in GigaPath's vendored
copy), pins timm==0.6.13 and fairscale==0.4.0, and GigaPath's dilated attention asserts flash attention (flash_attn
on CUDA >= sm80, xformers below) for the log-sum-exp it mixes the branches with: there is no CPU path. The
attention here is plain PyTorch and computes the same thing: per (segment length, dilation) branch, the sequence
is cut into segments, head group g of r attends to the tokens g, g + r, ... of its segment, zero padding included as
keys exactly as GigaPath pads; branches are mixed with weights softmax(log-sum-exp) computed without gradient.
Differences on purpose: the 2-D sin-cos position embedding is computed for the tiles' grid cells when needed instead
of a (1000^2 + 1) x 768 buffer (3 GB; identical values, the buffer is not in the state dict), and tiles outside the
slide_ngrids x slide_ngrids grid are refused instead of wrapping into the next grid row.

Tile encoders are timm VisionTransformers (`vit_giant_patch14_dinov2` at patch 16 / 224 px for the teacher,
`vit_base_patch16_224` for the student); `encode_tiles` returns the last block's tokens (before the final norm,
the hidden states the distillation matches) and the tile embedding `forward_head(norm(tokens))`, equal to
`model(images)`. Importing this module imports no torch.
"""
from __future__ import annotations

import json
import logging
import sys
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from core.spec import FieldError

log = logging.getLogger("gigapath_distill")

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


# ---------------------------------------------------------------- configs (torch-free)
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
    if model_spec.path and (Path(model_spec.path) / "config.json").is_file():
        cfg = json.loads((Path(model_spec.path) / "config.json").read_text())
    elif model_spec.preset:
        if model_spec.preset not in TEACHER_PRESETS:
            raise FieldError("models.teacher.preset", f"{model_spec.preset!r} is not a teacher preset; known: "
                                                      f"{', '.join(TEACHER_PRESETS)}")
        cfg = json.loads(json.dumps(TEACHER_PRESETS[model_spec.preset]))
    elif model_spec.make_tiny:
        cfg = json.loads(json.dumps(TINY_TEACHER))
    else:
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


# ---------------------------------------------------------------- LongNet slide encoder (torch inside)
def _np_sincos(dim: int, pos):
    """1-D sin-cos embedding (MAE's get_1d_sincos_pos_embed_from_grid), float64: pos (...,) -> (..., dim)."""
    import torch

    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.to(torch.float64)[..., None] * omega.to(pos.device)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)


def grid_pos_embed(embed_dim: int, pos, ngrids: int):
    """Rows `pos` (1 = grid cell 0; 0 = the class token) of MAE / GigaPath's 2-D sin-cos table
    get_2d_sincos_pos_embed(embed_dim, ngrids, cls_token=True), computed instead of looked up."""
    import torch

    cell = (pos - 1).clamp(min=0)
    row, col = cell // ngrids, cell % ngrids       # the table's grid is meshgrid(w, h): the first half encodes col
    emb = torch.cat([_np_sincos(embed_dim // 2, col), _np_sincos(embed_dim // 2, row)], dim=-1)
    return torch.where((pos == 0)[..., None], torch.zeros_like(emb), emb)


def _sparse(x, r: int):
    """GigaPath's dense_to_sparse: (B, g, h, d) -> (B, ceil(g / r), h, d); head group j (of r) keeps tokens j, j + r, ..."""
    import torch.nn.functional as F

    B, g, h, d = x.shape
    tpad, hpad = (-g) % r, (-h) % r
    if tpad or hpad:
        x = F.pad(x, (0, 0, 0, hpad, 0, tpad))
    hh = (h + hpad) // r
    x = x.view(B, (g + tpad) // r, r, r, hh, d).diagonal(dim1=2, dim2=3)      # (B, l, hh, d, r)
    return x.permute(0, 1, 4, 2, 3).reshape(B, (g + tpad) // r, r * hh, d)[:, :, :h]


def _dense(out, lse, r: int, g: int):
    """GigaPath's sparse_to_dense: back to (B, g, h, d) with zeros and lse -1e8 where a head group does not look."""
    B, l, h, d = out.shape
    hh = -(-h // r)
    dense = out.new_zeros(B, l * r, hh * r, d)
    dlse = lse.new_full((B, l * r, hh * r), -1e8)
    lse = lse.transpose(1, 2)                                                  # (B, l, h)
    for j in range(r):
        heads = slice(j * hh, min((j + 1) * hh, h))
        dense[:, j::r, heads] = out[:, :, heads]
        dlse[:, j::r, heads] = lse[:, :, heads]
    dlse = dlse.masked_fill(dlse == 0, -1e8)                                   # as GigaPath masks lse == 0
    return dense[:, :g, :h], dlse[:, :g, :h]


def _attend(q, k, v, max_elems: int = 1 << 26):
    """softmax(q k^T / sqrt(d)) v and its log-sum-exp (what flash attention returns), in float32, over chunks of the
    batch so that one score block stays below max_elems: (B, l, h, d) -> (B, l, h, d), (B, h, l)."""
    import torch

    B, l, h, d = q.shape
    scale = d ** -0.5
    step = max(1, max_elems // max(1, h * l * l))
    outs, lses = [], []
    for a in range(0, B, step):
        qa, ka, va = (t[a:a + step].float().transpose(1, 2) for t in (q, k, v))   # (b, h, l, d)
        s = qa @ ka.transpose(-1, -2) * scale
        lse = torch.logsumexp(s, dim=-1)
        outs.append((torch.exp(s - lse[..., None]) @ va).transpose(1, 2).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def dilated_attention(q, k, v, segment_length: list[int], dilated_ratio: list[int]):
    """LongNet's dilated attention (non-causal): q, k, v (b, T, h, d) -> (b, T, h, d)."""
    import torch
    import torch.nn.functional as F

    b, T, h, d = q.shape
    outs, lses = [], []
    for sl, r in zip(segment_length, dilated_ratio):
        sl = min(int(sl), T)
        pad = (-T) % sl
        n = (T + pad) // sl
        seg = [(F.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t).reshape(b * n, sl, h, d) for t in (q, k, v)]
        o, lse = _attend(*(_sparse(t, r) for t in seg))
        o, lse = _dense(o, lse, r, sl)
        outs.append(o.reshape(b, n * sl, h, d)[:, :T])
        lses.append(lse.reshape(b, n * sl, h)[:, :T])
    with torch.no_grad():
        weights = torch.softmax(torch.stack(lses), dim=0)                     # (branches, b, T, h)
    return sum(o * w[..., None].to(o.dtype) for o, w in zip(outs, weights))


@lru_cache(maxsize=None)
def _classes():
    """The slide encoder's modules, defined on first use (this module imports no torch at import time)."""
    import torch
    from torch import nn

    class PatchEmbed(nn.Module):
        def __init__(self, in_chans, embed_dim):
            super().__init__()
            self.proj = nn.Linear(in_chans, embed_dim)
            self.norm = nn.Identity()

        def forward(self, x):
            return self.norm(self.proj(x))

    class DilatedAttention(nn.Module):
        def __init__(self, embed_dim, num_heads, segment_length, dilated_ratio, eps):
            super().__init__()
            self.embed_dim, self.num_heads = embed_dim, num_heads
            self.segment_length, self.dilated_ratio = list(segment_length), list(dilated_ratio)
            self.k_proj = nn.Linear(embed_dim, embed_dim)
            self.v_proj = nn.Linear(embed_dim, embed_dim)
            self.q_proj = nn.Linear(embed_dim, embed_dim)
            self.out_proj = nn.Linear(embed_dim, embed_dim)
            self.inner_attn_ln = nn.LayerNorm(embed_dim, eps=eps)

        def forward(self, x):
            b, T, _ = x.shape
            q, k, v = (p(x).view(b, T, self.num_heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
            attn = dilated_attention(q, k, v, self.segment_length, self.dilated_ratio).reshape(b, T, self.embed_dim)
            return self.out_proj(self.inner_attn_ln(attn))

    class FeedForwardNetwork(nn.Module):
        def __init__(self, embed_dim, ffn_dim, dropout, eps):
            super().__init__()
            self.fc1 = nn.Linear(embed_dim, ffn_dim)
            self.fc2 = nn.Linear(ffn_dim, embed_dim)
            self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=eps)
            self.dropout_module = nn.Dropout(dropout)

        def forward(self, x):
            x = self.fc1(x)
            x = torch.nn.functional.gelu(x.float()).type_as(x)
            return self.dropout_module(self.fc2(self.ffn_layernorm(x)))

    class EncoderLayer(nn.Module):
        def __init__(self, cfg, drop_path):
            super().__init__()
            dim, eps = cfg["embed_dim"], cfg["layernorm_eps"]
            self.self_attn = DilatedAttention(dim, cfg["num_heads"], cfg["segment_length"], cfg["dilated_ratio"], eps)
            self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
            self.dropout_module = nn.Dropout(cfg["dropout"])
            self.drop_path = drop_path
            self.ffn = FeedForwardNetwork(dim, cfg["ffn_dim"], cfg["dropout"], eps)
            self.final_layer_norm = nn.LayerNorm(dim, eps=eps)

        def _path(self, x):
            if self.drop_path and self.training:
                from timm.layers import drop_path

                return drop_path(x, self.drop_path, True)
            return x

        def forward(self, x):
            x = x + self._path(self.dropout_module(self.self_attn(self.self_attn_layer_norm(x))))
            return x + self._path(self.ffn(self.final_layer_norm(x)))

    class LongNetEncoder(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            n = cfg["depth"]
            rates = [cfg["drop_path_rate"] * i / (n - 1) for i in range(n)] if n > 1 else [0.0]  # np.linspace
            self.dropout_module = nn.Dropout(cfg["dropout"])
            self.layers = nn.ModuleList(EncoderLayer(cfg, rates[i] if cfg["drop_path_rate"] > 0 else 0.0)
                                        for i in range(cfg["depth"]))
            self.layer_norm = nn.LayerNorm(cfg["embed_dim"], eps=cfg["layernorm_eps"])

        def forward(self, x, return_all_hiddens: bool = False):
            x = self.dropout_module(x)
            states = [x] if return_all_hiddens else []
            for layer in self.layers:
                x = layer(x)
                if return_all_hiddens:
                    states.append(x)
            return {"encoder_out": self.layer_norm(x), "encoder_states": states}

    class LongNetViT(nn.Module):
        """Prov-GigaPath's slide encoder: tile embeddings (N, L, in_chans) + level-0 coordinates (N, L, 2) ->
        a list of slide embeddings (N, embed_dim) (the last layer's, or every layer's with all_layer_embed)."""

        def __init__(self, cfg: dict):
            super().__init__()
            self.config = dict(cfg)
            dim = cfg["embed_dim"]
            self.patch_embed = PatchEmbed(cfg["in_chans"], dim)
            self.tile_size, self.slide_ngrids = cfg["tile_size"], cfg["slide_ngrids"]
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.encoder = LongNetEncoder(cfg)
            self.norm = nn.LayerNorm(dim, eps=cfg["norm_eps"])
            self.global_pool = cfg["global_pool"]
            if not any(p.is_meta for p in self.parameters()):
                self.initialize_vit_weights()

        def initialize_vit_weights(self):
            torch.nn.init.normal_(self.cls_token, std=0.02)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    torch.nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.constant_(m.bias, 0)
                    nn.init.constant_(m.weight, 1.0)

        def coords_to_pos(self, coords):
            cell = torch.floor(coords.to(torch.float64) / self.tile_size).long()
            bad = (cell < 0) | (cell >= self.slide_ngrids)
            if bool(bad.any()):
                raise ValueError(f"tile coordinates outside the slide encoder's grid of {self.slide_ngrids} x "
                                 f"{self.slide_ngrids} cells of {self.tile_size} px (e.g. {coords[bad.any(-1)][0].tolist()})")
            return cell[..., 0] * self.slide_ngrids + cell[..., 1] + 1

        def forward(self, x, coords, all_layer_embed: bool = False):
            x = self.patch_embed(x)
            pos = self.coords_to_pos(coords)
            x = x + grid_pos_embed(x.shape[-1], pos, self.slide_ngrids).to(x.dtype)
            cls = self.cls_token.expand(x.shape[0], -1, -1)              # its position row is zeros
            x = torch.cat((cls, x), dim=1)
            out = self.encoder(x, return_all_hiddens=all_layer_embed)
            states = out["encoder_states"] if all_layer_embed else [out["encoder_out"]]
            outcomes = []
            for h in states:
                outcomes.append(self.norm(h[:, 1:].mean(dim=1)) if self.global_pool else self.norm(h)[:, 0])
            return outcomes

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

    return {"LongNetViT": LongNetViT, "FeatureAdaptor": FeatureAdaptor, "DistillStudent": DistillStudent}


def LongNetViT(cfg: dict):  # noqa: N802  (a class built on first use)
    return _classes()["LongNetViT"](slide_config(cfg))


# ---------------------------------------------------------------- tile encoders
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


def teacher_width(cfg: dict) -> int:
    return int(cfg.get("num_features") or cfg["model_args"].get("embed_dim") or 1536)


# ---------------------------------------------------------------- checkpoints
def read_state_dict(path) -> dict:
    """Tensors of a .safetensors / .pth / .bin file; {"model": ...} / {"state_dict": ...} wrappers and a 'module.'
    prefix removed (GigaPath's slide_encoder.pth is {"model": state_dict})."""
    import torch

    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k.removeprefix("module."): v for k, v in state.items() if hasattr(v, "shape")}


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


# ---------------------------------------------------------------- tiny twins and the export
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


