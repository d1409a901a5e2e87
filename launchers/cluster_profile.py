#!/usr/bin/env python
"""Write a cluster profile from the cluster itself: partitions (MaxTime, MaxNodes), the nodes' CPUs, memory and
GRES, MaxArraySize, your accounts and QOS, this checkout's virtualenv; a comment on every value says where it came
from. Review it, then use it with -c. (Not named profile.py: that would shadow Python's own profile module for every
launcher, launchers/ being first on their import path.)

  python launchers/cluster_profile.py                          # cluster_configs/<ClusterName>.yaml, default partition
  python launchers/cluster_profile.py --partition gpu --name mylab -o cluster_configs/mylab.yaml
  python launchers/cluster_profile.py -o -                     # print it instead
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _common  # noqa: F401
from _common import REPO, fail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default=None, help="the profile's name (default: Slurm's ClusterName)")
    p.add_argument("--partition", "-p", default=None, help="the partition jobs go to (default: Slurm's default)")
    p.add_argument("--output", "-o", default=None,
                   help="where to write it (default cluster_configs/<name>.yaml; '-' prints it)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.add_argument("--scheduler", default="slurm", help="the scheduler to read (default slurm)")
    args = p.parse_args(argv)
    from core import scheduler

    try:
        text = scheduler.by_name(args.scheduler).write_profile(args.name, args.partition, REPO)
    except (scheduler.SchedulerUnavailable, ValueError) as e:
        fail(str(e), 1 if isinstance(e, scheduler.SchedulerUnavailable) else 2)
    if args.output == "-":
        print(text, end="")
        return 0
    from core.safe_yaml import load_yaml

    name = args.name or load_yaml(text, "the written profile")["name"]
    out = Path(args.output) if args.output else REPO / "cluster_configs" / f"{name}.yaml"
    if out.exists() and not args.force:
        fail(f"{out} exists: give another --output, or --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}: review every value (its comment says where it came from), then e.g.\n"
          f"  python launchers/submit.py jobs/tiny/smoke.yaml -c {out} --dry-run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
