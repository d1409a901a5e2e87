"""openPangu-Embedded as transformers' LlamaForCausalLM, loaded from a local folder; and a tiny twin.

openPangu-Embedded-7B ships `config.json` (model_type PanguEmbedded, `bias: true`), safetensors shards (with
per-layer `rotary_emb.inv_freq` buffers, ignored on load) and a SentencePiece `tokenizer.model`. Structurally it
is Llama with a bias on q, k, v and o and none in the MLP, so it loads as `LlamaForCausalLM` with no renaming
and no remote code. The tokenizer is loaded with transformers' SentencePieceBackend so that its ids are
SentencePiece's own (transformers 5 has no slow LlamaTokenizer and its fast conversion changes the ids).
`write_tiny_pangu` writes a folder with the same files and keys, random weights and a small SentencePiece model
trained on `jobs/tiny/data/corpus.txt`: tests and jobs/tiny use it; nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from core.run_folder import atomic_path

REPO = Path(__file__).resolve().parents[2]
TINY_CORPUS = REPO / "jobs" / "tiny" / "data" / "corpus.txt"
TINY_LAYERS = 4

# PanguEmbedded config.json keys -> LlamaConfig keywords (the rest share names)
_RENAMED = {"bias": "attention_bias"}
_DROPPED = {"architectures", "auto_map", "model_type", "transformers_version", "torch_dtype"}


class ModelFolderError(ValueError):
    pass


def llama_config(cfg: dict):
    """A LlamaConfig from an openPangu (or Llama) config.json dict."""
    from transformers import LlamaConfig

    kw = {_RENAMED.get(k, k): v for k, v in cfg.items() if k not in _DROPPED}
    kw.setdefault("mlp_bias", False)
    return LlamaConfig(**kw)


def read_config(folder) -> dict:
    folder = Path(folder)
    f = folder / "config.json"
    if not f.is_file():
        raise ModelFolderError(f"{folder}: no config.json; model.path must be a local model folder "
                               f"(config.json + *.safetensors + tokenizer.model)")
    return json.loads(f.read_text())


def load_pangu(folder, dtype=None, device: Optional[str] = None, **kwargs):
    """LlamaForCausalLM with the folder's weights (bf16 by default). Under an active HfDeepSpeedConfig with
    ZeRO-3, transformers builds it inside deepspeed.zero.Init, so each rank only ever holds its shard."""
    import torch
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    config = llama_config(read_config(folder))
    if not any(folder.glob("*.safetensors")):
        raise ModelFolderError(f"{folder}: no *.safetensors weights")
    model = LlamaForCausalLM.from_pretrained(folder, config=config, dtype=dtype or torch.bfloat16,
                                             use_safetensors=True, **kwargs)
    return model.to(device) if device else model


def load_tokenizer(folder):
    """SentencePiece tokenizer whose ids equal SentencePiece's own; special ids from config.json."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    folder = Path(folder)
    sp_file = folder / "tokenizer.model"
    if not sp_file.is_file():
        raise ModelFolderError(f"{folder}: no tokenizer.model (SentencePiece)")
    cfg = read_config(folder)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    names = {}
    for key in ("bos", "eos", "pad", "unk"):
        tid = cfg.get(f"{key}_token_id")
        if tid is None and key == "unk":
            tid = sp.unk_id()
        if tid is not None and 0 <= tid < sp.GetPieceSize():
            names[f"{key}_token"] = sp.IdToPiece(tid)
    tok = SentencePieceBackend(vocab_file=str(sp_file), **names)
    return tok


def model_folder(spec) -> Path:
    """The spec's local model folder; with `model.make_tiny` the tiny twin is written there first (idempotent,
    always the same weights, whichever workload writes it)."""
    if not spec.model.path:
        raise ModelFolderError("model.path: give the local model folder (config.json, *.safetensors, tokenizer.model)")
    folder = Path(spec.model.path)
    if spec.model.make_tiny:
        write_tiny_pangu(folder)
    return folder


def meta_size(cfg: dict, peft=None):
    """core.model_sizes.ModelSize of the LlamaForCausalLM this config builds (with the spec's adapters), counted
    on the meta device."""
    import torch
    from transformers import LlamaForCausalLM

    from core.model_sizes import size_of

    config = llama_config(cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return size_of(model, layers=config.num_hidden_layers, hidden=config.hidden_size,
                   heads=config.num_attention_heads, vocab=config.vocab_size, peft=peft)


def bos_encode(tokenizer, text: str) -> list[int]:
    """BOS + the text's tokens (no other special tokens): how every openPangu prompt starts."""
    return [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)


def train_tiny_tokenizer(out_file: Path, vocab_size: int = 1000, corpus: Path = TINY_CORPUS) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_file.with_suffix("")), vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, pad_id=0, bos_id=1, eos_id=2,
        unk_id=3, minloglevel=2, num_threads=1)


def tiny_config(vocab_size: int, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128) -> dict:
    """A PanguEmbedded config.json with the real keys and tiny sizes."""
    return {
        "architectures": ["PanguEmbeddedForCausalLM"], "model_type": "PanguEmbedded", "bias": True,
        "attention_dropout": 0.0, "bos_token_id": 1, "pad_token_id": 0, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": intermediate,
        "max_position_embeddings": 512, "num_attention_heads": heads, "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5, "rope_theta": 16000000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": vocab_size,
    }


def write_tiny_pangu(folder, layers: int = TINY_LAYERS, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                     intermediate: int = 128, seed: int = 0) -> Path:
    """Write a tiny openPangu-shaped model folder (config.json, model.safetensors with inv_freq buffers as the
    real shards carry, tokenizer.model). Idempotent: an existing complete folder is left alone."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    train_tiny_tokenizer(folder / "tokenizer.model")
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).GetPieceSize()
    cfg = tiny_config(vocab, layers, hidden, heads, kv_heads, intermediate)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(cfg)).to(torch.bfloat16)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    head_dim = hidden // heads
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    for i in range(layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}, indent=2))
    return folder
