#!/usr/bin/env python
"""This user's jobs as a person reads them: one squeue + one sacct call per refresh.

Active runs and studies first (newest first, why pending jobs wait and when they are expected to start), then the
finished ones of the window folded to one line each (state, device-hours, the failed task's own error line).

  python launchers/status.py                 # once: active in full, finished in the last 2 days one line each
  python launchers/status.py --since 7d      # the window: 30m, 12h, 2d, 1w or a date (2026-12-01)
  python launchers/status.py --all           # every job of every run of the window, nothing folded
  python launchers/status.py --watch         # refresh with back-off (2 s doubling to 60 s) until all finish
  python launchers/status.py --name smoke    # only jobs whose name starts with smoke
  python launchers/status.py --json          # every field (reasons, errors, attempts, device-hours), for scripts
"""
from __future__ import annotations

import argparse
import sys

import _common  # noqa: F401
from _common import fail
from core.gc_pause import start_up


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--watch", "-w", action="store_true", help="refresh until no job is pending or running")
    p.add_argument("--interval", type=float, default=2.0, help="first refresh interval in seconds (doubles while idle)")
    p.add_argument("--max-interval", type=float, default=60.0)
    p.add_argument("--since", default=None, help="the window: jobs that ran since 30m, 12h, 2d (default), 1w ago, "
                                                 "or a date like 2026-12-01")
    p.add_argument("--all", action="store_true", help="every job of every run in the window, nothing folded")
    p.add_argument("--max-finished", type=int, default=20, help="finished runs and studies listed (default 20)")
    p.add_argument("--user", default=None)
    p.add_argument("--name", default=None, help="only jobs whose name starts with this")
    p.add_argument("--no-log", action="store_true", help="leave out the last log line")
    p.add_argument("--json", action="store_true", help="print the runs and their jobs as JSON (for scripts)")
    args = p.parse_args(argv)
    if not args.watch:
        # one refresh, then exit: the rows of a long window (tens of thousands of objects, none in a cycle) are freed
        # by their counts; the cyclic collector would only walk them (core.gc_pause)
        start_up()
    from core import monitor

    label = args.since or monitor.DEFAULT_SINCE
    try:
        since = monitor.since_arg(label)
    except ValueError as e:
        fail(str(e))
    refresher = monitor.Refresher(args.user, since)

    def render():
        rows = refresher.query() if args.watch else monitor.query(args.user, since)
        if args.name:
            rows = [r for r in rows if r.name.startswith(args.name)]
        if args.all:
            text = monitor.format_table(rows, with_log=not args.no_log)
        else:
            text = monitor.format_view(rows, with_log=not args.no_log, since=label, max_finished=args.max_finished)
        return text, any(r.active for r in rows)

    try:
        if args.json:
            import json

            rows = monitor.query(args.user, since)
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
    except BrokenPipeError:  # status.py | head
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
