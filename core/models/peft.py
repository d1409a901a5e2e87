"""Parameter-efficient fine-tuning for every workload that trains: the spec's `peft:` section -> peft adapters.

One implementation for all workloads:
- `quantization_config(peft)` gives transformers' BitsAndBytesConfig for a 4/8-bit base (QLoRA) or None; the
  workload passes it to its `from_pretrained` with `quantized_load_kwargs(device)`; `quantized_modules(model)`
  counts the bitsandbytes layers of what was loaded, `frozen_weight_bytes(...)` gives the plan the bytes of the
  frozen weights as they will be loaded (packed 4/8-bit linear weights + their quantisation constants, the rest
  at the training precision).
- `apply_peft(model, peft)` freezes the base and adds LoRA (names, full module paths or 'all-linear'; `exclude` by
  full path; `modules_to_save` trained in full), switching on gradient checkpointing when asked. A target that
  matches nothing is a `PeftTargetError` naming the modules that do exist.
- `save_adapter(engine_or_model, folder, rank)` writes the adapter and the `modules_to_save` weights in peft's own
  format (adapter_config.json + adapter_model.safetensors), gathered from every rank under ZeRO-3, so that
  `PeftModel.from_pretrained(base, folder)` loads it.
- `trainable_count(model, peft)` counts what LoRA would train on a model built on the meta device (the plan's
  memory estimate and its trainable share).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

# bitsandbytes (imported by peft) warns at import that its optional CPU kernels package is missing: not an error
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class PeftTargetError(ValueError):
    """peft.target_modules / exclude / modules_to_save name modules the model does not have."""


def _exclude_pattern(paths: list[str]):
    """peft's exclude_modules as one regex: a listed full path excludes the module and everything below it."""
    if not paths:
        return None
    return "|".join(rf"(.*\.)?{re.escape(p)}(\..*)?" for p in paths)


def lora_config(peft_spec, head: tuple[str, ...] = ()):
    from peft import LoraConfig

    targets = peft_spec.target_modules if isinstance(peft_spec.target_modules, str) else list(peft_spec.target_modules)
    return LoraConfig(r=peft_spec.r, lora_alpha=peft_spec.alpha, lora_dropout=peft_spec.dropout,
                      target_modules=targets, bias=peft_spec.bias,
                      exclude_modules=_exclude_pattern(list(peft_spec.exclude) + list(head)),
                      modules_to_save=list(peft_spec.modules_to_save) or None, task_type=None)


def quantization_config(peft_spec, head: tuple[str, ...] = ()):
    """BitsAndBytesConfig for `peft.quantize` (4bit: NF4/FP4, double quantisation, compute dtype), else None.
    `head`: the model's output head (a tied LM head must stay unquantized), kept in full precision with the
    `modules_to_save`."""
    if peft_spec is None or peft_spec.quantize is None:
        return None
    from transformers import BitsAndBytesConfig

    from core.runtime import torch_dtype

    skip = list(peft_spec.modules_to_save) + list(head) or None
    if peft_spec.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=peft_spec.quant_type,
                              bnb_4bit_use_double_quant=peft_spec.double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(peft_spec.compute_dtype), llm_int8_skip_modules=skip)


def quantized_load_kwargs(device) -> dict:
    """from_pretrained keywords for a quantized base: bitsandbytes packs the weights as they are placed, so the whole
    model goes straight onto this rank's device (DeepSpeed then finds it there)."""
    return {"device_map": {"": str(device)}}


def skip_modules(peft_spec, head: tuple[str, ...] = ()) -> list[str]:
    """Modules kept in full precision: the `modules_to_save` and the output head."""
    return list(peft_spec.modules_to_save) + list(head)


def would_quantize(model, peft_spec, head: tuple[str, ...] = ()) -> list[str]:
    """Paths of the linear layers that transformers' bitsandbytes integration replaces for this spec (type
    nn.Linear, not matched by the skip list, by transformers' own matching rule): what the plan counts at 4/8 bit."""
    import torch
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = skip_modules(peft_spec, head) or None
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and should_convert_module(n, skip)]


def bytes_per_quantized_weight(peft_spec) -> float:
    """Bytes a 4/8-bit weight takes with its quantisation constants: NF4/FP4 packs two weights per byte with one
    absmax per block of 64 (fp32, or 8 bit + an fp32 per 256 blocks with double quantisation); LLM.int8 one byte
    (+ one fp32 scale per row, left out)."""
    if peft_spec.quantize == "8bit":
        return 1.0
    return 0.5 + ((1 + 4 / 256) / 64 if peft_spec.double_quant else 4 / 64)


def quantized_numel(model, peft_spec, head: tuple[str, ...] = ()) -> int:
    """Weights (unpacked count) that bitsandbytes will hold in 4/8 bit for this spec (model unadapted; meta is
    enough)."""
    names = {n + ".weight" for n in would_quantize(model, peft_spec, head)}
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


def frozen_size(size, quantized: int, peft_spec, precision: str):
    """`size` (core.model_sizes.ModelSize, adapters counted) with weight_bytes = the mean bytes per frozen weight as a
    QLoRA job loads it: `quantized` weights at bytes_per_quantized_weight, every other frozen tensor (norms,
    embeddings, biases, the head, the originals of modules_to_save) at deepspeed.precision's width."""
    import dataclasses

    frozen = size.total - (size.trainable or 0)
    if not peft_spec or not peft_spec.quantize or frozen <= 0:
        return size
    full = 4 if precision == "fp32" else 2
    total = quantized * bytes_per_quantized_weight(peft_spec) + (frozen - quantized) * full
    return dataclasses.replace(size, weight_bytes=total / frozen)


def quantized_modules(model) -> int:
    """bitsandbytes layers (Linear4bit / Linear8bitLt) in a loaded model: what QLoRA really runs through."""
    import bitsandbytes as bnb

    return sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def _check_names(model, peft_spec) -> None:
    paths = [n for n, _ in model.named_modules()]
    wanted = [] if isinstance(peft_spec.target_modules, str) else list(peft_spec.target_modules)
    missing = [t for t in wanted if not any(p == t or p.endswith("." + t) for p in paths)]
    if missing:
        leaves = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if not list(m.children())})
        raise PeftTargetError(f"peft.target_modules: {missing} match no module of {type(model).__name__}; its "
                              f"leaf module names are {leaves[:40]}")
    for field in ("exclude", "modules_to_save"):
        bad = [t for t in getattr(peft_spec, field) if not any(p == t or p.endswith("." + t) for p in paths)]
        if bad:
            raise PeftTargetError(f"peft.{field}: {bad} match no module of {type(model).__name__}")


def apply_peft(model, peft_spec, head: tuple[str, ...] = ()):
    """Frozen base + LoRA adapters from a spec's `peft:` section; None leaves the model as it is. `head`: full
    paths of the model's output head, which never gets an adapter ('all-linear' skips it where the model reports
    it through get_output_embeddings; BLIP does not)."""
    if peft_spec is None:
        return model
    from peft import get_peft_model

    _check_names(model, peft_spec)
    if peft_spec.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # a frozen embedding must still pass gradients to the adapters
    # peft's prepare_model_for_kbit_training is not called: of its three steps, freezing is get_peft_model's,
    # gradient checkpointing is peft.gradient_checkpointing above, and its upcast of every 16-bit tensor to fp32
    # would be undone by DeepSpeed, which casts the module to deepspeed.precision (bf16/fp16) in initialize; the
    # workloads load the unquantized tensors at the training precision instead (fp32 when deepspeed.precision is)
    try:
        return get_peft_model(model, lora_config(peft_spec, head))
    except ValueError as e:  # e.g. 'all-linear' with an exclude that leaves nothing
        raise PeftTargetError(f"peft: {e}") from None


def trainable_count(model, peft_spec) -> tuple[int, int]:
    """(trainable, total) parameters of `model` with the spec's adapters (the model may live on meta)."""
    model = apply_peft(model, peft_spec)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_adapter(model, folder: Path, rank: int) -> Path | None:
    """Adapter + modules_to_save weights in peft's format. Every rank calls this (under ZeRO-3 the trainable
    tensors are gathered with a collective); rank 0 writes. Returns the folder on rank 0."""
    import deepspeed

    from core.run_folder import atomic_path

    module = getattr(model, "module", model)  # a DeepSpeed engine or the PeftModel itself
    trainable = [p for p in module.parameters() if p.requires_grad]
    partitioned = bool(trainable) and hasattr(trainable[0], "ds_id")
    from contextlib import nullcontext

    with (deepspeed.zero.GatheredParameters(trainable, modifier_rank=None) if partitioned else nullcontext()):
        if rank != 0:
            return None
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = {id(p): n for n, p in module.named_parameters()}
        full = {names[id(p)]: p.detach().float().cpu().clone() for p in trainable}
        state = get_peft_model_state_dict(module, state_dict=full)
        module.peft_config["default"].save_pretrained(str(folder))
        with atomic_path(folder / "adapter_model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    return folder
