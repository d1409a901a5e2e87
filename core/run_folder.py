"""The run folder: everything about where a run's files live, in one place.

A run is one folder, `<logs_dir>/<name>/<root id>/`:
  run.json              the run record (spec, profile, plan, steps, job ids), written by the submit side
  submitit/             submitit's scripts, pickles and logs
  tasks/<step>[-NNNNNN].rank<R>.json   one small record per rank of every task (merge steps read them)
  checkpoints/          the engine's checkpoints (core.checkpoint)
  ...                   whatever the workload writes (results/, layers/, ...)
`<logs_dir>/<name>/latest` links to the newest run folder. On Slurm the root id is the first job's id (the array
job id for arrays), so the first step is submitted with the template `.../%A` and later steps with the concrete
id; local runs get a `local-<time>-<pid>` id.

`atomic_path` / `write_text_atomic` / `write_json_atomic` are the one write-temp-then-rename helper every module
uses, so a reader never sees half a file; `build_folder` does the same for a whole folder (the tiny models that
several jobs of a study may write at once). Nothing here imports torch.
"""
from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

REPO = Path(__file__).resolve().parent.parent
RECORD = "run.json"
CHECKPOINT_MARKER = "COMPLETE"   # checkpoints/<tag>/COMPLETE: written last, when every rank's files are on disk
ROOT_TEMPLATE = "%A"   # Slurm's array job id (the job id for a single job) in the first step's paths


# ---------------------------------------------------------------- atomic writes
@contextmanager
def atomic_path(path: Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block succeeds it replaces `path` in one rename.
    Use it for writers that take a file name (safetensors' save_file, torch.save); a failed block leaves
    `path` as it was and removes the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{_writer_id()}")
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
        if fsync:   # the rename itself is durable only once the folder's entry is (a node crash, not just a kill)
            fsync_path(path.parent)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (its entries: what a rename into it changed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writer_id() -> str:
    """host + pid: unique among the processes of every node that shares the filesystem (a pid alone is not)."""
    import socket

    host = re.sub(r"[^A-Za-z0-9.\-]", "_", socket.gethostname())[:60]
    return f"{os.getpid()}-{host}"


def build_folder(target: Path, build: Callable[[Path], None], complete: Callable[[Path], bool]) -> Path:
    """Build a folder once, safely under concurrent callers (processes on several nodes sharing the filesystem):
    `build(tmp)` fills a private temporary folder next to `target`, which is then renamed to `target` in one step,
    so a reader sees either no folder or a complete one. If another caller's folder got there first, ours is
    discarded and theirs is used. A `target` that is already `complete` is returned untouched (idempotent); an
    incomplete non-empty one (left by an interrupted writer) is moved aside to `<name>.incomplete-<pid>-<host>`
    rather than deleted, then replaced."""
    import errno
    import shutil

    target = Path(target)
    if complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{_writer_id()}")
    if tmp.exists():  # a crash of this very pid on this host earlier
        shutil.rmtree(tmp)
    tmp.mkdir()
    taken = (errno.ENOTEMPTY, errno.EEXIST)
    try:
        build(tmp)
        if complete(target):  # another caller finished while we built
            return target
        try:
            os.rename(tmp, target)  # atomic; also replaces an empty target folder
            return target
        except OSError as e:
            if e.errno not in taken:
                raise
        if complete(target):
            return target
        try:
            os.rename(target, target.with_name(f"{target.name}.incomplete-{_writer_id()}"))
        except FileNotFoundError:
            pass  # another caller moved it aside first
        try:
            os.rename(tmp, target)
        except OSError as e:
            if e.errno not in taken or not complete(target):
                raise
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str, fsync: bool = False) -> Path:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: Path, data: Any, fsync: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1, default=str), fsync=fsync)


# ---------------------------------------------------------------- where runs live
LOGS = REPO / "logs"


def logs_root(spec) -> Path:
    """`<logs_dir>/<name>`: the folder that holds every run of a spec (relative logs_dir: under the checkout)."""
    p = Path(spec.outputs.logs_dir)
    return (p if p.is_absolute() else REPO / p) / spec.name


def logs_dir_problem(logs_dir: str, roots: list[str]) -> Optional[str]:
    """Why run folders may not go to `logs_dir` (None when they may): a relative one must stay inside the
    checkout's logs/ folder, an absolute one inside one of the profile's `logs_roots`; both after resolving
    `..` and symbolic links."""
    p = Path(logs_dir)
    target = (p if p.is_absolute() else REPO / p).resolve()
    allowed = [Path(r).resolve() for r in roots] if p.is_absolute() else [LOGS.resolve()]
    if any(target == a or a in target.parents for a in allowed):
        return None
    if p.is_absolute():
        where = ", ".join(str(a) for a in allowed) or "nowhere (the profile sets no logs_roots)"
        return (f"{target} is outside the folders this cluster profile allows for absolute paths ({where}); use a "
                f"path relative to the checkout's logs/ or add a root to the profile's logs_roots")
    return f"resolves to {target}, outside the checkout's logs folder {LOGS}; use a relative path such as logs/mine"


def run_dir_template(spec, root: Optional[str] = None) -> str:
    """The run folder as a string for submitit: `%A` stands for the root id until Slurm gives one."""
    return str(logs_root(spec) / (root or ROOT_TEMPLATE))


def local_root_id(parent: Optional[Path] = None) -> str:
    """`local-<time>-<pid>`; with `parent` (the spec's logs root) a `-2`, `-3` ... suffix when that folder is
    taken (a study's local steps of one spec can start within the same second, from the same process)."""
    base = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    rid, n = base, 1
    while parent is not None and (Path(parent) / rid).exists():
        n += 1
        rid = f"{base}-{n}"
    return rid


def resolve_run_dir(template: str, environ: Optional[dict] = None) -> Path:
    """Inside a task: `%A` in the template is the root job id (the array job id, else the job id)."""
    environ = os.environ if environ is None else environ
    if ROOT_TEMPLATE in template:
        from core import scheduler

        root = scheduler.root_job_id(environ)
        if not root:
            raise RuntimeError("run folder template has %A but this process runs in no scheduler's job (no job id)")
        template = template.replace(ROOT_TEMPLATE, root)
    return Path(template)


def find_run(spec, run_dir: Optional[str]) -> Path:
    """The run folder to resume: the one given (it must hold a run record of this spec's name), else the newest
    run of this spec's name that has a record. Raises FileNotFoundError / ValueError with the fix."""
    root = logs_root(spec)
    if run_dir:
        p = Path(run_dir)
        if not (p / RECORD).is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no {RECORD} there; give a run folder logs/<name>/<id>")
        p = p.resolve()
        if p.parent != root.resolve() or read_record(p).get("name") != spec.name:
            raise ValueError(f"--resume {run_dir}: not a run of '{spec.name}' (expected under {root})")
        return p
    runs = sorted((d for d in root.glob("*") if (d / RECORD).is_file() and not d.is_symlink()),
                  key=lambda d: (d / RECORD).stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"--resume: no earlier run of '{spec.name}' under {root}")
    return runs[-1]


# ---------------------------------------------------------------- promised inputs (studies)
# A study (core.study) plans every step before any has run: a later step's input (a scan's sensitivity.csv, a
# trained run folder) is then a path an earlier step of the same study will produce. While a study plans or
# submits, it registers the run folders its earlier steps will write (a placeholder before submission, the real
# run folder after); planners accept a path inside one of them instead of insisting that it exists now.
_PROMISED: dict[str, str] = {}   # resolved folder -> the study step that produces it


@contextmanager
def promises(folders: dict[str, str]) -> Iterator[None]:
    """Within the block, paths inside `folders` (folder -> step name) count as promised by that step."""
    saved = dict(_PROMISED)
    _PROMISED.update({str(Path(f).resolve()): step for f, step in folders.items()})
    try:
        yield
    finally:
        _PROMISED.clear()
        _PROMISED.update(saved)


def promised_by(path) -> Optional[str]:
    """The study step that will produce `path` (it lies in that step's run folder), or None."""
    if not _PROMISED or not path:
        return None
    p = Path(path).resolve()
    for folder, step in _PROMISED.items():
        f = Path(folder)
        if p == f or f in p.parents:
            return step
    return None


# ---------------------------------------------------------------- the run record
def read_record(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / RECORD).read_text())


def record_if_any(run_dir: Path) -> Optional[dict]:
    """run.json of a folder, or None when it is missing, unreadable or not a mapping (a job's comment may name a
    folder whose record is not written yet, or was never ours)."""
    try:
        rec = json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def is_run(run_dir: Path) -> bool:
    return (Path(run_dir) / RECORD).is_file()


def write_record(run_dir: Path, record: dict) -> None:
    """Write run.json, then point `<name>/latest` at this run (both atomically)."""
    run_dir = Path(run_dir)
    write_json_atomic(run_dir / RECORD, record)
    link = run_dir.parent / ".latest.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(run_dir.name)
    os.replace(link, run_dir.parent / "latest")


# ---------------------------------------------------------------- task records
def task_record_path(run_dir: Path, step: str, task_index: Optional[int], rank: int) -> Path:
    tag = step if task_index is None else f"{step}-{task_index:06d}"
    return Path(run_dir) / "tasks" / f"{tag}.rank{rank}.json"


def write_task_record(run_dir: Path, record: dict) -> Path:
    path = task_record_path(run_dir, record["step"], record["task_index"], record["rank"])
    return write_json_atomic(path, record)


def task_records(run_dir: Path, step: str = "main") -> list[dict]:
    """The records that the tasks of a step left, in task order."""
    folder = Path(run_dir) / "tasks"
    if not folder.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"{step}*.json"))
            if p.name.split(".")[0].split("-")[0] == step]
