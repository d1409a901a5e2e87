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
import json
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
    method: Literal["internvl_cls", "timm_classifier"] = Field(
        "internvl_cls", description="internvl_cls: the lab's method (InternVL chat model from model.path, question "
                                    "'<image>\\n<cls>: 0|1|2|3.', LM loss on the answer + cross-entropy over the "
                                    "choices' first-token logits); timm_classifier: the baseline image classifier "
                                    "(vitp.backbone) with a C-class head")
    max_dynamic_patch: PositiveInt = Field(6, description="internvl_cls: at most this many 448 px tiles per slice "
                                                          "(InternVL's dynamic_preprocess; 1 = one tile)")
    use_thumbnail: bool = Field(True, description="internvl_cls: add a whole-slice thumbnail tile when a slice is "
                                                  "cut into several tiles")
    label_smoothing: float = Field(0.01, ge=0, lt=1, description="internvl_cls: label smoothing of the choices' "
                                                                  "cross-entropy (ViTP's 0.01)")
    select_on_val: bool = Field(True, description="internvl_cls: score the val split at every checkpoint and "
                                                  "evaluate the best one (patient accuracy, then the true class's "
                                                  "mean log-probability) on vitp.eval_split")
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
    meta_splits: Optional[dict[str, Literal["train", "val", "test"]]] = Field(
        None, description="vitp format: the lab's own split, {meta entry: train|val|test} (one annotation file per "
                          "split); used as given, data.split is then not applied")
    patient_pattern: Optional[str] = Field(None, description="vitp format: regex over a row's image path whose "
                                                             "'patient' group (or first group) names the patient, "
                                                             "for rows without a patient_id field")
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

    @field_validator("patient_pattern")
    @classmethod
    def _pattern(cls, v):
        if v is not None:
            import re

            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a regular expression ({e})") from None
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


INTERNVL_PRESET = "internvl2_5-1b"


def internvl_config(spec: JobSpec) -> dict:
    """The original InternVL config (InternVLChatConfig dict) the spec trains: model.path's config.json, else the
    tiny twin's (model.make_tiny writes it there), else the published InternVL2.5-1B one (model.preset
    internvl2_5-1b: the plan can count the model before the weights are on this machine)."""
    from core.models import internvl as iv
    from core.models.checkpoint_files import find_config

    m = spec.model
    if m.preset not in (None, INTERNVL_PRESET):
        raise FieldError("model.preset", f"unknown InternVL preset {m.preset!r}; use {INTERNVL_PRESET} (or none: "
                                         f"the config.json of model.path)")
    cfg = find_config(m.path)
    if cfg is not None:
        if "vision_config" not in cfg or "llm_config" not in cfg:
            raise FieldError("model.path", f"{m.path}/config.json is not an InternVL chat config (vision_config, "
                                           f"llm_config); vitp.method internvl_cls loads OpenGVLab's layout")
        return cfg
    if m.make_tiny:
        return iv.TINY
    if m.preset == INTERNVL_PRESET:
        return iv.INTERNVL2_5_1B
    raise FieldError("model.path", f"{m.path!r}: no config.json; give the local InternVL folder (config.json, "
                                   f"model.safetensors, tokenizer), or model.preset: {INTERNVL_PRESET} to plan")


def internvl_tiles(spec: JobSpec) -> int:
    v = spec.vitp
    return v.max_dynamic_patch + (1 if v.use_thumbnail and v.max_dynamic_patch > 1 else 0)


def _check_internvl(spec: JobSpec) -> None:
    from core.models import internvl as iv

    v, m, d = spec.vitp, spec.model, spec.data
    if v.class_weights is not None:
        raise FieldError("vitp.class_weights", "applies to vitp.method timm_classifier; the lab's <cls> loss is "
                                               "unweighted (remove it or switch the method)")
    if m.make_tiny and not m.path:
        raise FieldError("model.path", "model.make_tiny writes the tiny InternVL twin there: give a folder")
    cfg = internvl_config(spec)
    size = cfg.get("force_image_size") or cfg["vision_config"]["image_size"]
    if d.image_size != size:
        raise FieldError("data.image_size", f"{d.image_size} but the InternVL model takes {size} px tiles; set "
                                            f"data.image_size: {size}")
    need = internvl_tiles(spec) * iv.tokens_per_tile(cfg)
    if m.seq_len < need:
        raise FieldError("model.seq_len", f"{m.seq_len} but a slice of up to {internvl_tiles(spec)} tile(s) "
                                          f"(vitp.max_dynamic_patch {v.max_dynamic_patch}) takes up to {need} image "
                                          f"tokens plus the prompt; set model.seq_len: {need + 128} or more")
    if not m.make_tiny:
        p = Path(m.path) if m.path else None
        if p is None or not p.is_dir():
            raise FieldError("model.path", f"{m.path}: InternVL model folder not found (config.json, the weights in "
                                           f"the original vision_model / mlp1 / language_model layout, tokenizer)")
        if not any((p / n).is_file() for n in iv.WEIGHT_NAMES):
            raise FieldError("model.path", f"{p}: no weights (looked for {', '.join(iv.WEIGHT_NAMES)})")
        if not (p / "tokenizer_config.json").is_file():
            raise FieldError("model.path", f"{p}: no tokenizer_config.json (InternVL's tokenizer is part of the "
                                           f"model folder)")


def check_spec(spec: JobSpec) -> None:
    """Everything about the spec that needs no dataset: FieldError naming the field."""
    v, d = spec.vitp, spec.data
    if isinstance(v.class_weights, list) and len(v.class_weights) != len(v.classes):
        raise FieldError("vitp.class_weights", f"{len(v.class_weights)} weights for {len(v.classes)} classes "
                                               f"({', '.join(v.classes)})")
    if d.format != "vitp" and (d.meta_splits or d.patient_pattern):
        raise FieldError("data.meta_splits" if d.meta_splits else "data.patient_pattern",
                         "applies to data.format vitp (the lab's meta json + jsonl)")
    for name in format_inputs(d):
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
    if v.method == "internvl_cls":
        _check_internvl(spec)
    else:
        _check_model_path(spec)


def read_dataset(spec: JobSpec) -> tuple[Scan, dict]:
    """Scan + patient split of the spec's dataset; DatasetError -> FieldError naming the field and the file."""
    from core.data.lung_ct import given_split, scan, split_patients

    d, v = spec.data, spec.vitp
    try:
        found = scan(d, len(v.classes))
    except DatasetError as e:
        raise FieldError(e.field, e.message) from None
    splits = given_split(found.patients) or split_patients(found.patients, d.split, d.seed)
    if not splits["train"]:
        raise FieldError("data.split", f"no patient left for training out of {len(found.patients)}")
    if v.evaluate and not splits[v.eval_split]:
        raise FieldError("data.split", f"the {v.eval_split} split is empty ({len(found.patients)} patients, fractions "
                                       f"{list(d.split)}); give it a larger fraction or set vitp.evaluate: false")
    return found, splits


def describe(spec: JobSpec, found: Scan, splits: dict) -> list[str]:
    classes = spec.vitp.classes
    counts = [sum(p.label == c for p in found.patients) for c in range(len(classes))]
    given = " (the lab's own split files, data.meta_splits)" if any(p.split for p in found.patients) else ""
    notes = [f"dataset: {len(found.patients)} patients ({', '.join(f'{n} {c}' for n, c in zip(counts, classes))}), "
             f"{sum(len(p.slices) for p in found.patients)} slices; split by patient{given}: "
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
    problems = []
    try:
        check_spec(spec)
    except FieldError as e:   # the model folder is the last check: a dry run away from it still plans
        if e.field != "model.path" or not _absent(spec.model.path):
            raise
        problems.append((e.field, e.message))
    if spec.data.make_synthetic:
        return Shape(items=None, merge=False, notes=[f"synthetic dataset: written under {synthetic_root(spec.data)} "
                                                     f"on first use"], problems=problems)
    absent = [(f"data.{n}", f"{getattr(spec.data, n)}: not on this machine") for n in format_inputs(spec.data)
              if _absent(getattr(spec.data, n))]
    if absent:   # away from the data: the plan still prints, then every missing input is listed
        return Shape(items=None, merge=False, notes=["dataset: not on this machine (patients and splits unknown "
                                                     "here)"], problems=problems + absent)
    found, splits = read_dataset(spec)
    return Shape(items=None, merge=False, notes=describe(spec, found, splits), problems=problems)


def format_inputs(d) -> tuple[str, ...]:
    """The data fields data.format reads (the others are ignored, wherever they point)."""
    return ("path", "labels_csv") if d.format == "folders" else ("meta",)


def _absent(path) -> bool:
    return not path or not Path(path).exists()


def model_size(spec: JobSpec):
    """The classifier (not an LLM) counted on the meta device, for the plan's memory estimate (an unknown
    vitp.arch, arguments it does not take, a wrong image size or model.seq_len are FieldErrors naming the field)."""
    if spec.vitp.method == "internvl_cls":
        return internvl_size(spec)
    from core.models.classifier import meta_size

    return meta_size(spec)


def internvl_size(spec: JobSpec):
    """The InternVL model (both towers, projector, LM head; + LoRA with a peft: section) counted on the meta device.
    The activation term takes the deeper of the two towers' widths over all their layers, model.seq_len tokens."""
    from core.model_sizes import size_of
    from core.models import internvl as iv

    cfg = internvl_config(spec)
    model = iv.build(iv.native_config(cfg), meta=True)
    vc, lc = cfg["vision_config"], cfg["llm_config"]
    return size_of(model, layers=vc["num_hidden_layers"] + lc["num_hidden_layers"],
                   hidden=max(vc["hidden_size"], lc["hidden_size"]),
                   heads=max(vc["num_attention_heads"], lc["num_attention_heads"]), vocab=lc["vocab_size"],
                   peft=spec.peft, head=("lm_head",))


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
    if spec.vitp.method == "internvl_cls":
        return run_internvl(spec, ctx)
    return run_classifier(spec, ctx)


def question(spec: JobSpec) -> str:
    """The lab's prompt: `<image>\\n<cls>: 0|1|2|3.` (one choice per class, the class index as its answer)."""
    return "<image>\n<cls>: " + "|".join(str(i) for i in range(len(spec.vitp.classes))) + "."


def parse_choices(text: str) -> list[str]:
    """The choices of a `<cls>` question, as ViTP's dataset reads them."""
    from core.data.lung_ct import CLS_CHOICES

    m = CLS_CHOICES.search(text)
    if not m:
        raise ValueError(f"no '<cls>: a|b|...' choices in {text!r}")
    return [c.strip() for c in m.group(1).split("|")]


class InternVLInputs:
    """Slices -> InternVL tiles and the chat prompt around them: (tiles, input ids, labels, cls position)."""

    def __init__(self, spec: JobSpec, tok, cfg: dict):
        from core.models import internvl as iv

        self.spec, self.tok, self.iv = spec, tok, iv
        self.per_tile = iv.tokens_per_tile(cfg)
        self.question = question(spec)
        self.choices = parse_choices(self.question)
        self.choice_ids = iv.choice_ids(tok, self.choices)
        self.window = tuple(spec.data.dicom_window)
        self.failed: set[str] = set()
        self._prompts: dict = {}

    def tiles(self, path: str):
        from core.data.lung_ct import load_slice

        d, v = self.spec.data, self.spec.vitp
        return self.iv.dynamic_tiles(load_slice(path, self.window), d.image_size, v.max_dynamic_patch,
                                     v.use_thumbnail, d.mean, d.std)

    def slice(self, patient, index: int):
        order = sorted(range(len(patient.slices)), key=lambda i: (abs(i - index), i))
        for i in order:
            path = patient.slices[i]
            if path in self.failed:
                continue
            try:
                return self.tiles(path)
            except Exception as e:
                self.failed.add(path)
                log.warning("unreadable slice skipped: %s (%s: %s); %d so far", path, type(e).__name__, e,
                            len(self.failed))
        raise RuntimeError(f"patient {patient.id}: no slice can be read")

    def prompt(self, n_tiles: int, label: Optional[int]):
        key = (n_tiles, label)
        if key not in self._prompts:
            answer = None if label is None else self.choices[label]
            self._prompts[key] = self.iv.prompt_ids(self.tok, self.question, n_tiles * self.per_tile, answer)
        return self._prompts[key]

    def batch(self, items, labels: Optional[list[int]], device, dtype):
        import torch

        prompts = [self.prompt(len(t), None if labels is None else y) for t, y in
                   zip(items, labels if labels is not None else [None] * len(items))]
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids, lab, mask, pos = self.iv.collate(prompts, pad)
        return {"input_ids": ids.to(device), "labels": lab.to(device), "attention_mask": mask.to(device),
                "cls_positions": pos.to(device), "pixel_values": torch.cat(list(items)).to(device, dtype),
                "targets": torch.tensor(labels if labels is not None else [0] * len(items), device=device)}


def load_internvl(spec: JobSpec, ctx: TaskContext, session):
    """The spec's InternVL model (the tiny twin written first with model.make_tiny), its weights loaded strictly
    from the original layout; rank 0 writes what it loaded to <run>/model_load.json."""
    from core.models import internvl as iv

    folder = Path(spec.model.path)
    if spec.model.make_tiny:
        session.rank0_first(lambda: iv.write_tiny(folder, seed=0))
    model, tok, cfg, report = iv.from_folder(folder)
    if session.rank == 0:
        write_json_atomic(ctx.run_dir / "model_load.json", report)
    return model, tok, cfg


def slice_batches(spec: JobSpec, session, train: list, read, collate):
    """The Trainer's batch_fn for both methods: the k-th training sample of the run from k alone (a seeded patient
    and slice: a resumed run draws the same ones), read by `read(patient, slice index)` in the prefetcher's threads
    two micro-batches ahead; `collate(images, labels)` makes the batch."""
    from core import engine as eng
    from core.data.lung_ct import train_slice
    from core.data.prefetch import Prefetcher

    d, ds = spec.data, spec.deepspeed or DeepSpeedSpec()
    K, micro, accum = d.slices_per_patient, ds.micro_batch, ds.grad_accum
    world, rank = session.dist.world_size, session.rank
    n_items = len(train) * K

    def load(k: int):
        p, j = divmod(eng.sample_index(k, n_items, d.seed), K)
        patient = train[p]
        return read(patient, train_slice(len(patient.slices), K, j, d.seed, k // n_items, p)), patient.label

    ahead = 2
    prefetch = Prefetcher(load, d.workers, keep=micro * (ahead + 2) + 8)

    def batch_fn(step: int, m: int):
        first = ((step * accum + m) * world + rank) * micro
        prefetch.ahead(first + world * micro * a + i for a in range(1, ahead + 1) for i in range(micro))
        items = [prefetch.get(k) for k in range(first, first + micro)]
        return collate([x for x, _ in items], [y for _, y in items])

    return batch_fn


def run_internvl(spec: JobSpec, ctx: TaskContext) -> dict:
    """The lab's method: InternVL fine-tuned on `<image>\\n<cls>: 0|1|2|3.` -> "c" with ViTP's use_classifier loss;
    patient prediction = mean of its K slices' choice probabilities."""
    import torch

    from core import engine as eng
    from core.models import internvl as iv
    from core.runtime import bf16_supported

    session = eng.start(spec, ctx)
    if session.precision == "bf16" and not bf16_supported(session.acc):
        raise RuntimeError("deepspeed.precision bf16 but this CUDA device has no bf16: use fp16 or fp32")
    found, splits = session.rank0_first(lambda: prepare(spec, ctx, session.rank))
    torch.manual_seed(spec.train.seed)
    model, tok, cfg = load_internvl(spec, ctx, session)
    ds = spec.deepspeed or DeepSpeedSpec()
    if spec.peft is not None:
        from core.models.peft import apply_peft

        model = apply_peft(model, spec.peft, ("lm_head",))
    if ds.activation_checkpointing:   # both towers: InternViT's and Qwen2's layers are checkpointed
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    engine = eng.initialize(session, model, spec)

    d, device, dtype = spec.data, session.device, session.dtype
    train, K = splits["train"], d.slices_per_patient
    micro, world, rank = ds.micro_batch, session.dist.world_size, session.rank
    inputs = InternVLInputs(spec, tok, cfg)
    smoothing = spec.vitp.label_smoothing

    batch_fn = slice_batches(spec, session, train, inputs.slice,
                             lambda xs, ys: inputs.batch(xs, ys, device, dtype))

    def loss_fn(engine, batch):
        out = engine(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                     attention_mask=batch["attention_mask"], use_cache=False)
        lm, cls, choice_logits = iv.cls_losses(out.logits, batch["labels"], batch["cls_positions"],
                                               inputs.choice_ids, batch["targets"], smoothing)
        acc = (choice_logits.argmax(-1) == batch["targets"]).float().mean()
        return {"loss": lm + cls, "lm_loss": lm.detach(), "cls_loss": cls.detach(), "acc": acc}

    if rank == 0:
        log.info("InternVL <cls> training on %d patients x %d slices per epoch, %d slice(s) per rank per micro-step, "
                 "%d rank(s); choices %s (token ids %s)", len(train), K, micro, world, "|".join(inputs.choices),
                 inputs.choice_ids)
    chooser = None
    if spec.vitp.evaluate and spec.vitp.select_on_val and splits["val"]:
        chooser = CheckpointChooser(spec, ctx, session, engine, splits["val"], inputs)

    class ChoosingTrainer(eng.Trainer):
        def checkpoint_meta(self, step: int) -> dict:
            # the val score of the weights the checkpoint holds, in its marker (a killed run recovers it)
            return {} if chooser is None else {"val": chooser.score()}

        def after_checkpoint(self, step: int, meta: dict) -> None:
            if chooser is not None:   # rank 0 links the checkpoint as "best": only once its files are complete
                self.session.ckpt.when_complete(lambda: chooser.record(step, meta["val"]))

    result = ChoosingTrainer(session, engine, spec, ctx, loss_fn, batch_fn).fit()
    losses = result.pop("losses", [])
    result.update(rank=rank, world_size=world, first_loss=losses[0] if losses else None, method="internvl_cls",
                  patients={s: len(ps) for s, ps in splits.items()}, unreadable_skipped=len(found.unreadable),
                  trainable=sum(getattr(p, "ds_numel", p.numel())     # ZeRO-3 partitions: their full size
                                for p in engine.module.parameters() if p.requires_grad))
    if spec.vitp.evaluate:
        step = chooser.restore_best(result["steps"]) if chooser is not None else result["steps"]
        extra = {"checkpoint_step": step, "chosen_on": "val" if chooser is not None else "last step",
                 "last_step": result["steps"]}
        result["evaluation"] = evaluate_internvl(spec, ctx, session, engine, splits[spec.vitp.eval_split], inputs,
                                                 found, extra)
        result["evaluated_step"] = step
    result["runtime_unreadable"] = len(inputs.failed)
    return result


def evaluate_internvl(spec, ctx, session, engine, patients, inputs, found, extra: Optional[dict] = None) -> dict:
    """Score the eval split's patients (score_internvl); rank 0 writes results/."""
    ordered = score_internvl(spec, session, engine, patients, inputs,
                             (ctx.run_dir, f"scoring the {spec.vitp.eval_split} patients"))
    if ordered is None:
        return {}
    return write_results(ctx.run_dir, ordered, spec, skipped=len(found.unreadable) + len(inputs.failed),
                         extra=extra)


class CheckpointChooser:
    """The val split chooses the checkpoint evaluated on test. Before every checkpoint is written all ranks score
    the val patients on its weights; the score goes into the checkpoint's marker (so a run killed right after a save
    finds it again), rank 0 appends (step, patient accuracy, mean log-probability of the true class) to
    results/val_by_step.csv and hard-links the best checkpoint so far into checkpoints/best/<tag> (pruning keeps it,
    no extra disk). A requeued run reads the file back and goes on."""

    FILE = "results/val_by_step.csv"

    def __init__(self, spec, ctx, session, engine, patients, inputs):
        self.spec, self.ctx, self.session, self.engine = spec, ctx, session, engine
        self.patients, self.inputs = patients, inputs
        self.path = ctx.run_dir / self.FILE
        point = session.resume
        if point is not None and point.meta.get("val") and session.rank == 0:
            rows = [r for r in self.rows() if r["step"] <= point.step]
            if not any(r["step"] == point.step for r in rows):   # killed between the save and the file
                self.record(point.step, point.meta["val"])
        session.barrier()

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [{"step": int(r["step"]), "patient_accuracy": float(r["patient_accuracy"]),
                 "mean_logp": float(r["mean_logp"])} for r in csv.DictReader(self.path.open())]

    @staticmethod
    def best(rows: list[dict]) -> Optional[dict]:
        return max(rows, key=lambda r: (r["patient_accuracy"], r["mean_logp"], -r["step"])) if rows else None

    def score(self) -> Optional[dict]:
        """Every rank: the val patients on the current weights; rank 0 gets {patient_accuracy, mean_logp}."""
        import numpy as np

        ordered = score_internvl(self.spec, self.session, self.engine, self.patients, self.inputs,
                                 (self.ctx.run_dir, "scoring the val patients (choosing the checkpoint)"))
        self.engine.module.train()
        if ordered is None:
            return None
        probs = [np.mean(np.asarray(r["probs"], dtype=np.float64), axis=0) for r in ordered]
        return {"patient_accuracy": float(np.mean([int(p.argmax()) == r["label"] for p, r in zip(probs, ordered)])),
                "mean_logp": float(np.mean([np.log(max(p[r["label"]], 1e-12)) for p, r in zip(probs, ordered)]))}

    def record(self, step: int, score: Optional[dict]) -> None:
        """Rank 0: the step's row in results/val_by_step.csv (later rows dropped: a resumed run redoes them), the
        best checkpoint linked."""
        if self.session.rank != 0 or score is None:
            return
        rows = [r for r in self.rows() if r["step"] < step] + [{"step": step, **score}]
        best = self.best(rows)["step"]
        if best == step:   # the link first: the file never names a best that best/ does not hold yet
            self._link(step)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["step", "patient_accuracy", "mean_logp"])
        w.writerows([[r["step"], repr(r["patient_accuracy"]), repr(r["mean_logp"])] for r in rows])
        write_text_atomic(self.path, buf.getvalue())
        log.info("val at step %d: patient accuracy %.3f, mean log p(true) %.4f (best: step %d)", step,
                 score["patient_accuracy"], score["mean_logp"], best)

    def _link(self, step: int) -> None:
        import os
        import shutil

        from core.checkpoint import tag_for

        root = self.session.ckpt.root
        src, dst = root / tag_for(step), root / "best" / tag_for(step)
        tmp = root / "best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for d, _, files in os.walk(src):
            out = tmp / tag_for(step) / Path(d).relative_to(src)
            out.mkdir(parents=True, exist_ok=True)
            for f in files:
                os.link(Path(d) / f, out / f)
        old = root / "best.old"   # replaced by renames: a kill in between leaves best.old, which restore_best reads
        shutil.rmtree(old, ignore_errors=True)
        if (root / "best").exists():
            os.rename(root / "best", old)
        os.rename(tmp, root / "best")
        shutil.rmtree(old, ignore_errors=True)
        assert dst.is_dir()

    def restore_best(self, last_step: int) -> int:
        """Load the best checkpoint's weights (every rank) when it is not the last step; its step."""
        from core.checkpoint import MARKER, ResumePoint, tag_for

        best = self.best(self.rows())
        if best is None or best["step"] == last_step:
            return last_step
        tag = tag_for(best["step"])
        root = self.session.ckpt.root
        folder = next((f for f in (root / "best", root / "best.old", root) if (f / tag / MARKER).is_file()), None)
        if folder is None:   # a run killed while best/ was being replaced, its tag since pruned
            if self.session.rank == 0:
                log.warning("the best val checkpoint (step %d) is no longer on disk: evaluating the last one (%d)",
                            best["step"], last_step)
            return last_step
        meta = json.loads((folder / tag / MARKER).read_text())
        self.session.ckpt.load(self.engine, ResumePoint(tag, best["step"], folder, False, meta))
        if self.session.rank == 0:
            log.info("evaluating the checkpoint of step %d (best on val) instead of the last one (%d)",
                     best["step"], last_step)
        return best["step"]


def score_internvl(spec, session, engine, patients, inputs, progress=None) -> Optional[list[dict]]:
    """Each rank scores its share of the patients: K uniformly spread slices each, the prompt without the answer,
    softmax over the choices' first-token logits at the answer position; rank 0 gets every patient's rows (in the
    patients' order), the other ranks None. `progress`: (run folder, what) for rank 0's notes of how far it got."""
    import torch

    from core.data.lung_ct import eval_slices
    from core.engine import padded_share
    from core.results.progress import noted

    K, micro = spec.data.slices_per_patient, (spec.deepspeed or DeepSpeedSpec()).micro_batch
    pick = padded_share(patients, session.rank, session.dist.world_size)
    model = engine.module
    model.eval()
    rows = []
    with torch.no_grad():
        for p, keep in noted(pick, progress, session.rank):
            indices = eval_slices(len(p.slices), K)
            probs = []
            for lo in range(0, K, micro):
                items = [inputs.slice(p, i) for i in indices[lo:lo + micro]]
                b = inputs.batch(items, None, session.device, session.dtype)
                out = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                            attention_mask=b["attention_mask"], use_cache=False)
                rows_i = torch.arange(len(items), device=out.logits.device)
                logits = out.logits[rows_i, b["cls_positions"]][:, torch.tensor(inputs.choice_ids,
                                                                                 device=out.logits.device)]
                probs += torch.softmax(logits.float(), dim=-1).cpu().tolist()
            if keep:
                rows.append({"patient_id": p.id, "label": p.label, "slices": [p.slices[i] for i in indices],
                             "indices": indices, "probs": probs})
    return session.gather_rows(rows, "patient_id", [p.id for p in patients])


def run_classifier(spec: JobSpec, ctx: TaskContext) -> dict:
    """The baseline (vitp.method timm_classifier): an image classifier with a C-class head, slice cross-entropy."""
    import torch
    import torch.nn.functional as F

    from core import engine as eng
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
    micro, world, rank = ds.micro_batch, session.dist.world_size, session.rank
    loader = SliceLoader(d)
    weights = class_weights(spec, train)
    weight_t = torch.tensor(weights, dtype=torch.float32, device=device) if weights else None

    batch_fn = slice_batches(spec, session, train, loader.slice, lambda xs, ys: {
        "images": torch.stack(xs).to(device, dtype), "labels": torch.tensor(ys, device=device)})

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
                  trainable=sum(getattr(p, "ds_numel", p.numel())     # ZeRO-3 partitions: their full size
                                for p in engine.module.parameters() if p.requires_grad))
    if spec.vitp.evaluate:
        result["evaluation"] = evaluate(spec, ctx, session, engine, splits[spec.vitp.eval_split], loader, found,
                                        {"checkpoint_step": result["steps"], "chosen_on": "last step",
                                         "last_step": result["steps"]})
    result["runtime_unreadable"] = len(loader.failed)
    return result


def evaluate(spec, ctx, session, engine, patients, loader, found, extra: Optional[dict] = None) -> dict:
    """Each rank scores its share of the patients (K fixed slices each; core.engine.padded_share keeps the number
    of forward passes equal on every rank, which ZeRO-3's parameter gathering needs); rank 0 gathers and writes
    results/."""
    import torch

    from core.data.prefetch import Prefetcher
    from core.data.lung_ct import eval_slices
    from core.engine import padded_share
    from core.results.progress import noted

    K = spec.data.slices_per_patient
    pick = padded_share(patients, session.rank, session.dist.world_size)
    indices = [eval_slices(len(p.slices), K) for p, _ in pick]
    pre = Prefetcher(lambda r: torch.stack([loader.slice(pick[r][0], i) for i in indices[r]]), spec.data.workers)
    model = engine.module
    model.eval()
    rows = []
    with torch.no_grad():
        for r, (p, keep) in enumerate(noted(pick, (ctx.run_dir, f"scoring the {spec.vitp.eval_split} patients"),
                                            session.rank)):
            pre.ahead(range(r + 1, min(r + 3, len(pick))))
            probs = torch.softmax(model(pre.get(r).to(session.device, session.dtype)).float(), dim=-1).cpu()
            if keep:
                rows.append({"patient_id": p.id, "label": p.label, "slices": [p.slices[i] for i in indices[r]],
                             "indices": indices[r], "probs": probs.tolist()})
    ordered = session.gather_rows(rows, "patient_id", [p.id for p in patients])
    if ordered is None:
        return {}
    return write_results(ctx.run_dir, ordered, spec, skipped=len(found.unreadable) + len(loader.failed),
                         extra=extra)


# ---------------------------------------------------------------- metrics and result files
def write_results(run_dir: Path, rows: list[dict], spec, skipped: int = 0, folder: str = "results",
                  extra: Optional[dict] = None) -> dict:
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
               "uniform_chance": 1 / len(classes), "unreadable_slices_skipped": skipped, **(extra or {}), **levels}
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
