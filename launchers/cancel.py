#!/usr/bin/env python
"""Cancel jobs by id or by run name (a name also cancels the run's later steps, e.g. NAME-merge).

  python launchers/cancel.py 48121          # one job or a whole array
  python launchers/cancel.py 48121_7        # one array task
  python launchers/cancel.py smoke_array    # every queued step of the run(s) named smoke_array
  python launchers/cancel.py 48121 --any-user   # a job of another user (refused without it)

A name matches exactly: the run's own jobs are NAME (main step) and NAME-<step>, checked against the run folder
in the job comment (run=<folder>, its run.json), so `cancel.py smoke` leaves run `smoke-test` alone. By name only
your own jobs (--user) are searched. Exits 1 when anything was refused or not found (the rest is still cancelled).
"""
from __future__ import annotations

import argparse
import sys

import _common  # noqa: F401
from _common import fail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="+", metavar="JOBID|NAME")
    p.add_argument("--user", default=None, help="whose jobs these are (default: you); names search only theirs")
    p.add_argument("--any-user", action="store_true", help="also cancel ids whose job belongs to another user")
    args = p.parse_args(argv)
    from core.cancel import cancel
    from core.scheduler import SchedulerUnavailable

    try:
        res = cancel(args.targets, args.user, any_user=args.any_user)
    except SchedulerUnavailable as e:
        fail(str(e), 1)
    except Exception as e:  # one line, never a traceback
        fail(f"cancel failed: {type(e).__name__}: {str(e)[:300]} (check with python launchers/status.py)", 1)
    except KeyboardInterrupt:
        return 130
    for problem in res.problems:
        print(f"error: {problem}", file=sys.stderr)
    if res.cancelled:
        print(f"cancelled {' '.join(res.cancelled)}")
    return 1 if res.problems or not res.cancelled else 0


if __name__ == "__main__":
    sys.exit(main())
