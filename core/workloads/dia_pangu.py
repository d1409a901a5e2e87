"""Dia-Pangu: train under DeepSpeed (frozen openPangu sharded by ZeRO-3, batch 1, grad accumulation, constant lr with
warmup, checkpoints of trainable weights only, resume), then evaluate (core.workloads.dia_reports): greedy report
generation on the test split, BLEU-1..4 / METEOR / ROUGE-L with pycocoevalcap, clinical precision / recall / F1 of
the 14 disease calls, a metrics JSON and a bar plot in the run folder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, PositiveInt

from core.data.ctrg import Case, check_dataset, load_volume, write_synthetic
from core.data.prefetch import Prefetcher
from core.runtime import TaskContext
from core.spec import DataSpec, FieldError, JobSpec, Strict
from core.workloads import Workload
from core.workloads.dia_reports import Prompts, evaluate, save_frozen_vision

log = logging.getLogger("dia_pangu")


class DiaSection(Strict):
    size: Literal["full", "tiny"] = Field("full", description="3D ViT + perceiver shapes (tiny: CPU tests)")
    stage: Literal[1, 2] = Field(1, description="1: perceiver + projection + contrastive head; 2: + LoRA (peft:)")
    question: str = "Please write the findings of this chest CT."
    max_new_tokens: PositiveInt = 300
    max_report_tokens: PositiveInt = 256
    contrastive_weight: float = Field(4.0, ge=0)
    init_from: Optional[str] = Field(None, description="Dia-LLaMA checkpoint: vision encoder + perceiver keys that fit")
    evaluate: bool = True
    eval_split: Literal["val", "test"] = "test"
    eval_limit: Optional[PositiveInt] = Field(None, description="evaluate only the first N cases")


class CTRGData(DataSpec):
    path: Optional[str] = Field(None, description="the folder of CTRG <id>.nii.gz volumes")
    annotation: Optional[str] = Field(None, description="CTRG annotation.json (train / val / test lists)")
    labels_csv: Optional[str] = Field(None, description="CTRG labels CSV, one CheXbert column per disease")
    make_synthetic: bool = Field(False, description="write a small synthetic CTRG-format dataset at data.path's parent")


def splits(spec: JobSpec) -> tuple[str, ...]:
    return ("train", spec.dia.eval_split) if spec.dia.evaluate else ("train",)


def plan(spec: JobSpec, resume_dir: Optional[Path] = None) -> None:
    """A single (multi-node) training + evaluation job; the dataset is checked here, before anything is submitted."""
    if resume_dir is not None:
        raise FieldError("--resume-missing", "dia_pangu has no per-item results; use --resume")
    d = spec.data
    for name in ("path", "annotation", "labels_csv"):
        if not getattr(d, name):
            raise FieldError(f"data.{name}", "required for the CTRG dataset (volumes folder, annotation.json, labels CSV)")
    if spec.dia.stage == 2 and spec.peft is None:
        raise FieldError("peft", "dia.stage: 2 adds LoRA on the LLM: give a peft: section (r, alpha, target_modules)")
    if not d.make_synthetic:
        from core.data.ctrg import DatasetError

        try:
            check_dataset(d.path, d.annotation, d.labels_csv, splits=splits(spec))
        except DatasetError as e:
            raise FieldError("data", str(e)) from None
    return None


def prepare_data(spec: JobSpec, session) -> dict[str, list[Case]]:
    d = spec.data
    if d.make_synthetic and session.rank == 0:
        write_synthetic(Path(d.path).parent, seed=d.seed)
    session.barrier()
    return check_dataset(d.path, d.annotation, d.labels_csv, splits=splits(spec))


def init_from_checkpoint(model, path: str) -> dict:
    """Load the vision encoder / perceiver keys of a Dia-LLaMA checkpoint whose names and shapes fit; list the rest."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    own = dict(model.named_parameters())
    loaded, skipped = [], []
    for key, value in state.items():
        name = key.replace("embedding_layer.vision_encoder.", "vit.").replace("embedding_layer.perceiver.", "perceiver.")
        if name in own and tuple(own[name].shape) == tuple(value.shape):
            with torch.no_grad():
                own[name].copy_(value.to(own[name].dtype))
            loaded.append(name)
        else:
            skipped.append(key)
    log.info("%s: loaded %d tensors, skipped %d (first: %s)", path, len(loaded), len(skipped), skipped[:5])
    return {"loaded": loaded, "skipped": skipped}


def run(spec: JobSpec, ctx: TaskContext) -> dict:
    import torch

    from core import engine as eng
    from core.models.dia_pangu import DiaPangu, vision_configs
    from core.models.pangu import load_pangu, load_tokenizer, model_folder
    from core.models.peft import apply_peft

    session = eng.start(spec, ctx)
    cases = prepare_data(spec, session)  # clear errors before any model is loaded
    folder = session.rank0_first(lambda: model_folder(spec))
    tok = load_tokenizer(folder)
    torch.manual_seed(spec.train.seed)
    session.enable_zero3_init()
    dtype = session.dtype
    llm = load_pangu(folder, dtype=dtype)
    vit_cfg, per_cfg = vision_configs(spec.dia.size)
    model = DiaPangu(llm, tok, vit_cfg, per_cfg, spec.dia.contrastive_weight)
    if spec.dia.init_from:
        init_from_checkpoint(model, spec.dia.init_from)
    if session.rank == 0:
        save_frozen_vision(model, ctx.run_dir)
    if spec.dia.stage == 2:
        model.llm = apply_peft(model.llm, spec.peft)
    engine = eng.initialize(session, model, spec)
    prompts = Prompts(tok, model, spec)
    train, device = cases["train"], session.device
    accum, world, rank = spec.deepspeed.grad_accum, session.dist.world_size, session.rank
    vit = model.vit.cfg

    def sample(k: int) -> int:
        return eng.sample_index(k, len(train), spec.data.seed)

    loader = Prefetcher(lambda i: load_volume(train[i].volume, vit.image_size, vit.frames), spec.data.workers)

    def batch_fn(step: int, micro: int):
        k = (step * accum + micro) * world + rank
        loader.ahead(sample(k + world * j) for j in range(1, 2 * max(spec.data.workers, 1) + 1))
        i = sample(k)
        ids, labels = prompts.training(train[i])
        return {"volume": loader.get(i).unsqueeze(0).to(device, dtype), "input_ids": ids.to(device),
                "labels": labels.to(device), "disease_labels": torch.tensor([train[i].labels], device=device)}

    def loss_fn(engine, batch):
        out = engine(**batch)
        return {"loss": out["loss"], "lm_loss": out["lm_loss"], "contrastive_loss": out["contrastive_loss"]}

    result = eng.Trainer(session, engine, spec, ctx, loss_fn, batch_fn).fit()
    if spec.dia.evaluate:
        result["evaluation"] = evaluate(spec, ctx, session, engine, prompts, cases[spec.dia.eval_split], dtype)
    result.pop("losses", None)
    return result


WORKLOAD = Workload(run=run, section="dia", Section=DiaSection, Data=CTRGData, trains=True, plan=plan)
