"""launchers/profile.py: a cluster profile written from the cluster itself (the real local Slurm), a comment on
every value saying where it came from; it validates and plans every tiny spec exactly as the shipped local_slurm
profile does."""
from __future__ import annotations

from pathlib import Path

import pytest

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
    res = cli("profile", "--name", "written", "-o", str(out))
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
    again = cli("profile", "--name", "written", "-o", str(out))
    assert again.returncode == 2 and "exists" in again.stderr and "--force" in again.stderr


def test_profile_refuses_an_unknown_partition(slurm):
    res = cli("profile", "--partition", "nosuch", "-o", "-")
    assert res.returncode == 2 and "no such partition" in res.stderr and "debug" in res.stderr
    assert "Traceback" not in res.stderr
