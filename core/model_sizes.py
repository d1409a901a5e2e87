"""Parameter counts of decoder LLMs from their config.json alone (no torch, no weights).

The plan needs the total, the largest single module and the trainable count for its memory estimate before
anything is submitted, and the submit path must stay torch-free. tests/test_model_sizes.py checks these
counts against the real transformers model built on the meta device.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
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
    total: int
    largest_module: int
    per_layer: int
    layers: int
    hidden: int
    heads: int
    vocab: int


def count_decoder(cfg: dict) -> ModelSize:
    """Llama-family decoder: embeddings, L x (attention + gated MLP + 2 RMSNorms), final norm, LM head."""
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    inter = cfg["intermediate_size"]
    vocab = cfg["vocab_size"]
    layers = cfg["num_hidden_layers"]
    attn_bias = cfg.get("attention_bias", cfg.get("bias", False))
    mlp_bias = cfg.get("mlp_bias", False)
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    if attn_bias:  # q, k, v and o all carry a bias in transformers' Llama
        attn += heads * hd + 2 * kv * hd + h
    mlp = 3 * h * inter + (2 * inter + h if mlp_bias else 0)
    per_layer = attn + mlp + 2 * h
    embed = vocab * h
    tied = cfg.get("tie_word_embeddings", False)
    total = embed + layers * per_layer + h + (0 if tied else embed)
    return ModelSize(total, max(embed, per_layer), per_layer, layers, h, heads, vocab)


def model_config(path: Optional[str], preset: Optional[str]) -> Optional[dict]:
    """config.json of a local model folder, else a preset, else None."""
    if path:
        cfg_file = Path(path) / "config.json"
        if cfg_file.is_file():
            return json.loads(cfg_file.read_text())
    if preset:
        return PRESETS[preset]
    return None
