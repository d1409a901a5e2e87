"""Small steps that several workloads share: text files of prompts, the decoder's layer count for planning, the
run folder's dataset index that rank 0 writes, next-token log-probabilities, and a headless pyplot
(core.plotting)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from core.plotting import pyplot  # noqa: F401  (workloads draw through it)
from core.config import FieldError


def text_lines(path: Optional[str], field_name: str) -> list[str]:
    """The non-empty lines of a text file (prompts, held-out sentences); FieldError naming the field otherwise."""
    if not path:
        raise FieldError(field_name, "give a text file (one prompt or sentence per line)")
    p = Path(path)
    if not p.is_file():
        raise FieldError(field_name, f"file {p} not found")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise FieldError(field_name, f"file {p} has no non-empty line")
    return lines


def decoder_layers(spec) -> int:
    """Decoder layers of the spec's LLM from its config.json (or preset), torch-free, for planning."""
    from core.model_sizes import model_config

    cfg = model_config(spec.model.path, spec.model.preset)
    if cfg is None:
        if spec.model.make_tiny:
            from core.models.pangu import TINY_LAYERS

            return TINY_LAYERS
        raise FieldError("model.path", f"no config.json in {spec.model.path!r}; give a local model folder "
                                       f"(or model.preset)")
    return int(cfg["num_hidden_layers"])


def rank0_index(path: Path, rank: int, what: str, write: Callable[[Path], None]) -> dict:
    """The JSON index a job keeps in its run folder (its dataset split, ...), read back. The first call, on rank 0
    (inside session.rank0_first), writes it with `write(path)`; every later call (the other ranks after the
    barrier, a requeued or resumed run) only reads it, so the split never changes within a run. A rank other than 0
    that finds no index raises, naming `what` was expected."""
    path = Path(path)
    if not path.is_file():
        if rank != 0:
            raise RuntimeError(f"{path} missing: rank 0 did not write the {what}")
        write(path)
    return json.loads(path.read_text())


def next_token_logprobs(logits, ids):
    """log p(ids[t+1] | ids[<=t]) for every position of one sequence: logits (T, V) or (1, T, V), ids (T,) or
    (1, T) -> (T-1,) float32."""
    import torch

    lp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    target = ids.reshape(-1)[1:].to(lp.device)
    return lp[:-1].gather(1, target.unsqueeze(1)).squeeze(1)
