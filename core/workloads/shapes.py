"""Torch-free planners for workloads that make their own steps and array items.

The plan asks these before anything is submitted, so they only read small files (config.json, prompt files,
result folders) and raise `FieldError` naming the spec field when something is wrong.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core.model_sizes import model_config
from core.spec import FieldError


@dataclass
class Shape:
    items: Optional[list[Any]]          # array items (None: a single task)
    items_per_task: int = 1
    pre: Optional[str] = None           # entry of a step that must succeed before the array (afterok)
    merge: bool = True                  # a merge step after the array (afterok)
    notes: list[str] = field(default_factory=list)


def text_lines(path: Optional[str], field_name: str) -> list[str]:
    if not path:
        raise FieldError(field_name, "give a text file (one prompt or sentence per line)")
    p = Path(path)
    if not p.is_file():
        raise FieldError(field_name, f"file {p} not found")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise FieldError(field_name, f"file {p} has no non-empty line")
    return lines


def n_layers(spec) -> int:
    cfg = model_config(spec.model.path, spec.model.preset)
    if cfg is None:
        if spec.model.make_tiny:
            from core.models.pangu import TINY_LAYERS

            return TINY_LAYERS
        raise FieldError("model.path", f"no config.json in {spec.model.path!r}; give a local model folder "
                                       f"(or model.preset)")
    return int(cfg["num_hidden_layers"])


def layer_results_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "layers"


def done_layers(run_dir: Path) -> set[int]:
    folder = layer_results_dir(run_dir)
    return {json.loads(p.read_text())["layer"] for p in folder.glob("layer_*.json")} if folder.is_dir() else set()


def sensitivity(spec, resume_dir: Optional[Path] = None) -> Shape:
    scan = spec.scan
    text_lines(scan.prompts, "scan.prompts")
    total = n_layers(spec)
    layers = scan.layers if scan.layers is not None else list(range(total))
    bad = [layer for layer in layers if not 0 <= layer < total]
    if bad:
        raise FieldError("scan.layers", f"layer indices {bad} are out of range: the model has {total} layers "
                                        f"(0..{total - 1})")
    if scan.metric in ("bi", "angular"):  # one pass gives every layer: a single task, then the merge
        return Shape(items=None, pre=None, notes=[f"{scan.metric}: one forward pass scores all {len(layers)} layers"])
    if resume_dir is not None:
        done = done_layers(resume_dir)
        missing = [layer for layer in layers if layer not in done]
        if not missing:
            raise FieldError("--resume-missing", f"every layer already has a result in {resume_dir}")
        return Shape(items=missing, items_per_task=scan.layers_per_task, pre=None,
                     notes=[f"resubmitting only the {len(missing)} missing layers: {missing}"])
    return Shape(items=layers, items_per_task=scan.layers_per_task, pre="baseline")


def prune(spec, resume_dir: Optional[Path] = None) -> Shape:
    pr = spec.prune
    text_lines(pr.heldout, "prune.heldout")
    if pr.dia_run and not (Path(pr.dia_run) / "run.json").is_file():
        raise FieldError("prune.dia_run", f"{pr.dia_run} is not a run folder (no run.json); give logs/<name>/<id> of a "
                                          f"finished Dia-Pangu run")
    total = n_layers(spec)
    if pr.layers is not None:
        bad = [layer for layer in pr.layers if not 0 <= layer < total]
        if bad or len(set(pr.layers)) >= total:
            raise FieldError("prune.layers", f"cannot remove {pr.layers} from a {total}-layer model "
                                             f"(indices 0..{total - 1}, at least one layer must stay)")
        return Shape(items=[0.0, "layers"], pre=None)
    if not pr.sensitivity_csv or not Path(pr.sensitivity_csv).is_file():
        raise FieldError("prune.sensitivity_csv", f"sensitivity CSV {pr.sensitivity_csv!r} not found; run a scan "
                                                  f"first (jobs/pangu_sensitivity.yaml) or give prune.layers")
    too_many = [r for r in pr.ratios if round(r * total) >= total]
    if too_many:
        raise FieldError("prune.ratios", f"ratios {too_many} would remove every layer of a {total}-layer model")
    return Shape(items=[0.0] + list(pr.ratios), pre=None)


def dia_pangu(spec, resume_dir: Optional[Path] = None) -> Optional[Shape]:
    """A single (multi-node) training + evaluation job; the dataset is checked here, before anything is submitted."""
    if resume_dir is not None:
        raise FieldError("--resume-missing", "dia_pangu has no per-item results; use --resume")
    d = spec.data
    for name in ("path", "annotation", "labels_csv"):
        if not getattr(d, name):
            raise FieldError(f"data.{name}", "required for the CTRG dataset (volumes folder, annotation.json, labels CSV)")
    if not d.make_synthetic:
        from core.data.ctrg import DatasetError, check_dataset

        splits = ("train", spec.dia.eval_split) if spec.dia.evaluate else ("train",)
        try:
            check_dataset(d.path, d.annotation, d.labels_csv, splits=splits)
        except DatasetError as e:
            raise FieldError("data", str(e)) from None
    return None
