"""Background checkpoint writes (core.checkpoint_writer through core.checkpoint.CheckpointManager), on one rank
in a subprocess under real DeepSpeed ZeRO-2 on CPU: the files equal a synchronous save's, `latest` moves only
after the files are durable, a process killed mid-write or before the marker leaves `latest` on the previous
complete checkpoint, and training resumed from it reproduces the uninterrupted losses exactly. The 2-rank path
through Slurm (kill during the write, signal, requeue) is in tests/test_training.py."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import PY, REPO

SCRIPT = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[4], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed, torch
deepspeed.init_distributed(dist_backend="gloo")
from core.checkpoint import CheckpointManager, set_rng_state
root, mode = sys.argv[2], sys.argv[3]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 4))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
eng, *_ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=model.parameters(),
                               config={"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}})
ck = CheckpointManager(root, 0, 1, keep_last=2)
start = 0
point = ck.resume_point()
if point is not None:
    start = ck.load(eng, point)["step"]
out = {"start": start, "losses": {}, "stalls": []}
for step in range(start + 1, 13):
    x, y = torch.randn(4, 64), torch.randint(0, 4, (4,))
    loss = torch.nn.functional.cross_entropy(eng(x), y)
    eng.backward(loss)
    eng.step()
    out["losses"][step] = loss.item()
    if step % 4 == 0:
        ck.save(eng, step, {"step": step}, {"mode": mode}, background=(mode == "background" and step < 12))
        out["stalls"].append(ck.last_stall)
ck.finish()
print("RESULT " + json.dumps(out))
'''


def run(tmp: Path, root: Path, mode: str, port: int, fault: str = "") -> subprocess.CompletedProcess:
    script = tmp / "train_one_rank.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDHPC_FAULT": fault}
    return subprocess.run([PY, str(script), str(REPO), str(root), mode, str(port)], capture_output=True, text=True,
                          env=env, timeout=300)


def free_port() -> int:
    """A port nobody listens on now (fixed ports collide with a concurrent suite)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def tensors(obj, prefix=""):
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sync")
    return tmp / "ck", result(run(tmp, tmp / "ck", "sync", free_port()))


def test_background_save_writes_the_same_checkpoint_and_moves_latest_last(sync_run, tmp_path):
    import torch

    sync_root, sync = sync_run
    root = tmp_path / "ck"
    got = result(run(tmp_path, root, "background", free_port()))
    assert got["losses"] == sync["losses"]          # training did not change
    assert len(got["stalls"]) == 3 and all(isinstance(s, float) for s in got["stalls"])  # one per save
    assert (root / "latest").read_text() == "step00000012"
    assert sorted(p.name for p in root.glob("step*")) == ["step00000008", "step00000012"]  # keep_last 2
    tag = "step00000008"                                      # written in the background (12 is the final, sync save)
    assert json.loads((root / tag / "COMPLETE").read_text())["mode"] == "background"
    names = sorted(p.name for p in (root / tag).iterdir())
    assert names == sorted(p.name for p in (sync_root / tag).iterdir())  # no .tmp or .written_rank left behind
    for name in names:
        if name.endswith(".pt"):
            a = dict(tensors(torch.load(sync_root / tag / name, weights_only=False)))
            b = dict(tensors(torch.load(root / tag / name, weights_only=False)))
            assert a.keys() == b.keys() and a, name
            assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("fault", ["kill@during_write:8", "kill@after_shards:8"])
def test_a_kill_during_the_background_write_keeps_latest_and_resumes_exactly(sync_run, tmp_path, fault):
    _, sync = sync_run
    root = tmp_path / "ck"
    port = free_port()
    killed = run(tmp_path, root, "background", port, fault=fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (root / "latest").read_text() == "step00000004"           # the previous complete checkpoint
    assert not (root / "step00000008").exists() and (root / ".staging" / "step00000008").is_dir()
    assert not (root / ".staging" / "step00000008" / "COMPLETE").exists()
    resumed = result(run(tmp_path, root, "background", port))
    assert resumed["start"] == 4
    assert {int(k): v for k, v in resumed["losses"].items()} == {int(k): v for k, v in sync["losses"].items()
                                                                 if int(k) > 4}
    assert (root / "latest").read_text() == "step00000012"


def test_a_rank_whose_background_write_fails_stops_rank_0_at_once_and_latest_stays(tmp_path):
    """Rank 1's writer meets an error (a full disk, say): it marks `.failed_rank1` instead of never marking, and
    rank 0's finalisation raises naming rank 1 and its error at once (not after the hour-long wait for a mark);
    nothing is finalised. No DeepSpeed needed: the writer thread and the manager's finalisation, in process."""
    from core.checkpoint import CheckpointError, CheckpointManager
    from core.checkpoint_writer import BackgroundWriter
    from core.run_folder import write_text_atomic

    root = tmp_path / "ck"
    folder = root / ".staging" / "step00000008"
    folder.mkdir(parents=True)
    write_text_atomic(root / "latest", "step00000004")

    def disk_full(path):
        raise OSError(28, "No space left on device")

    rank1 = BackgroundWriter(fault=disk_full)
    rank1.on_error = lambda e: write_text_atomic(folder / ".failed_rank1", f"{type(e).__name__}: {e}")
    rank1.save({"w": 1}, str(folder / "rank1_states.pt"))
    rank1.then(lambda: write_text_atomic(folder / ".written_rank1", "8"))
    with pytest.raises(OSError, match="No space left"):
        rank1.wait()
    assert not (folder / ".written_rank1").exists()
    (folder / ".written_rank0").write_text("8")
    rank0 = CheckpointManager(root, 0, 2, keep_last=2)
    with pytest.raises(CheckpointError, match=r"rank 1 could not write its part \(OSError: \[Errno 28\] No space"):
        rank0._finalize_when_written("step00000008", {"step": 8}, timeout=60)  # (a timeout says something else)
    assert (root / "latest").read_text() == "step00000004" and not (root / "step00000008").exists()
