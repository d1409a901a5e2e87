"""Layer pruning of openPangu and its evaluation, one Slurm array task per ratio.

Each task removes the least sensitive layers at its ratio (from a scan's sensitivity.csv), or an explicit
`prune.layers` list, writes a model folder that transformers loads with `from_pretrained` (safetensors with the
surviving layers renumbered, streamed layer by layer into shards with model.safetensors.index.json, config.json
with the new layer count, every non-weight file of the source copied, and `pruning.json` naming the original
layers that survived), then evaluates it on held-out text: perplexity, and the log-prob
distance to the unpruned model (the scan's `logprob` metric). Item 0.0 evaluates the unpruned model. The merge
writes `pruning_eval.csv` and a plot of quality against ratio.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, PositiveInt, field_validator

from core.results import ResultFolder
from core.run_folder import is_run, promised_by, write_json_atomic
from core.runtime import TaskContext
from core.config import FieldError, JobSpec, Strict
from core.workloads import Shape, Workload
from core.workloads.common import decoder_layers, next_token_logprobs, pyplot, text_lines

log = logging.getLogger("prune")


class PruneSection(Strict):
    heldout: str = Field(description="held-out text file for perplexity and log-prob distance")
    sensitivity_csv: Optional[str] = Field(None, description="sensitivity.csv of a scan run (least sensitive go first)")
    ratios: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3])
    layers: Optional[list[int]] = Field(None, description="explicit layers to remove instead of ratios")
    max_tokens: PositiveInt = 128
    dtype: Literal["bf16", "fp32"] = "bf16"
    max_shard_gb: float = Field(2.0, gt=0, description="size of the pruned folder's safetensors shards")
    dia_run: Optional[str] = Field(None, description="a finished Dia-Pangu run folder (stage 1, or stage 2: its "
                                                     "LoRA adapters follow the kept layers): also evaluate report "
                                                     "generation with each pruned LLM")
    dia_eval_limit: Optional[PositiveInt] = Field(None, description="evaluate only the first N test cases")

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v):
        bad = [r for r in v if not 0 < r < 1]
        if bad or not v:
            raise ValueError(f"every ratio must lie in (0, 1), got {bad or v}; e.g. [0.1, 0.2, 0.3]")
        return v


def plan(spec: JobSpec, resume_dir: Optional[Path] = None) -> Shape:
    """One array task per ratio (item 0.0: the unpruned model), then the merge; torch-free checks first. In a study
    (core.study) the scan's CSV and the Dia-Pangu run may be promised by earlier steps (run_folder.promised_by)."""
    pr = spec.prune
    problems = []
    try:
        text_lines(pr.heldout, "prune.heldout")
    except FieldError as e:  # not on this machine: a dry run still shows the ratios' tasks
        problems.append((e.field, e.message))
    if pr.dia_run and not is_run(Path(pr.dia_run)) and not promised_by(pr.dia_run):
        raise FieldError("prune.dia_run", f"{pr.dia_run} is not a run folder (no run.json); give logs/<name>/<id> of a "
                                          f"finished Dia-Pangu run")
    total = decoder_layers(spec)
    if pr.layers is not None:
        bad = [layer for layer in pr.layers if not 0 <= layer < total]
        if bad or len(set(pr.layers)) >= total:
            raise FieldError("prune.layers", f"cannot remove {pr.layers} from a {total}-layer model "
                                             f"(indices 0..{total - 1}, at least one layer must stay)")
        return Shape(items=[0.0, "layers"], pre=None, problems=problems)
    if not pr.sensitivity_csv or not (Path(pr.sensitivity_csv).is_file() or promised_by(pr.sensitivity_csv)):
        problems.append(("prune.sensitivity_csv", f"sensitivity CSV {pr.sensitivity_csv!r} not found; run a scan "
                                                  f"first (jobs/pangu_sensitivity.yaml) or give prune.layers"))
    too_many = [r for r in pr.ratios if round(r * total) >= total]
    if too_many:
        raise FieldError("prune.ratios", f"ratios {too_many} would remove every layer of a {total}-layer model")
    notes = [f"prune.{k}: {v} (written by study step {promised_by(v)}, submitted before this one)"
             for k, v in (("sensitivity_csv", pr.sensitivity_csv), ("dia_run", pr.dia_run)) if promised_by(v)]
    return Shape(items=[0.0] + list(pr.ratios), pre=None, problems=problems, notes=notes)


def layers_to_remove(spec, ratio, total: int) -> list[int]:
    import pandas as pd

    if ratio == "layers":
        return sorted(set(spec.prune.layers))
    if not ratio:
        return []
    df = pd.read_csv(spec.prune.sensitivity_csv)
    missing = sorted(set(range(total)) - set(df["layer"]))
    if missing:
        raise ValueError(f"prune.sensitivity_csv: no sensitivity for layers {missing} of {total}")
    return sorted(df.nsmallest(round(ratio * total), "mean")["layer"].tolist())


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _renumber(key: str, new_index: dict[int, int]) -> Optional[str]:
    """model.layers.<old>.x -> model.layers.<new>.x; None for a removed layer; other keys unchanged."""
    if not key.startswith("model.layers."):
        return key
    parts = key.split(".")
    old = int(parts[2])
    if old not in new_index:
        return None
    parts[2] = str(new_index[old])
    return ".".join(parts)


def write_pruned(src: Path, dst: Path, remove: list[int], max_shard_bytes: int = 2 * 1024 ** 3) -> dict:
    """A loadable model folder without the layers in `remove` (renumbered), plus pruning.json.

    The weights stream layer by layer: the embedding, then each surviving layer, then the final norm and head
    are read from the source shards (safe_open, one layer's tensors at a time) into the current output shard,
    which is written once it would grow past `max_shard_bytes`; so at most one shard is held in memory. Shards
    are named model-0000k-of-0000n.safetensors with model.safetensors.index.json. Every non-weight file of the
    source folder (tokenizer files, generation config, the *.py that config.json's auto_map names) is copied."""
    from contextlib import ExitStack

    from safetensors import safe_open
    from safetensors.torch import save_file

    from core.models.pangu import read_config, weight_map

    src, dst = Path(src), Path(dst)
    cfg = read_config(src)
    total = cfg["num_hidden_layers"]
    keep = [i for i in range(total) if i not in set(remove)]
    new_index = {old: new for new, old in enumerate(keep)}
    wmap = weight_map(src)
    groups: dict = {}  # "pre" (embedding etc.), each kept layer, "post" (norm, head): source keys in that order
    for key in wmap:
        if key.startswith("model.layers."):
            old = int(key.split(".")[2])
            if old in new_index:
                groups.setdefault(old, []).append(key)
        else:
            groups.setdefault("post" if key.startswith(("model.norm", "lm_head")) else "pre", []).append(key)
    order = [g for g in ("pre", *keep, "post") if g in groups]

    dst.mkdir(parents=True, exist_ok=True)
    for stale in [*dst.glob("*.safetensors"), *(dst / n for n in WEIGHT_INDEXES)]:
        stale.unlink(missing_ok=True)  # a requeued task rewrites the folder whole
    written: list[tuple[Path, list[str]]] = []
    buffer: dict = {}
    size = 0

    def flush():
        nonlocal buffer, size
        if buffer:
            part = dst / f"part-{len(written) + 1:05d}.safetensors.tmp"
            save_file(buffer, str(part), metadata={"format": "pt"})
            written.append((part, list(buffer)))
            buffer, size = {}, 0

    total_size = 0
    with ExitStack() as stack:
        handles = {}
        for group in order:
            tensors = {}
            for key in groups[group]:
                shard = wmap[key]
                if shard not in handles:
                    handles[shard] = stack.enter_context(safe_open(str(src / shard), "pt"))
                tensors[_renumber(key, new_index)] = handles[shard].get_tensor(key)
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            if size and size + nbytes > max_shard_bytes:
                flush()
            buffer.update(tensors)
            size += nbytes
            total_size += nbytes
            del tensors
        flush()
    n = len(written)
    weight_index = {}
    for k, (part, keys) in enumerate(written, 1):
        name = f"model-{k:05d}-of-{n:05d}.safetensors"
        part.replace(dst / name)
        weight_index.update({key: name for key in keys})
    write_json_atomic(dst / "model.safetensors.index.json",
                      {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_index.items()))})
    new_cfg = {**cfg, "num_hidden_layers": len(keep)}
    for key, value in cfg.items():  # per-layer lists (e.g. layer_types) lose the removed layers' entries
        if isinstance(value, list) and len(value) == total and key != "architectures":
            new_cfg[key] = [value[i] for i in keep]
    write_json_atomic(dst / "config.json", new_cfg)
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in (*WEIGHT_INDEXES, "config.json",
                                                                                   "pruning.json"):
            shutil.copy2(f, dst / f.name)
    for ref in _auto_map_modules(cfg):
        if not (src / f"{ref}.py").is_file():
            log.warning("config.json auto_map names %s.py, which %s does not have", ref, src)
    record = {"source": str(src), "original_layers": total, "removed": sorted(remove), "kept_original_layers": keep,
              "shards": n}
    write_json_atomic(dst / "pruning.json", record)
    return record


def _auto_map_modules(cfg: dict) -> set[str]:
    """The module files that config.json's auto_map points at ("modeling_x.Class" or "repo--modeling_x.Class")."""
    refs = set()
    for value in (cfg.get("auto_map") or {}).values():
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v:
                refs.add(v.split("--")[-1].rsplit(".", 1)[0])
    return refs


def evaluate(model, tokenizer, lines: list[str], max_tokens: int, device, reference=None) -> dict:
    """Perplexity over the held-out lines; with `reference` (per-line next-token log-probs of the unpruned model),
    also the mean absolute log-prob distance to it."""
    import torch

    from core.models.pangu import bos_encode

    nll, count, dists, per_line = 0.0, 0, [], []
    with torch.no_grad():
        for i, line in enumerate(lines):
            ids = torch.tensor([bos_encode(tokenizer, line)])[:, :max_tokens].to(device)
            if ids.shape[1] < 2:
                continue
            target = next_token_logprobs(model(input_ids=ids).logits, ids)
            nll -= target.sum().item()
            count += target.numel()
            per_line.append(target.cpu())
            if reference is not None:
                dists.append((target.cpu() - reference[i]).abs().mean().item())
    out = {"perplexity": math.exp(nll / max(count, 1)), "tokens": count, "per_line": per_line}
    if reference is not None:
        out["logprob_distance"] = sum(dists) / len(dists)
    return out


def run(spec: JobSpec, ctx: TaskContext) -> dict:
    from core.models.pangu import load_pangu, load_tokenizer, model_folder
    from core.runtime import task_device, torch_dtype

    pr = spec.prune
    src = model_folder(spec)
    device = task_device(ctx)
    dtype = torch_dtype(pr.dtype)
    tok = load_tokenizer(src)
    lines = text_lines(pr.heldout, "prune.heldout")
    base_model = load_pangu(src, dtype=dtype).to(device).eval()
    total = base_model.config.num_hidden_layers
    base = evaluate(base_model, tok, lines, pr.max_tokens, device)
    results = []
    for ratio in ctx.items:
        from core.runtime import fault_point

        fault_point("ratio", ratio)
        remove = layers_to_remove(spec, ratio, total)
        if not remove:
            res = {k: v for k, v in base.items() if k != "per_line"}
            res.update(logprob_distance=0.0, folder=str(src), layers=total)
        else:
            label = "layers" if ratio == "layers" else f"{ratio:.2f}"
            folder = ctx.path("pruned", f"ratio_{label}")
            record = write_pruned(src, folder, remove, max_shard_bytes=int(pr.max_shard_gb * 1024 ** 3))
            pruned = load_pangu(folder, dtype=dtype).to(device).eval()
            res = evaluate(pruned, tok, lines, pr.max_tokens, device, reference=base["per_line"])
            res.pop("per_line")
            res.update(folder=str(folder), layers=len(record["kept_original_layers"]),
                       params=sum(p.numel() for p in pruned.parameters()))
            del pruned
        res.update(ratio=ratio, removed=remove)
        if pr.dia_run:
            res.update(dia_evaluation(spec, ctx, Path(res["folder"]), ratio, device, dtype))
        results.append(res)
        write_json_atomic(ctx.path("evals", f"ratio_{ratio}.json"), res)
        log.info("ratio %s: removed %s -> perplexity %.3f, log-prob distance %.4f", ratio, remove,
                 res["perplexity"], res["logprob_distance"])
    return {"results": results}


DIA_COLUMNS = ("BLEU-4", "METEOR", "ROUGE-L", "head_micro_f1")


def dia_evaluation(spec: JobSpec, ctx: TaskContext, llm_folder: Path, ratio, device, dtype) -> dict:
    """Report generation of the trained Dia-Pangu run (`prune.dia_run`) on top of this (pruned) LLM."""
    from core.data.ctrg import check_dataset
    from core.workloads.dia_reports import generate_rows, load_trained, write_results

    model, prompts, dspec = load_trained(Path(spec.prune.dia_run), llm_folder, device, dtype)
    d = dspec.data
    cases = check_dataset(d.path, d.annotation, d.labels_csv, splits=(dspec.dia.eval_split,))[dspec.dia.eval_split]
    cases = cases[: spec.prune.dia_eval_limit] if spec.prune.dia_eval_limit else cases
    rows = generate_rows(model, prompts, cases, dspec, device, dtype)
    label = "layers" if ratio == "layers" else f"{ratio:.2f}"
    metrics = write_results(ctx.run_dir, rows, folder=f"dia_eval/ratio_{label}", spec=dspec, device=device)
    return {f"dia_{k}": metrics[k] for k in DIA_COLUMNS}


def merge(spec: JobSpec, ctx: TaskContext) -> dict:
    import pandas as pd

    plt = pyplot()
    rows = [json.loads(p.read_text()) for p in sorted((ctx.run_dir / "evals").glob("ratio_*.json"))]
    df = pd.DataFrame([{"ratio": r["ratio"], "layers": r["layers"], "removed": " ".join(map(str, r["removed"])),
                        "perplexity": r["perplexity"], "logprob_distance": r["logprob_distance"],
                        **{f"dia_{k}": r[f"dia_{k}"] for k in DIA_COLUMNS if f"dia_{k}" in r},
                        "folder": r["folder"]} for r in rows])
    df = df.sort_values("ratio", key=lambda s: s.map(lambda v: -1 if v == "layers" else float(v)))
    out = ResultFolder(ctx.run_dir)
    csv = out.dataframe("pruning_eval.csv", df)
    numeric = df[df["ratio"] != "layers"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(numeric["ratio"].astype(float), numeric["perplexity"], "o-", label="perplexity")
    ax.set_xlabel("pruning ratio")
    ax.set_ylabel("held-out perplexity")
    ax2 = ax.twinx()
    ax2.plot(numeric["ratio"].astype(float), numeric["logprob_distance"], "s--", color="tab:red")
    ax2.set_ylabel("log-prob distance to unpruned", color="tab:red")
    fig.tight_layout()
    png = out.figure("pruning_eval.png", fig)
    return {"csv": str(csv), "png": str(png), "rows": len(df)}


WORKLOAD = Workload(run=run, merge=merge, section="prune", Section=PruneSection, plan=plan,
                    resumable=True)  # each ratio's evaluation is rewritten whole
