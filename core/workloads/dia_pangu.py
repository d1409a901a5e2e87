"""Dia-Pangu: train under DeepSpeed (frozen openPangu sharded by ZeRO-3, batch 1, grad accumulation, constant lr with
warmup, `train.epochs` over the training split, checkpoints of trainable weights only, resume), then evaluate
(core.workloads.dia_reports): report generation on the test split with Dia-LLaMA's prompt and decoding, BLEU-1..4 /
METEOR / ROUGE-L on the raw strings, Dia-LLaMA's CheXbert clinical efficacy, the disease head's own calls, a
metrics JSON and a bar plot in the run folder.

`dia.init_from` loads a released Dia-LLaMA checkpoint whole (core.models.dia_pangu.load_dia_llama: every vision-side
tensor by name, the LLaMA vocabulary and LLaMA itself listed as unused, anything else refused before training) and
writes what it loaded to `init_from.json` in the run folder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, PositiveInt

from core.data.ctrg import GUIDE, Case, check_dataset, load_volume, write_synthetic
from core.data.prefetch import Prefetcher
from core.runtime import TaskContext
from core.config import DataSpec, FieldError, JobSpec, Strict
from core.workloads import Shape, Workload
from core.workloads.dia_reports import Prompts, evaluate, save_frozen_vision

log = logging.getLogger("dia_pangu")
INIT_REPORT = "init_from.json"


class DiaSection(Strict):
    size: Literal["full", "tiny"] = Field("full", description="3D ViT + perceiver shapes (tiny: CPU tests)")
    stage: Literal[1, 2] = Field(1, description="1: perceiver + fc + image markers; 2: + LoRA (peft:)")
    init_from: Optional[str] = Field(None, description="Dia-LLaMA checkpoint (pytorch_model.bin, *.safetensors or a "
                                                       "folder): every vision-side tensor is loaded, strictly")
    train_head: bool = Field(False, description="train the diagnostic head (prototypes, proj, memories, temp); "
                                                "false: frozen, from dia.init_from (the lab's)")
    question: str = Field("", description="text before the diagnostic sentences (Dia-LLaMA has none)")
    guide: str = Field(GUIDE, description="the instruction after the diagnostic sentences (Dia-LLaMA's)")
    max_new_tokens: PositiveInt = 300
    max_report_tokens: PositiveInt = 256
    contrastive_weight: float = Field(4.0, ge=0)
    decoding: Literal["sample", "greedy"] = Field("sample", description="sample: Dia-LLaMA's top-k sampling; greedy")
    top_k: PositiveInt = 50
    top_p: float = Field(1.0, gt=0, le=1)
    temperature: float = Field(1.0, gt=0)
    seed: int = Field(20, description="sampling seed (+ the case's position in the evaluated split)")
    nlg_tokenization: Literal["raw", "ptb", "both"] = Field(
        "raw", description="report metrics on the raw strings (Dia-LLaMA's), PTB-tokenised, or both (raw first)")
    chexbert: Optional[str] = Field(None, description="local chexbert.pth: Dia-LLaMA's clinical efficacy (ce_*) "
                                                      "from CheXbert labels of reference and generated reports")
    chexbert_tokenizer: Optional[str] = Field(None, description="folder with bert-base-uncased's vocab.txt "
                                                                "(default: dia.chexbert's folder)")
    evaluate: bool = True
    baseline_eval: bool = Field(False, description="also score the untrained model on the same cases before training "
                                                   "(results/untrained/): the summary and the plot show both")
    eval_split: Literal["val", "test"] = "test"
    eval_limit: Optional[PositiveInt] = Field(None, description="evaluate only the first N cases")


class CTRGData(DataSpec):
    path: Optional[str] = Field(None, description="the folder of CTRG <id>.nii.gz volumes")
    annotation: Optional[str] = Field(None, description="CTRG annotation.json (train / val / test lists)")
    labels_csv: Optional[str] = Field(None, description="CTRG labels CSV (Dia-LLaMA's CTRG_finding_labels.csv): id + "
                                                        "one CheXbert column per disease")
    make_synthetic: bool = Field(False, description="write a small synthetic CTRG-format dataset at data.path's parent")


def splits(spec: JobSpec) -> tuple[str, ...]:
    return ("train", spec.dia.eval_split) if spec.dia.evaluate else ("train",)


def plan(spec: JobSpec, resume_dir: Optional[Path] = None) -> Shape:
    """A single (multi-node) training + evaluation job; the spec's switches and the dataset are checked here, before
    anything is submitted. Reports the training split's size, so the plan prints the steps of train.epochs."""
    if resume_dir is not None:
        raise FieldError("--resume-missing", "dia_pangu has no per-item results; use --resume")
    d, dia = spec.data, spec.dia
    for name in ("path", "annotation", "labels_csv"):
        if not getattr(d, name):
            raise FieldError(f"data.{name}", "required for the CTRG dataset (volumes folder, annotation.json, labels CSV)")
    if dia.stage == 2 and spec.peft is None:
        raise FieldError("peft", "dia.stage: 2 adds LoRA on the LLM: give a peft: section (r, alpha, target_modules)")
    if dia.stage == 1 and spec.peft is not None and spec.peft.quantize:
        raise FieldError("peft.quantize", "stage 1 adds no LoRA (the LLM is frozen, peft: is read in stage 2 only), "
                                          "so nothing would load the base in 4/8 bit; drop peft.quantize or set "
                                          "dia.stage: 2")
    if not dia.train_head and not dia.init_from:
        raise FieldError("dia.train_head", "the diagnostic head is frozen (dia.train_head: false) and comes from a "
                                           "Dia-LLaMA checkpoint: give dia.init_from, or set dia.train_head: true")
    samples = None
    if not d.make_synthetic:
        from core.errors import DatasetError

        try:
            samples = len(check_dataset(d.path, d.annotation, d.labels_csv, splits=splits(spec))["train"])
        except DatasetError as e:
            raise FieldError(e.field, e.message) from None
    if dia.init_from and not Path(dia.init_from).exists():
        raise FieldError("dia.init_from", f"{dia.init_from}: Dia-LLaMA checkpoint not found (pytorch_model.bin, "
                                          f"*.safetensors or a folder holding one)")
    if dia.chexbert and not spec.model.make_tiny:
        if not Path(dia.chexbert).is_file():
            raise FieldError("dia.chexbert", f"{dia.chexbert}: CheXbert checkpoint not found (chexbert.pth)")
        vocab = Path(dia.chexbert_tokenizer or Path(dia.chexbert).parent) / "vocab.txt"
        if not vocab.is_file():
            raise FieldError("dia.chexbert_tokenizer", f"{vocab} not found: the CheXbert tokenizer is "
                                                       f"bert-base-uncased's vocab.txt, from a local folder")
    return Shape(items=None, merge=False, samples=samples)


def model_size(spec: JobSpec):
    """The whole Dia-Pangu (LLM of model.path / model.preset, 3D ViT, perceiver, fc, head, markers; + LoRA in
    stage 2) built on the meta device, with the trainable count of this spec."""
    import dataclasses

    import torch

    from core.model_sizes import model_config, size_of
    from core.models.dia_pangu import DiaPangu, vision_configs
    from core.models.pangu import llama_config

    cfg = model_config(spec.model.path, spec.model.preset)
    if cfg is None:
        return None
    from transformers import LlamaForCausalLM

    config = llama_config(cfg)
    vit_cfg, per_cfg = vision_configs(spec.dia.size)
    with torch.device("meta"):
        model = DiaPangu(LlamaForCausalLM(config), None, vit_cfg, per_cfg, train_head=spec.dia.train_head)
    peft = spec.peft if spec.dia.stage == 2 else None
    if peft is not None:
        from core.models.peft import apply_peft

        model.llm = apply_peft(model.llm, peft)
    size = size_of(model, layers=config.num_hidden_layers, hidden=config.hidden_size,
                   heads=config.num_attention_heads, vocab=config.vocab_size)
    size = dataclasses.replace(size, trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    if peft is None or not peft.quantize:
        return size
    from core.models.pangu import HEAD
    from core.models.peft import frozen_size, quantized_numel

    with torch.device("meta"):  # the LLM as bitsandbytes sees it (unadapted): its linear layers are what is packed
        quantized = quantized_numel(LlamaForCausalLM(config), peft, HEAD)
    return frozen_size(size, quantized, peft, spec.deepspeed.precision if spec.deepspeed else "bf16")


def prepare_data(spec: JobSpec, session) -> dict[str, list[Case]]:
    d = spec.data
    if d.make_synthetic and session.rank == 0:
        write_synthetic(Path(d.path).parent, seed=d.seed)
    session.barrier()
    return check_dataset(d.path, d.annotation, d.labels_csv, splits=splits(spec))


def init_from_checkpoint(model, path: str, run_dir: Optional[Path] = None, rank: int = 0) -> dict:
    """load_dia_llama, its report written to <run_dir>/init_from.json (rank 0) and summarised in the log."""
    from core.models.dia_pangu import load_dia_llama
    from core.run_folder import write_json_atomic

    report = load_dia_llama(model, path)
    if rank == 0:
        if run_dir is not None:
            write_json_atomic(Path(run_dir) / INIT_REPORT, report)
        log.info("%s: loaded %d vision-side tensors; not used: %s", path, report["counts"]["loaded"],
                 ", ".join(f"{u['key']} ({u['count']})" for u in report["unused"]) or "nothing")
    return report


def enable_activation_checkpointing(llm) -> bool:
    """The LLM's activation (gradient) checkpointing, as deepspeed.activation_checkpointing asks."""
    if not getattr(llm, "supports_gradient_checkpointing", False):
        return False
    if hasattr(llm, "activation_checkpointing_enable"):
        llm.activation_checkpointing_enable({"use_reentrant": False})
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    flag = "is_activation_checkpointing" if hasattr(type(llm), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(llm, flag, True))


def run(spec: JobSpec, ctx: TaskContext) -> dict:
    import torch

    from core import engine as eng
    from core.models.dia_pangu import DiaPangu, vision_configs
    from core.models.pangu import HEAD, load_pangu, load_tokenizer, model_folder
    from core.models.peft import apply_peft, quantization_config, quantized_modules

    session = eng.start(spec, ctx)
    cases = prepare_data(spec, session)  # clear errors before any model is loaded
    folder = session.rank0_first(lambda: model_folder(spec))
    if spec.dia.chexbert and spec.model.make_tiny:
        from core.models.chexbert import write_tiny_chexbert

        target = Path(spec.dia.chexbert)
        session.rank0_first(lambda: write_tiny_chexbert(target.parent, name=target.name))
    tok = load_tokenizer(folder)
    torch.manual_seed(spec.train.seed)
    session.enable_zero3_init()
    dtype = session.dtype
    # stage 2 with peft.quantize: the frozen LLM in 4/8 bit (QLoRA; its head and modules_to_save in dtype)
    quant = quantization_config(spec.peft, HEAD) if spec.dia.stage == 2 else None
    llm = load_pangu(folder, dtype=dtype, quantization_config=quant, device=session.device if quant else None)
    quantized = quantized_modules(llm) if quant else 0
    vit_cfg, per_cfg = vision_configs(spec.dia.size)
    model = DiaPangu(llm, tok, vit_cfg, per_cfg, spec.dia.contrastive_weight, train_head=spec.dia.train_head)
    init = init_from_checkpoint(model, spec.dia.init_from, ctx.run_dir, session.rank) if spec.dia.init_from else None
    ds = spec.deepspeed
    checkpointing = enable_activation_checkpointing(model.llm) if ds and ds.activation_checkpointing else False
    if session.rank == 0:
        save_frozen_vision(model, ctx.run_dir)
    if spec.dia.stage == 2:
        model.llm = apply_peft(model.llm, spec.peft, HEAD)
    model.train()  # as Dia-LLaMA's trainer: dropout in the (frozen) ViT, checkpointing active in the LLM
    train, device = cases["train"], session.device
    accum, world, rank = spec.deepspeed.grad_accum, session.dist.world_size, session.rank
    steps = eng.total_steps(spec, len(train), world)
    if rank == 0 and spec.train.epochs is not None:
        log.info("train.epochs %g over %d training cases at %d ranks x grad-accum %d: %d optimizer steps",
                 spec.train.epochs, len(train), world, accum, steps)
    engine = eng.initialize(session, model, spec, steps=steps)
    prompts = Prompts(tok, model, spec)
    untrained = None
    if spec.dia.evaluate and spec.dia.baseline_eval and session.resume is None:
        # before any step, on the same cases and decoding; its own RNG, so training draws what it would without it
        with torch.random.fork_rng(devices=[]):
            untrained = evaluate(spec, ctx, session, engine, prompts, cases[spec.dia.eval_split], dtype,
                                 folder="results/untrained", what="scoring the untrained model")
        model.train()
    vit = model.vit.cfg

    def sample(k: int) -> int:
        return eng.sample_index(k, len(train), spec.data.seed)

    loader = Prefetcher(lambda i: load_volume(train[i].volume, vit.image_size, vit.frames, vit.design_size),
                        spec.data.workers)

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

    result = eng.Trainer(session, engine, spec, ctx, loss_fn, batch_fn, steps=steps).fit()
    result.update(activation_checkpointing=checkpointing, total_steps=steps, train_cases=len(train),
                  quantized_modules=quantized,
                  init_from=init["counts"] if init else None)
    if spec.dia.evaluate:
        result["evaluation"] = evaluate(spec, ctx, session, engine, prompts, cases[spec.dia.eval_split], dtype,
                                        baseline=ctx.run_dir / "results" / "untrained" / "metrics.json")
        if untrained is not None:
            result["untrained"] = untrained
    result.pop("losses", None)
    return result


WORKLOAD = Workload(run=run, section="dia", Section=DiaSection, Data=CTRGData, trains=True, plan=plan,
                    model_size=model_size, checkpointing=True)
