#!/usr/bin/env python
"""The prepared device check (issue 27, item 6): what this project has never run, on a machine with one CUDA GPU.
Run it through bench/device_check.sh (which installs the carried wheels first); it finishes in under 8 minutes on
one H100 and prints ratios plus one JSON (device_check.json in the output folder):

1. the tiny spec of every training workload (and the scan) on `cuda` in bf16 through the local executor (a profile
   written here: one GPU, no Slurm on that machine), all at once: pass / fail, wall seconds, the last error line;
2. a Dia-Pangu stage-1 step at openPangu-7B widths with reduced depth under ZeRO-3 in bf16 (bench/dia_pangu_memory.py
   --device cuda): step time, model FLOPs utilisation, peak device memory / the plan's estimate;
3. checkpoint save and stall on the device (bench/checkpoint_stall.py --device cuda): background / synchronous.

  python bench/device_check.py [--out DIR] [--quick]     # --quick: smoke + one workload, 1-layer Dia (a rehearsal)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TINY = ["smoke", "pangu_lm", "dia_pangu", "dia_pangu_stage2", "vitp_lung", "gigapath_distill", "blip_medtrinity",
        "pangu_sensitivity"]
PROFILE = """name: device_check
executor: local
description: one CUDA GPU of a lent machine, submitit LocalExecutor (bench/device_check.py)
accelerator: {accelerator}
{devices}
cpus_per_task: 4
signal_s_before_timeout: 30
max_requeues: 0
task_start_s: 5
logs_roots: [/tmp]
scratch_roots: [/tmp]
"""


def environment() -> dict:
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "device_mem_gib": round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
           if torch.cuda.is_available() else None, "bf16": bool(torch.cuda.is_available()
                                                                 and torch.cuda.is_bf16_supported())}
    for name in ("deepspeed", "transformers", "peft", "timm", "submitit", "pydantic"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # a missing package is what the check reports, not a crash
            out[name] = f"missing ({type(e).__name__})"
    return out


def tiny_specs(out: Path, names: list[str], timeout_s: int, accelerator: str, mem: float) -> list[dict]:
    """Every tiny spec at once (each its own submit.py process on the local executor), bf16 where it trains."""
    profile = out / "device_check_profile.yaml"
    devices = f"devices_per_node: 1\ndevice_mem_gb: {mem}" if accelerator != "cpu" else "devices_per_node: 0"
    profile.write_text(PROFILE.format(accelerator=accelerator, devices=devices))
    procs = {}
    for name in names:
        sets = ["--set", f"outputs.logs_dir={out / 'runs'}", "--set", f"name=dc_{name}"]
        if name not in ("smoke", "pangu_sensitivity"):
            sets += ["--set", "deepspeed.precision=bf16"]
        if name == "pangu_sensitivity":
            sets += ["--set", "scan.dtype=bf16"]
        if name.startswith("dia_pangu"):   # the report metrics (pycocoevalcap, ~100 MB) are CPU code: not carried
            sets += ["--set", "dia.evaluate=false"]
        if name == "blip_medtrinity":      # likewise, and METEOR needs Java
            sets += ["--set", "caption.evaluate=false"]
        log = open(out / f"tiny_{name}.log", "w")
        procs[name] = (subprocess.Popen([PY, "launchers/submit.py", f"jobs/tiny/{name}.yaml", "-c", str(profile),
                                         *sets], cwd=REPO, stdout=log, stderr=subprocess.STDOUT), time.time(), log)
    rows = []
    for name, (proc, t0, log) in procs.items():
        try:
            code = proc.wait(timeout=max(1, timeout_s - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        log.close()
        text = (out / f"tiny_{name}.log").read_text(errors="replace").strip().splitlines()
        err = next((ln for ln in reversed(text) if "error" in ln.lower() or "Error" in ln), text[-1] if text else "")
        rows.append({"spec": f"jobs/tiny/{name}.yaml", "pass": code == 0, "exit": code,
                     "seconds": round(time.time() - t0, 1), "last_error": "" if code == 0 else err[-300:]})
    return rows


def run_bench(out: Path, name: str, args: list[str], timeout_s: int) -> dict:
    dest = out / f"{name}.json"
    log = out / f"{name}.log"
    try:
        with open(log, "w") as f:
            code = subprocess.run([PY, f"bench/{name}.py", *args, "--json", str(dest)], cwd=REPO, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    result = json.loads(dest.read_text()) if dest.is_file() else {}
    result["exit"] = code
    if code != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        result["last_error"] = lines[-1][-300:] if lines else ""
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "logs" / "device_check"))
    p.add_argument("--quick", action="store_true", help="a rehearsal: smoke and pangu_lm, a 1-layer Dia step")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: rehearse the plumbing here")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report: dict = {"environment": environment()}
    print("environment:", json.dumps(report["environment"]), flush=True)
    mem = report["environment"]["device_mem_gib"] or 80
    names = ["smoke", "pangu_lm"] if args.quick else TINY
    report["tiny_specs"] = tiny_specs(out, names, 150 if args.quick else 240, args.device, mem)
    for r in report["tiny_specs"]:
        print(f"tiny {r['spec']:36s} {'pass' if r['pass'] else 'FAIL'} {r['seconds']:6.1f} s {r['last_error']}",
              flush=True)
    layers = ["--layers", "1", "--steps", "2"] if args.quick else ["--layers", "4", "--steps", "6"]
    prec = ["--precision", "bf16"] if args.device == "cuda" else []
    report["dia_pangu_step"] = run_bench(out, "dia_pangu_memory", ["--device", args.device, *prec, *layers], 180)
    d = report["dia_pangu_step"]
    print(f"Dia-Pangu stage-1 step at openPangu-7B widths: {d.get('step_s')} s, MFU {d.get('mfu')}, peak memory "
          f"{d.get('measured_gib')} GiB, estimate / measured {d.get('estimate_over_measured')} "
          f"(exit {d['exit']}) {d.get('last_error', '')}", flush=True)
    width = ["--width", "1024", "--layers", "2", "--saves", "2"] if args.quick else ["--width", "8192", "--layers", "8"]
    report["checkpoint"] = run_bench(out, "checkpoint_stall", ["--device", args.device, *width], 150)
    c = report["checkpoint"]
    print(f"checkpoint on the device: background / sync stall {c.get('ratio')} (target <= 0.1; sync "
          f"{c.get('sync_stall_s')} s, background {c.get('background_stall_s')} s; exit {c['exit']}) "
          f"{c.get('last_error', '')}", flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    (out / "device_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    ok = all(r["pass"] for r in report["tiny_specs"]) and d["exit"] == 0 and c["exit"] == 0
    print(f"device check {'passed' if ok else 'FAILED'} in {report['seconds']:.0f} s; {out / 'device_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
