"""Slide encoder. Prov-GigaPath's `gigapath/slide_encoder.py` (`LongNetViT`) runs torchscale's LongNet encoder with
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
"""
from __future__ import annotations

from functools import lru_cache

from core.models.gigapath.config import slide_config


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

    return {"LongNetViT": LongNetViT}


def LongNetViT(cfg: dict):  # noqa: N802  (a class built on first use)
    return _classes()["LongNetViT"](slide_config(cfg))
