#!/usr/bin/env python
"""This user's Slurm jobs as a table: one squeue + one sacct call per refresh.

  python launchers/status.py                 # once
  python launchers/status.py --watch         # refresh with back-off (2 s doubling to 60 s) until all finish
  python launchers/status.py --name smoke    # only jobs whose name starts with smoke
  python launchers/status.py --json          # runs with their jobs and task counts, for scripts
"""
from __future__ import annotations

import argparse
import sys

import _common  # noqa: F401
from _common import fail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--watch", "-w", action="store_true", help="refresh until no job is pending or running")
    p.add_argument("--interval", type=float, default=2.0, help="first refresh interval in seconds (doubles while idle)")
    p.add_argument("--max-interval", type=float, default=60.0)
    p.add_argument("--since", default="now-2days", help="sacct start time (default now-2days)")
    p.add_argument("--user", default=None)
    p.add_argument("--name", default=None, help="only jobs whose name starts with this")
    p.add_argument("--no-log", action="store_true", help="leave out the last log line")
    p.add_argument("--json", action="store_true", help="print the runs and their jobs as JSON (for scripts)")
    args = p.parse_args(argv)
    from core import monitor

    refresher = monitor.Refresher(args.user, args.since)

    def render():
        rows = refresher.query() if args.watch else monitor.query(args.user, args.since)
        if args.name:
            rows = [r for r in rows if r.name.startswith(args.name)]
        return monitor.format_table(rows, with_log=not args.no_log), any(r.active for r in rows)

    try:
        if args.json:
            import json

            rows = monitor.query(args.user, args.since)
            rows = [r for r in rows if r.name.startswith(args.name)] if args.name else rows
            print(json.dumps(monitor.as_json(rows), indent=1))
        elif args.watch:
            monitor.watch(render, args.interval, args.max_interval)
        else:
            print(render()[0])
    except monitor.SchedulerUnavailable as e:
        fail(str(e), 1)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
