"""Inside the task: Slurm variables -> ranks and master, accelerator decisions (cuda / npu / cpu), clear errors."""
from __future__ import annotations

import pytest

from core.scheduler.slurm.env import dist_env_from_slurm, tasks_per_node as _tasks_per_node
from core.runtime import (DistEnvError, activate, master_port_for,
                          resolve_accelerator)
from core.config import SpecError, load_cluster

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
         "SLURM_NODEID": "2", "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu[07-09],gpu12",
         "SLURM_TASKS_PER_NODE": "2(x4)"}


def test_ranks_and_master_from_slurm_variables():
    d = dist_env_from_slurm(SLURM)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank, d.num_nodes) == (5, 8, 1, 2, 2, 4)
    assert d.master_addr == "gpu07" and d.master_port == master_port_for("4242") == 24242
    env = {}
    d.export(env)
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and env["MASTER_ADDR"] == "gpu07"


def test_master_port_is_deterministic_and_differs_between_neighbouring_jobs():
    ports = {master_port_for(str(j)) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(20000 <= p < 60000 for p in ports)
    assert master_port_for("77") == master_port_for("77")


@pytest.mark.parametrize("change,var", [
    ({"SLURM_PROCID": None}, "SLURM_PROCID"),
    ({"SLURM_PROCID": "8"}, "SLURM_PROCID"),
    ({"SLURM_NTASKS": "x"}, "SLURM_NTASKS"),
    ({"SLURM_NODEID": "4"}, "SLURM_NODEID"),
    ({"SLURM_JOB_NODELIST": "gpu[07-08]"}, "SLURM_JOB_NODELIST"),
    ({"SLURM_TASKS_PER_NODE": "3(x4)"}, "SLURM_TASKS_PER_NODE"),
    ({"SLURM_LOCALID": "2"}, "SLURM_LOCALID"),
    ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST"),
])
def test_inconsistent_slurm_variables_fail_fast_naming_the_variable(change, var):
    env = {**SLURM, **change}
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(DistEnvError, match=var):
        dist_env_from_slurm(env)


def test_tasks_per_node_format():
    assert _tasks_per_node("2(x3),1") == [2, 2, 2, 1] and _tasks_per_node("4") == [4]


def test_npu_decisions_devices_hccl_ports_and_backend():
    d = dist_env_from_slurm(SLURM)
    cluster = load_cluster("ascend_910b").model_dump()
    acc = resolve_accelerator("npu", d, cluster, environ={})
    assert acc.backend == "hccl" and acc.device == "npu:1"
    assert acc.env["ASCEND_RT_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert acc.env["HCCL_CONNECT_TIMEOUT"] == "1200" and acc.env["HCCL_EXEC_TIMEOUT"] == "1800"
    # Slurm's GPU-style binding is honoured; two jobs on one node get different HCCL port windows
    bound = resolve_accelerator("npu", d, cluster, environ={"SLURM_STEP_GPUS": "4,5"})
    assert bound.env["ASCEND_RT_VISIBLE_DEVICES"] == "4,5" and bound.device == "npu:1"
    other = resolve_accelerator("npu", dist_env_from_slurm({**SLURM, "SLURM_JOB_ID": "4243"}), cluster, environ={})
    a, b = int(acc.env["HCCL_IF_BASE_PORT"]), int(other.env["HCCL_IF_BASE_PORT"])
    assert abs(a - b) >= 256 and 60000 <= min(a, b) and max(a, b) < 60000 + 4096


def test_cuda_and_cpu_decisions():
    d = dist_env_from_slurm(SLURM)
    one = resolve_accelerator("cuda", d, {"devices_per_node": 8}, environ={"CUDA_VISIBLE_DEVICES": "3"})
    assert one.device == "cuda:0" and one.backend == "nccl"  # Slurm bound one GPU to this task
    many = resolve_accelerator("cuda", d, {"devices_per_node": 8}, environ={})
    assert many.device == "cuda:1" and many.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    cpu = resolve_accelerator("cpu", d, {}, environ={})
    assert (cpu.backend, cpu.device, cpu.env) == ("gloo", "cpu", {})


def test_unknown_accelerator_is_refused_in_profile_and_runtime(tmp_path):
    p = tmp_path / "tpu.yaml"
    p.write_text("name: tpu\nexecutor: slurm\naccelerator: tpu\n")
    with pytest.raises(SpecError) as e:
        load_cluster(str(p))
    assert "accelerator" in dict(e.value.problems) and "'cuda', 'npu' or 'cpu'" in str(e.value)
    with pytest.raises(ValueError, match="not one of cuda, npu, cpu"):
        resolve_accelerator("tpu", dist_env_from_slurm(SLURM))


def test_npu_without_torch_npu_is_a_clear_error(monkeypatch):
    import importlib.util

    assert importlib.util.find_spec("torch_npu") is None  # CI never installs it
    acc = resolve_accelerator("npu", dist_env_from_slurm(SLURM), {"devices_per_node": 8}, environ={})
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match=r"needs torch_npu \(pip install -e '.\[npu\]'"):
        activate(acc)
