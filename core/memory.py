"""Per-device memory estimate for a DeepSpeed run, printed by the plan before anything is submitted.

Model states come from DeepSpeed's own ZeRO estimators (stage 2 and 3 functions, `*_model_states_mem_needs`);
frozen weights use the stage-3 estimator with parameters kept on the device and no optimizer, and we add an
activation term (Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) bytes per layer without recomputation; with
activation checkpointing one layer's input per layer plus one layer's full working set) and the logits.
deepspeed (and so torch) is imported only here and only for specs with a `deepspeed:` section.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.model_sizes import ModelSize

GiB = 1024 ** 3
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)


@dataclass(frozen=True)
class MemoryEstimate:
    model_states: float   # bytes per device: trainable params + grads + optimizer (DeepSpeed estimator)
    frozen: float         # bytes per device: frozen weights (sharded under ZeRO-3)
    activations: float    # bytes per device
    cpu_per_node: float   # bytes of host memory per node (DeepSpeed estimator)
    device_gib: float | None

    @property
    def total(self) -> float:
        return self.model_states + self.frozen + self.activations

    @property
    def fits(self) -> bool:
        return self.device_gib is None or self.total <= self.device_gib * GiB

    def describe(self) -> str:
        of = f" of {self.device_gib:g} GiB" if self.device_gib else ""
        return (f"est. {self.total / GiB:.1f} GiB/device{of} (model states {self.model_states / GiB:.1f}, "
                f"frozen weights {self.frozen / GiB:.1f}, activations {self.activations / GiB:.1f}); "
                f"host {self.cpu_per_node / GiB:.1f} GiB/node")


def activation_bytes(size: ModelSize, seq: int, micro_batch: int, checkpointing: bool, half: bool) -> float:
    s, b, h, a = seq, micro_batch, size.hidden, size.heads
    full_layer = s * b * h * (34 + 5 * a * s / h)
    per_layer = 2 * s * b * h if checkpointing else full_layer
    # with checkpointing every layer keeps its input for the whole micro-batch, and one layer at a time recomputes
    # its full working set: for the samples one forward holds (a workload's chunk, e.g. GigaPath's tile_chunk)
    chunk = min(b, size.chunk or b)
    acts = size.layers * per_layer + (full_layer * chunk / b if checkpointing else 0)
    if not half:
        acts *= 2
    logits = s * b * size.vocab * 6  # 16-bit logits + their fp32 copy in the loss
    return acts + logits


def tower_activation_bytes(size, seq: int, micro_batch: int, checkpointing: bool, half: bool) -> float:
    """Activations of a model made of towers (size.towers, e.g. BLIP's vision encoder and text decoder): each tower's
    layers at their own token count, width and heads (the same per-layer term as activation_bytes), plus, for a
    tower that cross-attends, per layer the cross-attention block: its query side over the tower's tokens
    (s*b*h*11: q, output projection, dropout masks, layer norm) and its key/value projections over the attended
    tokens (4*t*b*h) and its scores, softmax and dropout (5*a*s*t*b); and the logits."""
    b, total, largest = micro_batch, 0.0, 0.0
    for tw in size.towers:
        s, h, a, t = tw.tokens or seq, tw.hidden, tw.heads, tw.cross_tokens
        layer = s * b * h * (34 + 5 * a * s / h)
        if t:
            layer += s * b * h * 11 + 4 * t * b * h + 5 * a * s * t * b
        largest = max(largest, layer)
        total += tw.layers * (2 * s * b * h if checkpointing else layer)
    acts = total + (largest if checkpointing else 0)
    if not half:
        acts *= 2
    return acts + seq * b * size.vocab * 6


def _estimators():
    """DeepSpeed's ZeRO-2/3 model-state estimators: arithmetic, run where the job is submitted. Importing them picks
    an accelerator and, on a login node or laptop without one, warns "Setting accelerator to CPU"; that says nothing
    about where the job will run, so that one message is dropped here (DS_ACCELERATOR in the environment would
    instead reach the submitted jobs). A filter, because DeepSpeed sets its logger's level while importing."""
    import logging

    def not_the_cpu_notice(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Setting accelerator to CPU")

    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.addFilter(not_the_cpu_notice)
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    finally:
        ds_logger.removeFilter(not_the_cpu_notice)
    return estimate_zero3_model_states_mem_needs, estimate_zero2_model_states_mem_needs


def estimate(size: ModelSize, trainable: int, *, stage: int, precision: str, offload_optimizer: bool,
             offload_param: bool, devices_per_node: int, nodes: int, seq: int, micro_batch: int,
             checkpointing: bool, device_gib: float | None) -> MemoryEstimate:
    estimate_zero3_model_states_mem_needs, estimate_zero2_model_states_mem_needs = _estimators()
    frozen_params = max(size.total - trainable, 0)
    n_dev = max(devices_per_node, 1)
    bytes_per_weight = 4 if precision == "fp32" else 2
    frozen_bytes = size.weight_bytes or bytes_per_weight  # a 4/8-bit base (QLoRA) keeps its frozen weights packed
    cpu = 0.0
    if stage == 3:
        largest_trainable = min(size.largest_module, trainable)
        if trainable:
            cpu, states, _ = estimate_zero3_model_states_mem_needs(
                trainable, largest_trainable, n_dev, nodes, cpu_offload=offload_optimizer,
                cpu_offload_params=offload_param)
        else:
            states = 0
        if frozen_params and offload_param:
            # the partitioned weights live in host memory; one module is gathered onto the device at a time
            frozen = min(size.largest_module, frozen_params) * frozen_bytes
        elif frozen_params:
            # weights only, no gradients or optimizer state: each device's shard of them plus the one module that
            # is gathered at a time (DeepSpeed's estimator counts 4 bytes per parameter of that module, weights and
            # gradients in 16 bit: twice what a frozen module holds; measured in bench/dia_pangu_memory.py)
            frozen = (frozen_params * frozen_bytes / (n_dev * nodes)
                      + min(size.largest_module, frozen_params) * frozen_bytes)
        else:
            frozen = 0
    else:
        shards = n_dev if stage in (1, 2) else 1
        cpu, states = (estimate_zero2_model_states_mem_needs(trainable, shards, nodes if stage else 1,
                                                             cpu_offload=offload_optimizer) if trainable else (0, 0))
        frozen = frozen_params * frozen_bytes
    if trainable and precision == "fp32":
        # DeepSpeed's estimators assume 16-bit parameter replicas (2 B/param); fp32 training keeps 4 B/param
        states += 2 * trainable / (n_dev * nodes if stage == 3 else 1)
    if trainable and stage > 0:
        # the gradient reduce bucket DeepSpeed allocates (reduce_bucket_size, default 5e8 elements)
        states += min(REDUCE_BUCKET, trainable) * bytes_per_weight
    acts = (tower_activation_bytes if getattr(size, "towers", None) else activation_bytes)(
        size, seq, micro_batch, checkpointing, precision != "fp32")
    return MemoryEstimate(float(states), float(frozen), float(acts), float(cpu), device_gib)
