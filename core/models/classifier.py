"""Image classifiers for the ViTP lung workload: any timm backbone, or a transformers image-classification model from
a local folder, with a fresh C-class head; weights only from local files (nothing is downloaded).

- timm: `timm.create_model(arch, pretrained=False, num_classes=C, **arch_kwargs)`, then `model.path` (a
  .safetensors / .pth / .bin file, or a Hugging Face timm folder with config.json + model.safetensors or
  pytorch_model.bin) loaded through the architecture's own `checkpoint_filter_fn` (position-embedding resize,
  original-repo key names) where timm has one; the pretrained head (1000 classes) is left out by shape.
- transformers: `AutoModelForImageClassification.from_pretrained(model.path, num_labels=C,
  ignore_mismatched_sizes=True)` (id2label from vitp.classes).
`ImageClassifier` wraps either so that `model(images) -> logits (B, C)`; `meta_size` counts the model on the meta
device for the plan's memory estimate. The tiny twin of the tests and jobs/tiny is a real timm architecture at
tiny sizes (vit_tiny_patch16_224 with img_size 32, patch 8, depth 2, width 32). Importing this module imports no
torch (the planner reads WEIGHT_FILES).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from contextlib import nullcontext
from functools import lru_cache
from typing import Optional

from core.errors import FieldError
from core.models import checkpoint_files

log = logging.getLogger("vitp_lung")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pt", "model.pth")
WRAPPERS = ("state_dict", "model", "module", "state_dict_ema")   # timm's checkpoints first


def weights_file(path) -> Path:
    """The weights file of `model.path`: the file itself, or the first of WEIGHT_FILES in a folder."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for name in WEIGHT_FILES:
            if (p / name).is_file():
                return p / name
        raise FieldError("model.path", f"{p}: no weights file in the folder (looked for {', '.join(WEIGHT_FILES)})")
    raise FieldError("model.path", f"{p}: weights file or folder not found")


def read_state_dict(path) -> dict:
    """The tensors of `model.path` (a weights file, or a folder holding one of WEIGHT_FILES)."""
    return checkpoint_files.read_state_dict(weights_file(path), wrappers=WRAPPERS)


def _head_keys(model) -> set[str]:
    try:
        head = model.get_classifier()
    except Exception:
        return set()
    for name, module in model.named_modules():
        if module is head:
            return {f"{name}.{k}" if name else k for k in head.state_dict()}
    return set()


def load_timm_weights(model, path) -> dict:
    """Load local weights into a timm model: filtered by the architecture's checkpoint_filter_fn, tensors whose
    shape does not fit (the pretrained head) left out. Raises when anything but the head is missing."""
    state = read_state_dict(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as e:  # a checkpoint in timm's own layout needs no filtering
            log.info("checkpoint_filter_fn of %s not applied (%s)", type(model).__name__, e)
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    skipped = sorted(k for k in state if k not in fits)
    missing = sorted(k for k in own if k not in fits)
    if not fits:
        raise FieldError("model.path", f"{weights_file(path)}: none of its {len(state)} tensors fits "
                                       f"{type(model).__name__} (wrong architecture in vitp.arch?)")
    not_head = [k for k in missing if k not in _head_keys(model)]
    if not_head:
        raise FieldError("model.path", f"{weights_file(path)}: lacks {len(not_head)} tensor(s) of the backbone "
                                       f"(first: {', '.join(not_head[:4])}); is it a checkpoint of vitp.arch?")
    model.load_state_dict(fits, strict=False)
    log.info("weights %s: %d tensors loaded, %d left out (%s), new: %s", weights_file(path), len(fits), len(skipped),
             ", ".join(skipped[:4]) or "none", ", ".join(missing) or "none")
    return {"loaded": len(fits), "skipped": skipped, "new": missing}


@lru_cache(maxsize=None)
def _classifier_class():
    import torch

    class ImageClassifier(torch.nn.Module):
        """images (B, 3, H, W) -> logits (B, C), for a timm or a transformers backbone."""

        def __init__(self, net, kind: str):
            super().__init__()
            self.backbone, self.kind = net, kind

        def forward(self, images):
            if self.kind == "transformers":
                return self.backbone(pixel_values=images).logits
            return self.backbone(images)

    return ImageClassifier


def ImageClassifier(net, kind: str):  # noqa: N802  (a class built on first use: this module imports no torch)
    return _classifier_class()(net, kind)


def _check_image_size(net, image_size: int, what: str) -> None:
    size = getattr(getattr(net, "patch_embed", None), "img_size", None)
    if size is not None and not getattr(net, "dynamic_img_size", False) and tuple(size) != (image_size, image_size):
        raise FieldError("data.image_size", f"{image_size} but {what} takes {size[0]}x{size[1]} images; set "
                                            f"data.image_size: {size[0]} or vitp.arch_kwargs.img_size: {image_size}")


def build(spec, meta: bool = False, load_weights: bool = True):
    """The spec's classifier (fp32, C = len(vitp.classes) outputs); `meta`: on the meta device, no weights."""
    import torch

    v, d = spec.vitp, spec.data
    classes = len(v.classes)
    if v.backbone == "timm":
        import timm

        with torch.device("meta") if meta else nullcontext():
            try:
                net = timm.create_model(v.arch, pretrained=False, num_classes=classes, **v.arch_kwargs)
            except RuntimeError as e:  # timm: "Unknown model (...)"
                raise FieldError("vitp.arch", f"{e}") from None
            except TypeError as e:  # an argument this architecture does not take
                raise FieldError("vitp.arch_kwargs", f"{v.arch}: {e}") from None
        _check_image_size(net, d.image_size, f"{v.arch} with these arch_kwargs")
        if spec.model.path and load_weights and not meta:
            load_timm_weights(net, spec.model.path)
        elif not meta and load_weights:
            log.info("no model.path: %s starts from random weights", v.arch)
    else:
        from transformers import AutoConfig, AutoModelForImageClassification

        if not spec.model.path:
            raise FieldError("model.path", "vitp.backbone transformers loads a local model folder: give model.path")
        labels = {"id2label": dict(enumerate(v.classes)), "label2id": {c: i for i, c in enumerate(v.classes)}}
        if meta or not load_weights:
            cfg = AutoConfig.from_pretrained(spec.model.path, **labels)
            with torch.device("meta") if meta else nullcontext():
                net = AutoModelForImageClassification.from_config(cfg)
        else:
            net = AutoModelForImageClassification.from_pretrained(spec.model.path, ignore_mismatched_sizes=True,
                                                                  dtype=torch.float32, **labels)
    return ImageClassifier(net, v.backbone)


def tokens_per_image(net) -> Optional[int]:
    """Tokens a ViT-like backbone attends over per image (patches + class / register tokens), else None."""
    if hasattr(net, "patch_embed") and hasattr(net, "blocks") and hasattr(net.patch_embed, "num_patches"):
        return int(net.patch_embed.num_patches) + int(getattr(net, "num_prefix_tokens", 1))
    cfg = getattr(net, "config", None)
    if cfg is not None and getattr(cfg, "image_size", None) and getattr(cfg, "patch_size", None):
        size, patch = cfg.image_size, cfg.patch_size
        size = size if isinstance(size, int) else size[0]
        patch = patch if isinstance(patch, int) else patch[0]
        return (size // patch) ** 2 + 1
    return None


def shape_of(net) -> tuple[int, int, int]:
    """(layers, hidden, heads) of a backbone for the activation term of the memory estimate."""
    if hasattr(net, "blocks") and hasattr(net, "embed_dim"):
        heads = getattr(getattr(net.blocks[0], "attn", None), "num_heads", 1)
        return len(net.blocks), int(net.embed_dim), int(heads)
    cfg = getattr(net, "config", None)
    if cfg is not None and getattr(cfg, "num_hidden_layers", None):
        return int(cfg.num_hidden_layers), int(cfg.hidden_size), int(getattr(cfg, "num_attention_heads", 1))
    return 1, int(getattr(net, "num_features", 1) or 1), 1


def meta_size(spec):
    """core.model_sizes.ModelSize of the spec's classifier, built on the meta device. For a ViT the activation
    term needs model.seq_len = its tokens per image: a different value is refused, naming the right one."""
    from core.model_sizes import size_of

    model = build(spec, meta=True)
    net = model.backbone
    tokens = tokens_per_image(net)
    if tokens is not None and spec.model.seq_len != tokens:
        what = spec.vitp.arch if spec.vitp.backbone == "timm" else spec.model.path
        raise FieldError("model.seq_len", f"{spec.model.seq_len} but {what} at {spec.data.image_size} px attends over "
                                          f"{tokens} tokens per image; set model.seq_len: {tokens} (the memory "
                                          f"estimate counts activations of that many tokens per image, "
                                          f"deepspeed.micro_batch images per device)")
    layers, hidden, heads = shape_of(net)
    return size_of(model, layers=layers, hidden=hidden, heads=heads, vocab=len(spec.vitp.classes))
