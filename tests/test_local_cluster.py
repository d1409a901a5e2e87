"""slurm/local_cluster.sh never touches a Slurm it did not set up: its config lives in its state dir, a foreign
/etc/slurm/slurm.conf (and slurmdbd.conf) is left byte-identical by `up` and `down` + `up`, a foreign slurmd /
slurmctld process keeps running, and `up` refuses to start next to either. Each test leaves the cluster up."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import LOCAL_CLUSTER, PY, REPO, SLURM_CONF, cluster_up

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(os.geteuid() != 0, reason="the local cluster runs as root")]


def script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL_CLUSTER), *args], capture_output=True, text=True, timeout=300)


def answers() -> bool:
    """Our cluster answers squeue through its own SLURM_CONF."""
    env = {**os.environ, "SLURM_CONF": SLURM_CONF}
    return subprocess.run(["squeue", "-h"], capture_output=True, env=env, timeout=60).returncode == 0


def snapshot(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, st.st_ino


def test_config_lives_in_its_state_dir_and_the_launchers_find_it(slurm):
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    assert f"SLURM_CONF              = {SLURM_CONF}" in out and "ClusterName             = ci" in out
    assert script("conf").stdout.strip() == SLURM_CONF
    status = script("status")
    assert status.returncode == 0 and f"config: SLURM_CONF={SLURM_CONF}" in status.stdout
    # launchers/_common.py points Slurm's clients at it when SLURM_CONF is unset and /etc/slurm has no slurm.conf
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    code = "import os, _common; print(os.environ.get('SLURM_CONF'))"
    seen = subprocess.run([PY, "-c", code], cwd=REPO / "launchers", env=env, capture_output=True, text=True).stdout
    assert seen.strip() == ("None" if Path("/etc/slurm/slurm.conf").exists() else SLURM_CONF)
    # /etc/hosts: only lines it marked are its own, each one `127.0.0.1 <name>  # medhpc-local-cluster`
    for line in Path("/etc/hosts").read_text().splitlines():
        if "medhpc-local-cluster" in line:
            assert line.split()[0] == "127.0.0.1" and line.rstrip().endswith("# medhpc-local-cluster")


def test_a_foreign_slurm_conf_stays_byte_identical_and_up_refuses(slurm):
    files = [Path("/etc/slurm/slurm.conf"), Path("/etc/slurm/slurmdbd.conf")]
    originals = {f: f.read_bytes() for f in files if f.exists()}
    made_dir = not files[0].parent.exists()
    try:
        for f in files:
            if f not in originals:  # a lab's own Slurm, as far as the script can tell
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(f"# the lab's own {f.name}\nClusterName=lab\nSlurmctldHost=headnode\n")
        before = {f: snapshot(f) for f in files}

        up = script("up")
        assert up.returncode == 3, up.stderr
        assert "refusing to start" in up.stderr and all(str(f) in up.stderr for f in files), up.stderr
        assert len(up.stderr.strip().splitlines()) == 1 and "Traceback" not in up.stderr
        assert {f: snapshot(f) for f in files} == before
        assert answers()  # refusing changed nothing: the running cluster still answers

        down = script("down")
        assert down.returncode == 0, down.stderr
        up = script("up")
        assert up.returncode == 3 and "refusing to start" in up.stderr, up.stderr
        assert {f: snapshot(f) for f in files} == before
    finally:
        for f in files:
            if f in originals:
                if f.read_bytes() != originals[f]:
                    f.write_bytes(originals[f])
            else:
                f.unlink(missing_ok=True)
        if made_dir:
            files[0].parent.rmdir()
        cluster_up()
    assert answers()


def _alive(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


def test_a_foreign_slurmd_keeps_running_and_up_refuses(slurm, tmp_path):
    link = tmp_path / "slurmd"  # a process whose name is slurmd (a symlink named slurmd to sleep) ...
    link.symlink_to(shutil.which("sleep"))
    named = subprocess.Popen([str(link), "300"])
    # ... and one whose argv[0] is slurmctld (`exec -a slurmctld sleep 300`)
    argv0 = subprocess.Popen(["slurmctld", "300"], executable=shutil.which("sleep"))
    try:
        t0 = time.time()
        while b"slurmd" not in subprocess.run(["ps", "-o", "comm=", "-p", str(named.pid)],
                                              capture_output=True).stdout:
            assert time.time() - t0 < 10, "the fake slurmd did not start"
            time.sleep(0.1)

        up = script("up")
        assert up.returncode == 3 and "refusing to start" in up.stderr, up.stderr
        assert f"pid {named.pid}:" in up.stderr and f"pid {argv0.pid}:" in up.stderr, up.stderr
        assert _alive(named) and _alive(argv0) and answers()

        down = script("down")  # stops only the daemons in its own pid files
        assert down.returncode == 0, down.stderr
        assert _alive(named) and _alive(argv0)
        up = script("up")
        assert up.returncode == 3 and f"pid {named.pid}:" in up.stderr, up.stderr
        assert _alive(named) and _alive(argv0)
        status = script("status")
        assert f"pid {named.pid}:" in status.stdout and "not ours" in status.stdout
    finally:
        for p in (named, argv0):
            p.kill()
            p.wait()
        cluster_up()
    assert answers()


def test_a_file_an_older_version_wrote_to_etc_slurm_is_its_own_and_moved_aside(slurm):
    conf, legacy = Path("/etc/slurm/slurm.conf"), Path(SLURM_CONF).parent / "legacy"
    if conf.exists():
        pytest.skip(f"{conf} exists")
    before = set(legacy.glob("slurm.conf*")) if legacy.is_dir() else set()
    made_dir = not conf.parent.exists()
    text = "# Written by slurm/local_cluster.sh: two fake nodes on one host.\nClusterName=ci\n"
    try:
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(text)
        up = script("up")
        assert up.returncode == 0, up.stderr
        assert not conf.exists() and "older version" in up.stderr
        moved = set(legacy.glob("slurm.conf*")) - before
        assert len(moved) == 1 and next(iter(moved)).read_text() == text
        assert answers()
    finally:
        conf.unlink(missing_ok=True)
        for f in set(legacy.glob("slurm.conf*")) - before:
            f.unlink()
        if made_dir:
            conf.parent.rmdir()
        cluster_up()
