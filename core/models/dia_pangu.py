"""Dia-Pangu: CT volume -> frozen 3D ViT -> trainable Perceiver resampler -> `fc` -> 32 vision tokens inside the
prompt of a frozen openPangu; plus Dia-LLaMA's disease-prototype contrastive head.

The vision side is Dia-LLaMA's `MyEmbedding` (zhi-xuan-chen/Dia-LLaMA `src/Model/DiaLLaMA/my_embedding_layer.py`)
tensor for tensor, so the released checkpoint loads whole (`load_dia_llama`; names and shapes in
../shared/data/dia-llama/embedding_layer_keys.tsv):

| Dia-LLaMA (`embedding_layer.` + ...) | here                 |                                                    |
| `vision_encoder.*`                   | `vit.*`              | RadFM's 3D ViT (core.models.vit3d), frozen         |
| `perceiver.*`                        | `perceiver.*`        | core.models.perceiver, trained                     |
| `fc.*`                               | `fc.*`               | Linear(768, 4096 = openPangu's hidden size), trained |
| `figure_token_weight`                | `markers.weight`     | the `<image>` / `</image>` embeddings (2 x 4096), trained |
| `prototype`, `proj.*`, `pos_sample_memory`, `neg_sample_memory`, `temp`, `group_cls_head.*` | `disease.*` | the diagnostic head: frozen from the checkpoint by default (`dia.train_head`) |
| `weight`                             | (not used)           | LLaMA-2's 32000 x 4096 vocabulary: openPangu keeps its own |

Prompt layout: `<image><image0>..<image31></image>`, one diagnostic sentence per disease (`The "<disease>" is
positive. ` / `... negative. `), Dia-LLaMA's instruction, then the report. The embedding at `<imageK>` is the K-th
projected latent; labels are -100 everywhere but on the report.

Disease head (Dia-LLaMA's): softmax prototypes (14 x visual tokens) pool the ViT tokens into one feature per disease,
`proj` Linear(768, 768), cosine similarity to the disease's positive and negative memory, divided by the learned
temperature `temp` (init 0.07); total loss = LM loss + 4 x cross-entropy of [matching, opposite] memory. At inference
a disease is positive when its pooled feature is closer to the positive memory: the same path as in training
(Dia-LLaMA's own `cls` mode scores disease i from visual token i instead). `group_cls_head` (14 x Linear(768, 2)) is
in the checkpoint and loaded, but Dia-LLaMA never uses its logits, and neither does this model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from core.data.ctrg import CONDITIONS, GUIDE, diagnosis_text  # noqa: F401 (the prompt's pieces, re-exported)
from core.models.perceiver import PerceiverConfig, PerceiverResampler
from core.models.vit3d import ViT3D, ViT3DConfig

IMAGE_TOKENS = ["<image>", "</image>"] + [f"<image{i}>" for i in range(32)]


def vision_configs(size: str) -> tuple[ViT3DConfig, PerceiverConfig]:
    """The 3D ViT and perceiver shapes of `dia.size`: the full-size ones, or the tiny twins for CPU tests."""
    from core.models.perceiver import TINY_PERCEIVER
    from core.models.vit3d import TINY_VIT

    return (TINY_VIT, TINY_PERCEIVER) if size == "tiny" else (ViT3DConfig(), PerceiverConfig())


class DiseaseHead(nn.Module):
    """Dia-LLaMA's diagnostic head, its tensors named as in the checkpoint (without `embedding_layer.`)."""

    def __init__(self, n_tokens: int, dim: int, n_diseases: int = len(CONDITIONS), memory_dim: int | None = None):
        super().__init__()
        memory_dim = memory_dim or dim
        # N(0, 0.02) (Dia-LLaMA: randn, then its checkpoint): a head trained from scratch starts from near-uniform
        # pooling, which learns the disease regions more reliably than randn's peaked softmax
        self.prototype = nn.Parameter(torch.randn(n_diseases, n_tokens) * 0.02)
        self.group_cls_head = nn.ModuleList(nn.Linear(dim, 2) for _ in range(n_diseases))  # loaded, never used
        self.proj = nn.Linear(dim, memory_dim)
        self.pos_sample_memory = nn.Parameter(torch.randn(n_diseases, 1, memory_dim))
        self.neg_sample_memory = nn.Parameter(torch.randn(n_diseases, 1, memory_dim))
        # Dia-LLaMA's `temp` is 0-d; here 1-d (ZeRO-3 cannot partition a 0-d tensor): the loader reshapes it
        self.temp = nn.Parameter(torch.full((1,), 0.07))

    def forward(self, visual):
        """visual (B, N, dim) -> logits (B, diseases, 2) as [negative, positive]."""
        weights = torch.softmax(self.prototype.float(), dim=-1).to(visual.dtype)
        feats = nn.functional.normalize(self.proj(torch.einsum("kn,bnd->bkd", weights, visual)), dim=-1)
        pos = (feats * nn.functional.normalize(self.pos_sample_memory[:, 0], dim=-1)).sum(-1)
        neg = (feats * nn.functional.normalize(self.neg_sample_memory[:, 0], dim=-1)).sum(-1)
        # clamped (as CLIP clamps its logit scale): a head trained here from scratch otherwise drives the
        # temperature to 0 and the contrastive loss explodes; the argmax (the calls) does not depend on it
        return torch.stack([neg, pos], dim=-1) / self.temp.clamp(min=0.01)

    @staticmethod
    def loss(logits, labels):
        """Cross-entropy of [negative, positive] against the 0/1 labels: Dia-LLaMA's cross-entropy of
        [matching memory, opposite memory] with target 0."""
        return nn.functional.cross_entropy(logits.reshape(-1, 2).float(), labels.reshape(-1).long())


class DiaPangu(nn.Module):
    def __init__(self, llm, tokenizer, vit_cfg: ViT3DConfig, perceiver_cfg: PerceiverConfig,
                 contrastive_weight: float = 4.0, train_head: bool = True):
        """`tokenizer` None builds the model without touching a tokenizer (meta-device counting)."""
        super().__init__()
        self.llm = llm
        self.vit = ViT3D(vit_cfg)
        hidden = llm.config.hidden_size
        self.perceiver = PerceiverResampler(perceiver_cfg)
        self.fc = nn.Linear(perceiver_cfg.dim, hidden)
        self.disease = DiseaseHead(vit_cfg.tokens, vit_cfg.dim)
        self.markers = nn.Embedding(2, hidden)  # <image>, </image> (a module, so ZeRO-3 gathers it when called)
        nn.init.normal_(self.markers.weight, std=0.02)
        self.contrastive_weight = contrastive_weight
        self.image_open = self.image_close = self.image_first = -1
        if tokenizer is not None:
            tokenizer.add_tokens(IMAGE_TOKENS, special_tokens=True)
            self.image_open, self.image_close = (tokenizer.convert_tokens_to_ids(t) for t in IMAGE_TOKENS[:2])
            self.image_first = tokenizer.convert_tokens_to_ids("<image0>")
        emb = llm.get_input_embeddings()
        self.vocab = emb.num_embeddings if hasattr(emb, "num_embeddings") else llm.config.vocab_size
        for p in [*self.vit.parameters(), *self.llm.parameters(), *self.disease.group_cls_head.parameters()]:
            p.requires_grad_(False)
        self.set_head_trainable(train_head)

    def set_head_trainable(self, train: bool) -> None:
        for name, p in self.disease.named_parameters():
            if not name.startswith("group_cls_head."):
                p.requires_grad_(train)

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
        """(visual tokens of the frozen ViT, the 32 projected latents)."""
        with torch.no_grad():
            visual = self.vit(volume)
        return visual, self.fc(self.perceiver(visual))

    def forward(self, volume, input_ids, labels, disease_labels, attention_mask=None):
        visual, latents = self.encode(volume)
        embeds = self.embed(input_ids, latents)
        lm = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False).loss
        logits = self.disease(visual)
        contrastive = DiseaseHead.loss(logits, disease_labels)
        # with the head frozen (and the ViT frozen) the contrastive term has no trainable input: the same loss
        # value as the lab's, no gradient from it
        return {"loss": lm + self.contrastive_weight * contrastive, "lm_loss": lm, "contrastive_loss": contrastive,
                "disease_logits": logits}

    def predict_diseases(self, volume):
        visual, latents = self.encode(volume)
        return (self.disease(visual).argmax(-1)).long(), latents


# ---------------------------------------------------------------- Dia-LLaMA's checkpoint
PREFIX = "embedding_layer."
UNUSED = {  # checkpoint key (or prefix ending in '.') -> why it is not loaded
    "embedding_layer.weight": "LLaMA-2's 32000 x 4096 input embeddings (the same tensor as lang_model's "
                              "embed_tokens): openPangu keeps its own vocabulary and embeddings",
    "lang_model.": "LLaMA-2-7B-chat and its LoRA adapters: Dia-Pangu's LLM is openPangu",
}


class DiaCheckpointError(ValueError):
    pass


def dia_llama_name(ours: str) -> str | None:
    """The Dia-LLaMA checkpoint key of one of our vision-side tensors (None for the LLM's)."""
    if ours.startswith("vit."):
        return PREFIX + "vision_encoder." + ours[len("vit."):]
    if ours.startswith(("perceiver.", "fc.")):
        return PREFIX + ours
    if ours == "markers.weight":
        return PREFIX + "figure_token_weight"
    if ours.startswith("disease."):
        return PREFIX + ours[len("disease."):]
    return None


def vision_state(model: DiaPangu) -> dict[str, torch.Tensor]:
    """Our vision-side parameters by name (everything but the LLM)."""
    return {n: p for n, p in model.named_parameters() if dia_llama_name(n) is not None}


def to_dia_llama(model: DiaPangu) -> dict[str, torch.Tensor]:
    """Our vision side under Dia-LLaMA's names and shapes (the inverse of load_dia_llama, for tests)."""
    out = {}
    for name, p in vision_state(model).items():
        key = dia_llama_name(name)
        out[key] = p.detach().clone().reshape(()) if key == PREFIX + "temp" else p.detach().clone()
    return out


def _unused_reason(key: str) -> str | None:
    for k, why in UNUSED.items():
        if key == k or (k.endswith(".") and key.startswith(k)):
            return why
    return None


class _Tensors:
    """Names, shapes and tensors of a checkpoint: a .safetensors file, a torch file (pytorch_model.bin, .pt, .pth;
    memory-mapped, weights only), or a folder holding one of them or a sharded *.index.json."""

    def __init__(self, path):
        self.path = Path(path)
        self.where: dict[str, Path] = {}
        self._torch: dict[Path, dict] = {}
        files = self._files(self.path)
        for f in files:
            for k in self._keys(f):
                self.where[k] = f

    @staticmethod
    def _files(path: Path) -> list[Path]:
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise DiaCheckpointError(f"{path}: Dia-LLaMA checkpoint not found (dia.init_from)")
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return [path / name]
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index).is_file():
                shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
                return [path / s for s in shards]
        raise DiaCheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or *.index.json in this folder")

    def _state(self, f: Path) -> dict:
        if f not in self._torch:
            try:
                state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # not a zip-format file: no memory map
                state = torch.load(str(f), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
                # a wrapper ({"module": ...} of DeepSpeed, {"model": ...}, {"state_dict": ...})
                state = next((state[w] for w in ("module", "model", "state_dict") if isinstance(state.get(w), dict)),
                             state)
            if not isinstance(state, dict):
                raise DiaCheckpointError(f"{f}: not a state dict")
            self._torch[f] = state
        return self._torch[f]

    def _keys(self, f: Path) -> list[str]:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                return list(sf.keys())
        return [k for k, v in self._state(f).items() if isinstance(v, torch.Tensor)]

    def shape(self, key: str) -> tuple:
        f = self.where[key]
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                return tuple(sf.get_slice(key).get_shape())
        return tuple(self._state(f)[key].shape)

    def get(self, key: str) -> torch.Tensor:
        f = self.where[key]
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                return sf.get_tensor(key)
        return self._state(f)[key]


def load_dia_llama(model: DiaPangu, path) -> dict:
    """Load every vision-side tensor of a Dia-LLaMA checkpoint into `model`, strictly: each of our vision tensors
    must be in the checkpoint with its shape (Dia-LLaMA's 0-d `temp` into our 1-element one), and each checkpoint key
    is either loaded or one of the deliberately unused ones (UNUSED); anything else raises DiaCheckpointError naming
    the keys, and nothing is loaded. Returns the report: loaded (key, into, shape, dtype), unused (key or prefix,
    count, why)."""
    src = _Tensors(path)
    ours = vision_state(model)
    wanted = {dia_llama_name(n): n for n in ours}
    missing, misshaped, unknown = [], [], []
    unused: dict[str, dict] = {}
    for key in src.where:
        if key in wanted:
            continue
        why = _unused_reason(key)
        if why is None:
            unknown.append(key)
            continue
        group = key if key in UNUSED else next(k for k in UNUSED if k.endswith(".") and key.startswith(k))
        entry = unused.setdefault(group, {"key": group + ("*" if group.endswith(".") else ""), "count": 0,
                                          "why": why, "shape": None})
        entry["count"] += 1
        if group == key:
            entry["shape"] = list(src.shape(key))
    for key, name in wanted.items():
        if key not in src.where:
            missing.append(key)
            continue
        have, need = src.shape(key), tuple(ours[name].shape)
        if have != need and not (have == () and need == (1,)):
            misshaped.append(f"{key} {list(have)} (ours: {name} {list(need)})")
    problems = []
    for what, keys in (("missing", missing), ("of the wrong shape", misshaped), ("not known", unknown)):
        if keys:
            problems.append(f"{len(keys)} key(s) {what}: {', '.join(keys[:8])}" + (" ..." if len(keys) > 8 else ""))
    if problems:
        raise DiaCheckpointError(f"{path}: not a Dia-LLaMA checkpoint this model can load whole: " + "; ".join(problems))
    loaded = []
    with torch.no_grad():
        for key, name in wanted.items():
            value = src.get(key)
            target = ours[name]
            target.copy_(value.reshape(target.shape).to(target.dtype))
            loaded.append({"key": key, "into": name, "shape": list(value.shape), "dtype": str(value.dtype)})
    return {"path": str(path), "loaded": loaded, "unused": list(unused.values()),
            "counts": {"loaded": len(loaded), "unused": sum(u["count"] for u in unused.values())}}
