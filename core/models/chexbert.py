"""The CheXbert labeler as Dia-LLaMA runs it for its clinical metric (zhi-xuan-chen/Dia-LLaMA `utils/chexbert.py`):
BERT-base (uncased) + 14 linear heads on the [CLS] state (13 x 4 classes: 0 blank, 1 positive, 2 negative,
3 uncertain; the 14th, `no finding`, 2 classes), loaded from a local `chexbert.pth` (Stanford's CheXbert release,
also in the Dia-LLaMA Hugging Face repository): `{"model_state_dict": {"module.bert.embeddings...",
"module.linear_heads.0.weight", ...}}`. Nothing is downloaded: the tokenizer is bert-base-uncased's `vocab.txt`
from a local folder, the BERT config is read off the checkpoint's shapes (BERT-base: 12 layers, 768 wide, 12 heads).

Texts are cleaned as Dia-LLaMA does (strip, line breaks to spaces), tokenised with padding to the longest of a
batch of 16, and labelled with the argmax of each head. One difference: texts longer than BERT's 512 positions are
truncated (Dia-LLaMA's labeler would fail on them; CheXbert's own code truncates too).
`write_tiny_chexbert` writes a small random labeler with the real key names (tests, jobs/tiny).
"""
from __future__ import annotations

from pathlib import Path

HEADS = 14  # 13 conditions x 4 classes, then `no finding` x 2
PREFIX = "module."


class CheXbertError(ValueError):
    pass


def _config_from_state(state: dict):
    from transformers import BertConfig

    try:
        vocab, hidden = state["bert.embeddings.word_embeddings.weight"].shape
        positions = state["bert.embeddings.position_embeddings.weight"].shape[0]
        types = state["bert.embeddings.token_type_embeddings.weight"].shape[0]
        intermediate = state["bert.encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as e:
        raise CheXbertError(f"not a CheXbert state dict: no {e.args[0]!r}") from None
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("bert.encoder.layer."))
    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), intermediate_size=intermediate,
                      max_position_embeddings=positions, type_vocab_size=types)


def build(config):
    """BERT + 14 heads, parameter names those of chexbert.pth without `module.`."""
    import torch
    from torch import nn
    from transformers import BertModel

    class CheXbert(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel(config)
            self.dropout = nn.Dropout(0.1)
            hidden = config.hidden_size
            self.linear_heads = nn.ModuleList([nn.Linear(hidden, 4) for _ in range(HEADS - 1)] + [nn.Linear(hidden, 2)])

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            cls = self.dropout(self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                         token_type_ids=token_type_ids)[0][:, 0])
            return torch.stack([head(cls).argmax(dim=1) for head in self.linear_heads], dim=1)

    return CheXbert()


def load_checkpoint(path) -> dict:
    """chexbert.pth's model_state_dict with `module.` (PREFIX) removed (a bare state dict is accepted too)."""
    from core.models.checkpoint_files import read_state_dict

    path = Path(path)
    if not path.is_file():
        raise CheXbertError(f"{path}: CheXbert checkpoint not found (dia.chexbert)")
    return read_state_dict(path, wrappers=("model_state_dict",))


class CheXbertLabeler:
    """label(texts) -> N x 14 CheXbert codes."""

    def __init__(self, checkpoint, vocab_folder=None, device="cpu", batch_size: int = 16):
        import torch
        from transformers import BertTokenizer

        state = load_checkpoint(checkpoint)
        config = _config_from_state(state)
        self.model = build(config)
        # position_ids / token_type_ids are buffers that transformers builds itself (Dia-LLaMA adds position_ids
        # by hand for the same reason)
        state = {k: v for k, v in state.items() if not k.endswith(("position_ids", "token_type_ids"))}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheXbertError(f"{checkpoint}: CheXbert keys missing {missing[:5]}, unexpected {unexpected[:5]}")
        folder = Path(vocab_folder) if vocab_folder else Path(checkpoint).parent
        if not (folder / "vocab.txt").is_file():
            raise CheXbertError(f"{folder}: no vocab.txt (bert-base-uncased's, for the CheXbert tokenizer; "
                                f"dia.chexbert_tokenizer)")
        self.tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True, do_lower_case=True)
        self.max_length = config.max_position_embeddings
        self.device, self.batch_size = torch.device(device), batch_size
        self.model.to(self.device).eval()

    @staticmethod
    def clean(text: str) -> str:
        return str(text).strip().replace("\n", " ").strip()

    def label(self, texts: list[str]) -> list[list[int]]:
        import torch

        out: list[list[int]] = []
        for i in range(0, len(texts), self.batch_size):
            batch = [self.clean(t) for t in texts[i:i + self.batch_size]]
            tok = self.tokenizer(batch, padding="longest", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            with torch.no_grad():
                codes = self.model(**{k: v.to(self.device) for k, v in tok.items()})
            out += codes.cpu().tolist()
        return out


def key_names(layers: int) -> list[str]:
    """chexbert.pth's model_state_dict keys for a BERT of `layers` layers (12 in the release)."""
    keys = [f"module.bert.embeddings.{n}" for n in ("word_embeddings.weight", "position_embeddings.weight",
                                                      "token_type_embeddings.weight", "LayerNorm.weight",
                                                      "LayerNorm.bias")]
    per_layer = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"]
    for i in range(layers):
        keys += [f"module.bert.encoder.layer.{i}.{m}.{p}" for m in per_layer for p in ("weight", "bias")]
    keys += ["module.bert.pooler.dense.weight", "module.bert.pooler.dense.bias"]
    keys += [f"module.linear_heads.{i}.{p}" for i in range(HEADS) for p in ("weight", "bias")]
    return keys


TINY_WORDS = ("the there is a no of and in with normal heart size lungs are clear pleural effusion right left "
              "small large mild pneumothorax consolidation opacity nodule lesion enlarged cardiomegaly edema "
              "atelectasis fracture seen mediastinum unremarkable focal lung lobe upper lower shadow density").split()


def write_tiny_chexbert(folder, layers: int = 2, hidden: int = 64, seed: int = 0, name: str = "chexbert.pth") -> Path:
    """A small random CheXbert in chexbert.pth's format (real key names, `module.` prefix, model_state_dict) and a
    vocab.txt beside it; returns the .pth path. Idempotent, and safe under concurrent callers (jobs of a study
    that start at once, on any node): each file is written to a temporary name and renamed into place, vocab.txt
    first, so whoever sees the .pth sees both complete; a second writer replaces them with the same content. (The
    .pth's folder may hold other files, e.g. logs/tiny_models/, so files are renamed, not the folder.)"""
    import torch
    from transformers import BertConfig

    folder = Path(folder)
    pth = folder / name
    if pth.is_file() and (folder / "vocab.txt").is_file():
        return pth
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "-"] + list(dict.fromkeys(TINY_WORDS))
    from core.run_folder import atomic_path, write_text_atomic

    write_text_atomic(folder / "vocab.txt", "\n".join(vocab) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 64), intermediate_size=2 * hidden,
                        max_position_embeddings=128)
    model = build(config)
    state = {PREFIX + k: v for k, v in model.state_dict().items()
             if not k.endswith(("position_ids", "token_type_ids"))}
    with atomic_path(pth) as tmp:
        torch.save({"epoch": 0, "model_state_dict": state}, str(tmp))
    return pth
