"""The hang watchdog and the node health check (core/watchdog.py, core/health.py; docs/hangs.md): the figures and the
plan's promise without Slurm, a really stopped (SIGSTOP) process named by its live peer in two local processes, and
through the real local Slurm a 2-node training run with one rank stopped (class hang, stacks in the run folder) and a
node that fails its health check (class node, the node named)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import PY, REPO, final_state, log_tails, losses, submit_run

from core import failure_mark, monitor, retry, watchdog
from core.scheduler import by_name
from core.config import SpecError, load_cluster, load_spec
from core.plan import make_plan

TINY_LM = REPO / "jobs" / "tiny" / "pangu_lm.yaml"
SLURM = by_name("slurm")


# ---------------------------------------------------------------- figures and the plan (no Slurm)
def test_the_step_limit_is_k_times_the_p95_above_a_floor_and_the_first_step_has_its_own_allowance(tmp_path):
    lim = watchdog.Limits(factor=4, floor_s=2, first_step_s=50)
    assert watchdog.percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 100], 95) == 19
    wd = watchdog.Watchdog(tmp_path, "7", 0, 1, "here", lim)
    assert wd.limit() == 50                       # loading
    wd.ready()
    wd.progress_t -= 3.0
    wd.beat(1)                                    # the first step (compile) took 3 s
    assert wd.p95() == pytest.approx(3.0, abs=0.1) and wd.limit() == pytest.approx(12, abs=0.5)
    for step in range(2, 8):
        wd.progress_t -= 0.1
        wd.beat(step)
    assert wd.p95() == pytest.approx(0.1, abs=0.05)  # the first step is dropped once 5 others are known
    assert wd.limit() == 2                        # 4 x 0.1 s is under the floor
    with wd.phase("checkpoint"):
        assert wd.limit() == 50
    assert wd.limit() == 2
    assert lim.grace_s == 7.5   # 5 s + 5 polls of floor_s / 10 (at least 0.5 s)
    assert lim.collective_timeout_s() == 58 and lim.collective_timeout_s(2) == 10


def test_the_plan_shows_the_watchdog_and_the_health_check_and_refuses_bad_figures():
    spec, _ = load_spec(TINY_LM, ("resources.nodes=2", "hang.factor=5", "hang.floor_s=60", "hang.first_step_s=900"))
    text = make_plan(spec, load_cluster("local_slurm")).describe()
    assert "a step must end within max(5 x p95 step time, 60 s), the first (with loading) and checkpoint saves " \
           "within 900 s" in text
    assert "collective timeout 935 s at start, then the step limit + 35 s" in text
    assert "node health check on each of the 2 nodes before the rendezvous" in text
    one = make_plan(load_spec(TINY_LM)[0], load_cluster("local_slurm")).describe()
    assert "max(10 x p95 step time, 300 s)" in one and "node health check" not in one
    off = make_plan(load_spec(TINY_LM, ("hang.enabled=false",))[0], load_cluster("local_slurm")).describe()
    assert "hang watchdog: off" in off
    scan = make_plan(load_spec(REPO / "jobs" / "tiny" / "pangu_sensitivity.yaml")[0], load_cluster("local_slurm"),
                     keep_going=True).describe()
    assert "a layer must end within max(10 x p95 layer time, 300 s)" in scan
    smoke = make_plan(load_spec(REPO / "jobs" / "tiny" / "smoke.yaml", ("hang.floor_s=5",))[0],
                      load_cluster("local_slurm")).describe()
    assert "workload smoke runs no hang watchdog; the section is not used" in smoke
    with pytest.raises(SpecError, match=r"hang\.factor"):
        load_spec(TINY_LM, ("hang.factor=0",))


# ---------------------------------------------------------------- a real SIGSTOP, two local processes (no Slurm)
RANK_SCRIPT = textwrap.dedent("""
    import sys, threading, time
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from core import watchdog

    def fake_collective():        # what a rank waiting for a stopped peer does: block
        threading.Event().wait()

    rank = int(sys.argv[1])
    wd = watchdog.Watchdog(Path(sys.argv[2]), "77", rank, 2, f"host{{rank}}",
                           watchdog.Limits(factor=3, floor_s=3, first_step_s=60)).start()
    print("pid", rank, flush=True)
    wd.ready()
    for step in range(1, 1000):
        time.sleep(0.05)
        wd.beat(step)            # rank 1 stops itself here after step 5 (MEDHPC_FAULT)
        if step == 6:
            fake_collective()
""")


def test_a_stopped_process_is_named_by_its_live_peer_which_writes_its_stacks_and_ends_with_the_hang_mark(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO)))
    env = {**os.environ, "MEDHPC_FAULT": "stop@rank1:step5"}
    procs = [subprocess.Popen([PY, str(script), str(r), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out0, err0 = procs[0].communicate(timeout=120)
        assert procs[0].returncode == watchdog.EXIT_CODE, err0
        os.kill(procs[1].pid, 0)
        state = Path(f"/proc/{procs[1].pid}/stat").read_text().split(") ")[1][0]
        assert state == "T"   # rank 1 is still stopped: nothing in it ran since
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    klass, cause = failure_mark.find(err0)
    assert klass == "hang"
    assert "no step ended within max(3 x p95" in cause
    assert "rank 1 (host1" in cause and "stopped reporting" in cause and "its last step 5 ended" in cause
    assert "waiting: rank 0 (host0" in cause and "step 6 ended" in cause
    hang = tmp_path / "hang" / "77"
    assert json.loads((hang / "HANG").read_text())["by_rank"] == 0
    own = (hang / "rank0.txt").read_text()
    assert "fake_collective" in own and "hang-watchdog-rank0" in own   # every thread's stack, named
    silent = (hang / "rank1.txt").read_text()
    assert silent.startswith("rank 1 of 2 on host1") and "NO STACKS" in silent and "last step ended: 5" in silent


SOLO_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from core import watchdog

    def stuck_in_compute():
        while True:
            time.sleep(0.01)

    wd = watchdog.Watchdog(Path(sys.argv[1]), "78", 0, 1, "solo", watchdog.Limits(factor=3, floor_s=2, first_step_s=60),
                           restart=1, what="layer").start()
    wd.ready()
    for layer in range(1, 4):
        time.sleep(0.05)
        wd.beat(layer)
    stuck_in_compute()
""")


def test_a_single_task_stuck_in_its_own_work_is_ended_with_its_stacks_after_a_requeue_in_its_own_folder(tmp_path):
    script = tmp_path / "solo.py"
    script.write_text(SOLO_SCRIPT.format(repo=str(REPO)))
    res = subprocess.run([PY, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == watchdog.EXIT_CODE, res.stderr
    klass, cause = failure_mark.find(res.stderr)
    assert klass == "hang" and "no layer ended within max(3 x p95" in cause
    assert "stuck: rank 0 (solo, pid" in cause and "layer 3 ended" in cause and "stopped reporting" not in cause
    stacks = (tmp_path / "hang" / "78-r1" / "rank0.txt").read_text()   # the job's second run (restart 1)
    assert "stuck_in_compute" in stacks and "last layer ended: 3" in stacks


GIL_SCRIPT = textwrap.dedent("""
    import re, sys, time
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from core import watchdog

    wd = watchdog.Watchdog(Path(sys.argv[1]), "79", 0, 1, "solo", watchdog.Limits(factor=3, floor_s=1, first_step_s=60))
    wd.start()
    wd.ready()
    for step in range(1, 4):
        time.sleep(0.05)
        wd.beat(step)
    while not wd._armed:                              # until a poll has armed the backstop (however slow)
        time.sleep(0.05)
    re.match(r"(a+)+$", "a" * 64 + "b")               # holds the GIL: the watchdog thread cannot run any more
""")


def test_a_process_whose_watchdog_thread_cannot_run_still_ends_with_its_stacks_in_the_log(tmp_path):
    script = tmp_path / "gil.py"
    script.write_text(GIL_SCRIPT.format(repo=str(REPO)))
    res = subprocess.run([PY, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    # faulthandler's dump of the main thread, stuck in the regex
    assert "Timeout (" in res.stderr and re.search(r'in match\n.*gil\.py", line \d+ in <module>', res.stderr)
    assert failure_mark.find(res.stderr) is None and not (tmp_path / "hang").exists()


# ---------------------------------------------------------------- through the real local Slurm
def _mark(run_dir: Path) -> list[tuple[str, str, str]]:
    """(log file, class, cause) of every task log of the run that carries a failure mark."""
    out = []
    for p in sorted((run_dir / "submitit").glob("*_log.*")):
        found = failure_mark.find(p.read_text(errors="replace"))
        if found:
            out.append((p.name, *found))
    return out


def _lm(tiny_pangu, logs, name, *extra, profile="local_slurm", nodes=2):
    return (str(TINY_LM), "-c", str(profile), "--set", f"name={name}", "--set", f"model.path={tiny_pangu}",
            "--set", f"outputs.logs_dir={logs}", "--set", f"resources.nodes={nodes}", *extra)


def _profile(tmp_path: Path, **retry_policy) -> Path:
    """local_slurm with these retry classes changed (a test's own profile file)."""
    import yaml

    profile = yaml.safe_load((REPO / "cluster_configs" / "local_slurm.yaml").read_text())
    profile["retry"] = {**profile.get("retry", {}), **retry_policy}
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def test_a_rank_stopped_in_a_two_node_run_ends_the_job_as_a_hang_with_both_ranks_in_the_run_folder(
        slurm, tiny_pangu, tmp_path):
    # the profile says stop for a hang (local_slurm's requeue would run the same fault again): decided in the task
    run_dir, job = submit_run(*_lm(tiny_pangu, tmp_path, "hangs", "--set", "train.steps=400",
                                   "--set", "train.checkpoint_every=0", "--set", "hang.floor_s=20",
                                   "--set", "hang.first_step_s=900", profile=_profile(tmp_path, hang="stop")),
                              env={"MEDHPC_FAULT": "stop@rank1:step5"})
    assert final_state(job) == "FAILED", log_tails(run_dir)   # not TIMEOUT: the watchdog ended it
    marks = _mark(run_dir)
    assert marks and {k for _, k, _ in marks} == {"hang"}, log_tails(run_dir)
    cause = next(c for f, _, c in marks if f.startswith(f"{job}_0_"))
    assert "rank 1 (n2" in cause and "stopped reporting" in cause and "its last step 5 ended" in cause
    assert [(d["task"], d["job_id"], d["class"], d["action"], d["why"], d["by"]) for d in retry.decisions(run_dir)] \
        == [("main", job, "hang", "stop", "the profile's retry.hang is stop", "task")]   # rank 0 decided, once
    hang = run_dir / "hang" / job
    own = (hang / "rank0.txt").read_text()
    assert own.startswith("rank 0 of 2 on n1") and "in fit" in own and "_agree_preempt" in own
    stopped = (hang / "rank1.txt").read_text()
    assert stopped.startswith("rank 1 of 2 on n2") and "stopped reporting" in stopped
    # the node health check passed on both nodes before the model was loaded
    health = json.loads((run_dir / "health" / f"{job}.json").read_text())
    assert sorted(r["host"] for r in health["ranks"]) == ["n1", "n2"] and health["allreduce_ms"] > 0
    assert [r["rendezvous"] for r in health["ranks"] if r["host"] == "n2"][0].startswith("n1:")


def test_a_node_that_fails_its_health_check_is_named_and_ends_the_job_with_the_node_mark(slurm, tiny_pangu, tmp_path):
    """A 2-node job on this 2-node cluster: the policy's requeue off n2 would leave one node for two, so the failing
    node's own rank decides stop ("no node left") instead of a requeue that pends for ever."""
    run_dir, job = submit_run(*_lm(tiny_pangu, tmp_path, "sick", "--set", "train.steps=5"),
                              env={"MEDHPC_FAULT": "health@n2"})
    assert final_state(job) == "FAILED", log_tails(run_dir)
    marks = _mark(run_dir)
    assert [(k, c) for _, k, c in marks] == [("node", "n2: health check failed (injected by MEDHPC_FAULT=health@n2)")], \
        log_tails(run_dir)
    assert not (run_dir / "metrics.csv").exists()   # no step was trained
    [decided] = retry.decisions(run_dir)
    assert (decided["class"], decided["node"], decided["action"], decided["by"]) == ("node", "n2", "stop", "task")
    assert decided["why"] == "no node left to replace n2: the job needs 2 nodes and the partition has 1 usable " \
                             "(n1 besides it)", decided
    assert len(SLURM.accounting([job])[0].attempts) == 1   # not requeued


def test_a_one_node_job_whose_health_check_fails_requeues_itself_off_that_node_and_completes_on_the_other(
        slurm, tiny_pangu, tmp_path):
    """The in-task decision without any watcher: the failing rank records `requeue`, requeues its own job with its
    node excluded, and the second run lands on the other node and trains to the end."""
    run_dir, job = submit_run(*_lm(tiny_pangu, tmp_path, "sick1", "--set", "train.steps=5", nodes=1),
                              env={"MEDHPC_FAULT": "health@first-run"})
    assert final_state(job, timeout=600) == "COMPLETED", log_tails(run_dir)
    [decided] = retry.decisions(run_dir)
    bad = decided["node"]
    assert bad in ("n1", "n2") and (decided["class"], decided["action"], decided["by"], decided["job_id"]) == \
        ("node", "requeue", "task", job), decided
    assert decided["detail"] == f"requeued excluding {bad}", decided
    assert monitor.retries_text(str(run_dir)) == f"retries: main #1 node -> requeue (requeued excluding {bad})"
    row = SLURM.accounting([job])[0]
    assert len(row.attempts) == 2 and row.ends[job].nodes == ({"n1", "n2"} - {bad}).pop(), row
    assert [s for s, _ in losses(run_dir)] == [1, 2, 3, 4, 5]   # trained once, on the second run
