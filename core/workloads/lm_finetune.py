"""Causal-LM fine-tune of openPangu (full, or frozen base + LoRA from `peft:`) on a text file: the first user of
the engine. Batches depend only on (step, micro-step, rank), so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""
from __future__ import annotations

from pathlib import Path

from core.runtime import TaskContext
from core.config import JobSpec
from core.workloads import Workload


def token_blocks(tokenizer, text_file: Path, seq_len: int):
    """The file's lines, each as BOS + tokens + EOS, concatenated and cut into blocks of seq_len tokens."""
    import torch

    from core.models.pangu import bos_encode

    path = Path(text_file)
    if not path.is_file():
        raise FileNotFoundError(f"data.path: text file {path} not found")
    ids: list[int] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            ids += bos_encode(tokenizer, line.strip()) + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"data.path: {path} has {len(ids)} tokens, fewer than model.seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def run(spec: JobSpec, ctx: TaskContext) -> dict:
    import torch

    from core import engine as eng
    from core.models.pangu import HEAD, load_pangu, load_tokenizer, model_folder
    from core.models.peft import apply_peft, quantization_config, quantized_modules

    session = eng.start(spec, ctx)
    folder = session.rank0_first(lambda: model_folder(spec))
    tokenizer = load_tokenizer(folder)
    blocks = token_blocks(tokenizer, Path(spec.data.path or ""), spec.model.seq_len)
    torch.manual_seed(spec.train.seed)
    session.enable_zero3_init()
    quant = quantization_config(spec.peft, HEAD)
    model = load_pangu(folder, dtype=session.dtype, quantization_config=quant,
                       device=session.device if quant else None)
    quantized = quantized_modules(model) if quant else 0
    model = apply_peft(model, spec.peft, HEAD)
    engine = eng.initialize(session, model, spec)

    micro, accum = spec.deepspeed.micro_batch, spec.deepspeed.grad_accum
    world, rank, n = session.dist.world_size, session.rank, blocks.shape[0]

    def batch_fn(step: int, m: int):
        first = ((step * accum + m) * world + rank) * micro
        rows = [blocks[eng.sample_index(i, n, spec.data.seed)] for i in range(first, first + micro)]
        return torch.stack(rows).to(session.device)

    def loss_fn(engine, batch):
        return engine(input_ids=batch, labels=batch).loss

    result = eng.Trainer(session, engine, spec, ctx, loss_fn, batch_fn).fit()
    result.update(rank=rank, world_size=world, blocks=n, quantized_modules=quantized,
                  trainable=sum(p.numel() for p in engine.module.parameters() if p.requires_grad))
    return result


def model_size(spec: JobSpec):
    """The plan's model: openPangu of model.path / model.preset with the spec's adapters, its frozen weights at the
    bytes they are loaded in (core.models.peft.frozen_size)."""
    from core.models.pangu import decoder_size

    return decoder_size(spec)


WORKLOAD = Workload(run=run, trains=True, model_size=model_size)
