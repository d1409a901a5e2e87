"""Frozen 3D ViT over a CT volume: RadFM's `ViT` (chaoyi-wu/RadFM `Model/RadFM/vit_3d.py`, used unchanged by Dia-LLaMA
as `embedding_layer.vision_encoder`), module for module, so that the released Dia-LLaMA checkpoint loads by name.

Input (B, 3, H, W, D) = (B, 3, 256, 256, 64); patches of 32 x 32 x 4 -> (8, 8, 16) = 1024 tokens.
- `to_patch_embedding`: 0 = the patch rearrangement `b c (h p1) (w p2) (f pf) -> b (h w f) (p1 p2 pf c)` (no
  parameters), 1 = LayerNorm(12288), 2 = Linear(12288, 768), 3 = LayerNorm(768).
- `pos_embedding`: RadFM's learned 3D table, one nn.Embedding per axis (`row_embed`, `col_embed`, `dep_embed`, 256
  features each, concatenated to 768), sized for RadFM's design volume of 512 x 512 x 512 (16, 16 and 128 rows).
  A smaller input reads every (rows // grid)-th row: row (i + 1) * (rows // grid) - 1 for grid position i
  (for 8 x 8 x 16 patches: rows 1, 3, ..., 15 in-plane and 7, 15, ..., 127 in depth).
- embedding dropout 0.1, then `transformer.layers.i` = [PreNorm(Attention), PreNorm(FeedForward)]:
  `0.norm`, `0.fn.to_qkv` (768 -> 3 x 8 x 64, no bias), `0.fn.to_out.0` (512 -> 768); `1.norm`,
  `1.fn.net.0` (768 -> 2048), GELU, dropout, `1.fn.net.3` (2048 -> 768), dropout; attention dropout 0.1.
- no final LayerNorm (RadFM returns the last block's output). Output: (B, 1024, 768). 66,208,000 parameters.
Dropout follows the module's train / eval mode, as it does in Dia-LLaMA (whose trainer keeps the frozen encoder in
train mode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ViT3DConfig:
    image_size: int = 256          # the input volume (what the CTRG loader produces)
    frames: int = 64
    patch: int = 32
    frame_patch: int = 4
    channels: int = 3
    dim: int = 768
    depth: int = 12
    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 2048
    dropout: float = 0.1
    emb_dropout: float = 0.1
    design_size: int = 512         # RadFM's design volume: the position tables' rows (512 / 32, 512 / 4)
    design_frames: int = 512

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.image_size // self.patch, self.image_size // self.patch, self.frames // self.frame_patch

    @property
    def table_rows(self) -> tuple[int, int, int]:
        return (self.design_size // self.patch, self.design_size // self.patch,
                self.design_frames // self.frame_patch)

    @property
    def tokens(self) -> int:
        h, w, d = self.grid
        return h * w * d

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch * self.patch * self.frame_patch


# the same layout at CPU-test size: 32 x 32 x 8 input, 8 x 8 x 2 patches -> 4 x 4 x 4 = 64 tokens; tables of 8 rows
# (a 64 x 64 x 16 design volume) read with stride 2, as the full size reads its 16 / 128 rows with strides 2 / 8
TINY_VIT = ViT3DConfig(image_size=32, frames=8, patch=8, frame_patch=2, dim=48, depth=2, heads=2, dim_head=16,
                       mlp_dim=96, design_size=64, design_frames=16)


class Patchify(nn.Module):
    """`b c (h p1) (w p2) (f pf) -> b (h w f) (p1 p2 pf c)` (RadFM's einops Rearrange, index 0 of
    to_patch_embedding)."""

    def __init__(self, patch: int, frame_patch: int):
        super().__init__()
        self.patch, self.frame_patch = patch, frame_patch

    def forward(self, volume):
        b, c, hh, ww, ff = volume.shape
        p, pf = self.patch, self.frame_patch
        h, w, f = hh // p, ww // p, ff // pf
        x = volume.reshape(b, c, h, p, w, p, f, pf).permute(0, 2, 4, 6, 3, 5, 7, 1)  # b h w f p1 p2 pf c
        return x.reshape(b, h * w * f, p * p * pf * c)


class PositionEmbedding3D(nn.Module):
    """RadFM's PositionEmbeddingLearned3d: one learned table per axis, uniform init, read with a stride."""

    def __init__(self, features: int, h_rows: int, w_rows: int, d_rows: int):
        super().__init__()
        self.rows = (h_rows, w_rows, d_rows)
        self.row_embed = nn.Embedding(h_rows, features)
        self.col_embed = nn.Embedding(w_rows, features)
        self.dep_embed = nn.Embedding(d_rows, features)
        for table in (self.row_embed, self.col_embed, self.dep_embed):
            nn.init.uniform_(table.weight)

    @staticmethod
    def rows_for(n: int, rows: int, device) -> torch.Tensor:
        if n > rows:
            raise ValueError(f"an input grid of {n} patches exceeds the position table's {rows} rows")
        return (torch.arange(n, device=device) + 1) * (rows // n) - 1

    def forward(self, h: int, w: int, d: int, device) -> torch.Tensor:
        """(h * w * d, 3 * features) in the token order of Patchify (h outermost, then w, then d)."""
        x = self.row_embed(self.rows_for(h, self.rows[0], device))
        y = self.col_embed(self.rows_for(w, self.rows[1], device))
        z = self.dep_embed(self.rows_for(d, self.rows[2], device))
        grid = torch.cat([x[:, None, None, :].expand(h, w, d, -1), y[None, :, None, :].expand(h, w, d, -1),
                          z[None, None, :, :].expand(h, w, d, -1)], dim=-1)
        return grid.reshape(h * w * d, -1)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dropout = heads, dropout
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        project_out = not (heads == 1 and dim_head == dim)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout)) if project_out else nn.Identity()

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        # softmax(q k^T / sqrt(dim_head)), dropout on the attention weights, times v: RadFM's attention
        out = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, cfg: ViT3DConfig):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleList([
            PreNorm(cfg.dim, Attention(cfg.dim, cfg.heads, cfg.dim_head, cfg.dropout)),
            PreNorm(cfg.dim, FeedForward(cfg.dim, cfg.mlp_dim, cfg.dropout)),
        ]) for _ in range(cfg.depth))

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class ViT3D(nn.Module):
    def __init__(self, cfg: ViT3DConfig = ViT3DConfig()):
        super().__init__()
        if cfg.dim % 3:
            raise ValueError(f"ViT dim {cfg.dim} must split into 3 position tables")
        self.cfg = cfg
        self.to_patch_embedding = nn.Sequential(Patchify(cfg.patch, cfg.frame_patch), nn.LayerNorm(cfg.patch_dim),
                                                nn.Linear(cfg.patch_dim, cfg.dim), nn.LayerNorm(cfg.dim))
        self.pos_embedding = PositionEmbedding3D(cfg.dim // 3, *cfg.table_rows)
        self.dropout = nn.Dropout(cfg.emb_dropout)
        self.transformer = Transformer(cfg)

    def forward(self, volume):
        c = self.cfg
        _, _, hh, ww, dd = volume.shape
        x = self.to_patch_embedding(volume)
        x = x + self.pos_embedding(hh // c.patch, ww // c.patch, dd // c.frame_patch, x.device).to(x.dtype)
        return self.transformer(self.dropout(x))
