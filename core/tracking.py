"""Experiment trackers beside metrics.csv: Weights & Biases (offline first) and MLflow (a file store per task),
one run per task across requeues and resumes, with the run's provenance.

Where things go (per task; `<tag>` is the step, `main`, or `<step>-NNNNNN` for an array task):
  <run>/tracking/<tag>/ids.json      the W&B run id and MLflow run id of this task: a requeued or resumed task
                                     continues the same runs
  <run>/tracking/<tag>/wandb/        W&B's folder: exactly one offline-run-<time>-<id>/ (upload later with
                                     `python launchers/sync.py <run>`)
  <run>/tracking/<tag>/mlruns/       an MLflow file store (`file:` URI; MLflow 3 refuses a file store unless
                                     MLFLOW_ALLOW_FILE_STORE=true, which is set here for this process only)
No two tasks ever write one store: a study's table step merges them afterwards (core/workloads/study_table.py).

Nothing is logged twice. A resumed task restarts from its checkpoint's step S and metrics.csv keeps rows 1..S
(core.engine). MLflow's run is reopened and its metric files drop every point after S. W&B cannot reopen an
offline run, so the offline run is written again under the same id: rows 1..S replayed from metrics.csv, then
the new steps; the older offline folder of that id is removed once the new one holds its rows. Online W&B
resumes the same run id (resume="allow") and logs the steps after S.

The API key is only ever a reference in the spec (`tracking.wandb_key: ${env:WANDB_API_KEY}` or
`${file:/path}`), resolved here for an online run only and handed to W&B in memory; it is never written to the
run folder, the config, a log line, or either store. Rank 0 logs; other ranks get a Tracker that does nothing.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from core.run_folder import write_text_atomic

log = logging.getLogger("tracking")

IDS = "ids.json"
PACKAGES = ("torch", "deepspeed", "transformers", "peft", "timm", "torch_npu", "wandb", "mlflow-skinny")


# ---------------------------------------------------------------- settings (no heavy imports: the planner uses them)
def settings(spec, cluster: Any) -> dict:
    """The spec's tracking: section with the profile's defaults filled in (cluster: a Cluster or its dict)."""
    t = spec.tracking
    d = cluster.get("tracking") if isinstance(cluster, dict) else getattr(cluster, "tracking", None)
    d = d.model_dump() if hasattr(d, "model_dump") else dict(d or {})
    pick = lambda key, default: getattr(t, key) if getattr(t, key) is not None else d.get(key, default)  # noqa: E731
    return {"wandb": pick("wandb", "off"), "mlflow": bool(pick("mlflow", False)),
            "tensorboard": bool(pick("tensorboard", True)), "project": pick("project", "medhpc"),
            "group": t.group or spec.name, "wandb_key": t.wandb_key,
            "wandb_reachable": bool(d.get("wandb_reachable", False))}


def plan_problems(spec, cluster) -> list[tuple[str, str]]:
    """What the planner refuses: online W&B where the profile does not say the nodes reach the server, or
    without a key reference."""
    s = settings(spec, cluster)
    if s["wandb"] != "online":
        return []
    name = getattr(cluster, "name", None) or (cluster.get("name") if isinstance(cluster, dict) else "?")
    if not s["wandb_reachable"]:
        return [("tracking.wandb", f"online: the profile {name} does not say its compute nodes reach the W&B "
                                   f"server (tracking.wandb_reachable); use offline and upload afterwards with "
                                   f"python launchers/sync.py RUN_FOLDER from a login node")]
    if not s["wandb_key"]:
        return [("tracking.wandb_key", "online W&B needs the key as a reference: tracking.wandb_key: "
                                       "${env:WANDB_API_KEY} (or ${file:/path/to/key}, mode 600)")]
    return []


def describe(spec, cluster) -> str:
    """The plan's line: where this run's metrics will go."""
    s = settings(spec, cluster)
    parts = ["metrics.csv"]
    if s["tensorboard"]:
        parts.append("TensorBoard (tensorboard/)")
    if s["wandb"] == "offline":
        parts.append(f"W&B offline (project {s['project']}, group {s['group']}; upload later: python "
                     f"launchers/sync.py RUN_FOLDER)")
    elif s["wandb"] == "online":
        parts.append(f"W&B online (project {s['project']}, group {s['group']})")
    if s["mlflow"]:
        parts.append(f"MLflow file store per task (tracking/<task>/mlruns, experiment {s['project']})")
    return "tracking: " + ", ".join(parts) + "; report.html when the run ends"


def task_tag(step: str, task_index: Optional[int]) -> str:
    return step if task_index is None else f"{step}-{task_index:06d}"


# ---------------------------------------------------------------- provenance
def _normalized(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def package_versions() -> dict:
    """Installed versions of the packages a result depends on (absent ones left out). One directory listing per
    sys.path entry, reading versions from the installers' `<name>-<version>.dist-info` folder names (a name
    importlib.metadata scans every path for, once per package: ~25 ms on every submission); importlib.metadata
    only for a package installed another way (an egg, a zip)."""
    want = {_normalized(n): n for n in PACKAGES}
    out: dict = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for folder in names:
            if not folder.endswith(".dist-info"):
                continue
            name, _, version = folder[:-len(".dist-info")].partition("-")
            key = _normalized(name)
            if key in want and want[key] not in out and version:
                out[want[key]] = version
    missing = [n for n in PACKAGES if n not in out]
    if missing:
        from importlib import metadata

        for name in missing:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
    return {n: out[n] for n in PACKAGES if n in out}


def start_git_status(repo: Optional[Path] = None):
    """`git status` of the checkout (or of `repo`), started now and read later (git_commit(started)): one process
    that says the commit (`# branch.oid`) and whether tracked files differ; None where git cannot start."""
    import subprocess

    from core.run_folder import REPO

    try:
        return subprocess.Popen(["git", "-C", str(repo or REPO), "status", "--porcelain=v2", "--branch",
                                 "--untracked-files=no"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError:
        return None


def git_commit(started=None) -> dict:
    """The checkout's commit and whether tracked files differ from it (None, None outside a git checkout).
    `started`: a process from start_git_status() begun earlier, so the submission's other work overlaps it."""
    import subprocess

    proc = started if started is not None else start_git_status()
    if proc is None:
        return {"commit": None, "dirty": None}
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"commit": None, "dirty": None}
    if proc.returncode != 0:
        return {"commit": None, "dirty": None}
    lines = out.splitlines()
    head = next((ln.split()[-1] for ln in lines if ln.startswith("# branch.oid ")), None)
    if head == "(initial)":
        head = None
    return {"commit": head, "dirty": any(ln and not ln.startswith("#") for ln in lines)}


def provenance(spec, ctx) -> dict:
    """What produced this run: the spec as resolved (references stay references), the checkout's commit and dirty
    flag, package versions, the scheduler's job id and nodes, the profile."""
    from core.scheduler import restart_count

    return {"spec": spec.model_dump(mode="json"), "git": git_commit(), "packages": package_versions(),
            "job": {"job_id": ctx.job_id, "root_id": ctx.root_id, "step": ctx.step, "task_index": ctx.task_index,
                    "nodes": list(ctx.hostnames), "world_size": ctx.world_size, "restart": restart_count(),
                    "executor": ctx.executor},
            "profile": ctx.cluster.get("name"), "run_dir": str(ctx.run_dir)}


def _flat(data: Any, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


# ---------------------------------------------------------------- the tracker
class Tracker:
    """Rank 0's fan-out to W&B and MLflow for one task. `log(step, metrics)` once per optimizer step."""

    def __init__(self, folder: Optional[Path] = None, opts: Optional[dict] = None):
        self.folder, self.opts = folder, opts or {}
        self.wandb_run = None
        self.mlflow = None          # (client, run_id)
        self.last_step = None

    @property
    def active(self) -> bool:
        return self.wandb_run is not None or self.mlflow is not None

    def log(self, step: int, metrics: dict) -> None:
        if self.last_step is not None and step <= self.last_step:
            return  # a step is logged once
        self.last_step = step
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(values, step=step)
            except Exception as e:  # a tracker never stops training: metrics.csv has every step anyway
                log.warning("W&B off from step %d on: %s: %s", step, type(e).__name__, e)
                self.wandb_run = None
        if self.mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self.mlflow
            ts = int(time.time() * 1000)
            try:
                client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in values.items()])
            except Exception as e:
                log.warning("MLflow off from step %d on: %s: %s", step, type(e).__name__, e)
                self.mlflow = None

    def summary(self, values: dict) -> None:
        """Final numbers (evaluation metrics): W&B summary, MLflow metrics without a step."""
        flat = {k: float(v) for k, v in _flat(values).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v)}
        if self.wandb_run is not None:
            self.wandb_run.summary.update(flat)
        if self.mlflow is not None and flat:
            client, run_id = self.mlflow
            for k, v in flat.items():
                try:
                    client.log_metric(run_id, k, v)
                except Exception as e:  # an odd key must not end a finished run
                    log.warning("MLflow metric %s not logged: %s", k, e)

    def close(self, status: str = "FINISHED") -> None:
        if self in _OPEN:
            _OPEN.remove(self)
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=0 if status == "FINISHED" else 1)
            self.wandb_run = None
        if self.mlflow is not None:
            client, run_id = self.mlflow
            client.set_terminated(run_id, status=status)
            self.mlflow = None


_OPEN: list[Tracker] = []   # this process's active trackers: training ends, evaluation follows, the task closes them


def finish_task(run_dir: Path, failed: bool = False) -> None:
    """At the end of a task (core.runtime.TaskEntry): the evaluation the workload wrote after training
    (results/metrics.json, and results/untrained/metrics.json as untrained/...) goes into the runs' summary, then
    they are closed. A tracker problem here is a warning: the task's work is done."""
    while _OPEN:
        tracker = _OPEN.pop()
        try:
            if not failed:
                results = Path(run_dir) / "results"
                for path, prefix in ((results / "metrics.json", "eval"), (results / "untrained" / "metrics.json",
                                                                          "untrained")):
                    if path.is_file():
                        tracker.summary({prefix: json.loads(path.read_text())})
            tracker.close("FAILED" if failed else "FINISHED")
        except Exception as e:
            log.warning("closing the trackers: %s: %s", type(e).__name__, e)


def open_tracker(spec, ctx, start_step: int = 0, metrics_csv: Optional[Path] = None) -> Tracker:
    """The task's tracker (rank 0; an inactive one elsewhere or when nothing is on), continuing this task's runs
    from `start_step`: rows of metrics_csv up to it are replayed where the store cannot be reopened."""
    s = settings(spec, ctx.cluster)
    if ctx.rank != 0 or (s["wandb"] == "off" and not s["mlflow"]):
        return Tracker()
    folder = Path(ctx.run_dir) / "tracking" / task_tag(ctx.step, ctx.task_index)
    folder.mkdir(parents=True, exist_ok=True)
    ids = _read_ids(folder)
    prov = provenance(spec, ctx)
    name = spec.name if ctx.task_index is None else f"{spec.name}-{ctx.task_index}"
    tracker = Tracker(folder, s)
    if s["wandb"] != "off":
        try:
            tracker.wandb_run = _open_wandb(folder, ids, s, name, prov, start_step, metrics_csv)
        except Exception as e:
            log.warning("W&B off for this task: %s: %s", type(e).__name__, e)
    if s["mlflow"]:
        try:
            tracker.mlflow = _open_mlflow(folder, ids, s, name, prov, start_step)
        except Exception as e:
            log.warning("MLflow off for this task: %s: %s", type(e).__name__, e)
    _write_ids(folder, ids)
    tracker.last_step = start_step
    if tracker.active:
        if not _OPEN:
            import atexit

            atexit.register(finish_task, ctx.run_dir)   # outside a TaskEntry too, the runs end closed
        _OPEN.append(tracker)
    return tracker


def _read_ids(folder: Path) -> dict:
    try:
        data = json.loads((folder / IDS).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_ids(folder: Path, ids: dict) -> None:
    from core.run_folder import write_json_atomic

    write_json_atomic(folder / IDS, ids)


def csv_rows(metrics_csv: Optional[Path], upto: int) -> list[tuple[int, dict]]:
    """(step, {train/<column>: value}) of metrics.csv up to `upto`, as the engine logs them (seconds left out)."""
    if metrics_csv is None or not Path(metrics_csv).is_file():
        return []
    out = []
    with Path(metrics_csv).open(newline="") as f:
        for r in csv.DictReader(f):
            step = int(r["step"])
            if step <= upto:
                out.append((step, {f"train/{k}": float(v) for k, v in r.items() if k not in ("step", "seconds") and v}))
    return out


def _open_wandb(folder: Path, ids: dict, s: dict, name: str, prov: dict, start_step: int, metrics_csv):
    import wandb

    offline = s["wandb"] == "offline"
    run_id = ids.setdefault("wandb_id", uuid.uuid4().hex[:12])
    for var, sub in (("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_DATA_DIR", "wandb-data")):
        os.environ[var] = str(folder / sub)   # nothing in the user's home from a compute node
    os.environ["WANDB_SILENT"] = "true"
    # WANDB_SERVICE is a token of the W&B service of the process that set it: inherited from the submitter (whose
    # own wandb.init put it in its environment; sbatch exports it), every attempt of the task would join that
    # stranger's service, where a killed attempt's run keeps the id "in use" and the requeued one cannot resume it
    os.environ.pop("WANDB_SERVICE", None)
    kwargs = dict(mode="offline" if offline else "online", x_disable_stats=True, console="off", save_code=False)
    if not offline:
        from core.config import resolve_refs

        kwargs["api_key"] = resolve_refs(s["wandb_key"])  # in memory only
    run = wandb.init(project=s["project"], group=s["group"], name=name, id=run_id, resume="allow",
                     dir=str(folder), config=prov, settings=wandb.Settings(**kwargs))
    if offline:
        # an offline run cannot be reopened: this one is the whole run, so it gets every earlier step again
        for step, values in csv_rows(metrics_csv, start_step):
            run.log(values, step=step)
        current = Path(run.dir).parent.resolve()
        for old in (folder / "wandb").glob(f"offline-run-*-{run_id}"):
            if old.resolve() != current:
                shutil.rmtree(old, ignore_errors=True)
    return run


def _open_mlflow(folder: Path, ids: dict, s: dict, name: str, prov: dict, start_step: int):
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"   # MLflow 3: a file store only when asked for explicitly
    from mlflow.tracking import MlflowClient

    store = folder / "mlruns"
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    job = prov["job"]
    tags = {"medhpc.group": s["group"], "medhpc.profile": str(prov["profile"]), "medhpc.job_id": str(job["job_id"]),
            "medhpc.nodes": ",".join(job["nodes"]), "medhpc.restart": str(job["restart"]),
            "medhpc.git_commit": str(prov["git"].get("commit")), "medhpc.git_dirty": str(prov["git"].get("dirty")),
            **{f"medhpc.version.{k}": v for k, v in prov["packages"].items()}}
    run_id = ids.get("mlflow_run_id")
    if run_id and (store / str(ids.get("mlflow_experiment_id")) / run_id).is_dir():
        truncate_mlflow_metrics(store / str(ids["mlflow_experiment_id"]) / run_id, start_step)
        client.update_run(run_id, status="RUNNING")
    else:
        exp = client.get_experiment_by_name(s["project"])
        exp_id = exp.experiment_id if exp else client.create_experiment(s["project"])
        run_id = client.create_run(exp_id, run_name=name, tags={"mlflow.runName": name}).info.run_id
        ids.update(mlflow_run_id=run_id, mlflow_experiment_id=exp_id)
        from mlflow.entities import Param

        params = [Param(k[:250], str(v)[:6000]) for k, v in _flat(prov["spec"]).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    client.log_dict(run_id, prov, f"provenance/attempt-{job['restart']}-{job['job_id']}.json")
    return client, run_id


def truncate_mlflow_metrics(run_path: Path, upto: int) -> None:
    """Drop the points after step `upto` from a file-store run's metric files (`<ts> <value> <step>` lines)."""
    metrics = Path(run_path) / "metrics"
    for f in metrics.rglob("*") if metrics.is_dir() else []:
        if not f.is_file():
            continue
        lines = f.read_text().splitlines()
        kept = [line for line in lines if _point_step(line) is not None and _point_step(line) <= upto]
        if len(kept) != len(lines):   # atomically: a kill now must not leave a cut-off metric file
            write_text_atomic(f, "".join(line + "\n" for line in kept))


def _point_step(line: str) -> Optional[int]:
    """The step of a file-store metric line (`<ts> <value> <step>`); None for a damaged line (dropped)."""
    parts = line.split()
    return int(parts[2]) if len(parts) >= 3 and parts[2].lstrip("-").isdigit() else None


# ---------------------------------------------------------------- reading the stores back (tests, sync, report)
def wandb_offline_runs(root: Path) -> list[Path]:
    """Every W&B offline run folder under `root` (a run folder, a study folder, logs/)."""
    return sorted(p for p in Path(root).rglob("offline-run-*") if p.is_dir() and list(p.glob("run-*.wandb")))


def read_wandb_offline(run_folder: Path) -> dict:
    """An offline run's id, project, group and history ({step: {key: value}}, in logged order as a list of
    (step, values)), read from its run-<id>.wandb file (W&B's record log: 32 KiB blocks of records with a 7-byte
    header, checksum / length / type, as in LevelDB's log format; each record a wandb_internal_pb2.Record)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    path = next(Path(run_folder).glob("run-*.wandb"))
    data = path.read_bytes()
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7   # zero padding up to the block's end
            continue
        chunk = data[pos:pos + length]
        pos += length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    out: dict = {"history": [], "config": {}, "summary": {}}
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        which = rec.WhichOneof("record_type")
        if which == "run":
            out.update(id=rec.run.run_id, project=rec.run.project, group=rec.run.run_group,
                       name=rec.run.display_name)
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif which == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif which == "summary":
            out["summary"].update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                   for i in rec.summary.update})
        elif which == "history":
            values = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            out["history"].append((int(rec.history.step.num), {k: v for k, v in values.items()
                                                                if not k.startswith("_")}))
    return out


def mlflow_runs(store: Path) -> list[dict]:
    """Every run of an MLflow file store: id, name, tags, params, and each metric's history [(step, value)]."""
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=Path(store).resolve().as_uri())
    out = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            rid = run.info.run_id
            out.append({"id": rid, "name": run.info.run_name, "experiment": exp.name, "status": run.info.status,
                        "tags": dict(run.data.tags), "params": dict(run.data.params),
                        "metrics": {k: [(m.step, m.value) for m in client.get_metric_history(rid, k)]
                                    for k in run.data.metrics}})
    return out


# ---------------------------------------------------------------- a study's store, merged once by its table step
def task_stores(run_dir: Path) -> list[Path]:
    """The MLflow file stores the tasks of a run left (tracking/<task>/mlruns)."""
    base = Path(run_dir) / "tracking"
    return sorted(p for p in base.glob("*/mlruns") if p.is_dir()) if base.is_dir() else []


def merge_study(study_dir: Path, table_csv: Optional[Path] = None, name: str = "") -> Optional[Path]:
    """<study>/mlruns: one parent run for the study, one child run per task run of its steps (their params, tags
    and every metric point copied from the tasks' own stores; a step without one gets a child naming its run
    folder), and the final table on the parent (study_table.csv as an artifact, each numeric cell as the metric
    `ratio_<r>/<column>`). Built afresh each time the table step runs, by that one task only, so no two jobs
    ever write one store. None when no step kept an MLflow store."""
    study_dir = Path(study_dir)
    try:
        steps = json.loads((study_dir / "study.json").read_text()).get("steps") or {}
    except (OSError, ValueError):
        return None
    sources = {step: task_stores(Path(s["run_dir"])) for step, s in steps.items() if s.get("run_dir")}
    if not any(sources.values()):
        return None
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    store = study_dir / "mlruns"
    shutil.rmtree(store, ignore_errors=True)
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    study = name or study_dir.parent.name
    exp_id = client.create_experiment(study)
    parent = client.create_run(exp_id, run_name=study, tags={"mlflow.runName": study, "medhpc.study": str(study_dir)})
    pid = parent.info.run_id
    for step, stores in sources.items():
        run_dir = steps[step]["run_dir"]
        children = [r for s in stores for r in mlflow_runs(s)] or [{"name": f"{step}", "params": {}, "tags": {},
                                                                   "metrics": {}, "status": "FINISHED"}]
        for src in children:
            tags = {k: v for k, v in src["tags"].items() if not k.startswith("mlflow.")}
            tags.update({"mlflow.parentRunId": pid, "mlflow.runName": f"{step}: {src['name']}",
                         "medhpc.study_step": step, "medhpc.run_dir": run_dir,
                         "medhpc.job_ids": " ".join(steps[step].get("job_ids") or [])})
            child = client.create_run(exp_id, run_name=tags["mlflow.runName"], tags=tags).info.run_id
            params = [Param(k, v) for k, v in src["params"].items()]
            for i in range(0, len(params), 100):
                client.log_batch(child, params=params[i:i + 100])
            points = [Metric(k, v, 0, s) for k, hist in src["metrics"].items() for s, v in hist]
            for i in range(0, len(points), 900):
                client.log_batch(child, metrics=points[i:i + 900])
            client.set_terminated(child, status=src.get("status") or "FINISHED")
    if table_csv is not None and Path(table_csv).is_file():
        client.log_artifact(pid, str(table_csv))
        with Path(table_csv).open(newline="") as f:
            rows = list(csv.DictReader(f))
        points = []
        for r in rows:
            for col, text in r.items():
                if col in ("ratio", "removed") or not text:
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue
                points.append(Metric(f"ratio_{r.get('ratio', '')}/{col}", value, 0, 0))
        for i in range(0, len(points), 900):
            client.log_batch(pid, metrics=points[i:i + 900])
    client.set_terminated(pid)
    return store
