#!/usr/bin/env python
"""Cancel jobs by id or by name (a name also cancels the run's later steps, e.g. NAME-merge).

  python launchers/cancel.py 48121          # one job or a whole array
  python launchers/cancel.py 48121_7        # one array task
  python launchers/cancel.py smoke_array    # every queued job named smoke_array or smoke_array-<step>
"""
from __future__ import annotations

import argparse
import sys

import _common  # noqa: F401
from _common import fail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="+", metavar="JOBID|NAME")
    p.add_argument("--user", default=None)
    args = p.parse_args(argv)
    from core import monitor

    try:
        ids = monitor.cancel(args.targets, args.user)
    except monitor.SlurmUnavailable as e:
        fail(str(e), 1)
    if not ids:
        fail(f"no queued job matches {' '.join(args.targets)}", 1)
    print(f"cancelled {' '.join(ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
