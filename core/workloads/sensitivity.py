"""Per-layer sensitivity of openPangu: mask one decoder layer's attention, measure how far the model's
log-probabilities move from the unmasked baseline.

Steps (`plan` below, torch-free): `baseline` (one job) stores the baseline once in the run
folder; `run` (one Slurm array task per layer, or `scan.layers_per_task` layers) loads the model once, masks each
of its layers in turn (reversibly, with hooks) and writes `layers/layer_NN.json` atomically; `merge` (afterok)
assembles `sensitivity.csv` and `sensitivity.png`, and names the layers that have no result.

Metrics (per prompt i, then mean and standard deviation over prompts):
- logprob (the lab's): d_i = mean over positions t of | log p_masked(x_{t+1} | x_<=t) - log p_base(x_{t+1} | x_<=t) |,
  the change in the log-probability of the prompt's own next tokens;
- kl: KL(p_base || p_masked) of the next-token distribution after the whole prompt;
- bi (ShortGPT's Block Influence): 1 - cos(h_in, h_out) of layer l, averaged over tokens;
- angular (Gromov et al.): arccos(cos(h_in, h_out)) / pi, averaged over tokens.
bi and angular need no mask and no baseline: one forward pass scores every layer (a single task).

Masking layer l leaves the hidden states entering layer l unchanged, so with `scan.reuse_hidden` a masked pass
starts at layer l from the baseline's stored hidden states instead of recomputing layers 0..l-1.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, PositiveInt

from core.run_folder import atomic_path, write_json_atomic
from core.runtime import TaskContext
from core.spec import FieldError, JobSpec, Strict
from core.workloads import Shape, Workload
from core.workloads.common import decoder_layers, next_token_logprobs, pyplot, text_lines

log = logging.getLogger("sensitivity")


class ScanSection(Strict):
    prompts: str = Field(description="text file, one prompt per line (Chinese and English both fine)")
    metric: Literal["logprob", "kl", "bi", "angular"] = Field(
        "logprob", description="logprob / kl: one masked pass per layer (array); bi / angular: one pass for all")
    mode: Literal["qv", "v", "attn", "block"] = "qv"
    layers: Optional[list[int]] = Field(None, description="layers to scan (default: all)")
    layers_per_task: PositiveInt = 1
    max_prompt_tokens: PositiveInt = 64
    reuse_hidden: bool = Field(True, description="start each masked pass at its layer from the baseline's hidden states")
    mark_ratio: float = Field(0.25, gt=0, lt=1, description="share of least sensitive layers marked in the plot")
    dtype: Literal["bf16", "fp32"] = "bf16"


# ---------------------------------------------------------------- plan (torch-free)
def layer_results_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "layers"


def done_layers(run_dir: Path) -> set[int]:
    folder = layer_results_dir(run_dir)
    return {json.loads(p.read_text())["layer"] for p in folder.glob("layer_*.json")} if folder.is_dir() else set()


def plan(spec: JobSpec, resume_dir: Optional[Path] = None) -> Shape:
    """baseline -> one array task per layer (or layers_per_task) -> merge; bi / angular: one task -> merge."""
    scan = spec.scan
    text_lines(scan.prompts, "scan.prompts")
    total = decoder_layers(spec)
    layers = scan.layers if scan.layers is not None else list(range(total))
    bad = [layer for layer in layers if not 0 <= layer < total]
    if bad:
        raise FieldError("scan.layers", f"layer indices {bad} are out of range: the model has {total} layers "
                                        f"(0..{total - 1})")
    if scan.metric in ("bi", "angular"):  # one pass gives every layer: a single task, then the merge
        return Shape(items=None, pre=None, notes=[f"{scan.metric}: one forward pass scores all {len(layers)} layers"])
    if resume_dir is not None:
        done = done_layers(resume_dir)
        missing = [layer for layer in layers if layer not in done]
        if not missing:
            raise FieldError("--resume-missing", f"every layer already has a result in {resume_dir}")
        return Shape(items=missing, items_per_task=scan.layers_per_task, pre=None,
                     notes=[f"resubmitting only the {len(missing)} missing layers: {missing}"])
    return Shape(items=layers, items_per_task=scan.layers_per_task, pre="baseline")

MODES = {"qv": ("q_proj", "v_proj"), "v": ("v_proj",), "attn": ("o_proj",), "block": ()}


class LayerMask:
    """Zero the outputs of a decoder layer's projections (qv: Q and V, v: V only, attn: the attention output),
    or skip the whole block (block); `remove()` restores the model exactly."""

    def __init__(self, model, layer: int, mode: str):
        self.handles = []
        decoder = model.model.layers[layer]
        if mode == "block":
            self.handles.append(decoder.register_forward_hook(_identity_block, with_kwargs=True))
        else:
            for name in MODES[mode]:
                self.handles.append(getattr(decoder.self_attn, name).register_forward_hook(_zero_output))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _zero_output(module, args, output):
    return output.new_zeros(output.shape)


def _identity_block(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


# ---------------------------------------------------------------- model, prompts, forward passes
def load(spec: JobSpec, ctx: TaskContext, dtype_name: str):
    from core.models.pangu import load_pangu, load_tokenizer, model_folder
    from core.runtime import task_device, torch_dtype

    folder = model_folder(spec)
    device = task_device(ctx)
    model = load_pangu(folder, dtype=torch_dtype(dtype_name), attn_implementation="sdpa").to(device).eval()
    return model, load_tokenizer(folder), device


def encode(tokenizer, lines: list[str], max_tokens: int) -> list:
    import torch

    from core.models.pangu import bos_encode

    return [torch.tensor(bos_encode(tokenizer, line)[:max_tokens]).unsqueeze(0) for line in lines]


def logits_from(model, hidden, start: int):
    """Run decoder layers start..L-1 on `hidden` (the states entering layer `start`), then norm and LM head."""
    import torch

    pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    emb = model.model.rotary_emb(hidden, pos)
    for layer in model.model.layers[start:]:
        out = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=emb)
        hidden = out[0] if isinstance(out, tuple) else out
    return model.lm_head(model.model.norm(hidden))


def scores(base: dict, logits, ids) -> dict:
    """logprob distance and KL of one prompt against its baseline."""
    import torch

    target = next_token_logprobs(logits, ids)
    d = (target - base["target_lp"]).abs().mean().item() if target.numel() else 0.0
    last = torch.log_softmax(logits[0, -1].float(), dim=-1)
    kl = torch.sum(base["last_lp"].exp() * (base["last_lp"] - last)).item()
    return {"logprob": d, "kl": kl}


def baseline_path(run_dir: Path) -> Path:
    return Path(run_dir) / "baseline.safetensors"


def baseline(spec: JobSpec, ctx: TaskContext) -> dict:
    """Baseline next-token log-probabilities (and the hidden states entering every layer) for every prompt."""
    import torch
    from safetensors.torch import save_file

    scan = spec.scan
    model, tok, device = load(spec, ctx, scan.dtype)
    prompts = encode(tok, text_lines(scan.prompts, "scan.prompts"), scan.max_prompt_tokens)
    tensors = {}
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            out = model(input_ids=ids.to(device), output_hidden_states=True)
            tensors[f"p{i}.ids"] = ids[0].clone()
            tensors[f"p{i}.target_lp"] = next_token_logprobs(out.logits, ids).cpu()
            tensors[f"p{i}.last_lp"] = torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu()
            if scan.reuse_hidden:  # hidden_states[l] enters layer l
                tensors[f"p{i}.hidden"] = torch.stack(out.hidden_states[:-1], 0)[:, 0].cpu().contiguous()
    path = baseline_path(ctx.run_dir)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"prompts": str(len(prompts)), "layers": str(len(model.model.layers))})
    log.info("baseline for %d prompts -> %s", len(prompts), path)
    return {"prompts": len(prompts), "layers": len(model.model.layers), "path": str(path)}


def read_baseline(run_dir: Path) -> list[dict]:
    from safetensors.torch import load_file

    path = baseline_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: the baseline step has not finished in this run folder")
    flat = load_file(str(path))
    n = 1 + max(int(k.split(".")[0][1:]) for k in flat)
    return [{k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(f"p{i}.")} for i in range(n)]


def scan_layer(model, base: list[dict], layer: int, mode: str, reuse_hidden: bool, device) -> dict:
    """Per-prompt scores with `layer` masked; the mask is removed afterwards."""
    import torch

    out = {"logprob": [], "kl": []}
    with LayerMask(model, layer, mode), torch.no_grad():
        for b in base:
            ids = b["ids"].unsqueeze(0).to(device)
            if reuse_hidden and "hidden" in b:
                logits = logits_from(model, b["hidden"][layer].unsqueeze(0).to(device), layer)
            else:
                logits = model(input_ids=ids).logits
            s = scores({k: v.to(device) for k, v in b.items() if k in ("target_lp", "last_lp")}, logits, ids)
            out["logprob"].append(s["logprob"])
            out["kl"].append(s["kl"])
    return out


def write_layer(run_dir: Path, layer: int, metric: str, values: list[float], extra: dict | None = None) -> None:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    rec = {"layer": layer, "metric": metric, "mean": mean, "std": std, "values": values, **(extra or {})}
    write_json_atomic(layer_results_dir(run_dir) / f"layer_{layer:03d}.json", rec)


def hidden_metrics(model, prompts: list, device) -> dict[int, dict[str, list[float]]]:
    """BI and angular distance of every layer from one forward pass per prompt."""
    import torch

    per_layer: dict[int, dict[str, list[float]]] = {}
    with torch.no_grad():
        for ids in prompts:
            hs = model(input_ids=ids.to(device), output_hidden_states=True).hidden_states
            for layer in range(len(hs) - 1):
                cos = torch.nn.functional.cosine_similarity(hs[layer][0].float(), hs[layer + 1][0].float(), dim=-1)
                d = per_layer.setdefault(layer, {"bi": [], "angular": []})
                d["bi"].append((1 - cos).mean().item())
                d["angular"].append((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item())
    return per_layer


def run(spec: JobSpec, ctx: TaskContext) -> dict:
    import time

    t0 = time.time()
    scan = spec.scan
    model, tok, device = load(spec, ctx, scan.dtype)
    load_s = time.time() - t0
    if scan.metric in ("bi", "angular"):
        prompts = encode(tok, text_lines(scan.prompts, "scan.prompts"), scan.max_prompt_tokens)
        layers = scan.layers if scan.layers is not None else list(range(len(model.model.layers)))
        per = hidden_metrics(model, prompts, device)
        for layer in layers:
            write_layer(ctx.run_dir, layer, scan.metric, per[layer][scan.metric])
        return {"layers": layers, "metric": scan.metric}
    from core.runtime import fault_point

    base = read_baseline(ctx.run_dir)
    t1 = time.time()
    for layer in ctx.items:
        fault_point("layer", layer)
        values = scan_layer(model, base, layer, scan.mode, scan.reuse_hidden, device)
        write_layer(ctx.run_dir, layer, scan.metric, values[scan.metric], {"mode": scan.mode})
        log.info("layer %d: %s %.6f", layer, scan.metric, sum(values[scan.metric]) / len(base))
    return {"layers": list(ctx.items), "metric": scan.metric, "mode": scan.mode, "load_s": round(load_s, 3),
            "scan_s": round(time.time() - t1, 3)}


# ---------------------------------------------------------------- merge
def merge(spec: JobSpec, ctx: TaskContext) -> dict:
    import pandas as pd

    scan = spec.scan
    wanted = scan.layers if scan.layers is not None else list(range(decoder_layers(spec)))
    folder = layer_results_dir(ctx.run_dir)
    recs = {r["layer"]: r for r in (json.loads(p.read_text()) for p in folder.glob("layer_*.json"))} \
        if folder.is_dir() else {}
    missing = [layer for layer in wanted if layer not in recs]
    if missing:
        raise RuntimeError(f"merge: no result for layers {missing} in {folder}; resubmit only those with: "
                           f"python launchers/submit.py SPEC --resume-missing {ctx.run_dir}")
    df = pd.DataFrame([{"layer": layer, "mean": recs[layer]["mean"], "std": recs[layer]["std"],
                        "metric": recs[layer]["metric"]} for layer in wanted])
    df["rank"] = df["mean"].rank(method="first").astype(int)  # 1 = least sensitive = first to prune
    df = df[["layer", "mean", "std", "rank", "metric"]]
    csv_path = ctx.path("sensitivity.csv")
    df.to_csv(csv_path, index=False)
    k = max(1, round(scan.mark_ratio * len(df)))
    candidates = sorted(df.nsmallest(k, "mean")["layer"].tolist())
    png = plot(df, candidates, ctx.path("sensitivity.png"), f"{scan.metric} ({scan.mode})")
    log.info("%s; pruning candidates at %.0f%%: %s", csv_path, 100 * scan.mark_ratio, candidates)
    return {"csv": str(csv_path), "png": str(png), "candidates": candidates, "layers": len(df)}


def plot(df, candidates: list[int], path: Path, label: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, len(df) * 0.3), 3.5))
    colors = ["tab:red" if layer in candidates else "tab:blue" for layer in df["layer"]]
    ax.bar(df["layer"], df["mean"], yerr=df["std"], color=colors, capsize=2)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(label)
    ax.set_title(f"layer sensitivity; red: {len(candidates)} pruning candidates")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


WORKLOAD = Workload(run=run, merge=merge, section="scan", Section=ScanSection, plan=plan,
                    entries={"baseline": baseline}, resumable=True)  # per-layer results are atomic: a requeued task redoes only its own layers
