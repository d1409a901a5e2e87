"""A static page per run and per study: `report.html`, one self-contained file (inline CSS, plots as inline PNG),
that opens from a cluster's file browser without a server.

A run's page (`write_run_report(run_dir)`, written by rank 0 when a step that is not an array task ends, so the
last step of a run leaves the complete page): what was submitted (spec name, workload, profile, git commit,
package versions, the plan), each task (step, rank, node, job id, seconds, failure cause when its log printed
one), the loss curve and the training summary from metrics.csv, every metrics*.json under results/ as a table
(untrained beside trained where the workload scored both), a study table the run wrote, and its PNG plots.

A study's page (`write_study_report(study_dir, table_csv)`, written by the study's table step): its steps with
their job ids, each step's state as the scheduler reports it (its jobs' states from the scheduler's accounting
and queue, the record's on the local executor) and the failure classes its tasks printed (core.failure_mark), their run pages, the final table cell for cell as study_table.csv has it, and one plot per metric
against the pruning ratio.

Values in tables are the files' own text (no rounding), so a reader can compare them with the CSV / JSON.
`python -m core.report FOLDER` writes the page of a run or a study folder again.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

from core.run_folder import record_if_any, task_records, write_text_atomic

NAME = "report.html"
MAX_PNG_BYTES = 2 * 1024 * 1024
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;
color:#1d2330;line-height:1.4}
h1{font-size:1.5em;margin-bottom:0}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #d5d9e0}
.sub{color:#5b6474;margin-top:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #d5d9e0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f8fb;border:1px solid #d5d9e0;padding:8px;overflow-x:auto;font-size:12px}
.wide{overflow-x:auto}img{max-width:100%;border:1px solid #d5d9e0;margin:6px 0}.bad{color:#a4161a;font-weight:600}
"""


# ---------------------------------------------------------------- small HTML pieces
def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def table(columns: list[str], rows: Iterable[Iterable[Any]], table_id: str = "") -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f'<td class="num">{esc(v)}</td>' if _is_number(v) else f"<td>{esc(v)}</td>"
                                    for v in row) + "</tr>" for row in rows)
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return f"<div class=\"wide\"><table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def png_tag(data: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def page(title: str, subtitle: str, sections: list[tuple[str, str]]) -> str:
    parts = [f"<h2>{esc(h)}</h2>\n{body}" for h, body in sections if body]
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><p class=\"sub\">{esc(subtitle)}</p>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _csv(path: Path) -> tuple[list[str], list[dict]]:
    with Path(path).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _flat(data: Any, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out: dict = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, list) and len(data) > 20:
        return {prefix: f"[{len(data)} values]"}
    return {prefix: data if not isinstance(data, (list, dict)) else json.dumps(data)}


# ---------------------------------------------------------------- a run's page
def loss_plot(metrics_csv: Path) -> Optional[bytes]:
    """The loss curve (and its parts) of metrics.csv as PNG bytes."""
    if not metrics_csv.is_file():
        return None
    _, rows = _csv(metrics_csv)
    if not rows:
        return None
    from core.plotting import loss_figure, pyplot

    fig = loss_figure(rows, "loss", size=(7, 3.4))
    data = _figure_png(fig)
    pyplot().close(fig)
    return data


def _training_section(run_dir: Path) -> str:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return ""
    _, rows = _csv(path)
    if not rows:
        return ""
    best = min(rows, key=lambda r: float(r["loss"]))
    summary = table(["", "step", "loss"], [["first", rows[0]["step"], rows[0]["loss"]],
                                           ["final", rows[-1]["step"], rows[-1]["loss"]],
                                           ["lowest", best["step"], best["loss"]]], "training")
    drawn = run_dir / "results" / "loss.png"   # the engine's own plot of the same rows, when it is there
    plot = drawn.read_bytes() if drawn.is_file() and drawn.stat().st_size <= MAX_PNG_BYTES else loss_plot(path)
    return summary + (png_tag(plot, "loss curve") if plot else "")


def _metrics_section(run_dir: Path) -> str:
    results = run_dir / "results"
    files = sorted(results.rglob("metrics*.json")) if results.is_dir() else []
    out = []
    trained = results / "metrics.json"
    untrained = results / "untrained" / "metrics.json"
    if trained.is_file() and untrained.is_file():  # the workload scored the model before and after training
        a, b = _flat(json.loads(untrained.read_text())), _flat(json.loads(trained.read_text()))
        keys = [k for k in b if k in a] + [k for k in b if k not in a]
        out.append(f"<p>{esc(trained.relative_to(run_dir))} beside {esc(untrained.relative_to(run_dir))}</p>"
                   + table(["metric", "untrained", "trained"], [[k, a.get(k, ""), b[k]] for k in keys],
                           "metrics-untrained-trained"))
        files = [f for f in files if f not in (trained, untrained)]
    for f in files:
        try:
            data = _flat(json.loads(f.read_text()))
        except ValueError:
            continue
        name = str(f.relative_to(run_dir))
        out.append(f"<p>{esc(name)}</p>" + table(["metric", "value"], data.items(), "metrics-" + name))
    return "\n".join(out)


def _tasks_section(run_dir: Path, record: dict) -> str:
    steps = [s.get("name") for s in record.get("steps", [])] or ["main"]
    rows = []
    for step in dict.fromkeys(steps + sorted({p.name.split(".")[0].split("-")[0]
                                             for p in (run_dir / "tasks").glob("*.json")} if (run_dir / "tasks").is_dir()
                                            else [])):
        for t in task_records(run_dir, step):
            rows.append([t.get("step"), "" if t.get("task_index") is None else t["task_index"], t.get("rank"),
                         t.get("host"), t.get("job_id"), t.get("seconds"), "done"])
    failures = [[log, klass, cause] for log, (klass, cause) in _log_marks(run_dir)]
    text = table(["step", "task", "rank", "node", "job", "seconds", "state"], rows, "tasks") if rows else \
        "<p>no task has finished yet</p>"
    if failures:
        text += '<p class="bad">failure causes the tasks printed</p>' + table(["log", "class", "cause"], failures,
                                                                                "failures")
    return text


def run_report(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    rec = record_if_any(run_dir) or {}
    title = f"{rec.get('name') or run_dir.parent.name} / {run_dir.name}"
    sub = f"workload {rec.get('workload', '?')}, profile {rec.get('profile') or rec.get('cluster', {}).get('name', '?')}"
    git = rec.get("git") or {}
    prov = [["run folder", str(run_dir)], ["spec file", rec.get("spec_file", "")],
            ["git commit", f"{git.get('commit')}" + (" (dirty)" if git.get("dirty") else "")],
            ["submitted", rec.get("submitted_at", "")],
            ["jobs", " ".join(j for s in rec.get("steps", []) for j in s.get("job_ids") or [])],
            *[[f"version {k}", v] for k, v in (rec.get("packages") or {}).items()]]
    for ids_file in sorted((run_dir / "tracking").glob("*/ids.json")) if (run_dir / "tracking").is_dir() else []:
        try:
            ids = json.loads(ids_file.read_text())
        except ValueError:
            continue
        where = ids_file.parent.relative_to(run_dir)
        if ids.get("wandb_id"):
            prov.append([f"W&B run ({where.name})", f"{ids['wandb_id']} in {where}/wandb (python launchers/sync.py "
                                                      f"{run_dir})"])
        if ids.get("mlflow_run_id"):
            prov.append([f"MLflow run ({where.name})", f"{ids['mlflow_run_id']} in {where}/mlruns"])
    if rec.get("study"):
        prov.append(["study", f"{rec.get('study_name', '')} step {rec.get('study_step', '')}: {rec['study']}"])
    sections = [("Run", table(["", ""], prov, "provenance")),
                ("Plan", f"<pre>{esc(rec.get('plan', 'no run record yet (local runs write it when they end)'))}</pre>"),
                ("Tasks", _tasks_section(run_dir, rec)),
                ("Training", _training_section(run_dir)),
                ("Metrics", _metrics_section(run_dir))]
    table_csv = run_dir / "study_table.csv"
    if table_csv.is_file():
        cols, rows = _csv(table_csv)
        sections.append(("Study table", table(cols, [[r[c] for c in cols] for r in rows], "study-table")))
    pngs = [p for p in sorted((run_dir / "results").rglob("*.png")) if p.stat().st_size <= MAX_PNG_BYTES][:12] \
        if (run_dir / "results").is_dir() else []
    sections.append(("Plots", "".join(f"<p>{esc(p.relative_to(run_dir))}</p>" + png_tag(p.read_bytes(), p.name)
                                      for p in pngs if p.name != "loss.png")))
    return page(title, sub, sections)


def write_run_report(run_dir: Path) -> Path:
    return write_text_atomic(Path(run_dir) / NAME, run_report(run_dir))


# ---------------------------------------------------------------- a study's page
def study_plots(columns: list[str], rows: list[dict]) -> Optional[bytes]:
    """Each numeric metric of the table against the ratio (small multiples, one PNG)."""
    skip = {"ratio", "layers", "removed"}
    metrics = [c for c in columns if c not in skip and rows and all(_is_number(r[c]) for r in rows)]
    if not metrics or "ratio" not in columns:
        return None
    from core.plotting import pyplot

    plt = pyplot()
    n = len(metrics)
    cols = min(3, n)
    lines = -(-n // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4 * cols, 2.8 * lines), squeeze=False)
    x = [float(r["ratio"]) for r in rows]
    for ax, m in zip(axes.flat, metrics):
        ax.plot(x, [float(r[m]) for r in rows], marker="o")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("pruning ratio", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    data = _figure_png(fig)
    plt.close(fig)
    return data


def _log_marks(run_dir: Path) -> list[tuple[str, tuple[str, str]]]:
    """(log name, (class, cause)) of each of a run's task logs (the first 200) whose tail carries a failure mark
    (core.failure_mark)."""
    from core.failure_mark import find_in_file

    sub = Path(run_dir) / "submitit"
    found = []
    for log in sorted(sub.glob("*_log.err"))[:200] if sub.is_dir() else []:
        hit = find_in_file(log)
        if hit:
            found.append((log.name, hit))
    return found


def step_failures(run_dir: Path) -> list[tuple[str, str]]:
    """(class, cause) of each failure a step's tasks printed, each once (core.failure_mark lines in its logs)."""
    return list(dict.fromkeys(hit for _, hit in _log_marks(run_dir)))


def _step_states(rec: dict) -> tuple[dict, str]:
    """Per step, the scheduler's word on its jobs: {'state': 'COMPLETED' / 'FAILED (12_1)' / 'RUNNING x2, ...',
    'detail': the tasks' states}. One states() call of the study's scheduler over every job (its accounting and
    queue); a scheduler without a queue (local) keeps the record's state. Never fails the page."""
    from core import scheduler

    steps = rec.get("steps") or {}
    try:
        sched = scheduler.by_name(str(rec.get("executor")))
        if not sched.has_queue:
            return {}, ""
        ids = sorted({j for s in steps.values() for j in s.get("job_ids") or []})
        states, _ = sched.states(ids) if ids else ({}, True)
    except Exception as e:  # the page is drawn without the scheduler's word
        return {}, f"scheduler states not available ({type(e).__name__}: {e}); the record's states shown"
    out = {}
    for name, s in steps.items():
        mine = {t: st for t, st in states.items() if t.split("_")[0] in (s.get("job_ids") or [])}
        if not mine:
            continue
        counts: dict[str, list[str]] = {}
        for t, st in sorted(mine.items()):
            counts.setdefault(st.split()[0], []).append(t)
        bad = [f"{st} ({' '.join(ts[:5])})" for st, ts in counts.items() if scheduler.category(st) == "failed"]
        out[name] = {"state": ", ".join(bad) or ", ".join(f"{st} x{len(ts)}" if len(ts) > 1 else st
                                                          for st, ts in counts.items()),
                     "detail": " ".join(f"{t} {st}" for t, st in sorted(mine.items()))[:300]}
    return out, ""


def study_report(study_dir: Path, table_csv: Optional[Path] = None, title: str = "") -> str:
    import time

    study_dir = Path(study_dir)
    try:
        rec = json.loads((study_dir / "study.json").read_text())
    except (OSError, ValueError):
        rec = {}
    steps = rec.get("steps") or {}
    states, note = _step_states(rec) if steps else ({}, "")
    step_rows = []
    for name, s in steps.items():
        run_dir = Path(s.get("run_dir") or "")
        done = bool(s.get("run_dir")) and bool(task_records(run_dir, "main") or task_records(run_dir, "merge"))
        link = f"{s.get('run_dir')}/{NAME}" if s.get("run_dir") else ""
        st = states.get(name) or {"state": s.get("state") or "not run", "detail": s.get("detail", "")}
        failures = step_failures(run_dir) if s.get("run_dir") else []
        step_rows.append([name, " ".join(s.get("job_ids") or []), " ".join(s.get("dependency") or []),
                          st["state"], st.get("detail", ""), " ".join(k for k, _ in failures),
                          "; ".join(f"{k}: {c}" for k, c in failures),
                          "written" if done else "none yet", link])
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    sections = [("Steps", f"<p>states when this page was written ({esc(when)}; the step that writes it, the table, "
                          f"is still running then){esc(' ' + note) if note else ''}</p>"
                 + table(["step", "jobs", "waited for", "state", "detail", "failure class", "failure cause",
                          "results", "run page"], step_rows, "steps"))]
    if table_csv is not None and Path(table_csv).is_file():
        cols, rows = _csv(Path(table_csv))
        sections.append(("Final table", f"<p>{esc(table_csv)}</p>"
                         + table(cols, [[r[c] for c in cols] for r in rows], "study-table")))
        plot = study_plots(cols, rows)
        if plot:
            sections.append(("Metrics against the pruning ratio", png_tag(plot, "study metrics")))
    name = title or rec.get("study") or study_dir.parent.name
    return page(name, f"study folder {study_dir}", sections)


def write_study_report(study_dir: Path, table_csv: Optional[Path] = None, title: str = "") -> Path:
    return write_text_atomic(Path(study_dir) / NAME, study_report(study_dir, table_csv, title))


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m core.report RUN_OR_STUDY_FOLDER", file=sys.stderr)
        return 2
    folder = Path(args[0])
    if (folder / "study.json").is_file():
        rec = json.loads((folder / "study.json").read_text())
        table_dir = (rec.get("steps") or {}).get("table", {}).get("run_dir")
        out = write_study_report(folder, Path(table_dir) / "study_table.csv" if table_dir else None)
    elif (folder / "run.json").is_file():
        out = write_run_report(folder)
    else:
        print(f"error: {folder}: neither a run folder (run.json) nor a study folder (study.json)", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
