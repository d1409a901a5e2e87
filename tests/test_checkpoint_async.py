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
    return tmp / "ck", result(run(tmp, tmp / "ck", "sync", 29611))


def test_background_save_writes_the_same_checkpoint_and_moves_latest_last(sync_run, tmp_path):
    import torch

    sync_root, sync = sync_run
    root = tmp_path / "ck"
    got = result(run(tmp_path, root, "background", 29612))
    assert got["losses"] == sync["losses"]          # training did not change
    assert all(s >= 0 for s in got["stalls"])
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
    port = 29613 if "during" in fault else 29614
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
