#!/usr/bin/env python
"""Sensitivity scan costs, measured in one run on the local Slurm (bash slurm/local_cluster.sh up):

1. decoder-layer evaluations for a whole scan (34-layer openPangu shape, narrow): starting each masked pass at
   its layer from the baseline's hidden states vs the naive L full forward passes (target <= 0.55x), with
   identical per-layer results;
2. wall time of the scan as a Slurm array on the two local nodes vs the same scan in one process (target <= 0.65x);
3. per-task overhead (Slurm start + imports + model load) as a share of each array task's wall time, for the tiny
   model and a ~300M-parameter Pangu shape, with layers_per_task 1 and 4; and what each task reads: bytes of
   weights (layers min(task)..L-1 + norm + head, target <= 0.55 of the model on average) and bytes of the
   baseline (its own layers' rows, target <= 1/L of the file + header);
   and the work inflation: CPU seconds of every job of the array (baseline, tasks, merge; sacct TotalCPU) over
   the one-process scan's CPU seconds (target <= 1.3x);
4. import time of the task entry (core.runtime + the workload module) per workload in a fresh interpreter, the
   inference stack (torch, transformers' Llama, safetensors) that baseline / scan / merge / prune import, and
   whether DeepSpeed was imported.

  .venv/bin/python bench/sensitivity_scan.py [--skip-300m] [--only 300m] [--per-task 1|auto] [--skip-count]
                                            [--prompts 64] [--prompt-tokens 128]
--prompts N scans N prompts of --prompt-tokens tokens (the lab's scan has a few hundred of 128); the
default is the tiny spec's 8 prompts of 32 tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PY = sys.executable
# sacct / sbatch find the local cluster's slurm.conf through SLURM_CONF, as launchers/_common.py sets it
_LOCAL_CONF = Path(os.environ.get("SLURM_LOCAL_STATE") or "/var/lib/slurm-local") / "etc" / "slurm.conf"
if not os.environ.get("SLURM_CONF") and not Path("/etc/slurm/slurm.conf").exists() and _LOCAL_CONF.is_file():
    os.environ["SLURM_CONF"] = str(_LOCAL_CONF)


def count_evaluations(tmp: Path) -> None:
    import torch

    from core.models.pangu import write_tiny_pangu
    from core.runtime import TaskContext
    from core.config import load_spec
    from core.workloads import sensitivity as sens

    folder = write_tiny_pangu(tmp / "p34", layers=34, hidden=64, intermediate=128)
    results, counts = {}, {}
    for reuse in (True, False):
        spec, _ = load_spec(REPO / "jobs/tiny/pangu_sensitivity.yaml",
                            (f"model.path={folder}", "model.make_tiny=false", f"scan.reuse_hidden={str(reuse).lower()}"))
        run_dir = tmp / f"scan_{reuse}"
        ctx = TaskContext(run_dir=run_dir, step="main", job_id="bench", root_id="bench", items=list(range(34)))
        run_dir.mkdir(parents=True)
        sens.baseline(spec, ctx)
        model, _, device = sens.load(spec, ctx, spec.scan.dtype)
        n = [0]
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))
        base = sens.read_baseline(run_dir)
        results[reuse] = [sens.scan_layer(model, base, layer, "qv", reuse, device)["logprob"] for layer in range(34)]
        counts[reuse] = n[0]
    same = all(abs(a - b) <= 1e-6 for x, y in zip(results[True], results[False]) for a, b in zip(x, y))
    print(f"decoder-layer evaluations, 34 layers x {len(base)} prompts: from-layer {counts[True]} vs naive "
          f"{counts[False]} = {counts[True] / counts[False]:.3f}x (target <= 0.55x); identical results: {same}")


def submit(spec: str, *sets: str) -> Path:
    proc = subprocess.run([PY, "launchers/submit.py", spec, "-c", "local_slurm",
                           *[x for s in sets for x in ("--set", s)]], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"submit {spec} {sets} failed:\n{proc.stdout}\n{proc.stderr}")
    out = proc.stdout
    return Path(next(ln for ln in out.splitlines() if ln.startswith("run folder: ")).split(": ", 1)[1])


def wait_merge(run_dir: Path, timeout=3600) -> float:
    rec = json.loads((run_dir / "run.json").read_text())
    merge = [s for s in rec["steps"] if s["name"] == "merge"][0]["job_ids"][0]
    t0 = time.time()
    while time.time() - t0 < timeout:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", merge, "-o", "State"], capture_output=True, text=True).stdout
        if out.strip() in ("COMPLETED", "FAILED", "CANCELLED"):
            assert out.strip() == "COMPLETED", f"merge {merge}: {out}"
            return time.time()
        time.sleep(0.5)
    raise TimeoutError(run_dir)


def task_overheads(run_dir: Path, reads: list | None = None) -> list[float]:
    rec = json.loads((run_dir / "run.json").read_text())
    arr = [s for s in rec["steps"] if s["name"] == "main"][0]["job_ids"][0]
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", arr, "-o", "JobID,ElapsedRaw"], capture_output=True,
                         text=True).stdout
    elapsed = {ln.split("|")[0]: int(ln.split("|")[1]) for ln in out.split()}
    shares = []
    for p in (run_dir / "tasks").glob("main*.json"):   # main-<index>.json; main.json when auto made one task
        t = json.loads(p.read_text())
        jid = next((k for k in elapsed if k.endswith(f"_{t.get('task_index')}")), None) or \
            (next(iter(elapsed)) if len(elapsed) == 1 else None)
        if jid and elapsed[jid] > 0:
            shares.append(max(0.0, 1 - t["result"]["scan_s"] / elapsed[jid]))
        if reads is not None:
            reads.append(t["result"])
    return shares


def _cpu_seconds(text: str) -> float:
    """sacct's TotalCPU ([D-]HH:MM:SS, MM:SS.mmm) in seconds."""
    days, _, clock = text.strip().rpartition("-")
    parts = [float(x) for x in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def array_cpu_seconds(run_dir: Path) -> float:
    """CPU seconds of every job of the run (baseline, array tasks, merge): the sum over their job steps."""
    rec = json.loads((run_dir / "run.json").read_text())
    ids = [j for s in rec["steps"] for j in s["job_ids"]]
    out = subprocess.run(["sacct", "-n", "-P", "-j", ",".join(ids), "-o", "JobID,TotalCPU"], capture_output=True,
                         text=True, check=True).stdout
    return sum(_cpu_seconds(line.split("|")[1]) for line in out.splitlines() if "." in line.split("|")[0])


def write_prompts(path: Path, n: int, tokens: int) -> Path:
    """n distinct prompts of about `tokens` tokens each, made of the tiny corpus's sentences."""
    lines = [ln.strip() for ln in (REPO / "jobs/tiny/data/corpus.txt").read_text().splitlines() if ln.strip()]
    out = []
    for i in range(n):
        words, k = [], i
        while len(words) < tokens:  # the tiny tokenizer gives about one token per word or more
            words += lines[k % len(lines)].split()
            k += 7
        out.append(" ".join(words[:tokens]))
    path.write_text("\n".join(out) + "\n")
    return path


def wall_array_vs_inprocess(tmp: Path, label: str, folder: Path, per_task, prompts: tuple = ()) -> None:
    import resource

    from core.config import load_spec

    sets = (f"model.path={folder}", "model.make_tiny=false", f"outputs.logs_dir={tmp / 'logs'}",
            f"scan.layers_per_task={per_task}", "resources.array.parallelism=2", "scan.dtype=bf16", *prompts)
    load_spec(REPO / "jobs/tiny/pangu_sensitivity.yaml", sets)  # a bad setting fails here, before any timing
    t0, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    run_dir = tmp / f"inproc_{label}_{per_task}"
    run_dir.mkdir()
    n_layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    subprocess.run([PY, "-c", (
        "import sys; sys.path.insert(0, %r)\n"
        "from core.config import load_spec\nfrom core.runtime import TaskContext\nfrom core.workloads import sensitivity as s\n"
        "spec, _ = load_spec(%r, %r)\n"
        "mk = lambda step, items=None: TaskContext(run_dir=__import__('pathlib').Path(%r), step=step, job_id='x', root_id='x', items=items)\n"
        "s.baseline(spec, mk('baseline')); s.run(spec, mk('main', list(range(%d)))); s.merge(spec, mk('merge'))\n"
    ) % (str(REPO), str(REPO / "jobs/tiny/pangu_sensitivity.yaml"), sets, str(run_dir), n_layers)], check=True,
        capture_output=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    inproc = time.time() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    inproc_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    t0 = time.time()
    arr_dir = submit("jobs/tiny/pangu_sensitivity.yaml", *sets)
    array = wait_merge(arr_dir) - t0
    reads: list = []
    shares = task_overheads(arr_dir, reads)
    array_cpu = array_cpu_seconds(arr_dir)
    if per_task == "auto":
        per_task = f"auto ({-(-n_layers // max(len(shares), 1))} layers in each of {len(shares)} tasks)"
    print(f"{label} ({n_layers} layers), layers_per_task={per_task}: array on n1+n2 {array:.1f} s vs one process "
          f"{inproc:.1f} s = {array / inproc:.2f}x (target <= 0.65x); per-task overhead "
          f"{100 * sum(shares) / max(len(shares), 1):.0f}% of task wall time ({len(shares)} tasks; target <= 30%); "
          f"work inflation {array_cpu:.1f} / {inproc_cpu:.1f} CPU s = {array_cpu / inproc_cpu:.2f}x (target <= 1.3x)")
    w = [r["weights_read_bytes"] / r["weights_total_bytes"] for r in reads if r.get("weights_read_bytes")]
    b = [r["baseline_read_bytes"] / r["baseline_total_bytes"] for r in reads if r.get("baseline_read_bytes")]
    if w and b:
        print(f"  weights read per task: mean {100 * sum(w) / len(w):.1f}% of the model (max {100 * max(w):.1f}%, "
              f"target <= 55%); baseline read per task: mean {100 * sum(b) / len(b):.2f}% of the file (max "
              f"{100 * max(b):.2f}%; 1/L = {100 / n_layers:.2f}%, {reads[0]['baseline_total_bytes']:,} bytes)")


IMPORT_PROBE = r"""
import sys, time
t0 = time.perf_counter()
from core.runtime import TaskEntry
from core import workloads
workloads.get(sys.argv[1])
t1 = time.perf_counter()
if sys.argv[2] == "stack":
    import torch, safetensors.torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
t2 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {int(any(m.split('.')[0] == 'deepspeed' for m in sys.modules))}")
"""


def import_times(repeats: int = 3) -> None:
    from core import workloads

    for name in workloads.WORKLOADS:
        entry = []
        for _ in range(repeats):
            proc = subprocess.run([PY, "-c", IMPORT_PROBE, name, "entry"], capture_output=True, text=True, cwd=REPO)
            if proc.returncode:
                break
            out = proc.stdout.split()
            entry.append(float(out[0]))
        if not entry:
            print(f"task entry import, {name}: failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        print(f"task entry import, {name}: {min(entry):.3f} s (best of {repeats}); deepspeed imported: "
              f"{bool(int(out[2]))}")
    stack = [subprocess.run([PY, "-c", IMPORT_PROBE, "sensitivity", "stack"], capture_output=True, text=True,
                            cwd=REPO, check=True).stdout.split() for _ in range(repeats)]
    ds = [subprocess.run([PY, "-c", "import time; t = time.perf_counter(); import deepspeed; "
                                    "print(time.perf_counter() - t)"], capture_output=True, text=True,
                         check=True).stdout.split()[-1] for _ in range(repeats)]
    print(f"inference stack (torch, transformers Llama, safetensors) on top: {min(float(x[1]) for x in stack):.2f} s; "
          f"deepspeed imported: {bool(int(stack[0][2]))}; importing deepspeed would add "
          f"{min(float(x) for x in ds):.2f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-300m", action="store_true")
    ap.add_argument("--only", choices=["tiny", "300m"], help="scan only this shape")
    ap.add_argument("--per-task", type=lambda v: v if v == "auto" else int(v), action="append",
                    help="layers per task, or auto (the planner sizes the tasks; default: tiny 1 and 3, 300M 1 and 4)")
    ap.add_argument("--skip-count", action="store_true", help="skip the decoder-layer evaluation count")
    ap.add_argument("--prompts", type=int, help="scan this many prompts (default: the tiny spec's 8)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt with --prompts")
    args = ap.parse_args()
    subprocess.run(["bash", str(REPO / "slurm/local_cluster.sh"), "up"], check=True, capture_output=True)
    from core.models.pangu import write_tiny_pangu

    import_times()
    with tempfile.TemporaryDirectory(prefix="sensitivity_bench-") as t:  # under /tmp: the profile's logs_roots
        tmp = Path(t)
        if not args.skip_count:
            count_evaluations(tmp)
        prompts = () if not args.prompts else (
            f"scan.prompts={write_prompts(tmp / 'prompts.txt', args.prompts, args.prompt_tokens)}",
            f"scan.max_prompt_tokens={args.prompt_tokens}")
        if prompts:
            print(f"scanning {args.prompts} prompts of {args.prompt_tokens} tokens")
        if args.only in (None, "tiny"):
            tiny = write_tiny_pangu(tmp / "tiny6", layers=6)
            for per in args.per_task or (1, 3):
                wall_array_vs_inprocess(tmp, "tiny", tiny, per, prompts)
        if not args.skip_300m and args.only in (None, "300m"):
            mid = write_tiny_pangu(tmp / "p300m", layers=12, hidden=1536, heads=16, kv_heads=4, intermediate=4096)
            for per in args.per_task or (1, 4):
                wall_array_vs_inprocess(tmp, "300M", mid, per, prompts)


if __name__ == "__main__":
    main()
