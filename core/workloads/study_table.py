"""The pruning study's final table: one row per pruning ratio, joining the layer scan (sensitivity.csv) with the
post-pruning evaluation (pruning_eval.csv: LM perplexity and log-prob distance, and the Dia-Pangu report metrics
when the prune step evaluated them).

One small single-CPU task, no torch: `study_table.csv` (exact values) and `study_table.md` (a readable table, the
same the study prints when it finishes) in its run folder. In a study (core.study) both inputs are written by
earlier steps: `${step:scan}/sensitivity.csv`, `${step:prune}/pruning_eval.csv`.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

from pydantic import Field

from core.run_folder import promised_by, record_if_any, write_text_atomic
from core.runtime import TaskContext
from core.config import JobSpec, Strict
from core.workloads import Shape, Workload

log = logging.getLogger("study_table")

CSV_NAME = "study_table.csv"
MD_NAME = "study_table.md"


class TableSection(Strict):
    sensitivity_csv: str = Field(description="a scan's sensitivity.csv (layer, mean, std, rank, metric)")
    pruning_csv: str = Field(description="a prune run's pruning_eval.csv (ratio, layers, removed, perplexity, ...)")
    title: str = Field("Pangu pruning study", max_length=200)


def plan(spec: JobSpec, resume_dir=None) -> Shape:
    """One task; the two CSVs must exist, or be promised by an earlier step of the same study."""
    t = spec.table
    problems, notes = [], []
    for key in ("sensitivity_csv", "pruning_csv"):
        value = getattr(t, key)
        step = promised_by(value)
        if step:
            notes.append(f"table.{key}: {value} (written by study step {step}, submitted before this one)")
        elif not Path(value).is_file():
            problems.append((f"table.{key}", f"{value} not found; run the scan and the prune jobs first, or submit "
                                             f"the whole study (jobs/pangu_pruning_study.yaml)"))
    return Shape(items=None, merge=False, notes=notes, problems=problems)


def _rows(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def build(sensitivity_csv: str, pruning_csv: str) -> tuple[list[str], list[dict], dict]:
    """(columns, rows, scan summary): per ratio the layers left and removed, the scan's scores of the removed
    layers (sum and max of their mean), then every metric of pruning_eval.csv but its folder. Values are the
    CSVs' own text, so nothing is rounded."""
    scan = _rows(sensitivity_csv)
    score = {int(r["layer"]): float(r["mean"]) for r in scan}
    prune = _rows(pruning_csv)
    metrics = [c for c in (prune[0].keys() if prune else []) if c not in ("ratio", "layers", "removed", "folder")]
    columns = ["ratio", "layers", "removed", "removed_score_sum", "removed_score_max", *metrics]
    rows = []
    for r in prune:
        removed = [int(x) for x in (r.get("removed") or "").split()]
        rows.append({"ratio": r["ratio"], "layers": r["layers"], "removed": " ".join(map(str, removed)),
                     "removed_score_sum": repr(sum(score[x] for x in removed)) if removed else "0.0",
                     "removed_score_max": repr(max(score[x] for x in removed)) if removed else "0.0",
                     **{m: r[m] for m in metrics}})
    order = sorted(score, key=lambda layer: score[layer])
    summary = {"metric": scan[0]["metric"] if scan else "", "layers": len(scan), "least_sensitive": order[:5],
               "most_sensitive": order[-3:][::-1]}
    return columns, rows, summary


def markdown(title: str, columns: list[str], rows: list[dict], summary: dict) -> str:
    def cell(v: str) -> str:
        try:
            f = float(v)
        except ValueError:
            return v
        return v if float(f).is_integer() and "." not in v else f"{f:.4f}"

    lines = [f"# {title}", "",
             f"Layer scan: {summary['layers']} layers by {summary['metric']}; least sensitive first: "
             f"{summary['least_sensitive']}; most sensitive: {summary['most_sensitive']}", "",
             "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(run_dir: Path, spec: JobSpec) -> dict:
    t = spec.table
    columns, rows, summary = build(t.sensitivity_csv, t.pruning_csv)
    lines = [",".join(columns)] + [",".join(_csv_cell(r[c]) for c in columns) for r in rows]
    out_csv = write_text_atomic(Path(run_dir) / CSV_NAME, "\n".join(lines) + "\n")
    out_md = write_text_atomic(Path(run_dir) / MD_NAME, markdown(t.title, columns, rows, summary))
    return {"csv": str(out_csv), "markdown": str(out_md), "rows": len(rows)}


def _csv_cell(v: str) -> str:
    return f'"{v}"' if any(ch in v for ch in ',"') else v


def run(spec: JobSpec, ctx: TaskContext) -> dict:
    out = write(ctx.run_dir, spec)
    log.info("study table with %d rows -> %s", out["rows"], out["csv"])
    study = (record_if_any(ctx.run_dir) or {}).get("study")
    if study and Path(study).is_dir():  # the study's page beside study.json (core.report)
        from core.report import write_study_report

        out["report"] = str(write_study_report(Path(study), Path(out["csv"]), spec.table.title))
        log.info("study page -> %s", out["report"])
        from core.tracking import merge_study

        store = merge_study(Path(study), Path(out["csv"]), (record_if_any(ctx.run_dir) or {}).get("study_name", ""))
        if store is not None:
            out["mlflow"] = str(store)
            log.info("the steps' MLflow runs merged under one parent -> %s", store)
    return out


WORKLOAD = Workload(run=run, section="table", Section=TableSection, plan=plan, resumable=True, device=False)
