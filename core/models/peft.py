"""Parameter-efficient fine-tuning for every workload that trains: the spec's `peft:` section -> peft adapters.

One implementation for all: a workload hands its (frozen) model and `spec.peft`; the engine's optimizer then sees
only the adapter parameters, and checkpoints hold only them (frozen weights are excluded).
"""
from __future__ import annotations


def apply_peft(model, peft_spec):
    """Frozen base + LoRA adapters (peft.get_peft_model) from a spec's `peft:` section; None leaves the model."""
    if peft_spec is None:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=peft_spec.r, lora_alpha=peft_spec.alpha,
                                            lora_dropout=peft_spec.dropout,
                                            target_modules=list(peft_spec.target_modules)))
