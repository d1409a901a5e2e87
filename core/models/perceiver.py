"""Flamingo-style Perceiver resampler (trainable): 32 learned latents attend to the ViT's visual tokens.

dim 768, depth 6, 8 heads x 64, feed-forward x4 (GELU), no biases in attention and feed-forward (as Flamingo),
a learned media position embedding, a final LayerNorm; then a projection Linear(768, LLM hidden size).
Output: (B, 32, hidden).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PerceiverConfig:
    dim: int = 768
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    num_latents: int = 32
    ff_mult: int = 4
    max_media: int = 4


TINY_PERCEIVER = PerceiverConfig(dim=48, depth=2, heads=2, dim_head=16, num_latents=32, ff_mult=2)


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media, latents):
        b, n_lat, _ = latents.shape
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n_lat, -1))


class PerceiverResampler(nn.Module):
    def __init__(self, cfg: PerceiverConfig = PerceiverConfig(), out_dim: int = 4096):
        super().__init__()
        self.cfg = cfg
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, cfg.dim) * 0.02)
        self.media_pos = nn.Parameter(torch.zeros(cfg.max_media, 1, cfg.dim))
        self.layers = nn.ModuleList(nn.ModuleList([
            PerceiverAttention(cfg.dim, cfg.heads, cfg.dim_head),
            nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, cfg.dim * cfg.ff_mult, bias=False), nn.GELU(),
                          nn.Linear(cfg.dim * cfg.ff_mult, cfg.dim, bias=False)),
        ]) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.proj = nn.Linear(cfg.dim, out_dim)

    def forward(self, visual):  # visual: (B, tokens, dim) for one volume per sample
        x = visual + self.media_pos[0].to(visual.dtype)
        latents = self.latents.unsqueeze(0).expand(visual.shape[0], -1, -1).to(visual.dtype)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.proj(self.norm(latents))
