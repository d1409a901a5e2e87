"""The failure mark a task prints when it knows why it ends: one line, the last one wins, classes are words."""
from __future__ import annotations

import io

import pytest

from core.failure_mark import find, mark_line, report


def test_the_last_mark_of_a_log_is_its_class_and_cause():
    buf = io.StringIO()
    report("node", "n2: rendezvous 10.0.0.1:29500 unreachable\n(timed out after 30 s)", stream=buf)
    log = "step 10 loss 2.3\n" + "[medhpc] failure data: row 7 bad\n" + buf.getvalue() + "Traceback (most recent)\n"
    assert buf.getvalue() == "[medhpc] failure node: n2: rendezvous 10.0.0.1:29500 unreachable (timed out after 30 s)\n"
    assert find(log) == ("node", "n2: rendezvous 10.0.0.1:29500 unreachable (timed out after 30 s)")
    assert find("no marks here\n[medhpc] failure : x\n") is None
    with pytest.raises(ValueError, match="lower-case"):
        mark_line("Hang now", "x")
