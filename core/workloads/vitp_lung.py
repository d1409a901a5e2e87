"""ViTP-style lung-disease classification from CT slices with patient-level labels (4 classes: 0 normal, 1 bacterial,
2 viral, 3 pneumocystis pneumonia), on the engine (DeepSpeed ZeRO, checkpoints, exact resume, requeue).

- Data (core.data.lung_ct): a folder of slices per patient + `patient_id,label` CSV, or the lab's ViTP meta json +
  `<cls>` conversation jsonl; checked by the planner before anything is submitted. Patient-level split (70/15/15,
  seeded, stratified by class) written to `data/split.csv` in the run folder; K slices per patient, one per
  stratum of the series (random within its stratum each epoch in training, the stratum's middle in evaluation).
- Model (core.models.classifier): a timm backbone or a transformers image classifier with a C-class head, weights
  from a local file or folder.
- Training: slice-level cross-entropy (optional class weights) with the engine's Trainer; the k-th sample a run
  consumes is a function of k only (engine.sample_index), so a resumed run sees the same batches.
- Evaluation: every rank scores its share of the eval split's patients, rank 0 gathers them; slice-level and
  patient-level (mean of the K slices' probabilities, argmax) accuracy, macro-F1, per-class recall, macro
  one-vs-rest AUC (scikit-learn) and confusion matrices in `results/`.
"""
from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, PositiveInt, field_validator

from core.data.lung_ct import CLASS_NAMES, LUNG_WINDOW, Scan
from core.errors import DatasetError
from core.metrics.classification import classification_metrics
from core.results import ResultFolder
from core.run_folder import write_json_atomic, write_text_atomic
from core.runtime import TaskContext
from core.config import DataSpec, DeepSpeedSpec, FieldError, JobSpec, Strict
from core.workloads import Shape, Workload
from core.workloads.common import rank0_index

log = logging.getLogger("vitp_lung")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VitpSection(Strict):
    backbone: Literal["timm", "transformers"] = Field(
        "timm", description="timm: timm.create_model(vitp.arch); transformers: AutoModelForImageClassification "
                            "from the local folder model.path")
    arch: str = Field("vit_base_patch16_224", description="timm model name (backbone timm)")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict, description="further timm.create_model arguments "
                                        "(img_size, patch_size, depth, embed_dim, ...)")
    classes: list[str] = Field(default_factory=lambda: list(CLASS_NAMES), min_length=2,
                               description="class names: label i (ViTP answer 'i') is classes[i]")
    class_weights: Union[Literal["balanced"], list[float], None] = Field(
        None, description="cross-entropy class weights: a list (one per class) or 'balanced' (by training patients)")
    evaluate: bool = True
    eval_split: Literal["val", "test"] = "test"

    @field_validator("class_weights")
    @classmethod
    def _weights(cls, v):
        if isinstance(v, list) and any(not math.isfinite(w) or w < 0 for w in v):
            raise ValueError("class weights must be finite and >= 0")
        return v


class LungData(DataSpec):
    path: Optional[str] = Field(None, description="folders format: the folder holding one folder of slices per patient")
    format: Literal["folders", "vitp"] = Field("folders", description="folders: data.path + data.labels_csv; "
                                                                      "vitp: data.meta")
    labels_csv: Optional[str] = Field(None, description="folders format: CSV with patient_id,label")
    meta: Optional[str] = Field(None, description="vitp format: meta json {name: {root, annotation}}")
    slices_per_patient: PositiveInt = Field(16, description="K: slices per patient, one per stratum of the series")
    image_size: PositiveInt = 224
    split: tuple[float, float, float] = Field((0.7, 0.15, 0.15), description="train / val / test fractions of "
                                                                             "each class's patients")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dicom_window: tuple[float, float] = Field(LUNG_WINDOW, description="DICOM window (center, width) in HU")
    verify_images: bool = Field(True, description="decode-check every slice before submitting (and in the job)")
    max_unreadable: float = Field(0.02, ge=0, le=1, description="fraction of all slices that may be unreadable "
                                                               "(skipped); more is refused")

    @field_validator("split")
    @classmethod
    def _split(cls, v):
        if any(f < 0 for f in v) or abs(sum(v) - 1) > 1e-6 or v[0] <= 0:
            raise ValueError(f"train / val / test fractions must be >= 0, train > 0, and add up to 1 (got {list(v)})")
        return v

    @field_validator("std")
    @classmethod
    def _std(cls, v):
        if any(s <= 0 for s in v):
            raise ValueError("std must be > 0 per channel")
        return v


# ---------------------------------------------------------------- planning (torch-free)
def synthetic_root(d) -> Path:
    return Path(d.meta).parent if d.format == "vitp" else Path(d.path).parent


def _check_model_path(spec: JobSpec) -> None:
    from core.models.checkpoint_files import find_config

    v, m, d = spec.vitp, spec.model, spec.data
    if v.backbone == "transformers":
        cfg = find_config(m.path)
        if cfg is None:
            raise FieldError("model.path", f"{m.path!r}: vitp.backbone transformers needs a local model folder with "
                                           f"config.json (and its weights)")
        size = cfg.get("image_size")
        size = size[0] if isinstance(size, list) else size
        if size and size != d.image_size:
            raise FieldError("data.image_size", f"{d.image_size} but {m.path}/config.json has image_size {size}; "
                                                f"set data.image_size: {size}")
        return
    size = v.arch_kwargs.get("img_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    if size is not None and size != d.image_size:
        raise FieldError("data.image_size", f"{d.image_size} but vitp.arch_kwargs.img_size is {size}; make them equal")
    if m.path:
        p = Path(m.path)
        if not p.exists():
            raise FieldError("model.path", f"{p}: weights file or folder not found (a .safetensors / .pth file, or a "
                                           f"timm Hugging Face folder)")
        if p.is_dir():
            from core.models.classifier import WEIGHT_FILES

            if not any((p / n).is_file() for n in WEIGHT_FILES):
                raise FieldError("model.path", f"{p}: no weights file in the folder (looked for "
                                               f"{', '.join(WEIGHT_FILES)})")
            arch = (find_config(p) or {}).get("architecture")
            if arch and arch.split(".")[0] != v.arch.split(".")[0]:
                raise FieldError("vitp.arch", f"{v.arch} but {p / 'config.json'} is a {arch} checkpoint; set "
                                              f"vitp.arch: {arch}")


def check_spec(spec: JobSpec) -> None:
    """Everything about the spec that needs no dataset: FieldError naming the field."""
    v, d = spec.vitp, spec.data
    if isinstance(v.class_weights, list) and len(v.class_weights) != len(v.classes):
        raise FieldError("vitp.class_weights", f"{len(v.class_weights)} weights for {len(v.classes)} classes "
                                               f"({', '.join(v.classes)})")
    need = ("path", "labels_csv") if d.format == "folders" else ("meta",)
    for name in need:
        if not getattr(d, name):
            what = {"path": "the folder of patient folders", "labels_csv": "the patient_id,label CSV",
                    "meta": "the ViTP meta json"}[name]
            raise FieldError(f"data.{name}", f"required for data.format {d.format}: {what}")
    if d.make_synthetic:
        root = synthetic_root(d)
        expected = {"labels_csv": root / "labels.csv", "path": root / "slices"} if d.format == "folders" else \
            {"meta": root / "vitp_meta.json"}
        for name, path in expected.items():
            if Path(getattr(d, name)) != path:
                raise FieldError(f"data.{name}", f"data.make_synthetic writes {path}; point data.{name} there")
        if len(v.classes) != len(CLASS_NAMES):
            raise FieldError("vitp.classes", f"the synthetic dataset has the {len(CLASS_NAMES)} classes "
                                             f"{', '.join(CLASS_NAMES)}")
    _check_model_path(spec)


def read_dataset(spec: JobSpec) -> tuple[Scan, dict]:
    """Scan + patient split of the spec's dataset; DatasetError -> FieldError naming the field and the file."""
    from core.data.lung_ct import scan, split_patients

    d, v = spec.data, spec.vitp
    try:
        found = scan(d, len(v.classes))
    except DatasetError as e:
        raise FieldError(e.field, e.message) from None
    splits = split_patients(found.patients, d.split, d.seed)
    if not splits["train"]:
        raise FieldError("data.split", f"no patient left for training out of {len(found.patients)}")
    if v.evaluate and not splits[v.eval_split]:
        raise FieldError("data.split", f"the {v.eval_split} split is empty ({len(found.patients)} patients, fractions "
                                       f"{list(d.split)}); give it a larger fraction or set vitp.evaluate: false")
    return found, splits


def describe(spec: JobSpec, found: Scan, splits: dict) -> list[str]:
    classes = spec.vitp.classes
    counts = [sum(p.label == c for p in found.patients) for c in range(len(classes))]
    notes = [f"dataset: {len(found.patients)} patients ({', '.join(f'{n} {c}' for n, c in zip(counts, classes))}), "
             f"{sum(len(p.slices) for p in found.patients)} slices; split by patient: "
             + " / ".join(f"{s} {len(splits[s])}" for s in ("train", "val", "test"))
             + f"; {spec.data.slices_per_patient} slices per patient"]
    missing = [c for i, c in enumerate(classes) if not any(p.label == i for p in splits["train"])]
    if missing:
        notes.append(f"no training patient of class(es) {', '.join(missing)}")
    if found.unreadable:
        shown = "; ".join(f"{f}: {r}" for f, r in found.unreadable[:3])
        notes.append(f"{len(found.unreadable)} unreadable slice(s) skipped (of {found.slices_total}): {shown}")
    if found.ignored:
        notes.append(f"{len(found.ignored)} folder(s) without a label ignored: {', '.join(found.ignored[:5])}")
    return notes


def plan(spec: JobSpec, resume_dir: Optional[Path] = None) -> Shape:
    """One (multi-node) training + evaluation job; the spec and the dataset are checked before submission."""
    if resume_dir is not None:
        raise FieldError("--resume-missing", "vitp_lung has no per-item results; use --resume")
    check_spec(spec)
    if spec.data.make_synthetic:
        return Shape(items=None, merge=False, notes=[f"synthetic dataset: written under {synthetic_root(spec.data)} "
                                                     f"on first use"])
    found, splits = read_dataset(spec)
    return Shape(items=None, merge=False, notes=describe(spec, found, splits))


def model_size(spec: JobSpec):
    """The classifier (not an LLM) counted on the meta device, for the plan's memory estimate (an unknown
    vitp.arch, arguments it does not take, a wrong image size or model.seq_len are FieldErrors naming the field)."""
    from core.models.classifier import meta_size

    return meta_size(spec)


# ---------------------------------------------------------------- the dataset inside the job
DATASET = "data/dataset.json"


def prepare(spec: JobSpec, ctx: TaskContext, rank: int) -> tuple[Scan, dict]:
    """Rank 0 (first): the synthetic dataset if asked, the scan and the split, saved in the run folder (data/);
    every later call (other ranks, a requeued or resumed run) reads them back, so the split never changes."""
    from core.data.lung_ct import write_synthetic

    def write(path: Path) -> None:
        if spec.data.make_synthetic:
            write_synthetic(synthetic_root(spec.data), seed=spec.data.seed, dicom_every=6)
        found, splits = read_dataset(spec)
        for note in describe(spec, found, splits):
            log.info("%s", note)
        write_json_atomic(path, {"scan": found.to_json(), "split": {s: [p.id for p in ps] for s, ps in splits.items()},
                                 "format": spec.data.format, "seed": spec.data.seed,
                                 "fractions": list(spec.data.split)})
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["patient_id", "label", "class", "split", "slices"])
        for s, ps in splits.items():
            for p in ps:
                w.writerow([p.id, p.label, spec.vitp.classes[p.label], s, len(p.slices)])
        write_text_atomic(ctx.run_dir / "data" / "split.csv", buf.getvalue())

    saved = rank0_index(ctx.run_dir / DATASET, rank, "dataset index", write)
    found = Scan.from_json(saved["scan"])
    by_id = {p.id: p for p in found.patients}
    return found, {s: [by_id[i] for i in ids] for s, ids in saved["split"].items()}


class SliceLoader:
    """Slice files -> normalised (3, S, S) tensors; a slice that fails to decode in the job (it passed the check)
    is replaced by the nearest readable slice of the same patient and counted."""

    def __init__(self, d):
        import torch

        self.size, self.window = d.image_size, tuple(d.dicom_window)
        self.mean = torch.tensor(d.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(d.std, dtype=torch.float32).view(3, 1, 1)
        self.failed: set[str] = set()

    def image(self, path: str):
        import torch
        import torch.nn.functional as F

        from core.data.lung_ct import load_slice

        t = torch.from_numpy(load_slice(path, self.window))[None, None]
        if tuple(t.shape[-2:]) != (self.size, self.size):
            t = F.interpolate(t, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return ((t[0].expand(3, -1, -1) - self.mean) / self.std).contiguous()

    def slice(self, patient, index: int):
        order = sorted(range(len(patient.slices)), key=lambda i: (abs(i - index), i))
        for i in order:
            path = patient.slices[i]
            if path in self.failed:
                continue
            try:
                return self.image(path)
            except Exception as e:
                self.failed.add(path)
                log.warning("unreadable slice skipped: %s (%s: %s); %d so far", path, type(e).__name__, e,
                            len(self.failed))
        raise RuntimeError(f"patient {patient.id}: no slice can be read")


def class_weights(spec: JobSpec, train) -> Optional[list[float]]:
    v = spec.vitp
    if v.class_weights is None:
        return None
    if v.class_weights == "balanced":
        counts = [sum(p.label == c for p in train) for c in range(len(v.classes))]
        return [len(train) / (len(counts) * n) if n else 0.0 for n in counts]
    return list(v.class_weights)


# ---------------------------------------------------------------- run: train, then evaluate
def run(spec: JobSpec, ctx: TaskContext) -> dict:
    import torch
    import torch.nn.functional as F

    from core import engine as eng
    from core.data.lung_ct import train_slice
    from core.data.prefetch import Prefetcher
    from core.models.classifier import build
    from core.runtime import bf16_supported

    session = eng.start(spec, ctx)
    if session.precision == "bf16" and not bf16_supported(session.acc):
        raise RuntimeError("deepspeed.precision bf16 but this CUDA device has no bf16: use fp16 or fp32")
    found, splits = session.rank0_first(lambda: prepare(spec, ctx, session.rank))
    torch.manual_seed(spec.train.seed)
    model = build(spec)
    ds = spec.deepspeed or DeepSpeedSpec()
    if ds.activation_checkpointing:
        net = model.backbone
        if hasattr(net, "set_grad_checkpointing"):
            net.set_grad_checkpointing(True)
        elif getattr(net, "supports_gradient_checkpointing", False):
            net.gradient_checkpointing_enable()
    engine = eng.initialize(session, model, spec)

    d, device, dtype = spec.data, session.device, session.dtype
    train, K = splits["train"], d.slices_per_patient
    micro, accum, world, rank = ds.micro_batch, ds.grad_accum, session.dist.world_size, session.rank
    n_items = len(train) * K
    loader = SliceLoader(d)
    weights = class_weights(spec, train)
    weight_t = torch.tensor(weights, dtype=torch.float32, device=device) if weights else None

    def sample(k: int):
        """The k-th training sample of the run: (patient, slice index), from k alone."""
        p, j = divmod(eng.sample_index(k, n_items, d.seed), K)
        return train[p], train_slice(len(train[p].slices), K, j, d.seed, k // n_items, p)

    def load(k: int):
        patient, index = sample(k)
        return loader.slice(patient, index), patient.label

    ahead = 2
    prefetch = Prefetcher(load, d.workers, keep=micro * (ahead + 2) + 8)

    def batch_fn(step: int, m: int):
        first = ((step * accum + m) * world + rank) * micro
        prefetch.ahead(first + world * micro * a + i for a in range(1, ahead + 1) for i in range(micro))
        items = [prefetch.get(k) for k in range(first, first + micro)]
        images = torch.stack([x for x, _ in items]).to(device, dtype)
        return {"images": images, "labels": torch.tensor([y for _, y in items], device=device)}

    def loss_fn(engine, batch):
        logits = engine(batch["images"]).float()
        loss = F.cross_entropy(logits, batch["labels"], weight=weight_t)
        return {"loss": loss, "acc": (logits.argmax(-1) == batch["labels"]).float().mean()}

    if rank == 0:
        log.info("training on %d patients x %d slices per epoch, %d image(s) per rank per micro-step, %d rank(s)",
                 len(train), K, micro, world)
    result = eng.Trainer(session, engine, spec, ctx, loss_fn, batch_fn).fit()
    losses = result.pop("losses", [])
    result.update(rank=rank, world_size=world, first_loss=losses[0] if losses else None,
                  patients={s: len(ps) for s, ps in splits.items()}, unreadable_skipped=len(found.unreadable),
                  trainable=sum(p.numel() for p in engine.module.parameters() if p.requires_grad))
    if spec.vitp.evaluate:
        result["evaluation"] = evaluate(spec, ctx, session, engine, splits[spec.vitp.eval_split], loader, found)
    result["runtime_unreadable"] = len(loader.failed)
    return result


def evaluate(spec, ctx, session, engine, patients, loader, found) -> dict:
    """Each rank scores its share of the patients (K fixed slices each; core.engine.padded_share keeps the number
    of forward passes equal on every rank, which ZeRO-3's parameter gathering needs); rank 0 gathers and writes
    results/."""
    import torch

    from core.data.prefetch import Prefetcher
    from core.data.lung_ct import eval_slices
    from core.engine import padded_share

    K = spec.data.slices_per_patient
    pick = padded_share(patients, session.rank, session.dist.world_size)
    indices = [eval_slices(len(p.slices), K) for p, _ in pick]
    pre = Prefetcher(lambda r: torch.stack([loader.slice(pick[r][0], i) for i in indices[r]]), spec.data.workers)
    model = engine.module
    model.eval()
    rows = []
    with torch.no_grad():
        for r, (p, keep) in enumerate(pick):
            pre.ahead(range(r + 1, min(r + 3, len(pick))))
            probs = torch.softmax(model(pre.get(r).to(session.device, session.dtype)).float(), dim=-1).cpu()
            if keep:
                rows.append({"patient_id": p.id, "label": p.label, "slices": [p.slices[i] for i in indices[r]],
                             "indices": indices[r], "probs": probs.tolist()})
    ordered = session.gather_rows(rows, "patient_id", [p.id for p in patients])
    if ordered is None:
        return {}
    return write_results(ctx.run_dir, ordered, spec, skipped=len(found.unreadable) + len(loader.failed))


# ---------------------------------------------------------------- metrics and result files
def write_results(run_dir: Path, rows: list[dict], spec, skipped: int = 0, folder: str = "results") -> dict:
    """results/: patients.csv and slices.csv (class probabilities), confusion_{patient,slice}.csv / .png and
    metrics.json (classification metrics at both levels)."""
    import numpy as np

    classes = spec.vitp.classes
    out = ResultFolder(Path(run_dir) / folder)
    prob_cols = [f"prob_{c}" for c in classes]
    patient_probs = [np.mean(np.asarray(r["probs"], dtype=np.float64), axis=0) for r in rows]
    patient_rows = [[r["patient_id"], r["label"], int(p.argmax()), *map(repr, p.tolist())]
                    for r, p in zip(rows, patient_probs)]
    out.csv("patients.csv", ["patient_id", "label", "predicted", *prob_cols], patient_rows)
    slice_rows = [[r["patient_id"], i, f, r["label"], int(np.argmax(pr)), *map(repr, pr)]
                  for r in rows for i, f, pr in zip(r["indices"], r["slices"], r["probs"])]
    out.csv("slices.csv", ["patient_id", "index", "slice", "label", "predicted", *prob_cols], slice_rows)
    y_patient = [r["label"] for r in rows]
    levels = {"patient": classification_metrics(y_patient, patient_probs, classes),
              "slice": classification_metrics([r["label"] for r in rows for _ in r["probs"]],
                                              [pr for r in rows for pr in r["probs"]], classes)}
    counts = np.bincount(np.asarray(y_patient, dtype=int), minlength=len(classes))
    metrics = {"split": spec.vitp.eval_split, "classes": classes, "patients": len(rows),
               "slices_per_patient": spec.data.slices_per_patient,
               "chance_accuracy": float(counts.max() / counts.sum()),
               "uniform_chance": 1 / len(classes), "unreadable_slices_skipped": skipped, **levels}
    files = {}
    for level, m in levels.items():
        cm = m["confusion_matrix"]
        out.csv(f"confusion_{level}.csv", ["true\\predicted", *classes], [[c, *row] for c, row in zip(classes, cm)])
        png = out.figure(f"confusion_{level}.png", confusion_figure(
            cm, classes, f"{level} level, {m['n']} {level}s: accuracy {m['accuracy']:.3f}"))
        files[f"confusion_{level}_png"] = str(png)
    out.json("metrics.json", metrics)
    p, s = levels["patient"], levels["slice"]
    auc = f"{p['macro_auc_ovr']:.3f}" if p["macro_auc_ovr"] is not None else "n/a"
    log.info("%s: %d patients, patient-level accuracy %.3f (chance %.3f), macro-F1 %.3f, AUC %s; slice-level "
             "accuracy %.3f -> %s", spec.vitp.eval_split, len(rows), p["accuracy"], metrics["chance_accuracy"],
             p["macro_f1"], auc, s["accuracy"], out.folder)
    return {"patients_csv": str(out.path("patients.csv")), "slices_csv": str(out.path("slices.csv")),
            "metrics": str(out.path("metrics.json")), **files, "patient_accuracy": p["accuracy"],
            "patient_macro_f1": p["macro_f1"], "patient_macro_auc": p["macro_auc_ovr"], "slice_accuracy": s["accuracy"],
            "chance_accuracy": metrics["chance_accuracy"], "patients": len(rows)}

def confusion_figure(cm, classes: list[str], title: str):
    from core.workloads.common import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1.5))
    ax.imshow(cm, cmap="Blues")
    top = max(max(row) for row in cm) or 1
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


WORKLOAD = Workload(run=run, section="vitp", Section=VitpSection, Data=LungData, trains=True, plan=plan,
                    model_size=model_size, checkpointing=True)
