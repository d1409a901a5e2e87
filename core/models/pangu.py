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

from core.errors import ModelFolderError
from core.models import checkpoint_files


REPO = Path(__file__).resolve().parents[2]
TINY_CORPUS = REPO / "jobs" / "tiny" / "data" / "corpus.txt"
TINY_LAYERS = 4
HEAD = ("lm_head",)  # the output head: no adapter, never quantized

# PanguEmbedded config.json keys -> LlamaConfig keywords (the rest share names)
_RENAMED = {"bias": "attention_bias"}
_DROPPED = {"architectures", "auto_map", "model_type", "transformers_version", "torch_dtype"}


def llama_config(cfg: dict):
    """A LlamaConfig from an openPangu (or Llama) config.json dict."""
    from transformers import LlamaConfig

    kw = {_RENAMED.get(k, k): v for k, v in cfg.items() if k not in _DROPPED}
    kw.setdefault("mlp_bias", False)
    return LlamaConfig(**kw)


def read_config(folder) -> dict:
    return checkpoint_files.read_config(Path(folder), "model.path must be a local model folder (config.json + "
                                                     "*.safetensors + tokenizer.model)")


def load_pangu(folder, dtype=None, device: Optional[str] = None, quantization_config=None, **kwargs):
    """LlamaForCausalLM with the folder's weights (bf16 by default). Under an active HfDeepSpeedConfig with
    ZeRO-3, transformers builds it inside deepspeed.zero.Init, so each rank only ever holds its shard. With a
    BitsAndBytesConfig (QLoRA) the linear layers are packed in 4/8 bit as they are placed on `device` (default
    cpu); the other tensors (embeddings, norms, biases, the head) stay in `dtype`."""
    import torch
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    config = llama_config(read_config(folder))
    if not any(folder.glob("*.safetensors")):
        raise ModelFolderError(f"{folder}: no *.safetensors weights")
    if quantization_config is not None:
        from core.models.peft import quantized_load_kwargs

        kwargs.update(quantization_config=quantization_config, **quantized_load_kwargs(device or "cpu"))
        device = None  # placed (and packed) by from_pretrained
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


def decoder_size(spec):
    """The default builder for the plan's estimate: the decoder LLM of model.path / model.preset, built on the
    meta device (meta_size, with the spec's adapters); None when neither names one. With peft.quantize the frozen
    weights count at the bytes they are loaded in (quantized_size)."""
    from core.model_sizes import model_config

    cfg = model_config(spec.model.path, spec.model.preset)
    if cfg is None:
        return None
    size = meta_size(cfg, peft=spec.peft)
    if spec.peft is not None and spec.peft.quantize:
        import torch
        from transformers import LlamaForCausalLM

        from core.models.peft import frozen_size, quantized_numel

        with torch.device("meta"):
            quantized = quantized_numel(LlamaForCausalLM(llama_config(cfg)), spec.peft, HEAD)
        size = frozen_size(size, quantized, spec.peft, spec.deepspeed.precision if spec.deepspeed else "bf16")
    return size


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


TINY_FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json")


def write_tiny_pangu(folder, layers: int = TINY_LAYERS, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                     intermediate: int = 128, seed: int = 0) -> Path:
    """Write a tiny openPangu-shaped model folder (config.json, model.safetensors with inv_freq buffers as the
    real shards carry, tokenizer.model). Idempotent: an existing complete folder is left alone. Safe under
    concurrent callers (the jobs of a study that start at once, on any node): the folder is built in a private
    temporary folder beside it and renamed into place (core.run_folder.build_folder); the first one wins."""
    from core.run_folder import build_folder

    return build_folder(Path(folder), lambda tmp: _build_tiny_pangu(tmp, layers, hidden, heads, kv_heads,
                                                                    intermediate, seed),
                        lambda f: all((f / n).is_file() for n in TINY_FILES))


def _build_tiny_pangu(folder: Path, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int,
                      seed: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

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
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}, indent=2))


# ---------------------------------------------------------------- reading only part of a model
def _header_bytes(path: Path) -> int:
    """Bytes of a safetensors file's header (8-byte length + JSON), what safe_open reads before any tensor."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def weight_map(folder) -> dict[str, str]:
    """Tensor name -> shard file name: from model.safetensors.index.json, else from the shards' own headers."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ModelFolderError(f"{folder}: no *.safetensors weights")
    out = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as st:
            out.update({k: shard.name for k in st.keys()})
    return out


def read_tensors(folder, names, dtype=None, stats: Optional[dict] = None) -> dict:
    """Just the named tensors from the folder's shards (safe_open: each shard's header, then only those tensors);
    `stats` gets bytes_read (headers + tensors) and bytes_total (all shards)."""
    from safetensors import safe_open

    folder = Path(folder)
    wmap = weight_map(folder)
    by_shard: dict[str, list[str]] = {}
    for name in names:
        if name not in wmap:
            raise ModelFolderError(f"{folder}: no tensor {name!r} in the safetensors shards")
        by_shard.setdefault(wmap[name], []).append(name)
    out, read = {}, 0
    for shard, keys in sorted(by_shard.items()):
        read += _header_bytes(folder / shard)
        with safe_open(str(folder / shard), "pt") as st:
            for k in keys:
                t = st.get_tensor(k)
                read += t.numel() * t.element_size()
                out[k] = t.to(dtype) if dtype is not None else t
    if stats is not None:
        stats["bytes_read"] = stats.get("bytes_read", 0) + read
        stats["bytes_total"] = sum((folder / f).stat().st_size for f in set(wmap.values()))
    return out


def load_pangu_tail(folder, start: int, dtype=None, device=None, attn_implementation: str = "sdpa",
                    stats: Optional[dict] = None):
    """Decoder layers start..L-1, the final norm and the LM head of the folder's model, and nothing else (no
    embedding, no earlier layer): only those tensors are read from the shards. The layers are the same
    transformers modules (LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding) that `load_pangu` builds, with
    the same weights in the same dtype, so what they compute is bit-identical. `layer(l)` takes the original
    layer index."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    folder = Path(folder)
    dtype = dtype or torch.bfloat16
    config = llama_config(read_config(folder))
    config._attn_implementation = attn_implementation
    total = config.num_hidden_layers
    if not 0 <= start < total:
        raise ValueError(f"start layer {start} outside 0..{total - 1}")
    wmap = weight_map(folder)
    names = [k for k in wmap if k.startswith("model.layers.") and int(k.split(".")[2]) >= start
             and not k.endswith("rotary_emb.inv_freq")]
    head = "lm_head.weight" if "lm_head.weight" in wmap else "model.embed_tokens.weight"  # tied embeddings
    tensors = read_tensors(folder, names + ["model.norm.weight", head], dtype=dtype, stats=stats)

    class PanguTail(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.first_layer, self.num_layers = config, start, total
            with torch.device("meta"):
                self.layers = torch.nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(start, total))
                self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
                self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.rotary_emb = LlamaRotaryEmbedding(config=config)

        def layer(self, index: int):
            if index < self.first_layer:
                raise IndexError(f"layer {index} was not loaded (this model holds layers {self.first_layer}.."
                                 f"{self.num_layers - 1})")
            return self.layers[index - self.first_layer]

    model = PanguTail()
    state = {f"layers.{int(k.split('.')[2]) - start}.{k.split('.', 3)[3]}": v for k, v in tensors.items()
             if k.startswith("model.layers.")}
    state["norm.weight"] = tensors["model.norm.weight"]
    state["lm_head.weight"] = tensors[head]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith("rotary_emb.")]
    if missing or unexpected:
        raise ModelFolderError(f"{folder}: tensors missing {missing} / unexpected {unexpected} for layers {start}..")
    return model.to(device).eval() if device is not None else model.eval()
