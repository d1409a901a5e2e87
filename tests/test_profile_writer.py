"""launchers/cluster_profile.py: a cluster profile written from the cluster itself (the real local Slurm), a comment on
every value saying where it came from; it validates and plans every tiny spec exactly as the shipped local_slurm
profile does."""
from __future__ import annotations



from conftest import REPO, cli


def _plan_lines(spec_file: str, cluster) -> list[str]:
    from core.config import load_spec
    from core.plan import make_plan

    spec, _ = load_spec(spec_file)
    plan = make_plan(spec, cluster, keep_going=True, limits={"MaxArraySize": 11})
    return plan.describe().splitlines()[1:] + [
        repr((s.name, s.nodes, s.tasks_per_node, s.cpus_per_task, s.mem_gb, s.minutes, s.chunks, s.after))
        for s in plan.steps] + [f"{f}: {m}" for f, m in plan.problems]


def test_the_profile_written_from_the_local_cluster_plans_like_the_shipped_one(slurm, tmp_path):
    from core.config import load_cluster
    from core.study import is_study

    out = tmp_path / "written.yaml"
    res = cli("cluster_profile", "--name", "written", "-o", str(out))
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    values = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
              and not ln.rstrip().endswith(":")]
    assert values and all("  # " in ln for ln in values)  # a comment on every value: where it came from
    assert "MaxArraySize (scontrol show config)" in text and f'source \\"{REPO}/.venv/bin/activate\\"' in text
    written, shipped = load_cluster(str(out)), load_cluster("local_slurm")
    for key in ("executor", "accelerator", "devices_per_node", "cpus_per_task", "mem_gb_per_node", "max_array_size",
                "max_nodes", "loopback_rendezvous"):
        assert getattr(written, key) == getattr(shipped, key), key
    assert written.slurm.cluster_name == shipped.slurm.cluster_name and written.slurm.partition == "debug"
    specs = [str(p.relative_to(REPO)) for p in sorted((REPO / "jobs" / "tiny").glob("*.yaml")) if not is_study(p)]
    assert len(specs) >= 8
    for spec in specs:
        assert _plan_lines(spec, written) == _plan_lines(spec, shipped), spec
    again = cli("cluster_profile", "--name", "written", "-o", str(out))
    assert again.returncode == 2 and "exists" in again.stderr and "--force" in again.stderr


def test_profile_refuses_an_unknown_partition(slurm):
    res = cli("cluster_profile", "--partition", "nosuch", "-o", "-")
    assert res.returncode == 2 and "no such partition" in res.stderr and "debug" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_gpu_partition_gives_a_cuda_profile_with_its_devices(tmp_path):
    """What scontrol / sacctmgr print for a GPU partition (recorded lines, no such cluster here) -> a cuda profile:
    devices from the nodes' Gres, CPUs per device, the user's default account among several; it validates."""
    from core.config import load_cluster
    from core.config.cluster import RetryPolicy
    from core.scheduler.slurm.profile_writer import _records, profile_entries, render_yaml

    facts = {
        "config": {"ClusterName": "lab", "MaxArraySize": "1001", "MaxJobCount": "10000"},
        "partition": _records("PartitionName=gpu Default=NO MaxNodes=16 MaxTime=2-00:00:00 TotalNodes=32")[0],
        "nodes": _records("NodeName=g1 CPUTot=64 RealMemory=1024000 Gres=gpu:a100:8(S:0-1) NodeAddr=10.0.0.1\n"
                          "NodeName=g2 CPUTot=64 RealMemory=1024000 Gres=gpu:a100:8(S:0-1) NodeAddr=10.0.0.2"),
        "user": "me", "accounts": {"medai": {"normal", "long"}, "other": {"normal"}}, "default_account": "medai",
        "qos_limits": {"normal": 500}, "partitions": ["cpu", "gpu"], "chosen_by_user": True}
    entries = {k: v for k, v, _ in profile_entries(facts, "lab", tmp_path)}
    assert entries["accelerator"] == "cuda" and entries["devices_per_node"] == 8 and entries["cpus_per_task"] == 8
    assert entries["slurm.gres"] == "gpu:{devices}" and entries["slurm.account"] == "medai"
    assert entries["max_nodes"] == 16 and entries["max_array_size"] == 1001 and entries["max_jobs_per_user"] == 500
    assert entries["mem_gb_per_node"] == 900 and entries["device_mem_gb"] is None
    assert "loopback_rendezvous" not in entries and entries["setup"] is None  # no .venv in tmp_path
    out = tmp_path / "lab.yaml"
    out.write_text(render_yaml(profile_entries(facts, "lab", tmp_path), "test"))
    lab = load_cluster(str(out))
    assert lab.slurm.partition == "gpu" and lab.slurm.gres == "gpu:{devices}" and lab.accelerator == "cuda"
    assert "# device_mem_gb:  # Slurm does not know a device's memory" in out.read_text()
    # the retry policy is spelled out with a comment per class, and reads back as the defaults
    text = out.read_text()
    assert '\nretry:\n  max_retries: 2  # the project\'s default: retries per job or array task' in text
    assert '  node: "requeue"  # the project\'s default: node failure or failed health check' in text
    assert '  exception: "stop"  # the project\'s default: a Python exception in the workload: always stop' in text
    assert lab.retry.model_dump() == RetryPolicy().model_dump() and lab.retry.node == "requeue"
    for klass in RetryPolicy.model_fields:
        assert f"\n  {klass}: " in text, klass
