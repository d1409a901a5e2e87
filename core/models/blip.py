"""BLIP image captioning (`BlipForConditionalGeneration` + `BlipProcessor`) from a local Hugging Face folder, and a
tiny twin of the same classes.

The full-size model is `Salesforce/blip-image-captioning-base` as the lab downloads it (config.json, safetensors,
preprocessor_config.json, the BERT tokenizer files with `[DEC]` as BOS): ViT-B/16 at 384 px + a BERT-base decoder
that cross-attends to the image, 223,971,644 parameters. `write_tiny_blip` writes a folder with the same files and
classes (random weights, a WordPiece vocabulary from the captions it will see); nothing is downloaded.
BLIP's text conventions (from its config and `generate`): the decoder starts at `bos_token_id` (`[DEC]`), ends at
`sep_token_id` (`[SEP]`) and pads with 0 (`[PAD]`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from core.errors import ModelFolderError
from core.models import checkpoint_files

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# transformers' BlipConfig() defaults are the captioning-base shapes except the text decoder's heads: the hub's
# config.json of Salesforce/blip-image-captioning-base has 12 (BlipTextConfig's default is 8); parameters are equal
FULL_CONFIG: dict = {"text_config": {"num_attention_heads": 12}}
TINY = {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128, "image_size": 32, "patch": 8, "positions": 64}


def read_config(folder) -> dict:
    return checkpoint_files.read_config(folder, "model.path must be a local BLIP folder (config.json, *.safetensors, "
                                                "preprocessor_config.json, tokenizer files)")


def blip_config(cfg: Optional[dict] = None):
    from transformers import BlipConfig

    return BlipConfig(**(cfg or FULL_CONFIG))  # {} (the preset) is the captioning-base as well


def meta_model(cfg: Optional[dict] = None):
    """BlipForConditionalGeneration on the meta device (no memory): for counts and target-module checks."""
    import torch
    from transformers import BlipForConditionalGeneration

    config = blip_config({k: v for k, v in (cfg or {}).items() if k not in ("architectures", "transformers_version")})
    with torch.device("meta"):
        return BlipForConditionalGeneration(config), config


def meta_size(cfg: Optional[dict] = None, peft=None, head: tuple[str, ...] = ()):
    """core.model_sizes.ModelSize of the captioner, with its towers for the activation estimate
    (core.memory.tower_activation_bytes): the vision encoder over (image_size / patch)^2 + 1 tokens (577 at 384 px)
    and the text decoder, whose layers also cross-attend to those image tokens."""
    import dataclasses

    from core.model_sizes import size_of

    model, config = meta_model(cfg)
    t, v = config.text_config, config.vision_config
    size = size_of(model, layers=t.num_hidden_layers + v.num_hidden_layers,
                   hidden=t.hidden_size, heads=t.num_attention_heads, vocab=t.vocab_size, peft=peft, head=head)
    image_tokens = (v.image_size // v.patch_size) ** 2 + 1
    towers = (Tower("vision", v.num_hidden_layers, image_tokens, v.hidden_size, v.num_attention_heads, 0),
              Tower("text", t.num_hidden_layers, None, t.hidden_size, t.num_attention_heads, image_tokens))
    return TowerSize(**{f.name: getattr(size, f.name) for f in dataclasses.fields(size)}, towers=towers)


def _tower_types():
    from dataclasses import dataclass

    from core.model_sizes import ModelSize

    @dataclass(frozen=True)
    class Tower:
        name: str
        layers: int
        tokens: Optional[int]      # None: the text length (model.seq_len)
        hidden: int
        heads: int
        cross_tokens: int          # tokens each layer cross-attends to (0: none)

    @dataclass(frozen=True)
    class TowerSize(ModelSize):
        towers: tuple = ()

    return Tower, TowerSize


Tower, TowerSize = _tower_types()


def load_blip(folder, dtype=None, quantization_config=None, device="cpu"):
    """The captioner and its processor from a local folder (bf16 by default). With a BitsAndBytesConfig its linear
    layers are loaded in 4/8 bit straight onto `device`; every other tensor (norms, embeddings, the skipped head
    and modules_to_save) in `dtype`."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    folder = Path(folder)
    read_config(folder)
    if not any(folder.glob("*.safetensors")) and not (folder / "pytorch_model.bin").is_file():
        raise ModelFolderError(f"{folder}: no model weights (*.safetensors or pytorch_model.bin)")
    from core.models.peft import quantized_load_kwargs

    kwargs = {"quantization_config": quantization_config, **quantized_load_kwargs(device)} if quantization_config \
        else {}
    model = BlipForConditionalGeneration.from_pretrained(folder, dtype=dtype or torch.bfloat16, **kwargs)
    return model, BlipProcessor.from_pretrained(folder)


def _vocab(captions: list[str]) -> list[str]:
    """BERT's special tokens, then every word and punctuation mark of the captions as BERT splits them."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    norm, pre = BertNormalizer(lowercase=True), BertPreTokenizer()
    words = sorted({w for c in captions for w, _ in pre.pre_tokenize_str(norm.normalize_str(c))})
    return SPECIALS + words


def write_tiny_blip(folder, captions: list[str], seed: int = 0) -> Path:
    """A tiny BLIP folder (same classes and files as the real one) whose vocabulary covers `captions`.
    Idempotent: an existing complete folder is left alone."""
    import torch
    from transformers import BertTokenizer, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(_vocab(captions))}, do_lower_case=True,
                              model_max_length=TINY["positions"])
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    t = TINY
    cfg = {
        "vision_config": {"hidden_size": t["hidden"], "intermediate_size": t["intermediate"],
                          "num_hidden_layers": t["layers"], "num_attention_heads": t["heads"],
                          "image_size": t["image_size"], "patch_size": t["patch"]},
        "text_config": {"vocab_size": len(tokenizer), "hidden_size": t["hidden"],
                        "intermediate_size": t["intermediate"], "num_hidden_layers": t["layers"],
                        "num_attention_heads": t["heads"], "encoder_hidden_size": t["hidden"],
                        "max_position_embeddings": t["positions"], "bos_token_id": tokenizer.bos_token_id,
                        "pad_token_id": tokenizer.pad_token_id, "sep_token_id": tokenizer.sep_token_id,
                        "eos_token_id": tokenizer.sep_token_id},
        "projection_dim": t["hidden"],
    }
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(blip_config(cfg))
    image_processor = BlipImageProcessor(size={"height": t["image_size"], "width": t["image_size"]})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    model.save_pretrained(str(folder))  # config.json + model.safetensors (tied LM head stored once, as on the hub)
    return folder
