"""Per-layer sensitivity of openPangu: mask one decoder layer's attention, measure how far the model's
log-probabilities move from the unmasked baseline.

Steps (core.workloads.shapes.sensitivity plans them): `baseline` (one job) stores the baseline once in the run
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
import math
import os
from pathlib import Path

from core.workloads.shapes import layer_results_dir, text_lines

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
def load(spec, ctx, dtype_name: str):
    import torch

    from core.models.pangu import load_pangu, load_tokenizer, model_folder
    from core.runtime import task_device

    folder = model_folder(spec)
    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    device = task_device(ctx)
    model = load_pangu(folder, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return model, load_tokenizer(folder), device


def encode(tokenizer, lines: list[str], max_tokens: int) -> list:
    import torch

    out = []
    for line in lines:
        ids = [tokenizer.bos_token_id] + tokenizer.encode(line, add_special_tokens=False)
        out.append(torch.tensor(ids[:max_tokens]).unsqueeze(0))
    return out


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

    lp = torch.log_softmax(logits[0].float(), dim=-1)
    target = lp[:-1].gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
    d = (target - base["target_lp"]).abs().mean().item() if target.numel() else 0.0
    last = lp[-1]
    kl = torch.sum(base["last_lp"].exp() * (base["last_lp"] - last)).item()
    return {"logprob": d, "kl": kl}


def baseline_path(run_dir: Path) -> Path:
    return Path(run_dir) / "baseline.safetensors"


def baseline(spec, ctx) -> dict:
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
            lp = torch.log_softmax(out.logits[0].float(), dim=-1)
            tensors[f"p{i}.ids"] = ids[0].clone()
            tensors[f"p{i}.target_lp"] = lp[:-1].gather(1, ids[0, 1:].to(device).unsqueeze(1)).squeeze(1).cpu()
            tensors[f"p{i}.last_lp"] = lp[-1].cpu()
            if scan.reuse_hidden:  # hidden_states[l] enters layer l
                tensors[f"p{i}.hidden"] = torch.stack(out.hidden_states[:-1], 0)[:, 0].cpu().contiguous()
    path = baseline_path(ctx.run_dir)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"prompts": str(len(prompts)), "layers": str(len(model.model.layers))})
    os.replace(tmp, path)
    print(f"[sensitivity] baseline for {len(prompts)} prompts -> {path}", flush=True)
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
    folder = layer_results_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    rec = {"layer": layer, "metric": metric, "mean": mean, "std": std, "values": values, **(extra or {})}
    path = folder / f"layer_{layer:03d}.json"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, path)


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


def run(spec, ctx) -> dict:
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
        print(f"[sensitivity] layer {layer}: {scan.metric} {sum(values[scan.metric]) / len(base):.6f}", flush=True)
    return {"layers": list(ctx.items), "metric": scan.metric, "mode": scan.mode, "load_s": round(load_s, 3),
            "scan_s": round(time.time() - t1, 3)}


# ---------------------------------------------------------------- merge
def merge(spec, ctx) -> dict:
    import pandas as pd

    from core.workloads.shapes import n_layers

    scan = spec.scan
    wanted = scan.layers if scan.layers is not None else list(range(n_layers(spec)))
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
    print(f"[sensitivity] {csv_path}; pruning candidates at {scan.mark_ratio:.0%}: {candidates}", flush=True)
    return {"csv": str(csv_path), "png": str(png), "candidates": candidates, "layers": len(df)}


def plot(df, candidates: list[int], path: Path, label: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
