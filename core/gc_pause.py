"""Pause Python's cyclic garbage collector around work that builds many objects but no reference cycles.

A status refresh over a long history builds tens of thousands of small objects (one per accounting line and task)
and keeps them while it groups and prints them; each time enough new objects pile up, the collector walks every
live one looking for cycles there are none of: a third of a refresh's own time on 9,000 accounting lines. Objects
are still freed by reference counting while the collector is paused; it is switched back on (if it was on) when
the work ends, so a cycle made meanwhile is collected afterwards.

A command's start-up is the same kind of work: importing pydantic, submitit and our modules and validating a spec
builds a few hundred thousand objects that live as long as the process, and the collector walks them again and
again while they are made. `start_up` pauses it for that stretch; `settle` then sets what was built aside for good
(gc.freeze: later collections skip it) and lets the collector run for what follows.
"""
from __future__ import annotations

import functools
import gc


def paused_collector(fn):
    """Decorator: run `fn` with the cyclic collector paused (nesting is fine: only the outermost call resumes it)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        was_on = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_on:
                gc.enable()
    return run


def start_up() -> None:
    """A command begins its start-up (imports, validation, planning): the collector is paused until settle()."""
    gc.disable()


def settle() -> None:
    """Start-up is over: what it built is kept out of every later collection (it lives as long as the process) and
    the collector runs again, for long work that follows in the same process (following a job, a local run)."""
    gc.freeze()
    gc.enable()
