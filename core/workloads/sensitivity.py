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
- bi (ShortGPT's Block Influence): 1 - cos(X_l, X_{l+1}) averaged over tokens, X_l the hidden states entering layer
  l and X_L the last layer's own output (before the final norm);
- angular (Gromov et al.): arccos(cos(x_l, x_{l+n})) / pi on the last token, x_l entering layer l, n =
  `scan.block_size` (1: one layer); the score of block [l, l+n) is written as layer l.
bi and angular need no mask and no baseline: one forward pass scores every layer (a single task).

Masking layer l leaves the hidden states entering layer l unchanged, so with `scan.reuse_hidden` a masked pass
starts at layer l from the baseline's stored hidden states instead of recomputing layers 0..l-1; such a task
builds only layers min(its layers)..L-1, the final norm and the LM head (`load_pangu_tail`: only those tensors are
read from the shards) and reads only its layers' hidden states from the baseline (one tensor per layer).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, PositiveInt

from core.results import ResultFolder
from core.run_folder import atomic_path, write_json_atomic
from core.runtime import TaskContext
from core.config import FieldError, JobSpec, Strict
from core.workloads import Shape, Workload
from core.workloads.common import decoder_layers, next_token_logprobs, pyplot, text_lines

log = logging.getLogger("sensitivity")


class ScanSection(Strict):
    prompts: str = Field(description="text file, one prompt per line (Chinese and English both fine)")
    metric: Literal["logprob", "kl", "bi", "angular"] = Field(
        "logprob", description="logprob / kl: one masked pass per layer (array); bi / angular: one pass for all")
    mode: Literal["qv", "qkv", "v", "k", "attn", "block"] = Field(
        "qv", description="zero Q+V (the lab's), Q+K+V, V, K, the attention output, or skip the block")
    block_size: PositiveInt = Field(1, description="angular: distance between the inputs of layers l and l+n")
    layers: Optional[list[int]] = Field(None, description="layers to scan (default: all)")
    layers_per_task: Union[PositiveInt, Literal["auto"]] = Field(
        1, description="layers per array task; auto: the fewest that keep the start cost under max_start_share")
    max_start_share: float = Field(0.2, gt=0, lt=1, description="auto: the most of the scan's task time that may go "
                                                                  "to starting tasks")
    task_start_s: Optional[float] = Field(
        None, gt=0, description="auto: fixed start cost of a task (Slurm start, imports, tokenizer); default: the "
                                "cluster profile's task_start_s; bench/sensitivity_scan.py measures it")
    read_gb_s: float = Field(1.0, gt=0, description="auto: GB/s at which a task reads weights and baseline")
    device_tflops: float = Field(20.0, gt=0, description="auto: effective TFLOP/s of one task's device on one prompt")
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


def plan(spec: JobSpec, resume_dir: Optional[Path] = None, cluster=None) -> Shape:
    """baseline -> one array task per layer (or layers_per_task) -> merge; bi / angular: one task -> merge.
    `cluster` (the profile, when the plan passes it) gives `auto` its per-cluster task start cost."""
    scan = spec.scan
    problems = []
    try:
        text_lines(scan.prompts, "scan.prompts")
    except FieldError as e:  # not on this machine: a dry run still shows the layers' tasks
        problems.append((e.field, e.message))
    total = decoder_layers(spec)
    layers = scan.layers if scan.layers is not None else list(range(total))
    bad = [layer for layer in layers if not 0 <= layer < total]
    if bad:
        raise FieldError("scan.layers", f"layer indices {bad} are out of range: the model has {total} layers "
                                        f"(0..{total - 1})")
    if scan.block_size > 1:
        if scan.metric != "angular":
            raise FieldError("scan.block_size", f"blocks of {scan.block_size} layers are for metric angular "
                                                f"(Gromov et al.), not {scan.metric}")
        if scan.block_size >= total:
            raise FieldError("scan.block_size", f"{scan.block_size} >= the model's {total} layers")
        late = [layer for layer in layers if layer > total - scan.block_size]
        if late and scan.layers is not None:
            raise FieldError("scan.layers", f"blocks of {scan.block_size} cannot start at {late} in a {total}-layer "
                                            f"model (last start: {total - scan.block_size})")
    if scan.metric in ("bi", "angular"):  # one pass gives every layer: a single task, then the merge
        return Shape(items=None, pre=None, notes=[f"{scan.metric}: one forward pass scores all {len(layers)} layers"],
                     problems=problems)
    if resume_dir is not None:
        done = done_layers(resume_dir)
        missing = [layer for layer in layers if layer not in done]
        if not missing:
            raise FieldError("--resume-missing", f"every layer already has a result in {resume_dir}")
        per, notes = layers_per_task(spec, missing, cluster)
        return Shape(items=missing, items_per_task=per, pre=None,
                     notes=[f"resubmitting only the {len(missing)} missing layers: {missing}", *notes],
                     problems=problems)
    if problems and scan.layers_per_task == "auto":  # auto counts the prompts: without them, one layer per task
        per, notes = 1, ["layers_per_task auto: 1 (the prompts file is not here to size the tasks)"]
    else:
        per, notes = layers_per_task(spec, layers, cluster)
    return Shape(items=layers, items_per_task=per, pre="baseline", notes=notes, problems=problems)


DEFAULT_TASK_START_S = 20.0  # core.config.Cluster.task_start_s's default, for a plan made without a profile


def task_start(spec: JobSpec, cluster=None) -> tuple[float, str]:
    """(start seconds of one task, where that figure came from): scan.task_start_s, else the profile's."""
    if spec.scan.task_start_s is not None:
        return spec.scan.task_start_s, "scan.task_start_s"
    if cluster is not None:
        return cluster.task_start_s, f"profile {cluster.name}'s task_start_s"
    return DEFAULT_TASK_START_S, "default task_start_s"


def task_costs(spec: JobSpec, layers: list[int], per: int, cluster=None) -> list[tuple[float, float]]:
    """Estimated (start seconds, layer-work seconds) of each task when `layers` go `per` to a task (in order,
    as the plan slices them). Start: the fixed cost plus reading the weights from min(task layers) to the end
    (reuse_hidden) or all of them, and the task's baseline rows. Work: prompts x tokens x the decoder layers each
    masked pass runs (L - l from layer l with reuse_hidden, else L), 2 FLOPs per parameter, plus the LM head."""
    from core.model_sizes import model_config

    scan = spec.scan
    cfg = model_config(spec.model.path, spec.model.preset) or {}
    total = decoder_layers(spec)
    h = int(cfg.get("hidden_size", 4096))
    inter = int(cfg.get("intermediate_size", 4 * h))
    heads = int(cfg.get("num_attention_heads", 32))
    kv = int(cfg.get("num_key_value_heads", heads))
    vocab = int(cfg.get("vocab_size", 32000))
    hd = h // heads
    layer_params = 2 * h * h + 2 * h * kv * hd + 3 * h * inter
    head_params = h * vocab
    wbytes = 2  # bf16 on disk
    tokens = len(text_lines(scan.prompts, "scan.prompts")) * scan.max_prompt_tokens  # an upper bound
    act_bytes = 4 if scan.dtype == "fp32" else 2
    flops = scan.device_tflops * 1e12
    bw = scan.read_gb_s * 1e9
    start_s = task_start(spec, cluster)[0]
    out = []
    for i in range(0, len(layers), per):
        chunk = layers[i:i + per]
        first = min(chunk) if scan.reuse_hidden else 0
        weight_bytes = ((total - first) * layer_params + head_params * (1 if scan.reuse_hidden else 2)) * wbytes
        base_bytes = len(chunk) * tokens * h * act_bytes if scan.reuse_hidden else 0
        start = start_s + (weight_bytes + base_bytes) / bw
        work = sum(tokens * 2 * ((total - (layer if scan.reuse_hidden else 0)) * layer_params + head_params)
                   for layer in chunk) / flops
        out.append((start, work))
    return out


def start_share(costs: list[tuple[float, float]]) -> float:
    start = sum(c[0] for c in costs)
    return start / (start + sum(c[1] for c in costs))


def layers_per_task(spec: JobSpec, layers: list[int], cluster=None) -> tuple[int, list[str]]:
    """scan.layers_per_task, or for `auto` the fewest layers per task (the most tasks running side by side) whose
    estimated start cost stays within scan.max_start_share of the scan's task time; with the reason as notes.
    The fixed start cost of a task is scan.task_start_s, else the cluster profile's task_start_s."""
    scan = spec.scan
    if scan.layers_per_task != "auto":
        return scan.layers_per_task, []
    limit = scan.max_start_share
    shares = {}
    for per in range(1, len(layers) + 1):
        shares[per] = start_share(task_costs(spec, layers, per, cluster))
        if shares[per] <= limit:
            break
    costs = task_costs(spec, layers, per, cluster)
    start_s, source = task_start(spec, cluster)
    why = (f"layers_per_task auto: {per} ({len(costs)} tasks); estimated start {costs[0][0]:.1f}-{costs[-1][0]:.1f} "
           f"s per task (task_start_s {start_s:g} from {source} + weights from its first layer at {scan.read_gb_s:g} GB/s) "
           f"vs layer work {costs[-1][1]:.1f}-{costs[0][1]:.1f} s (prompts x {scan.max_prompt_tokens} tokens x "
           f"layers left at {scan.device_tflops:g} TFLOP/s): start share {100 * shares[per]:.0f}%")
    if shares[per] <= limit:
        why += f" <= {100 * limit:.0f}% (max_start_share)"
        if per > 1:
            why += f"; {per - 1} per task would be {100 * shares[per - 1]:.0f}%"
    else:
        why += f" > {100 * limit:.0f}% even with every layer in one task"
    return per, [why]

def scanned_layers(scan, total: int) -> list[int]:
    """The layers that get a score: scan.layers or all; blocks of n (angular) start at 0..L-n."""
    layers = scan.layers if scan.layers is not None else list(range(total))
    return [layer for layer in layers if layer <= total - scan.block_size]


MODES = {"qv": ("q_proj", "v_proj"), "qkv": ("q_proj", "k_proj", "v_proj"), "v": ("v_proj",), "k": ("k_proj",),
         "attn": ("o_proj",), "block": ()}


def decoder_layer(model, index: int):
    """Decoder layer `index` (original numbering) of a full LlamaForCausalLM or of a `load_pangu_tail` model."""
    return model.layer(index) if hasattr(model, "first_layer") else model.model.layers[index]


def _parts(model):
    """(rotary embedding, norm, LM head) of a full model or a tail."""
    inner = model if hasattr(model, "first_layer") else model.model
    return inner.rotary_emb, inner.norm, model.lm_head


class LayerMask:
    """Zero the outputs of a decoder layer's projections (qv: Q and V, v: V only, attn: the attention output),
    or skip the whole block (block); `remove()` restores the model exactly."""

    def __init__(self, model, layer: int, mode: str):
        self.handles = []
        decoder = decoder_layer(model, layer)
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
def load(spec: JobSpec, ctx: TaskContext, dtype_name: str, start: Optional[int] = None, stats: Optional[dict] = None):
    """The full model, or with `start` only layers start..L-1 + final norm + LM head (load_pangu_tail)."""
    from core.models.pangu import load_pangu, load_tokenizer, model_folder
    from core.runtime import task_device, torch_dtype

    folder = model_folder(spec)
    device = task_device(ctx)
    if start is not None:
        from core.models.pangu import load_pangu_tail

        model = load_pangu_tail(folder, start, dtype=torch_dtype(dtype_name), device=device, stats=stats)
        return model, load_tokenizer(folder), device
    model = load_pangu(folder, dtype=torch_dtype(dtype_name), attn_implementation="sdpa").to(device).eval()
    return model, load_tokenizer(folder), device


def encode(tokenizer, lines: list[str], max_tokens: int) -> list:
    import torch

    from core.models.pangu import bos_encode

    return [torch.tensor(bos_encode(tokenizer, line)[:max_tokens]).unsqueeze(0) for line in lines]


def logits_from(model, hidden, start: int):
    """Run decoder layers start..L-1 on `hidden` (the states entering layer `start`), then norm and LM head."""
    import torch

    rotary, norm, head = _parts(model)
    total = model.num_layers if hasattr(model, "first_layer") else len(model.model.layers)
    pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    emb = rotary(hidden, pos)
    for index in range(start, total):
        out = decoder_layer(model, index)(hidden, attention_mask=None, position_ids=pos, position_embeddings=emb)
        hidden = out[0] if isinstance(out, tuple) else out
    return head(norm(hidden))


def scores(base: dict, logits, ids) -> dict:
    """logprob distance and KL of one prompt against its baseline."""
    import torch

    out = {}
    if "target_lp" in base:
        target = next_token_logprobs(logits, ids)
        out["logprob"] = (target - base["target_lp"]).abs().mean().item() if target.numel() else 0.0
    if "last_lp" in base:
        last = torch.log_softmax(logits[0, -1].float(), dim=-1)
        out["kl"] = torch.sum(base["last_lp"].exp() * (base["last_lp"] - last)).item()
    return out


def baseline_path(run_dir: Path) -> Path:
    return Path(run_dir) / "baseline.safetensors"


def baseline(spec: JobSpec, ctx: TaskContext) -> dict:
    """Baseline next-token log-probabilities (and the hidden states entering every layer) for every prompt.

    Keys: `p{i}.ids`, `p{i}.target_lp`, `p{i}.last_lp` per prompt; with reuse_hidden `hidden.layer{l:03d}`: the
    states entering layer l of all prompts, concatenated along tokens (prompt i's rows follow from the ids'
    lengths), so that a task reads its own layers' tensors and nothing else."""
    import torch
    from safetensors.torch import save_file

    scan = spec.scan
    model, tok, device = load(spec, ctx, scan.dtype)
    prompts = encode(tok, text_lines(scan.prompts, "scan.prompts"), scan.max_prompt_tokens)
    tensors, hidden = {}, []
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            out = model(input_ids=ids.to(device), output_hidden_states=True)
            tensors[f"p{i}.ids"] = ids[0].to(torch.int32)  # every task reads every prompt's ids: keep them small
            tensors[f"p{i}.target_lp"] = next_token_logprobs(out.logits, ids).cpu()
            tensors[f"p{i}.last_lp"] = torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu()
            if scan.reuse_hidden:  # hidden_states[l] enters layer l
                hidden.append([h[0].cpu() for h in out.hidden_states[:-1]])
    if hidden:
        for layer in range(len(model.model.layers)):
            tensors[f"hidden.layer{layer:03d}"] = torch.cat([h[layer] for h in hidden], 0).contiguous()
    path = baseline_path(ctx.run_dir)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"prompts": str(len(prompts)), "layers": str(len(model.model.layers))})
    log.info("baseline for %d prompts -> %s", len(prompts), path)
    return {"prompts": len(prompts), "layers": len(model.model.layers), "path": str(path)}


def read_baseline(run_dir: Path, layers: Optional[list[int]] = None, fields=("target_lp", "last_lp"),
                  stats: Optional[dict] = None) -> list[dict]:
    """Per prompt: ids, the requested `fields`, and `hidden` {layer: states entering it} for `layers` (default:
    every stored layer). Only those tensors are read (safe_open); `stats` gets bytes_read / bytes_total."""
    from safetensors import safe_open

    from core.models.pangu import _header_bytes

    path = baseline_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: the baseline step has not finished in this run folder")
    read = _header_bytes(path)

    def get(st, key):
        nonlocal read
        t = st.get_tensor(key)
        read += t.numel() * t.element_size()
        return t

    with safe_open(str(path), "pt") as st:
        keys = set(st.keys())
        n = int(st.metadata()["prompts"])
        base = [{"ids": get(st, f"p{i}.ids").long(), **{f: get(st, f"p{i}.{f}") for f in fields}} for i in range(n)]
        stored = sorted(int(k[len("hidden.layer"):]) for k in keys if k.startswith("hidden.layer"))
        if stored:
            offsets = [0]
            for b in base:
                offsets.append(offsets[-1] + b["ids"].numel())
            for b in base:
                b["hidden"] = {}
            for layer in (stored if layers is None else sorted(set(layers))):
                h = get(st, f"hidden.layer{layer:03d}")
                for i, b in enumerate(base):
                    b["hidden"][layer] = h[offsets[i]:offsets[i + 1]]
    if stats is not None:
        stats.update(bytes_read=read, bytes_total=path.stat().st_size)
    return base


def scan_layer(model, base: list[dict], layer: int, mode: str, reuse_hidden: bool, device) -> dict:
    """Per-prompt scores with `layer` masked; the mask is removed afterwards."""
    import torch

    out = {"logprob": [], "kl": []}
    with LayerMask(model, layer, mode), torch.no_grad():
        for b in base:
            ids = b["ids"].unsqueeze(0).to(device)
            if reuse_hidden and layer in b.get("hidden", {}):
                logits = logits_from(model, b["hidden"][layer].unsqueeze(0).to(device), layer)
            else:
                logits = model(input_ids=ids).logits
            s = scores({k: v.to(device) for k, v in b.items() if k in ("target_lp", "last_lp")}, logits, ids)
            for k, v in s.items():
                out[k].append(v)
    return {k: v for k, v in out.items() if v}


def write_layer(run_dir: Path, layer: int, metric: str, values: list[float], extra: dict | None = None) -> None:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    rec = {"layer": layer, "metric": metric, "mean": mean, "std": std, "values": values, **(extra or {})}
    write_json_atomic(layer_results_dir(run_dir) / f"layer_{layer:03d}.json", rec)


def layer_states(model, ids) -> list:
    """X_0..X_L of one prompt (1, T) -> L+1 tensors (T, H): X_l enters decoder layer l, X_L is the last layer's
    own output, before the final norm (transformers' hidden_states[L] is the normed one)."""
    states, handles = [], []
    layers = model.model.layers

    def pre(module, args, kwargs):
        states.append((args[0] if args else kwargs["hidden_states"])[0])

    def post(module, args, kwargs, output):
        states.append((output[0] if isinstance(output, tuple) else output)[0])

    for layer in layers:
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    handles.append(layers[-1].register_forward_hook(post, with_kwargs=True))
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return states


def hidden_metrics(model, prompts: list, device, block_size: int = 1) -> dict[int, dict[str, list[float]]]:
    """Per layer l: ShortGPT's BI 1 - cos(X_l, X_{l+1}) (mean over tokens) and Gromov's angular distance
    arccos(cos(x_l, x_{l+n})) / pi on the last token (n = block_size; l = 0..L-n), one forward pass per prompt."""
    import torch

    per_layer: dict[int, dict[str, list[float]]] = {}
    cosine = torch.nn.functional.cosine_similarity
    with torch.no_grad():
        for ids in prompts:
            xs = [x.float() for x in layer_states(model, ids.to(device))]
            total = len(xs) - 1
            for layer in range(total):
                d = per_layer.setdefault(layer, {"bi": []})
                d["bi"].append((1 - cosine(xs[layer], xs[layer + 1], dim=-1)).mean().item())
                if layer + block_size <= total:
                    cos = cosine(xs[layer][-1], xs[layer + block_size][-1], dim=0)
                    d.setdefault("angular", []).append((torch.arccos(cos.clamp(-1, 1)) / math.pi).item())
    return per_layer


def run(spec: JobSpec, ctx: TaskContext) -> dict:
    import time

    from core import watchdog
    from core.runtime import restart_count

    t0 = time.time()
    scan = spec.scan
    # the hang watchdog (docs/hangs.md): loading and the first layer get hang.first_step_s, each further layer
    # max(hang.factor x p95 layer time, hang.floor_s)
    wd = watchdog.start(spec, ctx.run_dir, ctx.job_id, ctx.rank, ctx.world_size, ctx.hostname, restart_count(),
                        what="layer")
    if scan.metric in ("bi", "angular"):
        model, tok, device = load(spec, ctx, scan.dtype)
        prompts = encode(tok, text_lines(scan.prompts, "scan.prompts"), scan.max_prompt_tokens)
        layers = scanned_layers(scan, len(model.model.layers))
        wd.ready()
        per = hidden_metrics(model, prompts, device, scan.block_size)  # one pass scores every layer
        for layer in layers:
            write_layer(ctx.run_dir, layer, scan.metric, per[layer][scan.metric],
                        {"block_size": scan.block_size} if scan.metric == "angular" else None)
            wd.beat(layer)
        wd.stop()
        return {"layers": layers, "metric": scan.metric}
    from core.runtime import fault_point

    weights, baseline_io = {}, {}
    # reuse_hidden: the task needs layers min(items)..L-1 only, and only its own layers' baseline rows
    start = min(ctx.items) if scan.reuse_hidden and ctx.items else None
    model, _, device = load(spec, ctx, scan.dtype, start=start, stats=weights)
    load_s = time.time() - t0
    base = read_baseline(ctx.run_dir, layers=list(ctx.items) if scan.reuse_hidden else [],
                         fields=("target_lp",) if scan.metric == "logprob" else ("last_lp",), stats=baseline_io)
    t1 = time.time()
    wd.ready()
    for layer in ctx.items:
        fault_point("layer", layer)
        values = scan_layer(model, base, layer, scan.mode, scan.reuse_hidden, device)
        write_layer(ctx.run_dir, layer, scan.metric, values[scan.metric], {"mode": scan.mode})
        log.info("layer %d: %s %.6f", layer, scan.metric, sum(values[scan.metric]) / len(base))
        wd.beat(layer)
    wd.stop()
    return {"layers": list(ctx.items), "metric": scan.metric, "mode": scan.mode, "load_s": round(load_s, 3),
            "scan_s": round(time.time() - t1, 3), "weights_read_bytes": weights.get("bytes_read"),
            "weights_total_bytes": weights.get("bytes_total"), "baseline_read_bytes": baseline_io["bytes_read"],
            "baseline_total_bytes": baseline_io["bytes_total"]}


# ---------------------------------------------------------------- merge
def merge(spec: JobSpec, ctx: TaskContext) -> dict:
    import pandas as pd

    scan = spec.scan
    wanted = scanned_layers(scan, decoder_layers(spec))
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
    out = ResultFolder(ctx.run_dir)
    csv_path = out.dataframe("sensitivity.csv", df)
    k = max(1, round(scan.mark_ratio * len(df)))
    candidates = sorted(df.nsmallest(k, "mean")["layer"].tolist())
    png = out.figure("sensitivity.png", sensitivity_figure(df, candidates, f"{scan.metric} ({scan.mode})"))
    log.info("%s; pruning candidates at %.0f%%: %s", csv_path, 100 * scan.mark_ratio, candidates)
    return {"csv": str(csv_path), "png": str(png), "candidates": candidates, "layers": len(df)}


def sensitivity_figure(df, candidates: list[int], label: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, len(df) * 0.3), 3.5))
    colors = ["tab:red" if layer in candidates else "tab:blue" for layer in df["layer"]]
    ax.bar(df["layer"], df["mean"], yerr=df["std"], color=colors, capsize=2)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(label)
    ax.set_title(f"layer sensitivity; red: {len(candidates)} pruning candidates")
    fig.tight_layout()
    return fig


WORKLOAD = Workload(run=run, merge=merge, section="scan", Section=ScanSection, plan=plan,
                    entries={"baseline": baseline}, resumable=True, watchdog="layer")  # per-layer results are atomic: a requeued task redoes only its own layers
