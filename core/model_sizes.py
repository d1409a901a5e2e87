"""Model sizes for the plan's memory estimate: config.json or a built-in preset, then the model built on the
meta device by its own builder (no weights, no memory), counted.

The plan needs the total, the largest single module and the activation shape before anything is submitted.
Reading config files stays torch-free (planners use it for layer counts); counting builds the model, which
imports torch, and runs only for specs with a `deepspeed:` section (their estimate imports DeepSpeed anyway).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# openPangu-Embedded-7B (V1.1 config.json, as mapped to LlamaForCausalLM; see ../shared/design/workloads.md)
PRESETS: dict[str, dict] = {
    "openpangu-7b": {
        "vocab_size": 153376, "hidden_size": 4096, "intermediate_size": 12800, "num_hidden_layers": 34,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False,
        "attention_bias": True, "mlp_bias": False,
    },
}


@dataclass(frozen=True)
class ModelSize:
    total: int            # parameters
    largest_module: int   # most parameters one module holds itself (what ZeRO-3 gathers at once)
    layers: int           # transformer blocks, hidden width, attention heads, vocabulary: the activation terms
    hidden: int
    heads: int
    vocab: int
    trainable: Optional[int] = None   # with a peft: section, what the adapters train (None: model.trainable)
    weight_bytes: Optional[float] = None  # bytes per frozen weight when the base is quantized (4bit 0.5, 8bit 1)
    param_names: tuple[str, ...] = ()     # what train.lr_groups may name: the adapters' parameters with a peft:
    #                                       section, else every parameter (the workload freezes its own parts later)
    chunk: Optional[int] = None   # samples one forward holds at once when the workload splits a micro-batch
    #                               (GigaPath's distill.tile_chunk): the one-layer working set of checkpointing


QUANTIZED_BYTES = {"4bit": 0.5, "8bit": 1.0}


def size_of(model, *, layers: int, hidden: int, heads: int, vocab: int, peft=None, head: tuple = ()) -> ModelSize:
    """Count a built model (the meta device is enough). The largest module is DeepSpeed's own definition in its
    ZeRO-3 estimator: the most parameters any single module holds directly (recurse=False). With a spec's
    `peft:` section the adapters are added (core.models.peft) and what they train is counted too."""
    trainable = None
    if peft is not None:
        from core.models.peft import apply_peft

        model = apply_peft(model, peft, head)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    weight_bytes = QUANTIZED_BYTES[peft.quantize] if peft is not None and peft.quantize else None
    names = tuple(n for n, p in model.named_parameters() if peft is None or p.requires_grad)
    return ModelSize(int(total), int(largest), layers, hidden, heads, vocab, trainable, weight_bytes, names)


def lr_group_of(name: str, patterns) -> Optional[str]:
    """The most specific train.lr_groups pattern that names a module above parameter `name` (whole path
    components: 'mm_projector' matches 'model.mm_projector.0.weight', not 'mm_projector2.weight')."""
    import re

    hits = [p for p in patterns if re.search(rf"(?:^|\.){re.escape(p)}\.", name)]
    return max(hits, key=len) if hits else None


def unused_lr_groups(patterns, names) -> list[str]:
    """The train.lr_groups patterns that name no module above any of `names`."""
    return [p for p in patterns if not any(lr_group_of(n, [p]) is not None for n in names)]


def model_config(path: Optional[str], preset: Optional[str]) -> Optional[dict]:
    """config.json of a local model folder, else a preset, else None."""
    from core.models.checkpoint_files import find_config

    cfg = find_config(path)
    if cfg is not None:
        return cfg
    if preset:
        return PRESETS[preset]
    return None
