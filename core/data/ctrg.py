"""CTRG-Chest (as converted by Dia-LLaMA): `{data_dir}/{id}.nii.gz` CT volumes, `annotation.json` with train / val /
test lists of `{id, finding}`, and a labels CSV with one CheXbert column per disease (1 = positive).

`check_dataset` validates everything a run needs before any model is loaded (and is torch-free, so the plan can
call it too); `load_volume` preprocesses a volume (slices resized, depth resampled, min-max to [0, 1], 3
channels); `write_synthetic` writes a small dataset in exactly this format with a learnable signal: a bright
blob whose presence decides the `pleural effusion` label and one sentence of the finding.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

CONDITIONS = [
    "enlarged cardiomediastinum", "cardiomegaly", "lung opacity", "lung lesion", "edema", "consolidation",
    "pneumonia", "atelectasis", "pneumothorax", "pleural effusion", "pleural other", "fracture", "support devices",
    "no finding",
]
SIGNAL = "pleural effusion"


class DatasetError(ValueError):
    pass


@dataclass
class Case:
    id: str
    finding: str
    labels: list[int]        # 14 values, 1 = positive, 0 otherwise
    volume: Path


def _labels_table(labels_csv: Path) -> dict[str, list[int]]:
    if not labels_csv.is_file():
        raise DatasetError(f"{labels_csv}: labels CSV not found (data.labels_csv)")
    with labels_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        id_col = next((c for c in cols if c.lower() in ("id", "image_id", "study_id", "name")), None)
        if id_col is None:
            raise DatasetError(f"{labels_csv}: no id column (expected one of id, image_id, study_id, name)")
        lower = {c.lower(): c for c in cols}
        missing = [d for d in CONDITIONS if d not in lower]
        if missing:
            raise DatasetError(f"{labels_csv}: no column for disease(s) {missing}; the CSV needs one CheXbert column "
                               f"per condition: {', '.join(CONDITIONS)}")
        table = {}
        for row in reader:
            table[str(row[id_col])] = [1 if str(row[lower[d]]).strip() in ("1", "1.0") else 0 for d in CONDITIONS]
    return table


def check_dataset(data_dir, annotation, labels_csv, splits=("train", "test"), check_volumes: bool = True
                  ) -> dict[str, list[Case]]:
    """Every id of the splits has a volume with 3 dimensions and a labels row; raises DatasetError naming the file."""
    data_dir, annotation, labels_csv = Path(data_dir), Path(annotation), Path(labels_csv)
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: volume folder not found (data.path)")
    if not annotation.is_file():
        raise DatasetError(f"{annotation}: annotation.json not found (data.annotation)")
    try:
        ann = json.loads(annotation.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{annotation}: not valid JSON ({e})") from None
    labels = _labels_table(labels_csv)
    out: dict[str, list[Case]] = {}
    for split in splits:
        if split not in ann or not ann[split]:
            raise DatasetError(f"{annotation}: no '{split}' list (expected train / val / test lists of {{id, finding}})")
        cases = []
        for entry in ann[split]:
            cid, finding = str(entry["id"]), entry.get("finding", "")
            vol = data_dir / f"{cid}.nii.gz"
            if not vol.is_file():
                raise DatasetError(f"{annotation}: id {cid} ({split}) has no volume {vol}")
            if cid not in labels:
                raise DatasetError(f"{labels_csv}: no labels row for id {cid} (listed in {annotation})")
            if check_volumes:
                import nibabel as nib

                shape = nib.load(str(vol)).shape
                if len(shape) != 3:
                    raise DatasetError(f"{vol}: a CT volume must have 3 dimensions (H, W, D), this one has shape {shape}")
            cases.append(Case(cid, finding, labels[cid], vol))
        out[split] = cases
    return out


def load_volume(path: Path, image_size: int, frames: int):
    """(3, image_size, image_size, frames) float32 in [0, 1]: slices resized, depth resampled, min-max normalised."""
    import nibabel as nib
    import numpy as np
    import torch

    arr = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    if arr.ndim != 3:
        raise DatasetError(f"{path}: expected 3 dimensions, got shape {arr.shape}")
    vol = torch.from_numpy(arr)[None, None]  # 1, 1, H, W, D
    vol = torch.nn.functional.interpolate(vol, size=(image_size, image_size, frames), mode="trilinear",
                                          align_corners=False)[0, 0]
    lo, hi = vol.min(), vol.max()
    vol = (vol - lo) / (hi - lo) if hi > lo else torch.zeros_like(vol)
    return vol.unsqueeze(0).repeat(3, 1, 1, 1).contiguous()


SENTENCES_POS = "There is a right pleural effusion."
SENTENCES_NEG = "No pleural effusion is seen."
OTHER = ["The heart size is normal.", "The lungs are clear.", "No pneumothorax.", "The mediastinum is unremarkable.",
         "No focal consolidation.", "Mild degenerative changes of the spine."]


def write_synthetic(root, n_train: int = 24, n_val: int = 4, n_test: int = 8, shape=(40, 40, 10), seed: int = 0) -> dict:
    """A CTRG-format dataset under `root` (volumes/, annotation.json, labels.csv). Idempotent."""
    import nibabel as nib
    import numpy as np

    root = Path(root)
    paths = {"data_dir": root / "volumes", "annotation": root / "annotation.json", "labels_csv": root / "labels.csv"}
    if paths["annotation"].is_file() and paths["labels_csv"].is_file():
        return paths
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    paths["data_dir"].mkdir(parents=True, exist_ok=True)
    splits, rows = {}, []
    counter = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        items = []
        for i in range(n):
            cid = f"ct{counter:04d}"
            counter += 1
            positive = i % 2 == 0
            vol = nrng.normal(0.0, 0.15, size=shape).astype(np.float32)
            if positive:  # a bright blob in the lower right of the volume
                h, w, d = shape
                vol[h // 2:, w // 2:, d // 3:] += 2.0
            nib.save(nib.Nifti1Image(vol, np.eye(4)), str(paths["data_dir"] / f"{cid}.nii.gz"))
            others = rng.sample(OTHER, 2)
            finding = " ".join([SENTENCES_POS if positive else SENTENCES_NEG] + others)
            items.append({"id": cid, "finding": finding})
            labels = {d: "" for d in CONDITIONS}
            labels[SIGNAL] = "1" if positive else "0"
            labels["no finding"] = "0" if positive else "1"
            rows.append({"id": cid, **labels})
        splits[split] = items
    paths["annotation"].write_text(json.dumps(splits, indent=1, ensure_ascii=False))
    with paths["labels_csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id"] + CONDITIONS)
        w.writeheader()
        w.writerows(rows)
    return paths
