"""Shared fixtures and helpers: the real local Slurm cluster (and the `slurm` marker on every test that needs it),
the launchers as subprocesses, readers of a run folder (losses, task records), Slurm state helpers, and the tiny
models written once per session."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_DATA = REPO / "tests" / "data"  # small public reference files kept in the repo (tests/data/README.md)
sys.path.insert(0, str(REPO))
PY = sys.executable
LOCAL_CLUSTER = REPO / "slurm" / "local_cluster.sh"
# The local cluster's own slurm.conf (never /etc/slurm): every Slurm client the tests start, directly or through
# the launchers and submitit (and the jobs, which inherit sbatch's environment), talks to that cluster only.
SLURM_CONF = str(Path(os.environ.get("SLURM_LOCAL_STATE") or "/var/lib/slurm-local") / "etc" / "slurm.conf")
os.environ["SLURM_CONF"] = SLURM_CONF


def cluster_up() -> None:
    """`bash slurm/local_cluster.sh up` (idempotent); fails the test with the script's own message."""
    res = subprocess.run(["bash", str(LOCAL_CLUSTER), "up"], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        pytest.fail(f"local Slurm cluster did not start (exit {res.returncode}): {res.stderr.strip()[-2000:]}",
                    pytrace=False)


def pytest_collection_modifyitems(config, items):
    """Every test that uses the `slurm` fixture, directly or through another fixture, gets the `slurm` marker, so
    `pytest -m "not slurm"` runs what passes on a machine without the local cluster. (Tests that reach Slurm without
    the fixture carry the marker explicitly.)"""
    for item in items:
        if "slurm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def slurm():
    """The project's own local cluster (idempotent `up`); fails loudly if it cannot start."""
    cluster_up()
    os.environ["SLURM_CONF"] = SLURM_CONF
    return "local_slurm"


def cli(tool: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run launchers/<tool>.py as a user would (a separate process)."""
    return subprocess.run([PY, str(REPO / "launchers" / f"{tool}.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env={**os.environ, **(env or {})})


def submit(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """launchers/submit.py with these arguments, which must succeed (exit 0): the finished process."""
    res = cli("submit", *args, env=env, timeout=timeout)
    assert res.returncode == 0, res.stderr + res.stdout
    return res


def submit_run(*args: str, env: dict | None = None, timeout: int = 300) -> tuple[Path, str]:
    """`submit` of one run: (its run folder, the first job id of its first step)."""
    run_dir = run_folder(submit(*args, env=env, timeout=timeout).stdout)
    return run_dir, record(run_dir)["steps"][0]["job_ids"][0]


@pytest.fixture
def uname():
    """A unique job name per test, so Slurm queries never see another test's jobs."""
    return f"t{uuid.uuid4().hex[:8]}"


def run_folder(stdout: str) -> Path:
    m = re.search(r"^run folder: (.+)$", stdout, re.M)
    assert m, f"no run folder in output:\n{stdout}"
    return Path(m.group(1))


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """The training loss curve a run wrote: (step, loss) per row of metrics.csv."""
    return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader((run_dir / "metrics.csv").open())]


def task_records(run_dir: Path, prefix: str = "main") -> list[dict]:
    """The task records tasks/<prefix>*.json of a run, sorted by file name."""
    return [json.loads(p.read_text()) for p in sorted((run_dir / "tasks").glob(f"{prefix}*.json"))]


def rank0_result(run_dir: Path, step: str = "main") -> dict:
    """The result rank 0 of a step reported (tasks/<step>.rank0.json); fails if that record is missing."""
    return json.loads((run_dir / "tasks" / f"{step}.rank0.json").read_text())["result"]


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobID,State"],
                         capture_output=True, text=True, check=True).stdout
    return {jid: state.split()[0] for jid, state in (ln.split("|")[:2] for ln in out.splitlines() if "|" in ln)}


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def wait_terminal(job_ids: list[str], expect_tasks: int | None = None, timeout: float = 240) -> dict[str, str]:
    """Poll sacct until every job/task listed is in a terminal state (and, for arrays, all tasks are listed).
    Every id asked for must be in accounting first: slurmdbd can record a fresh job a moment after another."""
    t0 = time.time()
    while True:
        states = sacct_states(job_ids)
        seen = all(any(k == j or k.startswith(f"{j}_") for k in states) for j in job_ids)
        done = states and seen and all(s in TERMINAL for s in states.values())
        if done and (expect_tasks is None or len(states) >= expect_tasks):
            return states
        if time.time() - t0 > timeout:
            raise AssertionError(f"jobs {job_ids} not finished after {timeout}s: {states}")
        time.sleep(1)


def queue_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def _known_jobs() -> dict[int, set[tuple[str, str]]]:
    """Every job Slurm knows of (queued, or accounted today): base job id -> {(job name, working directory)}."""
    jobs: dict[int, set[tuple[str, str]]] = {}
    acct = subprocess.run(["sacct", "-X", "-n", "-a", "-P", "-S", "now-1days", "-o", "JobID,JobName,WorkDir"],
                          capture_output=True, text=True, check=True).stdout
    queue = subprocess.run(["squeue", "-h", "-o", "%i|%j|%Z"], capture_output=True, text=True, check=True).stdout
    for line in (acct + queue).splitlines():
        job, name, workdir = (line.split("|") + ["", ""])[:3]
        m = re.match(r"\d+", job.strip())
        if m:
            jobs.setdefault(int(m.group()), set()).add((name.strip(), workdir.strip()))
    return jobs


def job_mark() -> int:
    """The newest job id Slurm knows of now: `new_jobs(mark)` lists what was submitted after it."""
    return max(_known_jobs(), default=0)


def new_jobs(mark: int, name: str | None = None) -> dict[int, set[tuple[str, str]]]:
    """Jobs this checkout submitted after `mark` (sbatch's working directory is the repo: `cli` runs there), with
    `name` only those whose job name starts with it. Unlike comparing two snapshots of the queue, earlier tests'
    jobs finishing in between and another checkout's jobs on the same cluster do not count, so 'nothing was
    submitted' holds on a busy machine."""
    return {j: seen for j, seen in _known_jobs().items()
            if j > mark and any(w == str(REPO) and (name is None or n.startswith(name)) for n, w in seen)}


def log_tails(run_dir: Path, lines: int = 25) -> str:
    """The last lines of every task log of a run: what a failed fixture run's assertion shows (CI keeps nothing else)."""
    parts = []
    for p in sorted(Path(run_dir).rglob("*_log.*")):
        if p.is_file():
            parts.append(f"==> {p} <==\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(parts) or f"no task logs under {run_dir}"


def final_state(job_id: str, timeout: float = 900) -> str:
    """The job's state once it is over, after any requeues (sacct shows the newest run of a job)."""
    t0 = time.time()
    while True:
        state = wait_terminal([job_id], timeout=timeout)[job_id]
        if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}:
            return state
        assert time.time() - t0 < timeout, f"job {job_id} still {state} after {timeout}s"
        time.sleep(1)


def requeue_once_checkpointed(run_dir: Path, job_id: str, timeout: float = 600) -> None:
    """Wait for the run's first complete checkpoint, then `scontrol requeue` the job (the resume tests)."""
    t0 = time.time()
    while not (run_dir / "checkpoints" / "latest").exists():
        assert time.time() - t0 < timeout, f"no checkpoint in {run_dir} after {timeout}s"
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", job_id], check=True)


# ---------------------------------------------------------------- tiny models, written once per session
@pytest.fixture(scope="session")
def tiny_pangu_factory(tmp_path_factory):
    """`tiny_pangu_factory(layers=None)`: the folder of a tiny openPangu with that many layers (the writer's default
    when None), written once per session and shared by every test file; tests only read it."""
    root = tmp_path_factory.mktemp("tiny_pangu")

    def make(layers: int | None = None) -> Path:
        from core.models.pangu import write_tiny_pangu

        if layers is None:
            return write_tiny_pangu(root / "pangu")  # idempotent: an existing complete folder is kept
        return write_tiny_pangu(root / f"pangu{layers}", layers=layers)

    return make


@pytest.fixture(scope="session")
def tiny_pangu(tiny_pangu_factory) -> Path:
    """The default tiny openPangu folder (core.models.pangu.write_tiny_pangu's defaults)."""
    return tiny_pangu_factory()


@pytest.fixture(scope="session")
def tiny_chexbert(tmp_path_factory) -> Path:
    """A tiny CheXbert (chexbert.pth + vocab.txt beside it, write_tiny_chexbert's defaults): the .pth path."""
    from core.models.chexbert import write_tiny_chexbert

    return write_tiny_chexbert(tmp_path_factory.mktemp("tiny_chexbert"))


# ---------------------------------------------------------------- report pages in a real browser (issue 25)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(page: Path, tmp: Path, screenshot: Path | None = None, timeout: int = 120) -> str:
    """Load a page from disk in headless Chromium (Debian's chromium, a fresh profile under tmp): the DOM it built
    (--dump-dom), or with `screenshot` a PNG of the page written there (then the empty string)."""
    import shutil

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed (tests/run.sh installs it as root: apt-get install chromium)"
    profile = Path(tmp) / f"chromium-profile-{uuid.uuid4().hex[:6]}"
    what = [f"--screenshot={screenshot}", "--window-size=1280,1600"] if screenshot else ["--dump-dom"]
    res = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *what, Path(page).resolve().as_uri()],
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def html_tables(dom: str) -> dict[str, list[list[str]]]:
    """Every <table id=...> of a page: its rows (header row first) as lists of cell texts."""
    from html.parser import HTMLParser

    tables: dict[str, list[list[str]]] = {}

    class Reader(HTMLParser):
        current, row, cell = None, None, None

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.current = dict(attrs).get("id") or f"table{len(tables)}"
                tables[self.current] = []
            elif tag == "tr" and self.current is not None:
                self.row = []
            elif tag in ("td", "th") and self.row is not None:
                self.cell = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th") and self.cell is not None:
                self.row.append(self.cell)
                self.cell = None
            elif tag == "tr" and self.row is not None:
                tables[self.current].append(self.row)
                self.row = None
            elif tag == "table":
                self.current = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    Reader().feed(dom)
    return tables


def write_snapshot(root, table, names: list[str], row_group: int = 5):
    """A hub-style MedTrinity snapshot (what `huggingface_hub.snapshot_download` leaves): <root>/25M_demo/<shard>
    for each name, the table's rows split evenly, small row groups."""
    import pyarrow.parquet as pq

    (root / "25M_demo").mkdir(parents=True)
    per = -(-table.num_rows // len(names))
    for k, name in enumerate(names):
        pq.write_table(table.slice(k * per, per), str(root / "25M_demo" / name), row_group_size=row_group)
    return root
