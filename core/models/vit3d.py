"""Frozen 3D ViT over a CT volume (Dia-LLaMA / RadFM shapes).

Input (B, 3, H, W, D) = (B, 3, 256, 256, 64); patches of 32 x 32 x 4 -> (8, 8, 16) = 1024 tokens; each patch
(3*32*32*4 = 12288 values) goes through LayerNorm -> Linear(12288, 768) -> LayerNorm; a learned 3D position
embedding adds one table per axis (h, w, d; 256 features each, concatenated to 768); then 12 pre-norm
transformer blocks (8 heads x 64, MLP 2048, GELU) and a final LayerNorm. Output: (B, 1024, 768).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ViT3DConfig:
    image_size: int = 256
    frames: int = 64
    patch: int = 32
    frame_patch: int = 4
    channels: int = 3
    dim: int = 768
    depth: int = 12
    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 2048

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.image_size // self.patch, self.image_size // self.patch, self.frames // self.frame_patch

    @property
    def tokens(self) -> int:
        h, w, d = self.grid
        return h * w * d

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch * self.patch * self.frame_patch


TINY_VIT = ViT3DConfig(image_size=32, frames=8, patch=8, frame_patch=2, dim=48, depth=2, heads=2, dim_head=16,
                       mlp_dim=96)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


class ViT3D(nn.Module):
    def __init__(self, cfg: ViT3DConfig = ViT3DConfig()):
        super().__init__()
        self.cfg = cfg
        h, w, d = cfg.grid
        self.patch_norm_in = nn.LayerNorm(cfg.patch_dim)
        self.patch_proj = nn.Linear(cfg.patch_dim, cfg.dim)
        self.patch_norm_out = nn.LayerNorm(cfg.dim)
        third = cfg.dim // 3
        self.pos_h = nn.Parameter(torch.randn(h, third) * 0.02)
        self.pos_w = nn.Parameter(torch.randn(w, third) * 0.02)
        self.pos_d = nn.Parameter(torch.randn(d, cfg.dim - 2 * third) * 0.02)
        self.layers = nn.ModuleList(nn.ModuleList([Attention(cfg.dim, cfg.heads, cfg.dim_head),
                                                   FeedForward(cfg.dim, cfg.mlp_dim)]) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)

    def patchify(self, volume):
        c = self.cfg
        b = volume.shape[0]
        h, w, d = c.grid
        x = volume.reshape(b, c.channels, h, c.patch, w, c.patch, d, c.frame_patch)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # b, h, w, d, p1, p2, pf, c
        return x.reshape(b, h * w * d, c.patch_dim)

    def position(self):
        h, w, d = self.cfg.grid
        grid = torch.cat([self.pos_h[:, None, None, :].expand(h, w, d, -1),
                          self.pos_w[None, :, None, :].expand(h, w, d, -1),
                          self.pos_d[None, None, :, :].expand(h, w, d, -1)], dim=-1)
        return grid.reshape(h * w * d, self.cfg.dim)

    def forward(self, volume):
        x = self.patch_norm_out(self.patch_proj(self.patch_norm_in(self.patchify(volume))))
        x = x + self.position().to(x.dtype)
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x)
        return self.norm(x)
