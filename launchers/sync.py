#!/usr/bin/env python
"""Upload the W&B offline runs of finished runs from a machine that reaches the W&B server (a login node).

  python launchers/sync.py logs/pangu_lm/48121              # one run folder
  python launchers/sync.py logs/pangu_pruning_study_tiny/20261206-101500   # a study folder: every step's runs
  python launchers/sync.py logs/ --dry-run                  # list what would be uploaded and the command

Compute nodes write W&B offline (tracking.wandb: offline, docs/tracking.md): each task of a run leaves one
offline run under <run>/tracking/<task>/wandb/. This finds them and runs `wandb sync` on them. The key comes from
WANDB_API_KEY in your environment or from `wandb login` (~/.netrc); it is never an argument and never printed.
Exits 2 when nothing is found or no key is set (with --dry-run no key is needed).
"""
from __future__ import annotations

import argparse
import json
import netrc
import os
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import _common  # noqa: F401
from _common import fail


def offline_runs(folder: Path) -> list[Path]:
    """The offline runs in a run folder, a study folder (through study.json, every step's run) or any folder."""
    from core.tracking import wandb_offline_runs

    roots = [folder]
    study = folder / "study.json"
    if study.is_file():
        try:
            steps = json.loads(study.read_text()).get("steps") or {}
        except ValueError:
            steps = {}
        roots += [Path(s["run_dir"]) for s in steps.values() if isinstance(s, dict) and s.get("run_dir")]
    found: list[Path] = []
    for root in roots:
        if root.is_dir():
            found += [p for p in wandb_offline_runs(root) if p not in found]
    return found


def have_key(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_command() -> list[str]:
    exe = Path(sys.executable).with_name("wandb")
    return [str(exe) if exe.is_file() else "wandb", "sync"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", metavar="RUN_OR_STUDY_FOLDER")
    p.add_argument("--dry-run", action="store_true", help="list the offline runs and print the command only")
    p.add_argument("--project", default=None, help="upload into this W&B project instead of the runs' own")
    p.add_argument("--entity", default=None, help="the W&B entity (team or user) to upload to")
    args = p.parse_args(argv)
    runs: list[Path] = []
    for f in args.folders:
        folder = Path(f)
        if not folder.is_dir():
            fail(f"{f}: no such folder; give a run folder (logs/<name>/<id>) or a study folder")
        runs += [r for r in offline_runs(folder) if r not in runs]
    if not runs:
        fail(f"no W&B offline runs under {' '.join(args.folders)} (runs write them with tracking.wandb: offline; "
             f"see docs/tracking.md)")
    cmd = wandb_command() + (["--project", args.project] if args.project else []) + \
        (["--entity", args.entity] if args.entity else []) + [str(r) for r in runs]
    print(f"{len(runs)} W&B offline run(s):")
    for r in runs:
        print(f"  {r}")
    print("command: " + " ".join(shlex.quote(c) for c in cmd))
    if args.dry_run:
        return 0
    if not have_key():
        fail("no W&B key: set WANDB_API_KEY in your environment (e.g. export WANDB_API_KEY=$(cat ~/.wandb_key)) or "
             "run `wandb login` once on this machine, then run this again; nothing was uploaded")
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
