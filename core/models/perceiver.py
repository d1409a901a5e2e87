"""Flamingo-style Perceiver resampler (trainable): 32 learned latents attend to the ViT's visual tokens. Module for
module the `PerceiverResampler` of RadFM / Dia-LLaMA (`helpers.py`, from lucidrains/flamingo-pytorch) as Dia-LLaMA
builds it (`embedding_layer.perceiver`: no frame or media-time embeddings, one volume per sample):

`latents` (32 x 768, randn); `layers.i.0` = PerceiverAttention (`norm_media`, `norm_latents`, `to_q` 768 -> 512,
`to_kv` 768 -> 1024, `to_out` 512 -> 768, no biases; keys and values from media and latents together);
`layers.i.1` = feed-forward (0 LayerNorm, 1 Linear 768 -> 3072, 2 GELU, 3 Linear 3072 -> 768, no biases);
`norm` (final LayerNorm). dim 768, depth 6, 8 heads x 64, FF x4: 37,802,496 parameters. Output (B, 32, 768);
the projection to the LLM's width is Dia-LLaMA's separate `fc` (core.models.dia_pangu).
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


TINY_PERCEIVER = PerceiverConfig(dim=48, depth=2, heads=2, dim_head=16, num_latents=32, ff_mult=2)


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
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
        out = nn.functional.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(dim_head)) v
        return self.to_out(out.transpose(1, 2).reshape(b, n_lat, -1))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverResampler(nn.Module):
    def __init__(self, cfg: PerceiverConfig = PerceiverConfig()):
        super().__init__()
        self.cfg = cfg
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, cfg.dim))
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(cfg.dim, cfg.heads, cfg.dim_head),
                                                   feed_forward(cfg.dim, cfg.ff_mult)]) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, visual):  # visual: (B, tokens, dim), one volume per sample
        latents = self.latents.unsqueeze(0).expand(visual.shape[0], -1, -1).to(visual.dtype)
        for attn, ff in self.layers:
            latents = attn(visual, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
