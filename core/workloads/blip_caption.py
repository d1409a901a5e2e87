"""BLIP captioning fine-tuned with LoRA (the `peft:` section) on MedTrinity-style rows, on the shared engine.

Training follows the lab's notebook (`Describing Medical Images：` + caption, padded to `caption.max_length`, a seeded
90/10 split cut to `train_size` / `test_size`, LoRA r16 / alpha 32 / dropout 0.1 on qkv, query, key, value) and
BLIP's own text convention (the decoder input starts with `[DEC]`, BLIP's bos). Two deliberate differences, both
switches: padding is masked out of the loss (`caption.mask_padding`; the notebook copied input_ids to labels and
so also trained on the pads) and evaluation prompts with the prefix and strips it from the caption, as BLIP's own
captioner does with its prompt.
Evaluation: captions for the held-out rows (each rank its share, gathered) in `results/captions.csv` (id, reference,
prediction), BLEU-1..4 / METEOR / ROUGE-L / CIDEr (pycocoevalcap, PTB-tokenised as COCO does) in
`results/metrics.json` and `results/metrics.png`; with `caption.baseline_eval` the untrained model is scored
first, for comparison. The adapter is saved in peft's format in `adapter/` (`PeftModel.from_pretrained` loads it).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from pydantic import Field, PositiveInt

from core.data.medtrinity import ImageRows, open_rows, split, synthetic_captions, write_synthetic
from core.errors import DatasetError
from core.runtime import TaskContext
from core.config import DataSpec, FieldError, JobSpec, Strict
from core.workloads import Shape, Workload

log = logging.getLogger("blip_caption")
PRESET = "blip-captioning-base"
HEAD = ("text_decoder.cls.predictions.decoder",)  # the LM head, tied to the word embeddings
METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


class CaptionSection(Strict):
    prefix: str = Field("Describing Medical Images：", description="text put before every caption (the lab's)")
    max_length: PositiveInt = Field(256, description="tokens per caption after padding / truncation")
    mask_padding: bool = Field(True, description="leave pad tokens out of the loss (false: as the lab's notebook)")
    mask_prefix: bool = Field(False, description="leave the prefix out of the loss (BLIP masks its prompt)")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="share held out by the seeded split")
    train_size: Optional[PositiveInt] = Field(None, description="use at most this many training rows (lab: 100000)")
    test_size: Optional[PositiveInt] = Field(None, description="evaluate at most this many held-out rows (lab: 1000)")
    max_new_tokens: PositiveInt = 64
    num_beams: PositiveInt = 1
    evaluate: bool = True
    baseline_eval: bool = Field(False, description="also score the untrained model, before training")


class CaptionData(DataSpec):
    path: Optional[str] = Field(None, description="a datasets folder (save_to_disk), a hub snapshot (folder of parquet "
                                                  "shards), a datasets cache folder, a .parquet or a .jsonl file")
    hf_config: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
                                     description="the dataset config (the lab's: 25M_demo): its subfolder of a "
                                                 "hub snapshot, its folder in a datasets cache (a name, not a path)")
    image_column: str = "image"
    caption_column: str = "caption"
    id_column: str = "id"
    make_synthetic: bool = Field(False, description="write a small synthetic set (real scikit-image medical "
                                                    "images) in all three formats next to data.path first")


# ---------------------------------------------------------------- plan (torch-free unless adapters are checked)
def model_cfg(spec: JobSpec) -> Optional[dict]:
    """config.json of model.path, else the preset's (BlipConfig's defaults: {}), else None."""
    from core.models.checkpoint_files import find_config

    cfg = find_config(spec.model.path)
    if cfg is not None:
        return cfg
    return {} if spec.model.preset == PRESET else None


def model_size(spec: JobSpec):
    from core.models.blip import meta_size

    cfg = model_cfg(spec)
    if cfg is None:
        return None
    size = meta_size(cfg, spec.peft, HEAD)
    if spec.peft is not None and spec.peft.quantize:
        from core.models.blip import meta_model
        from core.models.peft import frozen_size, quantized_numel

        quantized = quantized_numel(meta_model(cfg)[0], spec.peft, HEAD)
        size = frozen_size(size, quantized, spec.peft, spec.deepspeed.precision if spec.deepspeed else "bf16")
    return size


JAVA_MISSING = ("the evaluation's METEOR and PTB tokenizer (pycocoevalcap) run on Java and there is no `java` on "
                "{where}: install a JRE (apt-get install default-jre-headless; launchers/setup.sh does this) or set "
                "caption.evaluate: false")


def java_problem(where: str) -> Optional[str]:
    import shutil

    return JAVA_MISSING.format(where=where) if shutil.which("java") is None else None


def plan(spec: JobSpec, resume_dir: Optional[Path] = None, cluster=None) -> None:
    """Model and adapters first (the targets must exist: checked on the meta device), then the dataset's columns,
    then what the evaluation at the end needs (Java), where this machine is where the job runs."""
    if resume_dir is not None:
        raise FieldError("--resume-missing", "blip_caption has no per-item results; use --resume")
    if spec.model.preset not in (None, PRESET):
        raise FieldError("model.preset", f"unknown BLIP preset {spec.model.preset!r}; use {PRESET}")
    if not spec.model.path and spec.model.preset is None:
        raise FieldError("model.path", "give the local BLIP folder (config.json, weights, processor files)")
    if spec.peft is not None and spec.deepspeed is None and model_cfg(spec) is not None:
        # (with a deepspeed: section the plan's memory estimate builds the adapters and checks them)
        from core.models.peft import PeftTargetError

        try:
            model_size(spec)
        except PeftTargetError as e:
            field, message = str(e).split(": ", 1)
            raise FieldError(field, message) from None
    if not spec.data.make_synthetic:
        d = spec.data
        try:
            open_rows(d.path, d.image_column, d.caption_column, d.id_column, d.hf_config)
        except DatasetError as e:
            raise FieldError(e.field, e.message) from None
    if spec.caption.evaluate and cluster is not None:
        from core import scheduler

        if java_problem("this machine"):
            if scheduler.for_cluster(cluster).single_host:
                raise FieldError("caption.evaluate", java_problem("this machine"))
            # the nodes may have what the login node lacks: say so now, and every task checks before it trains
            return Shape(items=None, merge=False, notes=[
                "java: not on this machine; the evaluation's METEOR needs it on the compute nodes: each task checks "
                "before training starts and stops at once without it (caption.evaluate: false skips the evaluation)"])
    return None


# ---------------------------------------------------------------- run
def prepare(spec: JobSpec) -> ImageRows:
    d = spec.data
    if d.make_synthetic:
        write_synthetic(Path(d.path).parent, seed=d.seed)
    return open_rows(d.path, d.image_column, d.caption_column, d.id_column, d.hf_config)


def tiny_folder(spec: JobSpec, rows: ImageRows) -> Path:
    from core.models.blip import write_tiny_blip

    if not spec.model.path:
        raise FieldError("model.path", "give the local BLIP folder")
    if spec.model.make_tiny:
        write_tiny_blip(spec.model.path, rows.captions + synthetic_captions() + [spec.caption.prefix])
    return Path(spec.model.path)


class Batches:
    """Processor calls for training and prompts for generation, with BLIP's decoder conventions."""

    def __init__(self, processor, spec: JobSpec, device, dtype):
        self.proc, self.cfg, self.device, self.dtype = processor, spec.caption, device, dtype
        self.prefix_len = len(processor.tokenizer(self.cfg.prefix, add_special_tokens=False)["input_ids"])

    def training(self, images, captions):
        enc = self.proc(images=images, text=[self.cfg.prefix + c for c in captions], return_tensors="pt",
                        padding="max_length", max_length=self.cfg.max_length, truncation=True)
        ids = enc["input_ids"]
        ids[:, 0] = self.proc.tokenizer.bos_token_id  # BLIP's decoder starts at [DEC]
        labels = ids.clone()
        if self.cfg.mask_padding:
            labels[enc["attention_mask"] == 0] = -100
        if self.cfg.mask_prefix:
            labels[:, : 1 + self.prefix_len] = -100
        return {"pixel_values": enc["pixel_values"].to(self.device, self.dtype), "input_ids": ids.to(self.device),
                "attention_mask": enc["attention_mask"].to(self.device), "labels": labels.to(self.device)}

    def prompt(self, images):
        enc = self.proc(images=images, text=[self.cfg.prefix] * len(images), return_tensors="pt")
        return enc["pixel_values"].to(self.device, self.dtype), enc["input_ids"].to(self.device)

    def caption(self, out, prompt_len: int) -> str:
        # generate returns the prompt (minus its final [SEP]) followed by the new tokens
        return self.proc.tokenizer.decode(out[prompt_len - 1:], skip_special_tokens=True).strip()


def good_rows(rows: ImageRows, index: list[int]) -> list[int]:
    """The rows of `index` whose image decodes (the held-out rows only: every rank must caption the same list); bad
    ones are named in the log and counted."""
    return [i for i in index if rows.image(i) is not None]


def first_good(loader, order: list[int], pos: int):
    """The row at order[pos], or, when its image does not decode, the next one in `order` whose image does: a bad
    training image is skipped (and counted in rows.failed) when the loop meets it, deterministically, so a resumed
    run draws the same rows."""
    for j in range(len(order)):
        i = order[(pos + j) % len(order)]
        image = loader.get(i)
        if image is not None:
            return i, image
    raise RuntimeError("no training image decodes")


def run(spec: JobSpec, ctx: TaskContext) -> dict:
    import torch

    from core import engine as eng
    from core.models.blip import load_blip
    from core.models.peft import apply_peft, quantization_config, quantized_modules, save_adapter
    from core.run_folder import write_json_atomic
    cfg = spec.caption
    if cfg.evaluate and java_problem(ctx.hostname or "this node"):  # at the start, never after hours of training
        raise RuntimeError("caption.evaluate: " + java_problem(ctx.hostname or "this node"))
    session = eng.start(spec, ctx)
    rows = session.rank0_first(lambda: prepare(spec))
    train_idx, test_idx = split(len(rows), spec.data.seed, cfg.test_fraction, cfg.train_size, cfg.test_size)
    test_idx = good_rows(rows, test_idx)  # training images are checked as the loop meets them (first_good)

    def write_split():
        failed = dict(rows.failed)
        if session.dist.world_size > 1:  # each rank met its own share of the bad images
            import torch.distributed as tdist

            parts = [None] * session.dist.world_size
            tdist.all_gather_object(parts, failed)
            failed = {k: v for part in parts for k, v in sorted(part.items())}
        if session.rank == 0:
            write_json_atomic(ctx.run_dir / "split.json", {"train": [rows.ids[i] for i in train_idx],
                                                           "test": [rows.ids[i] for i in test_idx],
                                                           "skipped_images": failed})
        return failed

    write_split()
    folder = session.rank0_first(lambda: tiny_folder(spec, rows))
    quant = quantization_config(spec.peft, HEAD)
    # a quantized base computes its 4/8-bit matmuls in peft.compute_dtype; everything else (and the batches) stays in
    # deepspeed.precision's dtype, which DeepSpeed trains the adapters and modules_to_save in
    dtype = session.dtype
    torch.manual_seed(spec.train.seed)
    session.enable_zero3_init()
    model, processor = load_blip(folder, dtype=dtype, quantization_config=quant, device=session.device)
    quantized = quantized_modules(model) if quant else 0
    model = apply_peft(model, spec.peft, HEAD)
    engine = eng.initialize(session, model, spec)
    batches = Batches(processor, spec, session.device, dtype)
    results = ctx.run_dir / "results"
    test_rows = test_idx
    untrained = None
    if cfg.evaluate and cfg.baseline_eval and session.resume is None:
        untrained = evaluate(spec, ctx, session, engine.module, batches, rows, test_rows, "untrained")

    micro, accum = spec.deepspeed.micro_batch, spec.deepspeed.grad_accum
    world, rank, n = session.dist.world_size, session.rank, len(train_idx)

    from core.data.prefetch import Prefetcher

    loader = Prefetcher(rows.image, spec.data.workers)  # images read and decoded in background threads

    def batch_fn(step: int, m: int):
        first = ((step * accum + m) * world + rank) * micro
        ahead = ((step * accum + m + 1) * world + rank) * micro  # this rank's next micro-batch
        loader.ahead(train_idx[eng.sample_index(k, n, spec.data.seed)] for k in range(ahead, ahead + micro))
        picked = [first_good(loader, train_idx, eng.sample_index(k, n, spec.data.seed))
                  for k in range(first, first + micro)]
        return batches.training([img for _, img in picked], [rows.captions[i] for i, _ in picked])

    def loss_fn(engine, batch):
        return engine(**batch).loss

    result = eng.Trainer(session, engine, spec, ctx, loss_fn, batch_fn).fit()
    if spec.peft is not None:
        save_adapter(engine, ctx.run_dir / "adapter", rank)
    if cfg.evaluate:
        result["evaluation"] = evaluate(spec, ctx, session, engine.module, batches, rows, test_rows, "trained")
        if rank == 0:
            plot(results, result["evaluation"], untrained)
        if untrained:
            result["untrained"] = untrained  # the submit summary prints both side by side
    failed = write_split()
    result.update(train_rows=n, test_rows=len(test_rows), skipped_images=len(failed), quantized_modules=quantized,
                  trainable=sum(p.numel() for p in engine.module.parameters() if p.requires_grad))
    result.pop("losses", None)
    return result


def generate(model, batches: Batches, rows: ImageRows, index: list[int], spec: JobSpec, rank: int, world: int,
             sync: bool, progress: Optional[tuple[Path, str]] = None) -> list[dict]:
    """Captions for this rank's share of `index` (core.engine.padded_share); `progress`: (run folder, what) for
    rank 0's notes (core.results.progress)."""
    import torch

    from core.engine import padded_share
    from core.results.progress import noted

    model.eval()
    out_rows = []
    with torch.no_grad():
        for i, keep in noted(padded_share(index, rank, world), progress, rank):
            pixels, prompt = batches.prompt([rows.image(i)])
            out = model.generate(pixel_values=pixels, input_ids=prompt, max_new_tokens=spec.caption.max_new_tokens,
                                 num_beams=spec.caption.num_beams, do_sample=False, synced_gpus=sync)
            if keep:
                out_rows.append({"id": rows.ids[i], "reference": rows.captions[i],
                                 "prediction": batches.caption(out[0], prompt.shape[1])})
    model.train()
    return out_rows


def evaluate(spec: JobSpec, ctx: TaskContext, session, model, batches: Batches, rows: ImageRows, index: list[int],
             label: str) -> dict:
    """Captions of the held-out rows gathered on rank 0, written and scored there."""
    from core.metrics import report_metrics
    from core.results import ResultFolder

    mine = generate(model, batches, rows, index, spec, session.rank, session.dist.world_size,
                    sync=session.dist.world_size > 1 and session.zero3,
                    progress=(ctx.run_dir, f"captioning the held-out images ({label} model)"))
    ordered = session.gather_rows(mine, "id", [rows.ids[i] for i in index])
    if ordered is None:
        return {}
    out = ResultFolder(ctx.run_dir / "results")
    suffix = "" if label == "trained" else f"_{label}"
    csv_path = out.csv(f"captions{suffix}.csv", ["id", "reference", "prediction"], ordered, fieldnames=True)
    scores = report_metrics({r["id"]: r["reference"] for r in ordered}, {r["id"]: r["prediction"] for r in ordered},
                            cider=True)
    metrics = {**scores, "images": len(ordered), "skipped_images": sorted(rows.failed)}
    metrics_json = out.json(f"metrics{suffix}.json", metrics)
    log.info("%s: %d captions, BLEU-4 %.4f, CIDEr %.4f -> %s", label, len(ordered), scores["BLEU-4"],
             scores["CIDEr"], csv_path)
    return {"csv": str(csv_path), "metrics": str(metrics_json),
            **({"plot": str(out.path("metrics.png"))} if label == "trained" else {}), **scores,
            "images": len(ordered)}


def plot(results: Path, trained: dict, untrained: Optional[dict]) -> None:
    """results/metrics.png: bars of every metric, trained next to untrained; CIDEr (0-10) on its own axis."""
    from core.results import ResultFolder
    from core.workloads.common import pyplot

    plt = pyplot()
    fig, (ax, ax_cider) = plt.subplots(1, 2, figsize=(8, 3.5), gridspec_kw={"width_ratios": [6, 1.3]})
    runs = [("untrained", untrained, "tab:gray"), ("LoRA fine-tuned", trained, "tab:blue")] if untrained else \
        [("LoRA fine-tuned", trained, "tab:blue")]
    width = 0.8 / len(runs)
    for j, (label, scores, color) in enumerate(runs):
        offset = (j - (len(runs) - 1) / 2) * width
        ax.bar([i + offset for i in range(6)], [scores[m] for m in METRICS[:6]], width=width, label=label, color=color)
        ax_cider.bar([offset], [scores["CIDEr"]], width=width, color=color)
    ax.set_xticks(range(6), METRICS[:6], rotation=30)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax_cider.set_xticks([0], ["CIDEr"])
    ax.set_title(f"BLIP captions on {trained['images']} held-out images")
    fig.tight_layout()
    ResultFolder(results).figure("metrics.png", fig)


WORKLOAD = Workload(run=run, section="caption", Section=CaptionSection, Data=CaptionData, trains=True, plan=plan,
                    model_size=model_size)
