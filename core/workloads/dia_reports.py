"""Dia-Pangu's prompts, report generation and scoring: shared by the training workload (`dia_pangu`, which
evaluates after training) and the pruning workload (`prune`, which evaluates a trained run on each pruned LLM).

Generation on the test split: each rank takes its share, the rows are gathered into one CSV. Scores in
`metrics.json`: BLEU-1..4 / METEOR / ROUGE-L with pycocoevalcap on the raw report strings as Dia-LLaMA computes them
(`nlg_tokenization: raw`; PTB-tokenised ones on request, under `nlg_ptb`), Dia-LLaMA's clinical efficacy (`ce_*`:
the CheXbert labeler run on the reference and the generated reports) when `dia.chexbert` names a labeler, and the
disease head's own calls against the dataset labels (`head_*`); plus a plot.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

from core.data.ctrg import CONDITIONS, Case, diagnosis_text, load_volume
from core.models.pangu import bos_encode
from core.results import ResultFolder
from core.run_folder import atomic_path, read_record
from core.config import parse_spec
from core.workloads.common import pyplot

log = logging.getLogger("dia_pangu")


class Prompts:
    """Token ids for one case, Dia-LLaMA's layout: BOS, the image block, the diagnostic sentences and the
    instruction (`dia.question`, empty by default, before them), then (training) the report and EOS."""

    def __init__(self, tokenizer, model, spec):
        self.tok, self.model, self.spec = tokenizer, model, spec

    def text(self, labels: list[int]) -> str:
        dia = self.spec.dia
        question = dia.question.strip()
        return (question + " " if question else "") + diagnosis_text(labels) + dia.guide

    def prefix(self, labels: list[int]) -> list[int]:
        bos, *words = bos_encode(self.tok, self.text(labels))
        return [bos] + self.model.image_block_ids() + words

    def training(self, case: Case):
        import torch

        prefix = self.prefix(case.labels)
        report = self.tok.encode(" " + case.finding, add_special_tokens=False)[: self.spec.dia.max_report_tokens]
        ids = prefix + report + [self.tok.eos_token_id]
        labels = [-100] * len(prefix) + report + [self.tok.eos_token_id]
        return torch.tensor([ids]), torch.tensor([labels])


def evaluate(spec, ctx, session, engine, prompts, cases: list[Case], dtype, folder: str = "results",
             baseline: Path | None = None, what: str = "writing the test reports") -> dict:
    """Each rank generates for its share; rank 0 gathers, writes the CSV and scores it into `folder`. `baseline`:
    the metrics.json of an earlier evaluation (the untrained model) drawn next to these in the plot; `what`: how
    the run's progress notes name this work."""
    if spec.dia.eval_limit:
        cases = cases[: spec.dia.eval_limit]
    rows = generate_rows(engine.module, prompts, cases, spec, session.device, dtype, session.rank,
                         session.dist.world_size, progress=(ctx.run_dir, what))
    ordered = session.gather_rows(rows, "ID", [c.id for c in cases])
    if ordered is None:
        return {}
    return write_results(ctx.run_dir, ordered, folder=folder, spec=spec, device=session.device, baseline=baseline)


def generation_kwargs(spec) -> dict:
    """The decoding settings of `dia.decoding`: Dia-LLaMA's sampling (top-k 50; temperature / top-p as given) or
    greedy. Passed explicitly, so a model folder's generation_config.json does not change them."""
    dia = spec.dia
    if dia.decoding == "greedy":
        return {"do_sample": False}
    return {"do_sample": True, "top_k": dia.top_k, "top_p": dia.top_p, "temperature": dia.temperature}


def generate_rows(model, prompts, cases: list[Case], spec, device, dtype, rank: int = 0, world: int = 1,
                  progress: Optional[tuple[Path, str]] = None) -> list[dict]:
    """Reports for this rank's share of the cases (core.engine.padded_share: the same number of generations on
    every rank). With sampling, the generator is seeded with `dia.seed` + the case's position before each case, so
    a report does not depend on the number of ranks. `progress`: (run folder, what) for rank 0's notes (how many
    of its share are written: core.results.progress)."""
    import torch

    from core.engine import padded_share
    from core.results.progress import noted

    model.eval()
    vit = model.vit.cfg
    gen = generation_kwargs(spec)
    rows = []
    with torch.no_grad():
        for r, (case, keep) in enumerate(noted(padded_share(cases, rank, world), progress, rank)):
            vol = load_volume(case.volume, vit.image_size, vit.frames, vit.design_size).unsqueeze(0).to(device, dtype)
            calls, latents = model.predict_diseases(vol)
            pred_labels = calls[0].tolist()
            ids = torch.tensor([prompts.prefix(pred_labels)], device=device)
            if gen["do_sample"]:
                torch.manual_seed(spec.dia.seed + (rank + r * world if keep else 0))
            out = model.llm.generate(inputs_embeds=model.embed(ids, latents), attention_mask=torch.ones_like(ids),
                                     max_new_tokens=spec.dia.max_new_tokens, eos_token_id=prompts.tok.eos_token_id,
                                     pad_token_id=prompts.tok.pad_token_id, synced_gpus=world > 1, **gen)
            text = prompts.tok.decode(out[0], skip_special_tokens=True).strip()
            if keep:
                rows.append({"ID": case.id, "Question": prompts.text(pred_labels), "Ground Truth": case.finding,
                             "Pred": text, "GT_labels": json.dumps(case.labels), "Pred_labels": json.dumps(pred_labels)})
    return rows


FROZEN_VISION = "vision_frozen.safetensors"


def frozen_vision(model) -> dict:
    """The frozen vision-side tensors under their model names: the 3D ViT, and the diagnostic head where it is
    frozen (checkpoints hold only trained tensors)."""
    return {n: p for n, p in model.named_parameters()
            if not p.requires_grad and n.startswith(("vit.", "disease.", "perceiver.", "fc.", "markers."))}


def save_frozen_vision(model, run_dir: Path) -> None:
    """The frozen vision tensors once per run, so a trained run can be rebuilt (load_trained)."""
    from safetensors.torch import save_file

    path = Path(run_dir) / FROZEN_VISION
    if path.is_file():
        return
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in frozen_vision(model).items()}, str(tmp))


LAYER_KEY = re.compile(r"^(llm\.(?:.+\.)?layers\.)(\d+)(\..+)$")  # a decoder layer's tensor (LoRA or not)


def kept_layers(llm_folder: Path) -> tuple[list[int], int] | None:
    """(the original indices of the layers this LLM folder kept, the original layer count) from the pruning.json
    that core.workloads.prune.write_pruned writes beside a pruned model; None for an unpruned folder."""
    path = Path(llm_folder) / "pruning.json"
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    return list(rec["kept_original_layers"]), int(rec["original_layers"])


def remap_layers(state: dict, kept: list[int] | None, original_layers: int | None, want: set[str],
                 source: str = "checkpoint") -> tuple[dict, list[str]]:
    """A trained run's tensors (names of the unpruned model) for a model whose LLM kept only the original layers
    `kept` (pruning.json, renumbered 0..len(kept)-1 in that order; None: unpruned). Tensors of a removed layer are
    dropped, those of a kept layer renamed to its new index. Strict: every tensor of `state` must land on a name in
    `want` (the model's state_dict names) or belong to a removed layer, else a ValueError naming it. Returns
    (the renamed state, the dropped names)."""
    new_index = {old: new for new, old in enumerate(kept)} if kept is not None else None
    out, dropped, unknown = {}, [], []
    for name, value in state.items():
        m = LAYER_KEY.match(name)
        if m and new_index is not None:
            old = int(m.group(2))
            if original_layers is not None and old >= original_layers:
                unknown.append(f"{name} (layer {old} of a {original_layers}-layer original)")
                continue
            if old not in new_index:
                dropped.append(name)
                continue
            name = f"{m.group(1)}{new_index[old]}{m.group(3)}"
        if name in want:
            out[name] = value
        else:
            unknown.append(name if not m or new_index is None else f"{name} (from {m.group(0)})")
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} tensors fit no tensor of this model and no removed layer: "
                         f"{unknown[:5]}")
    return out, dropped


def load_trained(dia_run: Path, llm_folder: Path, device, dtype):
    """A trained Dia-Pangu from its run folder (spec, frozen vision tensors, newest complete checkpoint of the
    trainable tensors), on top of the LLM in `llm_folder` (e.g. a pruned openPangu). A stage-2 run gets its LoRA
    adapters (and modules_to_save) back on the LLM: on a pruned LLM (pruning.json beside it) the adapters of the
    removed layers are dropped and those of the kept layers renamed to their new indices (remap_layers). Returns
    (model, prompts, spec)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from core.checkpoint import CheckpointManager

    dia_run = Path(dia_run)
    spec = parse_spec(read_record(dia_run)["spec"], str(dia_run / "run.json"))
    done = CheckpointManager(dia_run / "checkpoints", 0, 1).complete()
    if not done or not (dia_run / FROZEN_VISION).is_file():
        raise FileNotFoundError(f"{dia_run}: no complete checkpoint or no {FROZEN_VISION}: not a finished Dia-Pangu run")
    tag = done[-1][1]
    state = get_fp32_state_dict_from_zero_checkpoint(str(dia_run / "checkpoints"), tag=tag)
    model, tok = assemble(spec, llm_folder, load_file(str(dia_run / FROZEN_VISION)), state, dtype,
                          source=f"{dia_run} checkpoint {tag}")
    return model.to(device, dtype).eval(), Prompts(tok, model, spec), spec


def assemble(spec, llm_folder: Path, frozen: dict, state: dict, dtype, source: str = "checkpoint"):
    """The Dia-Pangu of a trained run's `spec` on the LLM in `llm_folder`: the frozen vision tensors `frozen`, the
    stage-2 adapters added as training adds them, then the trained tensors `state` (named for the unpruned model)
    remapped onto this LLM's layers (remap_layers with the folder's pruning.json). Returns (model, tokenizer)."""
    import torch

    from core.models.dia_pangu import DiaPangu, vision_configs
    from core.models.pangu import HEAD, load_pangu, load_tokenizer

    tok = load_tokenizer(llm_folder)
    vit_cfg, per_cfg = vision_configs(spec.dia.size)
    model = DiaPangu(load_pangu(llm_folder, dtype=dtype), tok, vit_cfg, per_cfg, spec.dia.contrastive_weight,
                     train_head=spec.dia.train_head)
    want = frozen_vision(model)
    if set(frozen) != set(want):
        raise ValueError(f"{source}: {FROZEN_VISION} holds {sorted(set(frozen) ^ set(want))[:5]} unlike this "
                         f"model's frozen vision tensors (a run of an older Dia-Pangu layout?)")
    with torch.no_grad():
        for name, value in frozen.items():
            want[name].copy_(value)
    if spec.dia.stage == 2:  # the adapters as the training workload adds them (unquantized: evaluation only)
        from core.models.peft import apply_peft

        model.llm = apply_peft(model.llm, spec.peft, HEAD)
    pruned = kept_layers(llm_folder)
    state, dropped = remap_layers(state, *(pruned or (None, None)), set(model.state_dict()), source=source)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"{source}: lacks trainable tensors {missing[:5]}")
    model.load_state_dict(state, strict=False)
    if pruned:
        log.info("%s on %s: %d tensors of the removed layers dropped, the kept layers' renumbered (kept original "
                 "layers %s)", source, llm_folder, len(dropped), pruned[0])
    return model, tok


CSV_COLUMNS = ["ID", "Question", "Ground Truth", "Pred", "GT_labels", "Pred_labels"]


def write_results(run_dir: Path, rows: list[dict], folder: str = "results", spec=None, device="cpu",
                  baseline: Path | None = None) -> dict:
    """The CSV, metrics.json and metrics.png of one evaluation. `spec` (the Dia-Pangu spec) chooses the report
    metrics' tokenization (default raw, Dia-LLaMA's) and the CheXbert labeler (none without it)."""
    from core.metrics import chexbert_scores, clinical_prf, report_metrics

    dia = spec.dia if spec is not None else None
    out = ResultFolder(Path(run_dir) / folder)
    refs, preds = {r["ID"]: r["Ground Truth"] for r in rows}, {r["ID"]: r["Pred"] for r in rows}
    how = dia.nlg_tokenization if dia is not None else "raw"
    first = "ptb" if how == "ptb" else "raw"
    scores = report_metrics(refs, preds, tokenize=first)
    metrics: dict = {**scores, "nlg_tokenization": first, f"nlg_{first}": dict(scores)}
    if how == "both":
        metrics["nlg_ptb"] = report_metrics(refs, preds, tokenize="ptb")
    columns = list(CSV_COLUMNS)
    if dia is not None and dia.chexbert:
        from core.models.chexbert import CheXbertLabeler

        labeler = CheXbertLabeler(dia.chexbert, dia.chexbert_tokenizer, device=device)
        gt_codes = labeler.label([r["Ground Truth"] for r in rows])
        pred_codes = labeler.label([r["Pred"] for r in rows])
        for r, g, p in zip(rows, gt_codes, pred_codes):
            r["GT_chexbert"], r["Pred_chexbert"] = json.dumps(g), json.dumps(p)
        columns += ["GT_chexbert", "Pred_chexbert"]
        metrics.update(chexbert_scores(gt_codes, pred_codes, CONDITIONS))
        metrics["chexbert"] = str(dia.chexbert)
    else:
        metrics["chexbert"] = None  # no labeler given (dia.chexbert): no ce_* scores
    head = clinical_prf([json.loads(r["GT_labels"]) for r in rows], [json.loads(r["Pred_labels"]) for r in rows],
                        CONDITIONS)
    metrics.update({f"head_{k}": v for k, v in head.items()})
    metrics["cases"] = len(rows)
    csv_path = out.csv("dia-pangu.csv", columns, rows, fieldnames=True, extrasaction="ignore")
    metrics_json = out.json("metrics.json", metrics)
    before = json.loads(Path(baseline).read_text()) if baseline is not None and Path(baseline).is_file() else None
    out.figure("metrics.png", metrics_figure(metrics, before))
    log.info("%d reports -> %s; metrics -> %s", len(rows), csv_path, metrics_json)
    headline = [*scores, "ce_f1_micro", "ce_f1_macro", "ce_precision_micro", "ce_recall_micro", "ce_auc_macro",
                "head_micro_f1", "head_macro_f1", "head_micro_precision", "head_micro_recall", "cases"]
    return {"csv": str(csv_path), "metrics": str(metrics_json),
            **{k: metrics[k] for k in headline if k in metrics}}


def metrics_figure(metrics: dict, before: dict | None = None):
    """Bars of the report and clinical metrics; with `before` (the untrained model's), its bars beside them."""
    plt = pyplot()
    nlg = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L"]
    clinical = (["ce_precision_micro", "ce_recall_micro", "ce_f1_micro"] if metrics.get("chexbert") else []) + \
        ["head_micro_precision", "head_micro_recall", "head_micro_f1"]
    names = nlg + clinical
    colors = ["tab:blue"] * len(nlg) + ["tab:red"] * (len(clinical) - 3) + ["tab:green"] * 3
    fig, ax = plt.subplots(figsize=(9, 3.5))
    x = range(len(names))
    if before is not None and all(n in before for n in names):
        ax.bar([i - 0.2 for i in x], [before[n] for n in names], width=0.4, color="lightgray", label="untrained")
        ax.bar([i + 0.2 for i in x], [metrics[n] for n in names], width=0.4, color=colors, label="trained")
        ax.legend(fontsize=8)
    else:
        ax.bar(x, [metrics[n] for n in names], color=colors)
    ax.set_xticks(list(x), names)
    ax.set_ylim(0, 1)
    ax.set_title(f"Dia-Pangu on {metrics['cases']} cases (report metrics: {metrics['nlg_tokenization']} strings)")
    ax.tick_params(axis="x", rotation=35)
    fig.tight_layout()
    return fig
