"""Failure classes and the retry policy (issue 23, items 1-2; docs/failures.md).

Unit tests read captured sacct lines and log tails (tests/data/failures/, its README says which are captured);
one Slurm test submits ONE smoke array whose tasks each fail a different way (MEDHPC_FAULT, core/fault_inject.py)
plus its merge, watched by `submit.py --wait`: every task gets its class, the policy decides, nothing loops."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from core import failures, monitor, retry
from core.config import SpecError, load_cluster
from core.failures import Failure
from core.scheduler import TaskEnd, by_name
from core.scheduler.slurm.queue import merge_rows

DATA = Path(__file__).parent / "data" / "failures"
SLURM = by_name("slurm")


def _acct_rows(run: Path) -> dict:
    text = "\n".join(ln for ln in (DATA / "sacct_ends.txt").read_text().splitlines() if not ln.startswith("#"))
    return {r.job_id: r for r in merge_rows("", text.replace("{run}", str(run)))}


def test_accounting_alone_names_time_limit_preemption_node_oom_cancel_and_dependency(tmp_path):
    rows = _acct_rows(tmp_path)
    got = {jid: failures.classify(r.ends[jid], [], SLURM) for jid, r in rows.items()}
    assert got["1523"].klass == "timeout" and "n[1-2]" in got["1523"].cause
    assert (got["2915"].klass, got["2915"].source) == ("dependency", "scheduler")
    assert got["46"].klass == "cancelled" and "uid 0" in got["46"].cause and "root" in got["46"].cause
    assert got["6028"] == Failure("node", "a node of n[1-2] failed (Slurm NODE_FAIL)", "scheduler", "n[1-2]")
    # srun's own line in the batch rank's log names the node that failed, even after another rank's attempt lines
    srun = (DATA / "node_fail.log").read_text().splitlines()
    rank1 = ["submitit INFO (2026-12-06 17:52:03,285) - Starting with JobEnvironment(job_id=6028, hostname=vm)"]
    assert failures.classify(rows["6028"].ends["6028"], srun + rank1, SLURM) == Failure(
        "node", "node n2 failed (Slurm NODE_FAIL on n[1-2]; srun: Node failure on n2)", "scheduler", "n2")
    # a person who cancels a job that waited for its dependency is a cancel, not a dependency
    waited = TaskEnd("CANCELLED by 1000", reason="Dependency", started=False)
    assert failures.classify(waited, [], SLURM).klass == "cancelled"
    assert failures.classify(TaskEnd("CANCELLED by 0", reason="DependencyNeverSatisfied", started=False), [],
                             SLURM).klass == "dependency"
    # the array it waited for failed within a second of its submission: slurmctld cancelled it before a scheduling
    # pass had set its pending reason (sacct: CANCELLED, Reason None, never started; seen in a full suite run)
    assert failures.classify(TaskEnd("CANCELLED", reason="None", started=False), [], SLURM).klass == "dependency"
    assert failures.classify(TaskEnd("CANCELLED by 0", reason="None", started=False), [], SLURM).klass == "cancelled"
    assert got["3002"].klass == "preempted"
    assert got["3003"].klass == "host_oom" and "OUT_OF_MEMORY" in got["3003"].cause
    # FAILED with nothing in a log: unknown, with the exit code; the requeued job's newest attempt counts
    assert got["2914"] == Failure("unknown", "FAILED, exit code 3, no error line in its log", "exit")
    assert rows["2917"].states["2917"] == "FAILED" and rows["2917"].ends["2917"].reason == "BeginTime"
    assert len(rows["2917"].attempts) == 2


def test_the_log_names_device_oom_comm_data_and_the_exception_with_where(tmp_path):
    failed = TaskEnd("FAILED", "1:0", "0:0", "None", "n1")
    gloo = failures.classify(failed, (DATA / "gloo_timeout.log").read_text().splitlines(), SLURM)
    assert gloo.klass == "comm" and "Timed out waiting 3000ms for recv" in gloo.cause
    nccl = failures.classify(failed, (DATA / "nccl_watchdog.log").read_text().splitlines(), SLURM)
    assert nccl.klass == "comm" and "WorkNCCL(SeqNum=812" in nccl.cause
    hccl = failures.classify(failed, (DATA / "hccl_socket.log").read_text().splitlines(), SLURM)
    assert hccl.klass == "comm" and "OPS function error: HcclAllreduce, error code is 6" in hccl.cause
    store = ["torch.distributed.DistStoreError: Timed out after 4 seconds waiting for clients. 1/2 clients joined."]
    assert failures.classify(failed, store, SLURM).klass == "comm"  # a rendezvous timeout (seen on this cluster)
    spent = ["core.engine.Preempted: SIGUSR2 received: checkpoint saved at step 300, not requeued (5 requeues used); "
             "resume with --resume"]
    assert failures.classify(failed, spent, SLURM).klass == "timeout"  # the in-task requeues ran out: resubmit
    oom = ["Traceback (most recent call last):", '  File "/x/core/engine.py", line 300, in step',
           "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)"]
    assert failures.classify(failed, oom, SLURM).klass == "device_oom"
    data = ["Traceback (most recent call last):", '  File "/x/core/data/ctrg.py", line 88, in read_labels',
            "core.errors.DatasetError: data.labels_csv: /d/labels.csv line 7: no label"]
    assert failures.classify(failed, data, SLURM) == Failure(
        "data", "core.errors.DatasetError: data.labels_csv: /d/labels.csv line 7: no label "
                "(at /x/core/data/ctrg.py:88 in read_labels)", "log")
    bug = ["Traceback (most recent call last):", '  File "/x/a.py", line 3, in f', "    g()",
           '  File "/x/b.py", line 9, in g', "    1 / 0", "ZeroDivisionError: division by zero",
           "srun: error: n1: task 0: Exited with exit code 1"]
    assert failures.classify(failed, bug, SLURM).cause == "ZeroDivisionError: division by zero (at /x/b.py:9 in g)"
    hostile = ["ValueError: bad token hf_" + "a" * 34 + " \x1b[2J\x07"]  # a log is untrusted text
    cause = failures.classify(failed, hostile, SLURM).cause
    assert "hf_aaaa" not in cause and "\x1b" not in cause and "\x07" not in cause and cause.startswith("ValueError")


def test_the_tasks_own_mark_wins_over_the_text_and_only_the_last_attempt_counts():
    failed = TaskEnd("FAILED", "1:0", "0:0", "None", "n[1-2]")
    log = ["submitit INFO (2026-12-05 10:00:00,000) - Starting with JobEnvironment(job_id=7)",
           "[medhpc] failure hang: an old attempt's hang",
           "submitit INFO (2026-12-05 11:00:00,000) - Starting with JobEnvironment(job_id=7)",
           "RuntimeError: [../third_party/gloo/transport/tcp/pair.cc:534] Connection closed by peer",
           "[rank1]:[medhpc] failure node: n2: rendezvous 10.0.0.1:29500 unreachable after 30 s",
           "RuntimeError: something after the mark"]
    got = failures.classify(failed, log, SLURM)
    assert got == Failure("node", "n2: rendezvous 10.0.0.1:29500 unreachable after 30 s", "mark", "n2")
    assert failures.classify(failed, log[:4], SLURM).klass == "comm"  # the old attempt's hang mark is history
    # what the scheduler ended from outside beats the mark: the task could not know its time limit
    assert failures.classify(TaskEnd("TIMEOUT", nodes="n1"), log, SLURM).klass == "timeout"
    # but a job cancelled after its mark (a watchdog stopping every rank with a cancel) is what the mark says
    assert failures.classify(TaskEnd("CANCELLED by 1000", nodes="n1"), log, SLURM).klass == "node"
    assert failures.classify(TaskEnd("CANCELLED by 0", nodes="n1"), log[:4], SLURM).klass == "cancelled"


def test_policy_never_retries_a_bug_bounds_retries_and_stops_a_loop(tmp_path):
    policy = retry.policy_of({"retry": {"max_retries": 2, "comm": "requeue", "host_oom": "stop"}})
    comm, node = Failure("comm", "gloo timeout", "log"), Failure("node", "n2: bad", "mark", "n2")
    assert retry.decide(policy, Failure("exception", "x", "log"), [], 5)[0] == "stop"
    assert retry.decide(policy, Failure("data", "x", "mark"), [], 5)[0] == "stop"
    assert retry.decide(policy, Failure("host_oom", "x", "scheduler"), [], 5) == \
        ("stop", "the profile's retry.host_oom is stop")
    assert retry.decide(policy, Failure("brand_new", "x", "mark"), [], 5)[0] == "stop"
    assert retry.decide(policy, comm, [], 100) == ("requeue", "the profile's retry.comm is requeue")
    first = {"class": "comm", "step": 100, "action": "requeue", "attempt": 1}
    action, why = retry.decide(policy, comm, [first], 100)
    assert action == "stop" and why.startswith("loop guard: comm again at step 100")
    assert retry.decide(policy, comm, [first], 200)[0] == "requeue"  # progress since: a retry may help
    two = [first, {"class": "node", "step": 200, "action": "requeue", "attempt": 2}]
    assert retry.decide(policy, node, two, 300) == ("stop", "retry bound reached: 2 of retry.max_retries=2")
    # decisions are recorded one file each and read back in order
    retry.record(tmp_path, "12_3", comm, "requeue", "x", 100, by="task")
    retry.record(tmp_path, "12_3", comm, "stop", "loop guard", 100, by="wait")
    got = retry.decisions(tmp_path, "12_3")
    assert [(d["attempt"], d["action"], d["step"], d["by"]) for d in got] == [(1, "requeue", 100, "task"),
                                                                              (2, "stop", 100, "wait")]
    assert sorted(p.name for p in (tmp_path / "retries").iterdir()) == ["12_3.001.json", "12_3.002.json"]


def test_a_profile_that_retries_a_bug_is_refused_naming_the_field(tmp_path):
    for klass in ("exception", "data"):
        bad = tmp_path / f"{klass}.yaml"
        bad.write_text(f"name: x\nexecutor: slurm\nretry:\n  {klass}: requeue\n")
        with pytest.raises(SpecError, match=rf"retry.{klass}: 'requeue': .* always 'stop'"):
            load_cluster(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: x\nexecutor: slurm\nretry:\n  node: reboot\n")
    with pytest.raises(SpecError, match="retry.node"):
        load_cluster(str(typo))
    for name in ("local", "local_slurm", "cuda_a100", "ascend_910b"):
        policy = load_cluster(name).retry
        assert policy.exception == policy.data == "stop" and policy.node == "requeue" and policy.max_retries >= 1


def test_one_array_fails_each_task_a_different_way_and_each_is_classified_and_decided_once(slurm, tmp_path):
    """9 tasks of one smoke array, each failing its own way (and one fine), plus the merge that can never run:
    `submit.py --wait` prints each task's class and the policy's action; status --json carries both; the
    requeue the policy asks for is refused by Slurm (smoke jobs are --no-requeue): recorded, no second run."""
    from conftest import cli, log_tails

    faults = {0: "exception", 1: "data", 2: "device_oom", 3: "comm", 4: "host_oom", 5: "node", 6: "hang",
              7: "cancel"}  # item 8 runs fine
    env = {"MEDHPC_FAULT": ";".join(f"{f}@item:{i}" for i, f in faults.items())}
    tag = f"failx{uuid.uuid4().hex[:8]}"
    res = cli("submit", "jobs/tiny/smoke_array.yaml", "-c", "local_slurm", "--wait", "--no-preflight",
              "--set", f"name={tag}", "--set", f"outputs.logs_dir={tmp_path}", "--set", "resources.array.items=9",
              "--set", "resources.array.parallelism=9",
              env=env, timeout=400)
    out = res.stdout
    assert res.returncode != 0, out + res.stderr
    run_dir = Path(next(ln for ln in out.splitlines() if ln.startswith("run folder: ")).split(": ", 1)[1])

    lines = [ln for ln in out.splitlines() if ": task " in ln]
    got = {ln.split(": task ", 1)[1].split()[0]: ln.split(": ", 2)[2] for ln in lines}
    arr = next(t for t in got if "_" in t).split("_")[0]
    want = {0: "exception", 1: "data", 2: "device_oom", 3: "comm", 4: "host_oom", 5: "node", 6: "hang", 7: "cancelled"}
    for i, klass in want.items():
        assert got.get(f"{arr}_{i}", "").startswith(f"{klass}: "), (i, out, log_tails(run_dir))
    assert f"{arr}_8" not in got
    merge = [t for t in got if "_" not in t]
    assert len(merge) == 1 and got[merge[0]].startswith("dependency: "), out
    assert "ValueError: [fault] injected exception at item 0 (at core/fault_inject.py:" in got[f"{arr}_0"]
    assert got[f"{arr}_5"].startswith("node: n") and "injected health-check failure" in got[f"{arr}_5"]
    decided = {d["job_id"]: d for d in retry.decisions(run_dir)}
    assert len(retry.decisions(run_dir)) == 9  # one decision per failed task: nothing decided twice
    assert {d["task"] for d in decided.values()} == {f"main[{i}]" for i in range(8)} | {"merge"}
    for i in (0, 1, 2, 4, 7):
        assert decided[f"{arr}_{i}"]["action"] == "stop", decided[f"{arr}_{i}"]
    for i in (3, 5, 6):  # the policy says requeue; Slurm refuses a --no-requeue job: recorded as a stop
        d = decided[f"{arr}_{i}"]
        assert d["action"] == "stop" and d["why"].startswith("the scheduler refused the requeue"), d
    assert decided[f"{arr}_3"]["by"] == "task" and decided[f"{arr}_5"]["by"] == "wait"  # comm: decided in-task
    assert "decided in the task: the scheduler refused" in out
    assert decided[f"{arr}_5"]["node"] and decided[merge[0]]["class"] == "dependency"
    assert [p.name for p in (run_dir / "tasks").glob("main*.json")] == ["main-000008.rank0.json"]  # item 8 only
    data = json.loads(cli("status", "--name", tag, "--json").stdout)
    run = next(r for r in data if r.get("run_dir") == str(run_dir))
    job = next(j for j in run["jobs"] if j["job_id"] == arr)
    assert {t: f["class"] for t, f in job["failures"].items()} == {f"{arr}_{i}": k for i, k in want.items()}
    assert run["failure"]["class"] == "exception" and len(run["retries"]) == 9
    text = cli("status", "--name", tag, "--all").stdout
    assert f"{arr}_1 FAILED: data: DatasetError: data.path: [fault]" in text and "retries: " in text
    assert monitor.retries_text(str(run_dir)).count("->") == 4  # the folded line names the newest four
    # no retry went through (all refused or stopped), so the cancelled merge is not brought back
    assert "step merge: brought back" not in out and not (run_dir / "merged.json").exists()


def test_a_node_failure_is_requeued_once_off_that_node_then_the_loop_guard_stops(slurm, tmp_path):
    """The policy's requeue through the real scheduler: a failed `--requeue` job goes back to the queue with the
    node it failed on excluded and runs again on the other one; the same class at the same step then stops (no
    third run)."""
    import subprocess
    import time

    from conftest import wait_terminal

    jid = subprocess.run(["sbatch", "--parsable", "--requeue", "-p", "debug", "-t", "1", "-o", str(tmp_path / "o"),
                          "-J", f"failrq{uuid.uuid4().hex[:6]}", "--wrap", "exit 3"],
                         capture_output=True, text=True, check=True).stdout.strip()
    wait_terminal([jid])
    bad = SLURM.accounting([jid])[0].ends[jid].nodes
    assert bad in ("n1", "n2")
    policy = retry.policy_of({"retry": {"node": "requeue", "max_retries": 3}})
    node = Failure("node", f"{bad}: all-reduce of 4 bytes took 31 s", "mark", bad)
    first = retry.apply(SLURM, tmp_path, "main", jid, node, policy, by="wait", step=40)
    assert (first["action"], first["detail"], first["attempt"]) == ("requeue", f"requeued excluding {bad}", 1), first
    shown = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True).stdout
    assert f"ExcNodeList={bad}" in shown and "Restarts=1" in shown
    t0 = time.time()
    while True:
        row = SLURM.accounting([jid])[0]
        if len(row.attempts) >= 2 and row.states[jid].split()[0] in ("FAILED", "COMPLETED"):
            break
        assert time.time() - t0 < 600, row   # a guard against a stuck test, not a speed target (Slurm delays a requeued start)
        time.sleep(1)
    assert row.ends[jid].nodes == ({"n1", "n2"} - {bad}).pop()  # the retry ran off the failed node
    second = retry.apply(SLURM, tmp_path, "main", jid, node, policy, by="wait", step=40)
    assert second["action"] == "stop" and second["why"].startswith("loop guard: node again at step 40"), second
    assert len(SLURM.accounting([jid])[0].attempts) == 2  # no third run
    # the other node failing too would leave none: the job already excludes the first (Slurm's ExcNodeList)
    other = ({"n1", "n2"} - {bad}).pop()
    assert retry.no_room(SLURM, jid, other) == f"no node left to replace {other}: the job needs 1 node and the " \
                                               f"partition has 0 usable (none besides it)"
    assert retry.no_room(SLURM, jid, "") == ""


def _sinfo_state(node: str) -> str:
    import subprocess

    return subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%t"], capture_output=True, text=True,
                          timeout=30).stdout.split("\n")[0].strip()


def _slurmd_pid(node: str) -> int:
    """The pid of `node`'s slurmd from the local cluster's own pid file (SlurmdPidFile, %n = the node), checked to
    be that node's slurmd (`slurmd -f ... -N node`) before anything is sent to it."""
    import re
    import subprocess

    conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    pid_file = Path(re.search(r"^SlurmdPidFile\s*=\s*(\S+)", conf, re.M).group(1).replace("%n", node))
    pid = int(pid_file.read_text().strip())
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    assert Path(argv[0].decode()).name == "slurmd" and argv[-2:] == [b"-N", node.encode()], (pid_file, argv)
    return pid


@pytest.fixture
def n2_restored(slurm, tmp_path):
    """For the test that takes n2 down: whatever happens in it, n2 comes back. The finalizer ends the test job's
    leftover process (its release file), restarts n2's slurmd the way slurm/local_cluster.sh starts it (`up` starts
    the daemons whose pid file names no live process and leaves the others), resumes n2 if Slurm still holds it
    down, and waits until sinfo shows it idle (or in use), so no later test sees a DOWN node."""
    import subprocess
    import time

    from conftest import LOCAL_CLUSTER

    release = tmp_path / "release"
    yield release
    release.touch()
    up = subprocess.run(["bash", str(LOCAL_CLUSTER), "up"], capture_output=True, text=True, timeout=300)
    t0 = time.time()
    while True:
        state = _sinfo_state("n2")
        if state in ("idle", "mix", "alloc"):
            break
        if state.startswith(("down", "drain", "drng", "fail")):
            subprocess.run(["scontrol", "update", "NodeName=n2", "State=RESUME"], capture_output=True, timeout=30)
        assert time.time() - t0 < 120, f"n2 is still {state!r} after restoring it; local_cluster.sh up said: " \
                                       f"{up.returncode} {up.stderr[-1500:]}"
        time.sleep(1)


def test_a_slurmd_killed_during_a_two_node_run_is_a_node_failure_and_no_node_is_left_to_replace_it(
        slurm, n2_restored, tmp_path):
    """A REAL node failure from this Slurm: a 2-node job runs, n2's slurmd is killed (SIGKILL, its own pid file)
    and n2 is set DOWN, which is what slurmctld does itself once SlurmdTimeout (300 s) passes without an answer; the
    job ends NODE_FAIL in sacct. The classifier says class node from accounting, the retry policy keeps the
    requeue off n2 (the node Slurm holds down, not the whole allocation) and, as the partition has only n1 left for
    a 2-node job, stops with 'no node left' instead of queueing a job that can never start."""
    import os
    import signal
    import subprocess
    import time

    from conftest import cli, log_tails, submit_run

    tag = f"failnf{uuid.uuid4().hex[:6]}"
    run_dir, jid = submit_run("jobs/tiny/smoke.yaml", "-c", "local_slurm", "--no-preflight", "--set", f"name={tag}",
                              "--set", f"outputs.logs_dir={tmp_path / 'logs'}", "--set", "resources.nodes=2",
                              "--set", "smoke.sleep_s=300", "--set", f"smoke.release_file={n2_restored}")
    t0 = time.time()
    while subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], capture_output=True, text=True).stdout.strip() \
            != "RUNNING":
        assert time.time() - t0 < 900, "the 2-node job did not start"  # a guard against a stuck queue, not a target
        time.sleep(1)
    # mid-run: both ranks' processes started (submitit's first log line on each node). A slurmd killed while the
    # job is still launching gives a NODE_FAIL whose first accounted NodeList is the survivor alone (seen: 'n1')
    while sum("Starting with JobEnvironment" in p.read_text(errors="replace")
              for p in run_dir.rglob("*_log.out")) < 2:
        assert time.time() - t0 < 900, log_tails(run_dir)
        time.sleep(0.5)
    os.kill(_slurmd_pid("n2"), signal.SIGKILL)
    subprocess.run(["scontrol", "update", "NodeName=n2", "State=DOWN", "Reason=medhpc-test"], check=True,
                   capture_output=True, timeout=30)
    from conftest import wait_terminal

    assert wait_terminal([jid], timeout=120)[jid] == "NODE_FAIL"
    # read accounting once the job has left the queue (no longer COMPLETING), as --wait does: while the survivors
    # end, sacct may list only them (NodeList n1 was seen here), the final record lists the whole allocation
    t0 = time.time()
    while subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], capture_output=True, text=True).stdout.strip():
        assert time.time() - t0 < 120, "the NODE_FAIL job did not leave the queue"
        time.sleep(0.5)
    row = SLURM.accounting([jid])[0]
    end = row.ends[jid]
    assert (end.state, end.nodes) == ("NODE_FAIL", "n[1-2]"), end
    failure = monitor.task_failure(row, jid)   # srun's own 'error: Node failure on n2' in the job's log names it
    assert failure == Failure("node", "node n2 failed (Slurm NODE_FAIL on n[1-2]; srun: Node failure on n2)",
                              "scheduler", "n2"), log_tails(run_dir)
    decision = retry.apply(SLURM, run_dir, "main", jid, failure, retry.policy_of(load_cluster("local_slurm")),
                           by="wait")
    assert (decision["class"], decision["node"], decision["action"]) == ("node", "n2", "stop"), decision
    assert decision["why"] == "no node left to replace n2: the job needs 2 nodes and the partition has 1 usable " \
                              "(n1 besides it)"
    data = json.loads(cli("status", "--name", tag, "--json").stdout)
    run = next(r for r in data if r.get("run_dir") == str(run_dir))
    assert (run["failure"]["class"], run["failure"]["source"]) == ("node", "scheduler")
    assert [(d["class"], d["node"], d["action"]) for d in run["retries"]] == [("node", "n2", "stop")]


def test_a_task_that_knows_why_it_fails_marks_decides_and_records_in_its_run_folder(tmp_path, capsys, monkeypatch):
    """retry.in_task, what the hang watchdog and the node health check call: the mark in the log, the policy's
    decision in the run folder (rank 0 only), and a scheduler that cannot requeue (local) recorded as a stop."""
    from core.runtime import TaskContext
    from core.scheduler import DistEnv

    monkeypatch.setattr(retry, "_DECIDED", {})  # this process's "decided in the task" flag, fresh for the test
    ctx = TaskContext(run_dir=tmp_path, step="main", job_id="4242", root_id="4242", executor="local",
                      cluster={"executor": "local", "retry": {"hang": "requeue"}})
    got = retry.in_task(ctx, "hang", "no step ended within 300 s\n(p95 step 1.2 s)", step=120)
    assert capsys.readouterr().err == "[medhpc] failure hang: no step ended within 300 s (p95 step 1.2 s)\n"
    assert got["action"] == "stop" and got["why"].startswith("the scheduler refused the requeue: the local scheduler")
    assert [(d["task"], d["job_id"], d["class"], d["step"], d["by"]) for d in retry.decisions(tmp_path)] == \
        [("main", "4242", "hang", 120, "task")]
    other = TaskContext(run_dir=tmp_path, step="main", job_id="4242", root_id="4242", executor="local",
                        cluster={"executor": "local"}, dist=DistEnv(1, 2, 1, 2, 0, 1, "h", 1, "4242"))
    assert retry.in_task(other, "hang", "x", step=120)["recorded"] is False
    assert len(retry.decisions(tmp_path)) == 1  # rank 1 printed its mark, decided nothing on disk
    # the collective the watchdog timed out then raises a gloo error into the task's entry: not decided again
    slurm_ctx = TaskContext(run_dir=tmp_path, step="main", job_id="4242", root_id="4242", executor="slurm",
                            cluster={"executor": "slurm"})
    gloo = RuntimeError("[../third_party/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    assert retry.caught(slurm_ctx, gloo) is None and len(retry.decisions(tmp_path)) == 1


def test_wait_brings_the_merge_back_only_when_the_arrays_retried_tasks_all_completed(tmp_path):
    """What `submit.py --wait` reads (core.submission.merge_pending_back) before it submits the merge Slurm cancelled
    again: accounting lines in the project's sacct format (task 1 of the array requeued once, then completed; the
    merge cancelled for its afterok while the task had failed)."""
    from core.submission import merge_pending_back

    head = "|t-main|{state}|{code}|00:00:05|1|{node}|5|billing=1,cpu=1,node=1|2026-12-06T14:00:0{s}|" \
           "2026-12-06T14:00:1{s}|None|0:0|run={{run}}"
    merge = "5001|t-merge|CANCELLED|0:0|00:00:00|1|None assigned|0||None|2026-12-06T14:00:12|Dependency|0:0|run={run}"

    def rows(*lines):
        text = "\n".join(lines).replace("{run}", str(tmp_path))
        return list(merge_rows("", text))

    ok = ("5000_0" + head.format(state="COMPLETED", code="0:0", node="n1", s=0),
          "5000_1" + head.format(state="REQUEUED", code="0:0", node="n2", s=1),
          "5000_1" + head.format(state="COMPLETED", code="0:0", node="n1", s=5))
    steps = {"main": ["5000"], "merge": ["5001"]}
    assert merge_pending_back(steps, rows(*ok, merge), 2, retried=True) == "5001"
    assert merge_pending_back(steps, rows(*ok, merge), 2, retried=False) is None   # nothing retried: afterok said it
    assert merge_pending_back(steps, rows(*ok, merge), 3, retried=True) is None    # a task not accounted yet
    failed = ok[:2] + ("5000_1" + head.format(state="FAILED", code="1:0", node="n1", s=5),)
    assert merge_pending_back(steps, rows(*failed, merge), 2, retried=True) is None  # its retry failed too
    ran = "5001" + head.format(state="FAILED", code="1:0", node="n1", s=6).replace("t-main", "t-merge")
    assert merge_pending_back(steps, rows(*ok, ran), 2, retried=True) is None   # the merge's own failure: policy's
    assert merge_pending_back({"main": ["5000"]}, rows(*ok), 2, retried=True) is None   # no merge step


def test_the_merge_brought_back_runs_alone_in_the_same_run_folder_and_writes_the_merged_result(tmp_path):
    """What `--wait` submits once the array's retried tasks completed (core.submission.submit_again, the --resume /
    --resume-missing path with only the merge step): on the local executor (real processes), a run's merged.json
    removed, the merge alone is submitted again in the same folder, reads the tasks' records and writes it again;
    run.json keeps both submissions."""
    from conftest import run_folder, submit

    from core.submission import Request, plan_job, submit_again

    sets = ("resources.array.items=2", f"outputs.logs_dir={tmp_path}")
    run_dir = run_folder(submit("jobs/tiny/smoke_array.yaml", "-c", "local",
                                *[a for s in sets for a in ("--set", s)]).stdout)
    (run_dir / "merged.json").unlink()
    ok, again = submit_again(plan_job(Request("jobs/tiny/smoke_array.yaml", "local", sets)), run_dir, only="merge")
    assert ok, again
    assert again.run_dir == run_dir and [s["name"] for s in again.record["steps"]] == ["merge"]
    assert [j.results()[0]["items"] for j in again.jobs["merge"]] == [2]
    assert json.loads((run_dir / "merged.json").read_text())["items"] == 2
    assert [[s["name"] for s in sub["steps"]] for sub in json.loads((run_dir / "run.json").read_text())["submissions"]] \
        == [["main", "merge"], ["merge"]]


def test_wait_resubmits_a_failed_job_in_its_run_folder_once_then_the_loop_guard_stops(slurm, tmp_path):
    """The policy's resubmit through `submit.py --wait`: a plain job that ends with a hang mark is submitted again
    with --resume in the same run folder; its second hang at the same point (no checkpoint) stops: two jobs, not
    more, and both decisions count for the same unit ('main') although the job ids differ."""
    import yaml

    from conftest import cli

    profile = yaml.safe_load((Path(__file__).parent.parent / "cluster_configs" / "local_slurm.yaml").read_text())
    profile["retry"] = {"max_retries": 3, "hang": "resubmit"}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(profile))
    tag = f"failrs{uuid.uuid4().hex[:6]}"
    res = cli("submit", "jobs/tiny/smoke.yaml", "-c", str(tmp_path / "p.yaml"), "--wait", "--no-preflight",
              "--set", f"name={tag}", "--set", f"outputs.logs_dir={tmp_path / 'logs'}",
              env={"MEDHPC_FAULT": "hang@step:main"}, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    run_dir = Path(next(ln for ln in res.stdout.splitlines() if ln.startswith("run folder: ")).split(": ", 1)[1])
    got = [(d["task"], d["class"], d["action"]) for d in retry.decisions(run_dir)]
    assert got == [("main", "hang", "resubmit"), ("main", "hang", "stop")], res.stdout
    first, second = retry.decisions(run_dir)
    assert second["why"].startswith("loop guard: hang again") and second["job_id"] != first["job_id"]
    jobs = [s["steps"][0]["job_ids"] for s in json.loads((run_dir / "run.json").read_text())["submissions"]]
    assert len(jobs) == 2 and jobs[1] == [second["job_id"]]  # resubmitted once, in the same run folder
    assert res.stdout.count(": hang: [fault] injected at step main") == 2
