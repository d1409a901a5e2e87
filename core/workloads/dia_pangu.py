"""Dia-Pangu: train under DeepSpeed (frozen openPangu sharded by ZeRO-3, batch 1, grad accumulation, constant lr with
warmup, checkpoints of trainable weights only, resume), then evaluate: greedy report generation on the test split
(each rank takes its share, results gathered into one CSV), BLEU-1..4 / METEOR / ROUGE-L with pycocoevalcap,
clinical precision / recall / F1 of the 14 disease calls, a metrics JSON and a bar plot in the run folder.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from core.data.ctrg import CONDITIONS, Case, Prefetcher, check_dataset, load_volume, write_synthetic


def vision_configs(size: str):
    from core.models.perceiver import TINY_PERCEIVER, PerceiverConfig
    from core.models.vit3d import TINY_VIT, ViT3DConfig

    return (TINY_VIT, TINY_PERCEIVER) if size == "tiny" else (ViT3DConfig(), PerceiverConfig())


def prepare_data(spec, session) -> dict[str, list[Case]]:
    d = spec.data
    if d.make_synthetic and session.rank == 0:
        write_synthetic(Path(d.path).parent, seed=d.seed)
    session.barrier()
    splits = ("train", spec.dia.eval_split) if spec.dia.evaluate else ("train",)
    return check_dataset(d.path, d.annotation, d.labels_csv, splits=splits)


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
    print(f"[dia_pangu] {path}: loaded {len(loaded)} tensors, skipped {len(skipped)} "
          f"(first: {skipped[:5]})", flush=True)
    return {"loaded": loaded, "skipped": skipped}


class Prompts:
    """Token ids for one case: BOS, image block, question, diagnostic sentences, then (training) the report."""

    def __init__(self, tokenizer, model, spec):
        self.tok, self.model, self.spec = tokenizer, model, spec

    def prefix(self, labels: list[int]) -> list[int]:
        from core.models.dia_pangu import diagnosis_text

        text = f" {self.spec.dia.question} {diagnosis_text(labels)} Findings:"
        return [self.tok.bos_token_id] + self.model.image_block_ids() + self.tok.encode(text, add_special_tokens=False)

    def training(self, case: Case):
        import torch

        prefix = self.prefix(case.labels)
        report = self.tok.encode(" " + case.finding, add_special_tokens=False)[: self.spec.dia.max_report_tokens]
        ids = prefix + report + [self.tok.eos_token_id]
        labels = [-100] * len(prefix) + report + [self.tok.eos_token_id]
        return torch.tensor([ids]), torch.tensor([labels])


def run(spec, ctx) -> dict:
    import torch

    from core import engine as eng
    from core.models.dia_pangu import DiaPangu
    from core.models.pangu import apply_lora, load_pangu, load_tokenizer

    session = eng.start(spec, ctx)
    cases = prepare_data(spec, session)  # clear errors before any model is loaded
    folder = session.model_folder(spec)
    tok = load_tokenizer(folder)
    torch.manual_seed(spec.train.seed)
    session.enable_zero3_init()
    dtype = torch.float32 if spec.deepspeed and spec.deepspeed.precision == "fp32" else torch.bfloat16
    llm = load_pangu(folder, dtype=dtype)
    vit_cfg, per_cfg = vision_configs(spec.dia.size)
    model = DiaPangu(llm, tok, vit_cfg, per_cfg, spec.dia.contrastive_weight)
    if spec.dia.init_from:
        init_from_checkpoint(model, spec.dia.init_from)
    if session.rank == 0:
        save_frozen_vision(model, ctx.run_dir)
    if spec.dia.stage == 2:
        if not spec.train.lora:
            raise ValueError("dia.stage: 2 adds LoRA on the LLM: give train.lora (r, alpha, target_modules)")
        model.llm = apply_lora(model.llm, spec.train.lora)
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


def evaluate(spec, ctx, session, engine, prompts, cases: list[Case], dtype) -> dict:
    """Each rank generates for its share (padded so every rank runs the same number of forward passes, which
    ZeRO-3's parameter gathering needs); rank 0 gathers, writes the CSV and scores it."""
    import torch.distributed as tdist

    if spec.dia.eval_limit:
        cases = cases[: spec.dia.eval_limit]
    world, rank = session.dist.world_size, session.rank
    rows = generate_rows(engine.module, prompts, cases, spec, session.device, dtype, rank, world)
    gathered = [None] * world
    if world > 1:
        tdist.all_gather_object(gathered, rows)
    else:
        gathered = [rows]
    if rank != 0:
        return {}
    by_id = {}
    for part in gathered:
        for row in part:
            by_id.setdefault(row["ID"], row)
    ordered = [by_id[c.id] for c in cases if c.id in by_id]
    return write_results(ctx.run_dir, ordered)


def generate_rows(model, prompts, cases: list[Case], spec, device, dtype, rank: int = 0, world: int = 1) -> list[dict]:
    """Greedy reports for this rank's share of the cases; every rank runs the same number of generations (a repeat
    pads the short shares) because ZeRO-3 gathers parameters with collectives in every forward."""
    import torch

    model.eval()
    share = [cases[i] for i in range(rank, len(cases), world)]
    rounds = -(-len(cases) // world)
    vit = model.vit.cfg
    rows = []
    with torch.no_grad():
        for r in range(rounds):
            case = share[r] if r < len(share) else cases[0]
            vol = load_volume(case.volume, vit.image_size, vit.frames).unsqueeze(0).to(device, dtype)
            calls, latents = model.predict_diseases(vol)
            pred_labels = calls[0].tolist()
            ids = torch.tensor([prompts.prefix(pred_labels)], device=device)
            out = model.llm.generate(inputs_embeds=model.embed(ids, latents), attention_mask=torch.ones_like(ids),
                                     max_new_tokens=spec.dia.max_new_tokens, do_sample=False,
                                     eos_token_id=prompts.tok.eos_token_id, pad_token_id=prompts.tok.pad_token_id,
                                     synced_gpus=world > 1)
            text = prompts.tok.decode(out[0], skip_special_tokens=True).strip()
            if r < len(share):
                rows.append({"ID": case.id, "Question": spec.dia.question, "Ground Truth": case.finding, "Pred": text,
                             "GT_labels": json.dumps(case.labels), "Pred_labels": json.dumps(pred_labels)})
    return rows


FROZEN_VISION = "vision_frozen.safetensors"


def save_frozen_vision(model, run_dir: Path) -> None:
    """The frozen 3D ViT once per run (checkpoints leave frozen weights out), so a trained run can be rebuilt."""
    import os

    from safetensors.torch import save_file

    path = Path(run_dir) / FROZEN_VISION
    if path.is_file():
        return
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.vit.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def load_trained(dia_run: Path, llm_folder: Path, device, dtype):
    """A trained Dia-Pangu from its run folder (spec, frozen ViT, newest complete checkpoint of the trainable
    tensors), on top of the LLM in `llm_folder` (e.g. a pruned openPangu). Returns (model, prompts, spec)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from core.checkpoint import CheckpointManager
    from core.models.dia_pangu import DiaPangu
    from core.models.pangu import load_pangu, load_tokenizer
    from core.spec import JobSpec

    dia_run = Path(dia_run)
    spec = JobSpec.model_validate(json.loads((dia_run / "run.json").read_text())["spec"])
    if spec.dia.stage == 2:
        raise ValueError(f"{dia_run}: a stage-2 (LoRA) run's adapters are tied to the unpruned layers; evaluate a "
                         f"stage-1 run with pruned models")
    done = CheckpointManager(dia_run / "checkpoints", 0, 1).complete()
    if not done or not (dia_run / FROZEN_VISION).is_file():
        raise FileNotFoundError(f"{dia_run}: no complete checkpoint or no {FROZEN_VISION}: not a finished Dia-Pangu run")
    tok = load_tokenizer(llm_folder)
    vit_cfg, per_cfg = vision_configs(spec.dia.size)
    model = DiaPangu(load_pangu(llm_folder, dtype=dtype), tok, vit_cfg, per_cfg, spec.dia.contrastive_weight)
    model.vit.load_state_dict(load_file(str(dia_run / FROZEN_VISION)))
    state = get_fp32_state_dict_from_zero_checkpoint(str(dia_run / "checkpoints"), tag=done[-1][1])
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"{dia_run}: checkpoint {done[-1][1]} lacks trainable tensors {missing[:5]}")
    model.load_state_dict(state, strict=False)
    return model.to(device, dtype).eval(), Prompts(tok, model, spec), spec


def write_results(run_dir: Path, rows: list[dict], folder: str = "results") -> dict:
    from core.metrics import clinical_prf, report_metrics

    results = Path(run_dir) / folder
    results.mkdir(parents=True, exist_ok=True)
    csv_path = results / "dia-pangu.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["ID", "Question", "Ground Truth", "Pred", "GT_labels", "Pred_labels"])
        w.writeheader()
        w.writerows(rows)
    scores = report_metrics({r["ID"]: r["Ground Truth"] for r in rows}, {r["ID"]: r["Pred"] for r in rows})
    clinical = clinical_prf([json.loads(r["GT_labels"]) for r in rows], [json.loads(r["Pred_labels"]) for r in rows],
                            CONDITIONS)
    metrics = {**scores, **{k: v for k, v in clinical.items() if k != "per_disease_f1"},
               "per_disease_f1": clinical["per_disease_f1"], "cases": len(rows)}
    (results / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_metrics(metrics, results / "metrics.png")
    print(f"[dia_pangu] {len(rows)} reports -> {csv_path}; metrics -> {results / 'metrics.json'}", flush=True)
    return {"csv": str(csv_path), "metrics": str(results / "metrics.json"),
            **{k: v for k, v in metrics.items() if k != "per_disease_f1"}}


def plot_metrics(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "micro_precision", "micro_recall", "micro_f1"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(names, [metrics[n] for n in names], color=["tab:blue"] * 6 + ["tab:green"] * 3)
    ax.set_ylim(0, 1)
    ax.set_title(f"Dia-Pangu on {metrics['cases']} cases")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
