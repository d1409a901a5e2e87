"""Dia-Pangu: CT volume -> frozen 3D ViT -> trainable Perceiver resampler -> 32 vision tokens inside the prompt of a
frozen openPangu; plus a disease-prototype contrastive head.

Prompt layout: `<image><image0>..<image31></image>` + question + one diagnostic sentence per disease
(`The "<disease>" is positive.` / `... negative.`), then the report. The embedding at `<imageK>` is the K-th
projected latent; `<image>` / `</image>` have their own small trainable embeddings (the LLM's frozen
embedding matrix is left as it is); labels are -100 everywhere but on the report.

Disease head: softmax prototypes (14 x visual tokens) pool the ViT tokens into one feature per disease,
Linear(768, 768) projects it, and cosine similarity (temperature learned, init 0.07) to a learned positive and a
learned negative memory per disease gives 2-way logits; the same path decides the diagnostic sentences at inference
(positive when closer to the positive memory) as it is trained on. Total loss = LM loss + 4 x contrastive loss.
"""
from __future__ import annotations

import torch
from torch import nn

from core.data.ctrg import CONDITIONS
from core.models.perceiver import PerceiverConfig, PerceiverResampler
from core.models.vit3d import ViT3D, ViT3DConfig

IMAGE_TOKENS = ["<image>", "</image>"] + [f"<image{i}>" for i in range(32)]


def vision_configs(size: str) -> tuple[ViT3DConfig, PerceiverConfig]:
    """The 3D ViT and perceiver shapes of `dia.size`: the full-size ones, or the tiny twins for CPU tests."""
    from core.models.perceiver import TINY_PERCEIVER
    from core.models.vit3d import TINY_VIT

    return (TINY_VIT, TINY_PERCEIVER) if size == "tiny" else (ViT3DConfig(), PerceiverConfig())


def diagnosis_text(labels: list[int]) -> str:
    return " ".join(f'The "{d}" is {"positive" if v else "negative"}.' for d, v in zip(CONDITIONS, labels))


class DiseaseHead(nn.Module):
    def __init__(self, n_tokens: int, dim: int, n_diseases: int = len(CONDITIONS)):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(n_diseases, n_tokens) * 0.02)
        self.proj = nn.Linear(dim, dim)
        self.pos_memory = nn.Parameter(torch.randn(n_diseases, dim))
        self.neg_memory = nn.Parameter(torch.randn(n_diseases, dim))
        self.temperature = nn.Parameter(torch.full((1,), 0.07))  # 1-d: ZeRO-3 cannot partition a 0-d tensor

    def forward(self, visual):
        """visual (B, N, dim) -> logits (B, diseases, 2) as [negative, positive]."""
        weights = torch.softmax(self.prototypes.float(), dim=-1).to(visual.dtype)
        feats = nn.functional.normalize(self.proj(torch.einsum("kn,bnd->bkd", weights, visual)), dim=-1)
        pos = (feats * nn.functional.normalize(self.pos_memory, dim=-1)).sum(-1)
        neg = (feats * nn.functional.normalize(self.neg_memory, dim=-1)).sum(-1)
        # the learned temperature is clamped (as CLIP clamps its logit scale): left free it drifts to 0 and the
        # contrastive loss explodes once the memories separate the classes
        return torch.stack([neg, pos], dim=-1) / self.temperature.clamp(min=0.01)

    @staticmethod
    def loss(logits, labels):
        return nn.functional.cross_entropy(logits.reshape(-1, 2).float(), labels.reshape(-1).long())


class DiaPangu(nn.Module):
    def __init__(self, llm, tokenizer, vit_cfg: ViT3DConfig, perceiver_cfg: PerceiverConfig,
                 contrastive_weight: float = 4.0):
        super().__init__()
        self.llm = llm
        self.vit = ViT3D(vit_cfg)
        hidden = llm.config.hidden_size
        self.perceiver = PerceiverResampler(perceiver_cfg, out_dim=hidden)
        self.disease = DiseaseHead(vit_cfg.tokens, vit_cfg.dim)
        self.markers = nn.Embedding(2, hidden)  # <image>, </image> (a module, so ZeRO-3 gathers it when called)
        nn.init.normal_(self.markers.weight, std=0.02)
        self.contrastive_weight = contrastive_weight
        tokenizer.add_tokens(IMAGE_TOKENS, special_tokens=True)
        self.image_open, self.image_close = (tokenizer.convert_tokens_to_ids(t) for t in IMAGE_TOKENS[:2])
        self.image_first = tokenizer.convert_tokens_to_ids("<image0>")
        self.vocab = llm.get_input_embeddings().num_embeddings if hasattr(llm.get_input_embeddings(),
                                                                           "num_embeddings") else llm.config.vocab_size
        for p in self.vit.parameters():
            p.requires_grad_(False)
        for p in self.llm.parameters():
            p.requires_grad_(False)

    def image_block_ids(self) -> list[int]:
        return [self.image_open] + list(range(self.image_first, self.image_first + 32)) + [self.image_close]

    def embed(self, input_ids, latents):
        """Token embeddings, with <imageK> -> K-th latent and the two markers -> their own embeddings."""
        text = input_ids.clamp(max=self.vocab - 1)
        emb = self.llm.get_input_embeddings()(text)
        latents = latents.to(emb.dtype)
        k = input_ids - self.image_first
        is_latent = (k >= 0) & (k < latents.shape[1])
        if is_latent.any():
            b_idx, t_idx = is_latent.nonzero(as_tuple=True)
            emb = emb.index_put((b_idx, t_idx), latents[b_idx, k[b_idx, t_idx]])
        marker = self.markers(torch.arange(2, device=input_ids.device)).to(emb.dtype)
        for j, tok in enumerate((self.image_open, self.image_close)):
            mask = (input_ids == tok).unsqueeze(-1)
            emb = torch.where(mask, marker[j].expand_as(emb), emb)
        return emb

    def encode(self, volume):
        with torch.no_grad():
            visual = self.vit(volume)
        return visual, self.perceiver(visual)

    def forward(self, volume, input_ids, labels, disease_labels, attention_mask=None):
        visual, latents = self.encode(volume)
        embeds = self.embed(input_ids, latents)
        lm = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels).loss
        logits = self.disease(visual)
        contrastive = DiseaseHead.loss(logits, disease_labels)
        return {"loss": lm + self.contrastive_weight * contrastive, "lm_loss": lm, "contrastive_loss": contrastive,
                "disease_logits": logits}

    def predict_diseases(self, volume):
        visual, latents = self.encode(volume)
        return (self.disease(visual).argmax(-1)).long(), latents
