"""InternVL-family chat models (InternViT + MLP projector + Qwen2 LLM) for the ViTP lung workload, on transformers'
native `InternVLForConditionalGeneration`, loaded from a local folder in OpenGVLab's ORIGINAL layout (remote-code
checkpoints such as InternVL2_5-1B or a ViTP checkpoint: `vision_model.*`, `mlp1.*`, `language_model.*`).

- `native_config(original)`: the original `config.json` (InternVLChatConfig: `vision_config`, `llm_config`,
  `downsample_ratio`, ...) as transformers' InternVLConfig, field by field as transformers' own conversion script
  (models/internvl/convert_internvl_weights_to_hf.py, `get_internvl_config`) does it: qkv_bias -> attention_bias,
  qk_normalization -> use_qk_norm, attention_probs_dropout_prob -> attention / projection dropout.
- `original_to_native(name)`: the same script's key renaming (vision_model -> model.vision_tower, layers -> layer,
  class_embedding -> cls_token, ..., mlp1.0/1/3 -> model.multi_modal_projector.layer_norm/linear_1/linear_2,
  language_model.model -> model.language_model, language_model.lm_head -> lm_head); the fused `attn.qkv` of
  InternViT is split into q_proj / k_proj / v_proj (rows [0:d], [d:2d], [2d:3d]) as the script does.
- `load_original(model, folder)`: strict accounting (as `dia.init_from` does for Dia-LLaMA): every tensor of the
  model must come from the checkpoint with its exact shape, else `InternVLCheckpointError` naming the tensor (the
  original and the native name) and the file, before training; checkpoint tensors the model has no place for are
  reported by name (`unused`), and only the known non-parameters are allowed among them.
- `write_tiny(folder)`: a tiny random twin of the same classes, saved in the ORIGINAL layout (config.json as
  InternVLChatConfig, model.safetensors with `vision_model.* / mlp1.* / language_model.*` names, fused qkv) with a
  tiny word-level tokenizer (tokenizer.json + tokenizer_config.json with the special tokens and a chat template),
  so that tests and jobs/tiny exercise the real loader and tokenizer path.
- `INTERNVL2_5_1B`: OpenGVLab/InternVL2_5-1B's published config.json (the fields that shape the model), for the
  plan's parameter count on the meta device (`build(native_config(INTERNVL2_5_1B), meta=True)`).

Importing this module imports no torch (the planner reads the constants).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

from core.errors import FieldError

log = logging.getLogger("vitp_lung")

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# The internvl2_5 conversation template's system message (InternVL / ViTP internvl/conversation.py), used by the
# lab's training (preprocess_internvl2_5) for every sample
SYSTEM_MESSAGE = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言"
                  "模型。")

# OpenGVLab/InternVL2_5-1B config.json (InternVLChatConfig, as published on the Hugging Face Hub with the model,
# template internvl2_5): InternViT-300M-448px + Qwen2.5-0.5B-Instruct. Checked against the printed module tree and
# config of the same towers (InternVL3-1B-Pretrained, repository shivangjhalani/multicoco, InternVL3-1B_data.md:
# vision 24 x 1024, 16 heads, qkv 1024 -> 3072 with bias, mlp1 LayerNorm(4096) + Linear(4096, 896) + GELU +
# Linear(896, 896); llm_config hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151674,
# tie_word_embeddings false, lm_head Linear(896, 151674)) and transformers' conversion script (image token 151667).
# With the untied lm_head this is the model card's 938M: InternViT-300M 304,012,288 + mlp1 4,482,816 + the Qwen2 LLM
# at vocab 151674 629,697,920 (Qwen2.5-0.5B's 494,032,768 at vocab 151936, less 262 x 896, plus the 896 x 151674
# lm_head).
INTERNVL2_5_1B: dict = {
    "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internvl2_5",
    "downsample_ratio": 0.5, "force_image_size": 448, "ps_version": "v2", "select_layer": -1,
    "dynamic_image_size": True, "use_thumbnail": True, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
    "tie_word_embeddings": False,
    "vision_config": {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 1024,
        "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "num_channels": 3,
        "image_size": 448, "patch_size": 14, "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6, "hidden_act": "gelu", "initializer_factor": 0.1, "attention_dropout": 0.0,
        "dropout": 0.0, "drop_path_rate": 0.1,
    },
    "llm_config": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151674,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
    },
}
INTERNVL2_5_1B_PARAMS = 938_193_024   # counted on the meta device (tests/test_vitp_lung.py pins it)

# the tiny twin: the same classes at toy sizes (32 px tiles, patch 4 -> 64 patches -> 16 tokens after pixel shuffle;
# width 64: at width 32 / patch 8 the <cls> task of the synthetic data was learnt too slowly for a short test run)
TINY_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT]
TINY_WORDS = ["system", "user", "assistant", "\n", " ", "<", ">", ":", "|", ".", "cls", "image", *"0123456789",
              "InternVL", "，", "。"]
TINY: dict = {
    **{k: v for k, v in INTERNVL2_5_1B.items() if k not in ("vision_config", "llm_config")},
    "force_image_size": 32,
    "vision_config": {**INTERNVL2_5_1B["vision_config"], "hidden_size": 64, "intermediate_size": 128,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 4,
                      "drop_path_rate": 0.0},
    "llm_config": {**INTERNVL2_5_1B["llm_config"], "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "vocab_size": 1 + len(TINY_SPECIAL) + len(TINY_WORDS), "max_position_embeddings": 512,
                   "bos_token_id": 1, "eos_token_id": 3},
}
WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# checkpoint entries that are buffers of the original code, not parameters (reported as unused, never refused)
KNOWN_UNUSED = (re.compile(r"^language_model\.model\.rotary_emb\.inv_freq$"),
                re.compile(r".*\.rotary_emb\.inv_freq$"))


class InternVLCheckpointError(FieldError):
    """A local InternVL checkpoint that does not fit the model: names the tensor and the file."""

    def __init__(self, message: str):
        super().__init__("model.path", message)


# ---------------------------------------------------------------- configs
def read_original_config(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise InternVLCheckpointError(f"{path}: not found (an InternVL model folder has config.json, the weights "
                                      f"and the tokenizer)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InternVLCheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "vision_config" not in cfg or "llm_config" not in cfg:
        raise InternVLCheckpointError(f"{path}: not an InternVL chat config (needs vision_config and llm_config, as "
                                      f"OpenGVLab's InternVLChatConfig)")
    return cfg


def tokens_per_tile(cfg: dict) -> int:
    v = cfg["vision_config"]
    size = cfg.get("force_image_size") or v["image_size"]
    return int((size // v["patch_size"]) ** 2 * cfg.get("downsample_ratio", 0.5) ** 2)


def native_config(cfg: dict, image_token_id: Optional[int] = None):
    """transformers.InternVLConfig of an original InternVLChatConfig dict."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    drop = {"architectures", "model_type", "auto_map", "_name_or_path", "use_flash_attn", "use_bfloat16",
            "torch_dtype", "drop_path_rate", "initializer_factor", "dropout"}
    v = {k: val for k, val in cfg["vision_config"].items() if k not in drop}
    if "qkv_bias" in v:
        v["attention_bias"] = v.pop("qkv_bias")
    if "qk_normalization" in v:
        v["use_qk_norm"] = v.pop("qk_normalization")
    if "attention_probs_dropout_prob" in v:
        v["attention_dropout"] = v["projection_dropout"] = v.pop("attention_probs_dropout_prob")
    v["use_absolute_position_embeddings"] = True
    v["use_mean_pooling"] = True                  # InternViT has no final norm: the native model's is Identity then
    size = cfg.get("force_image_size") or v.get("image_size", 448)
    v["image_size"], v["patch_size"] = [size, size], [v["patch_size"]] * 2
    v["layer_scale_init_value"] = cfg["vision_config"].get("initializer_factor", 0.1)
    llm = {k: val for k, val in cfg["llm_config"].items() if k not in drop}
    if cfg["llm_config"].get("architectures", ["Qwen2ForCausalLM"])[0] != "Qwen2ForCausalLM":
        raise InternVLCheckpointError(f"llm_config.architectures {cfg['llm_config']['architectures']}: only the "
                                      f"Qwen2 LLM of InternVL2.5-1B/4B/38B/78B is mapped here")
    tie = bool(llm.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))
    llm["tie_word_embeddings"] = tie
    return InternVLConfig(vision_config=InternVLVisionConfig(**v), text_config=Qwen2Config(**llm),
                          image_token_id=151667 if image_token_id is None else image_token_id,
                          image_seq_length=tokens_per_tile(cfg), downsample_ratio=cfg.get("downsample_ratio", 0.5),
                          vision_feature_layer=cfg.get("select_layer", -1), tie_word_embeddings=tie)


def build(config, meta: bool = False):
    """InternVLForConditionalGeneration of a native config (fp32; on the meta device when `meta`)."""
    import torch
    from contextlib import nullcontext

    from transformers import InternVLForConditionalGeneration

    with torch.device("meta") if meta else nullcontext():
        return InternVLForConditionalGeneration(config)


# ---------------------------------------------------------------- original <-> native names
_VISION = [(r"^vision_model\.", "model.vision_tower."), (r"\.layers\.", ".layer."),
           (r"class_embedding", "cls_token"), (r"position_embedding", "position_embeddings"),
           (r"patch_embedding", "patch_embeddings.projection"), (r"\.ls(\d+)$", r".lambda_\1"),
           (r"\.attn\.proj\.", ".attention.projection_layer."), (r"\.attn\.", ".attention."),
           (r"\.norm1\.", ".layernorm_before."), (r"\.norm2\.", ".layernorm_after.")]
_MULTI = {"mlp1.0.": "model.multi_modal_projector.layer_norm.", "mlp1.1.": "model.multi_modal_projector.linear_1.",
          "mlp1.3.": "model.multi_modal_projector.linear_2."}


def original_to_native(name: str) -> Optional[str]:
    """The native parameter name of an original InternVL tensor name (None: not one of the model's)."""
    if name.startswith("vision_model."):
        for pat, rep in _VISION:
            name = re.sub(pat, rep, name)
        return name
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    if name.startswith("language_model.lm_head."):
        return "lm_head." + name[len("language_model.lm_head."):]
    for old, new in _MULTI.items():
        if name.startswith(old):
            return new + name[len(old):]
    return None


def native_to_original(name: str) -> str:
    """Inverse of original_to_native for the model's parameters (q/k/v_proj map onto the fused attn.qkv)."""
    if name.startswith("model.vision_tower."):
        name = "vision_model." + name[len("model.vision_tower."):]
        for new, old in ((".layer.", ".layers."), ("cls_token", "class_embedding"),
                         ("position_embeddings", "position_embedding"),
                         ("patch_embeddings.projection", "patch_embedding"),
                         (".attention.projection_layer.", ".attn.proj."), (".attention.", ".attn."),
                         (".layernorm_before.", ".norm1."), (".layernorm_after.", ".norm2.")):
            name = name.replace(new, old)
        name = re.sub(r"\.lambda_(\d+)$", r".ls\1", name)
        return re.sub(r"\.attn\.[qkv]_proj\.", ".attn.qkv.", name)
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    if name.startswith("lm_head."):
        return "language_model.lm_head." + name[len("lm_head."):]
    for old, new in _MULTI.items():
        if name.startswith(new):
            return old + name[len(new):]
    return name


def to_original_state(model) -> dict:
    """The model's tensors under the original names, q/k/v fused into attn.qkv (what write_tiny saves)."""
    import torch

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    out = {}
    for k in sorted(state):
        if re.search(r"\.attention\.[kv]_proj\.", k):
            continue
        m = re.search(r"\.attention\.q_proj\.", k)
        if m:
            parts = [state[k.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
            out[native_to_original(k)] = torch.cat(parts, 0).contiguous()
        else:
            out[native_to_original(k)] = state[k]
    return out


# ---------------------------------------------------------------- strict loading
def weights_path(folder) -> Path:
    folder = Path(folder)
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise InternVLCheckpointError(f"{folder}: no weights (looked for {', '.join(WEIGHT_NAMES)})")


def read_weights(folder) -> tuple[dict, Path]:
    """All tensors of the folder's checkpoint (single file or sharded with an index json)."""
    from core.models.checkpoint_files import read_state_dict

    path = weights_path(folder)
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(read_state_dict(path.parent / shard))
        return state, path
    return read_state_dict(path), path


def load_original(model, folder) -> dict:
    """Load an original-layout InternVL checkpoint into a native model, strictly. Returns the report
    {loaded, unused, file}; InternVLCheckpointError for a missing tensor or a shape that does not fit."""
    import torch

    state, path = read_weights(folder)
    own = model.state_dict()
    dim = model.config.vision_config.hidden_size
    mapped: dict[str, tuple[str, "torch.Tensor"]] = {}
    unused = []
    for name, t in state.items():
        if re.search(r"\.attn\.qkv\.(weight|bias)$", name):
            native = original_to_native(name.replace(".attn.qkv.", ".attn.QKV."))
            if t.shape[0] != 3 * dim:
                raise InternVLCheckpointError(f"{path}: {name} has shape {list(t.shape)}, the fused q/k/v of a "
                                              f"{dim}-wide InternViT needs {3 * dim} rows")
            for i, p in enumerate("qkv"):
                mapped[native.replace(".attention.QKV.", f".attention.{p}_proj.")] = (name, t[i * dim:(i + 1) * dim])
            continue
        native = original_to_native(name)
        if native is None or native not in own:
            unused.append(name)
            continue
        mapped[native] = (name, t)
    tied = getattr(model.config, "tie_word_embeddings", False) or getattr(model.config.text_config,
                                                                         "tie_word_embeddings", False)
    missing = [k for k in own if k not in mapped and not (tied and k == "lm_head.weight")]
    if missing:
        raise InternVLCheckpointError(
            f"{path}: lacks {len(missing)} tensor(s) of the model (first: {native_to_original(missing[0])}, native "
            f"{missing[0]}); is it an InternVL checkpoint of this size (config.json)?")
    for native, (name, t) in mapped.items():
        if tuple(t.shape) != tuple(own[native].shape):
            raise InternVLCheckpointError(f"{path}: {name} has shape {list(t.shape)} but the model ({native}) needs "
                                          f"{list(own[native].shape)}; config.json and the weights disagree")
    with torch.no_grad():
        result = model.load_state_dict({k: t for k, (_, t) in mapped.items()}, strict=False)
    if tied:
        model.tie_weights()
    bad = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if bad:  # cannot happen after the check above; kept so that a silent partial load is impossible
        raise InternVLCheckpointError(f"{path}: not loaded: {', '.join(bad[:4])}")
    refused = [u for u in unused if not any(p.match(u) for p in KNOWN_UNUSED)]
    report = {"file": str(path), "loaded": len(mapped), "unused": sorted(unused)}
    if refused:
        log.warning("%s: %d tensor(s) the model has no place for, not used: %s", path, len(refused),
                    ", ".join(refused[:8]))
    log.info("InternVL weights %s: %d tensors loaded, %d unused", path, len(mapped), len(unused))
    return report


# ---------------------------------------------------------------- tokenizer and prompts
def load_tokenizer(folder):
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, use_fast=True)
    except Exception as e:  # noqa: BLE001 - any tokenizer loading failure is a spec problem here
        raise InternVLCheckpointError(f"{folder}: cannot load its tokenizer ({type(e).__name__}: {str(e)[:200]})")
    for t in (IMG_START, IMG_END, IMG_CONTEXT, "<|im_end|>"):
        ids = tok.convert_tokens_to_ids(t)
        if ids is None or ids == tok.unk_token_id:
            raise InternVLCheckpointError(f"{folder}: the tokenizer has no {t} token (InternVL's tokenizer adds "
                                          f"<img>, </img>, <IMG_CONTEXT>)")
    if not getattr(tok, "chat_template", None):
        raise InternVLCheckpointError(f"{folder}: the tokenizer has no chat template (tokenizer_config.json "
                                      f"chat_template)")
    return tok


def write_tiny_tokenizer(folder) -> None:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0}
    for t in TINY_SPECIAL + TINY_WORDS:
        vocab.setdefault(t, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[A-Za-z]+|\d|\s|[^A-Za-z\d\s]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", additional_special_tokens=TINY_SPECIAL[1:],
                                   model_max_length=4096)
    # the Qwen2 / InternVL chat template (system, user, assistant turns between <|im_start|> and <|im_end|>)
    fast.chat_template = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
                          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
                          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    fast.save_pretrained(str(folder))


def write_tiny(folder, seed: int = 0) -> Path:
    """The tiny twin in the original InternVL layout (config.json written last marks the folder complete)."""
    import torch
    from safetensors.torch import save_file

    from core.run_folder import atomic_path, write_json_atomic

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = json.loads(json.dumps(TINY))
    model = build(native_config(cfg, image_token_id=TINY_SPECIAL.index(IMG_CONTEXT) + 1))
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(to_original_state(model), str(tmp), metadata={"format": "pt"})
    write_json_atomic(folder / "config.json", cfg)
    return folder


def from_folder(folder, meta: bool = False, load_weights: bool = True):
    """(model, tokenizer, original config) of a local InternVL folder; the image token id from its tokenizer."""
    cfg = read_original_config(folder)
    tok = load_tokenizer(folder)
    model = build(native_config(cfg, image_token_id=tok.convert_tokens_to_ids(IMG_CONTEXT)), meta=meta)
    report = load_original(model, folder) if load_weights and not meta else None
    return model, tok, cfg, report


def prompt_ids(tok, question: str, n_image_tokens: int, answer: Optional[str] = None) -> tuple[list, list, int]:
    """(input_ids, labels, cls_position) for one `<image>\\n<cls>: ...` sample, as InternVL's preprocess_internvl2_5
    builds it: system message, the question with `<image>` -> `<img><IMG_CONTEXT> x n</img>`, the answer turn through
    the tokenizer's chat template; labels are -100 but on the answer's tokens and its `<|im_end|>` (the trailing
    newline is not learned). cls_position: the position whose logits predict the answer's first token."""
    user = question.replace("<image>", IMG_START + IMG_CONTEXT * n_image_tokens + IMG_END, 1)
    messages = [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": user}]
    prefix = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prefix, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(ids)
    cls_pos = len(ids) - 1
    if answer is not None:
        full = tok.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prefix):
            raise ValueError("the tokenizer's chat template renders the answer turn unlike the generation prompt")
        tail = full[len(prefix):]
        body = tail.rstrip("\n")
        a = tok(body, add_special_tokens=False)["input_ids"]
        nl = tok(tail[len(body):], add_special_tokens=False)["input_ids"] if len(body) < len(tail) else []
        ids, labels = ids + a + nl, labels + a + [-100] * len(nl)
    return ids, labels, cls_pos


def choice_ids(tok, choices: list[str]) -> list[int]:
    """First token id of each choice, as ViTP's dataset takes it (`tokenizer(choice).input_ids[0]`); two choices
    with the same first token cannot be told apart: refused."""
    ids = [tok(c, add_special_tokens=False)["input_ids"][0] for c in choices]
    if len(set(ids)) != len(ids):
        raise FieldError("vitp.classes", f"the choices {'|'.join(choices)} do not all start with a different token; "
                                         f"use single digits or letters (the guide's 0|1|2|3)")
    return ids


# ---------------------------------------------------------------- InternVL's image preprocessing and the <cls> loss
def closest_grid(width: int, height: int, image_size: int, min_num: int = 1, max_num: int = 6) -> tuple[int, int]:
    """InternVL's find_closest_aspect_ratio: the (columns, rows) grid of at most max_num tiles whose aspect ratio is
    closest to the image's; on a tie the larger grid when the image has more than half its pixels."""
    grids = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                    if min_num <= i * j <= max_num}, key=lambda g: (g[0] * g[1], g))
    aspect, best, best_diff = width / height, (1, 1), float("inf")
    for g in grids:
        diff = abs(aspect - g[0] / g[1])
        if diff < best_diff:
            best, best_diff = g, diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * g[0] * g[1]:
            best = g
    return best


def dynamic_tiles(image, image_size: int, max_num: int, use_thumbnail: bool, mean, std):
    """InternVL's dynamic_preprocess on a 2-D slice in [0, 1] (numpy or torch, H x W): resized (bicubic) to the
    closest grid of image_size tiles, cut row by row, plus a whole-image thumbnail when there is more than one
    tile; grey repeated to 3 channels, normalised by mean / std -> (tiles, 3, S, S) float32."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(image, dtype=torch.float32)[None, None]
    h, w = t.shape[-2:]
    cols, rows = closest_grid(int(w), int(h), image_size, 1, max_num)

    def resize(x, hh, ww):
        if tuple(x.shape[-2:]) == (hh, ww):
            return x
        return F.interpolate(x, size=(hh, ww), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)

    big = resize(t, rows * image_size, cols * image_size)
    tiles = [big[..., r * image_size:(r + 1) * image_size, c * image_size:(c + 1) * image_size]
             for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(resize(t, image_size, image_size))
    x = torch.cat(tiles, 0).expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def collate(samples: list[tuple[list, list, int]], pad_id: int):
    """Right-padded (input_ids, labels, attention_mask, cls_positions) of prompt_ids() results."""
    import torch

    n = max(len(ids) for ids, _, _ in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), n), dtype=torch.long)
    for i, (a, b, _) in enumerate(samples):
        ids[i, :len(a)], labels[i, :len(b)], mask[i, :len(a)] = torch.tensor(a), torch.tensor(b), 1
    return ids, labels, mask, torch.tensor([p for _, _, p in samples], dtype=torch.long)


def cls_losses(logits, labels, cls_positions, choices: list[int], targets, label_smoothing: float = 0.01):
    """ViTP's use_classifier loss: the LM cross-entropy over the answer tokens (shifted, mean over every labelled
    token of the batch) plus a cross-entropy with label smoothing over the logits of the choices' first tokens at
    the position that predicts the answer's first token (mean over the batch). Returns (lm, cls, choice_logits)."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    rows = torch.arange(logits.shape[0], device=logits.device)
    choice_logits = logits[rows, cls_positions.to(logits.device)][:, torch.tensor(choices, device=logits.device)]
    cls = F.cross_entropy(choice_logits, targets.to(logits.device), label_smoothing=label_smoothing)
    return lm, cls, choice_logits
