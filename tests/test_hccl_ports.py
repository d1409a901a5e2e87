"""Ascend: a requeue landing on the same node waits for HCCL's host ports (HCCP may still hold them) before HCCL
starts (core/hccl_ports.py, core/runtime.py init_distributed, the profile's hccl_port_wait_s). Real sockets on
this host; no torch_npu needed."""
from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

import pytest

from core import hccl_ports
from core.config import SpecError, load_cluster
from core.hccl_ports import busy_ports, wait_for_ports
from core.runtime import Accelerator, init_distributed, resolve_accelerator
from core.scheduler.slurm.env import dist_env_from_slurm

REPO = Path(__file__).resolve().parents[1]
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
         "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_TASKS_PER_NODE": "2"}


def free_window(count: int = 16) -> int:
    """A base port whose `count` ports are all free now: above the kernel's ephemeral range where there is room (no
    outgoing connection takes a port there mid-test), else around a port the kernel hands out for port 0."""
    try:
        high = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        high = 65535
    for _ in range(100):
        if high + 1 + count * 4 <= 65535:
            base = random.randrange(high + 1, 65536 - count)
        else:
            with socket.socket() as s:
                s.bind(("0.0.0.0", 0))
                base = s.getsockname()[1]
            if base + count > 65536:
                continue
        if not busy_ports(base, count):
            return base
    raise AssertionError("no free 16-port window on this host")


def listen(port: int) -> socket.socket:
    s = socket.socket()
    s.bind(("0.0.0.0", port))
    s.listen()
    return s


def test_free_ports_return_at_once_without_a_line():
    lines = []
    assert wait_for_ports(free_window(), 16, timeout_s=5, poll_s=0.05, log=lines.append) == 0.0
    assert lines == []


def test_a_held_port_is_waited_for_and_named_until_it_is_released():
    base = free_window()
    held = listen(base + 7)
    logged = threading.Event()
    lines = []

    def log(line):
        lines.append(line)
        logged.set()

    def release():
        logged.wait(30)  # the waiter has said it waits: now HCCP "releases" the port
        held.close()

    t = threading.Thread(target=release)
    t.start()
    try:
        waited = wait_for_ports(base, 16, timeout_s=30, poll_s=0.05, log=log)
    finally:
        t.join()
        held.close()
    assert waited > 0
    assert len(lines) == 2
    assert f"{base + 7}" in lines[0] and "busy" in lines[0] and "HCCP" in lines[0] and "30 s" in lines[0]
    assert f"{base + 6}" not in lines[0] and f"{base + 8}" not in lines[0]  # only the held port is named
    assert "free" in lines[1] and socket.gethostname() in lines[1]
    assert busy_ports(base, 16) == []


def test_ports_still_held_at_the_timeout_stop_the_task_naming_port_node_and_fix():
    base = free_window()
    held = [listen(base), listen(base + 1), listen(base + 15)]
    lines = []
    try:
        with pytest.raises(RuntimeError) as e:
            wait_for_ports(base, 16, timeout_s=0.5, poll_s=0.1, log=lines.append)
    finally:
        for s in held:
            s.close()
    msg = str(e.value)
    assert f"{base}-{base + 1}, {base + 15}" in msg
    assert "hccl_port_wait_s" in msg and "hccl_if_base_port" in msg and socket.gethostname() in msg
    assert len(lines) == 1 and f"{base + 15}" in lines[0]


def test_a_sibling_ranks_momentary_probe_is_not_busy(monkeypatch):
    """Two ranks of a node probe the same window at once: one failed bind (the other's probe socket) is re-probed."""
    base = free_window()
    real, seen = hccl_ports._bind_fails, []

    def sibling_probing_once(host, port):
        if port == base + 3 and port not in seen:
            seen.append(port)
            return True  # the sibling's probe held it for this instant
        return real(host, port)

    monkeypatch.setattr(hccl_ports, "_bind_fails", sibling_probing_once)
    lines = []
    assert wait_for_ports(base, 16, timeout_s=5, poll_s=0.05, log=lines.append) == 0.0
    assert lines == [] and seen == [base + 3]


def test_profile_field_defaults_is_checked_and_reaches_the_npu_wait(tmp_path):
    assert load_cluster("ascend_910b").hccl_port_wait_s == 120
    assert load_cluster("local_slurm").hccl_port_wait_s == 120  # left out: the default
    text = (REPO / "cluster_configs" / "ascend_910b.yaml").read_text()
    assert "hccl_port_wait_s: 120" in text
    (tmp_path / "bad.yaml").write_text(text.replace("hccl_port_wait_s: 120", "hccl_port_wait_s: -1"))
    with pytest.raises(SpecError) as e:
        load_cluster(str(tmp_path / "bad.yaml"))
    assert "hccl_port_wait_s" in str(e.value)
    (tmp_path / "p.yaml").write_text(text.replace("hccl_port_wait_s: 120", "hccl_port_wait_s: 7"))
    cluster = load_cluster(str(tmp_path / "p.yaml")).model_dump()
    dist = dist_env_from_slurm(SLURM)
    npu = resolve_accelerator("npu", dist, cluster, environ={})
    assert npu.port_wait_s == 7 and int(npu.env["HCCL_IF_BASE_PORT"]) == 60000 + 4242 % 16 * 256
    # CUDA and CPU runs never wait
    assert resolve_accelerator("cuda", dist, cluster, environ={}).port_wait_s == 0
    assert resolve_accelerator("cpu", dist, cluster, environ={}).port_wait_s == 0


def test_init_distributed_on_npu_waits_for_the_ports_before_the_process_group():
    """A port of the job's window still held: init_distributed stops with the ports named before DeepSpeed starts."""
    base = free_window()
    acc = Accelerator("npu", "hccl", "npu:1", {"HCCL_IF_BASE_PORT": str(base)}, port_wait_s=1)
    held = listen(base + 9)
    try:
        with pytest.raises(RuntimeError, match=f"HCCL host ports {base + 9} .*hccl_port_wait_s"):
            init_distributed(dist_env_from_slurm(SLURM), acc, timeout_s=5)
    finally:
        held.close()
