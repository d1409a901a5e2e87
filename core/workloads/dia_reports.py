"""Dia-Pangu's prompts, report generation and scoring: shared by the training workload (`dia_pangu`, which
evaluates after training) and the pruning workload (`prune`, which evaluates a trained run on each pruned LLM).

Generation on the test split: each rank takes its share, the rows are gathered into one CSV; BLEU-1..4 / METEOR /
ROUGE-L with pycocoevalcap, clinical precision / recall / F1 of the 14 disease calls, a metrics JSON and a plot.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from core.data.ctrg import CONDITIONS, Case, load_volume
from core.models.pangu import bos_encode
from core.run_folder import atomic_path, read_record, write_json_atomic
from core.spec import parse_spec
from core.workloads.common import pyplot

log = logging.getLogger("dia_pangu")


class Prompts:
    """Token ids for one case: BOS, image block, question, diagnostic sentences, then (training) the report."""

    def __init__(self, tokenizer, model, spec):
        self.tok, self.model, self.spec = tokenizer, model, spec

    def prefix(self, labels: list[int]) -> list[int]:
        from core.models.dia_pangu import diagnosis_text

        text = f" {self.spec.dia.question} {diagnosis_text(labels)} Findings:"
        bos, *words = bos_encode(self.tok, text)
        return [bos] + self.model.image_block_ids() + words

    def training(self, case: Case):
        import torch

        prefix = self.prefix(case.labels)
        report = self.tok.encode(" " + case.finding, add_special_tokens=False)[: self.spec.dia.max_report_tokens]
        ids = prefix + report + [self.tok.eos_token_id]
        labels = [-100] * len(prefix) + report + [self.tok.eos_token_id]
        return torch.tensor([ids]), torch.tensor([labels])


def evaluate(spec, ctx, session, engine, prompts, cases: list[Case], dtype) -> dict:
    """Each rank generates for its share; rank 0 gathers, writes the CSV and scores it."""
    if spec.dia.eval_limit:
        cases = cases[: spec.dia.eval_limit]
    rows = generate_rows(engine.module, prompts, cases, spec, session.device, dtype, session.rank,
                         session.dist.world_size)
    ordered = session.gather_rows(rows, "ID", [c.id for c in cases])
    return {} if ordered is None else write_results(ctx.run_dir, ordered)


def generate_rows(model, prompts, cases: list[Case], spec, device, dtype, rank: int = 0, world: int = 1) -> list[dict]:
    """Reports for this rank's share of the cases (core.engine.padded_share: the same number of generations on
    every rank)."""
    import torch

    from core.engine import padded_share

    model.eval()
    vit = model.vit.cfg
    rows = []
    with torch.no_grad():
        for case, keep in padded_share(cases, rank, world):
            vol = load_volume(case.volume, vit.image_size, vit.frames).unsqueeze(0).to(device, dtype)
            calls, latents = model.predict_diseases(vol)
            pred_labels = calls[0].tolist()
            ids = torch.tensor([prompts.prefix(pred_labels)], device=device)
            out = model.llm.generate(inputs_embeds=model.embed(ids, latents), attention_mask=torch.ones_like(ids),
                                     max_new_tokens=spec.dia.max_new_tokens, do_sample=False,
                                     eos_token_id=prompts.tok.eos_token_id, pad_token_id=prompts.tok.pad_token_id,
                                     synced_gpus=world > 1)
            text = prompts.tok.decode(out[0], skip_special_tokens=True).strip()
            if keep:
                rows.append({"ID": case.id, "Question": spec.dia.question, "Ground Truth": case.finding, "Pred": text,
                             "GT_labels": json.dumps(case.labels), "Pred_labels": json.dumps(pred_labels)})
    return rows


FROZEN_VISION = "vision_frozen.safetensors"


def save_frozen_vision(model, run_dir: Path) -> None:
    """The frozen 3D ViT once per run (checkpoints leave frozen weights out), so a trained run can be rebuilt."""
    from safetensors.torch import save_file

    path = Path(run_dir) / FROZEN_VISION
    if path.is_file():
        return
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.vit.state_dict().items()}, str(tmp))


def load_trained(dia_run: Path, llm_folder: Path, device, dtype):
    """A trained Dia-Pangu from its run folder (spec, frozen ViT, newest complete checkpoint of the trainable
    tensors), on top of the LLM in `llm_folder` (e.g. a pruned openPangu). Returns (model, prompts, spec)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from core.checkpoint import CheckpointManager
    from core.models.dia_pangu import DiaPangu, vision_configs
    from core.models.pangu import load_pangu, load_tokenizer

    dia_run = Path(dia_run)
    spec = parse_spec(read_record(dia_run)["spec"], str(dia_run / "run.json"))
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
    write_json_atomic(results / "metrics.json", metrics)
    plot_metrics(metrics, results / "metrics.png")
    log.info("%d reports -> %s; metrics -> %s", len(rows), csv_path, results / "metrics.json")
    return {"csv": str(csv_path), "metrics": str(results / "metrics.json"),
            **{k: v for k, v in metrics.items() if k != "per_disease_f1"}}


def plot_metrics(metrics: dict, path: Path) -> None:
    plt = pyplot()
    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "micro_precision", "micro_recall", "micro_f1"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(names, [metrics[n] for n in names], color=["tab:blue"] * 6 + ["tab:green"] * 3)
    ax.set_ylim(0, 1)
    ax.set_title(f"Dia-Pangu on {metrics['cases']} cases")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
