"""CTRG-Chest (as converted by Dia-LLaMA): `{data_dir}/{id}.nii.gz` CT volumes, `annotation.json` with train / val /
test lists of `{id, finding}`, and a labels CSV with one CheXbert column per disease: Dia-LLaMA's
CTRG_finding_labels.csv (`id`, then `enlarged_cardiomediastinum` ... `no_finding`, CheXbert codes 0 blank,
1 positive, 2 negative, 3 uncertain) is read as it is; column names with spaces work too.

`check_dataset` validates everything a run needs before any model is loaded (and is torch-free, so the plan can
call it too); `load_volume` preprocesses a volume step for step as Dia-LLaMA's CTRG_dataset.py and its collate do
(SimpleITK axis order, slices resized to 512 x 512, depth zoomed to 64 by nearest neighbour, min-max to [0, 1],
3 channels, nearest resize to 256 x 256 x 64); `write_synthetic` writes a small dataset in exactly this format
(labels CSV included) with a learnable signal: a bright blob whose presence decides the `pleural effusion` label
and one sentence of the finding.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from core.errors import DatasetError

CONDITIONS = [
    "enlarged cardiomediastinum", "cardiomegaly", "lung opacity", "lung lesion", "edema", "consolidation",
    "pneumonia", "atelectasis", "pneumothorax", "pleural effusion", "pleural other", "fracture", "support devices",
    "no finding",
]
SIGNAL = "pleural effusion"
# Dia-LLaMA's instruction after the diagnostic sentences (CTRG_dataset.py `guide`), trailing space included
GUIDE = ("Based on the above visual information and some key abnormal information related to specific diseases, "
         "please generate a complete medical report corresponding to this CT image. Providing a comprehensive report "
         "which contains detailed information about the anatomical structures and any abnormalities is essential. ")


def diagnosis_text(labels: list[int]) -> str:
    """Dia-LLaMA's diagnostic sentences (CTRG_dataset.py): `The "<disease>" is positive. ` for label 1,
    `... negative. ` otherwise, in CONDITIONS order."""
    return "".join(f'The "{d}" is {"positive" if v == 1 else "negative"}. ' for d, v in zip(CONDITIONS, labels))


@dataclass
class Case:
    id: str
    finding: str
    labels: list[int]        # 14 values, 1 = positive, 0 otherwise
    volume: Path


ID_COLUMNS = ("id", "image_id", "study_id", "name")


def column_key(name: str) -> str:
    """A labels CSV column name compared with CONDITIONS: case, underscores and surrounding spaces ignored
    (Dia-LLaMA's CTRG_finding_labels.csv writes `pleural_effusion`, CheXbert's own output `Pleural Effusion`)."""
    return " ".join(str(name).replace("_", " ").lower().split())


def read_labels(labels_csv) -> dict[str, list[int]]:
    """id -> 14 labels in CONDITIONS order, 1 where the CheXbert code is 1 (positive), else 0: Dia-LLaMA's rule
    (`torch.where(cls_labels == 1, cls_labels, 0)`; 0 blank, 2 negative, 3 uncertain all count as not positive).
    Columns are matched by name, not position; ids are compared as text with integer ids normalised (`44.0` -> `44`)."""
    labels_csv = Path(labels_csv)
    if not labels_csv.is_file():
        raise DatasetError("data", f"{labels_csv}: labels CSV not found (data.labels_csv)")
    with labels_csv.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        id_col = next((c for c in cols if column_key(c).replace(" ", "_") in ID_COLUMNS), None)
        if id_col is None:
            raise DatasetError("data", f"{labels_csv}: no id column (expected one of {', '.join(ID_COLUMNS)})")
        by_key = {column_key(c): c for c in cols}
        missing = [d for d in CONDITIONS if d not in by_key]
        if missing:
            raise DatasetError("data", f"{labels_csv}: no column for disease(s) {missing}; the CSV needs one "
                                       f"CheXbert column per condition (spaces or underscores): "
                                       f"{', '.join(CONDITIONS)}")
        table = {}
        for row in reader:
            table[case_id(row[id_col])] = [1 if _code(row[by_key[d]]) == 1 else 0 for d in CONDITIONS]
    return table


def _code(value) -> float | None:
    try:
        return float(str(value).strip())
    except ValueError:
        return None  # blank cell (CheXbert's "not mentioned" in some exports)


def case_id(value) -> str:
    """An id as text, integer-valued ids normalised (`44`, `44.0` and `0044` are the same case)."""
    text = str(value).strip()
    try:
        f = float(text)
    except ValueError:
        return text
    return str(int(f)) if f.is_integer() else text


def check_dataset(data_dir, annotation, labels_csv, splits=("train", "test"), check_volumes: bool = True
                  ) -> dict[str, list[Case]]:
    """Every id of the splits has a volume with 3 dimensions and a labels row; raises DatasetError naming the file."""
    data_dir, annotation, labels_csv = Path(data_dir), Path(annotation), Path(labels_csv)
    if not data_dir.is_dir():
        raise DatasetError("data", f"{data_dir}: volume folder not found (data.path)")
    if not annotation.is_file():
        raise DatasetError("data", f"{annotation}: annotation.json not found (data.annotation)")
    try:
        ann = json.loads(annotation.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError("data", f"{annotation}: not valid JSON ({e})") from None
    labels = read_labels(labels_csv)
    out: dict[str, list[Case]] = {}
    for split in splits:
        if split not in ann or not ann[split]:
            raise DatasetError("data", f"{annotation}: no '{split}' list (expected train / val / test lists of "
                                       f"{{id, finding}})")
        cases = []
        for entry in ann[split]:
            cid, finding = str(entry["id"]), entry.get("finding", "")
            vol = data_dir / f"{cid}.nii.gz"
            if not vol.is_file():
                raise DatasetError("data", f"{annotation}: id {cid} ({split}) has no volume {vol}")
            if case_id(cid) not in labels:
                raise DatasetError("data", f"{labels_csv}: no labels row for id {cid} (listed in {annotation})")
            if check_volumes:
                import nibabel as nib

                shape = nib.load(str(vol)).shape
                if len(shape) != 3:
                    raise DatasetError("data", f"{vol}: a CT volume must have 3 dimensions (H, W, D), this one "
                                               f"has shape {shape}")
            cases.append(Case(cid, finding, labels[case_id(cid)], vol))
        out[split] = cases
    return out


def sitk_order(arr):
    """The voxel array as SimpleITK's GetArrayFromImage returns it, (k, j, i), from nibabel's (i, j, k)."""
    return arr.transpose(2, 1, 0)


def depth_indices(depth: int, frames: int):
    """The slices scipy.ndimage.zoom(order=0) keeps when Dia-LLaMA zooms the depth axis from `depth` to `frames`
    (zoom factor frames / depth; order-0 zoom is separable, so the 1-D zoom of the slice numbers is exactly it)."""
    import numpy as np
    from scipy import ndimage

    idx = ndimage.zoom(np.arange(depth, dtype=np.float64), frames / depth, order=0)
    return idx.astype(np.int64)


def load_volume(path: Path, image_size: int = 256, frames: int = 64, resize: int = 512):
    """(3, image_size, image_size, frames) float32 in [0, 1], step for step as Dia-LLaMA prepares a CTRG volume
    (CTRG_dataset.py, then its collate / test-time resize):
    1. the array in SimpleITK's order (k, j, i); if its first axis is shorter than its last, transpose (1, 2, 0)
       -> (j, i, k): rows j, columns i, depth k (nibabel's (i, j, k) with the in-plane axes swapped);
    2. cv2.resize of axes 0 and 1 to resize x resize (bilinear, INTER_LINEAR; integer volumes keep their integer
       type, rounded, as cv2 does);
    3. three identical channels; scipy.ndimage.zoom(order=0) of the depth axis to `frames` slices;
    4. min-max normalisation over the whole volume ((x - min) / (max - min), float64 for integer volumes as numpy
       computes it, float32 for float32 ones);
    5. nearest-neighbour resize (torch.nn.functional.interpolate, mode 'nearest') to image_size x image_size x frames.
    Here the depth slices are chosen first and only those are resized (the same numbers: the depth zoom keeps whole
    slices and the resize works slice by slice), and the normalisation is applied after step 5 with step 4's min
    and max (pointwise, so the same numbers again).
    """
    import nibabel as nib
    import numpy as np
    import torch

    arr = np.asanyarray(nib.load(str(path)).dataobj)
    if arr.ndim != 3:
        raise DatasetError("data", f"{path}: expected 3 dimensions, got shape {arr.shape}")
    arr = sitk_order(arr)
    if arr.shape[0] < arr.shape[2]:
        arr = arr.transpose(1, 2, 0)
    integer = np.issubdtype(arr.dtype, np.integer)
    idx = depth_indices(arr.shape[2], frames)
    slices = np.ascontiguousarray(arr[:, :, idx].transpose(2, 0, 1))  # frames, rows, cols
    vol = torch.from_numpy(slices.astype(np.float32, copy=False))
    vol = torch.nn.functional.interpolate(vol[:, None], size=(resize, resize), mode="bilinear",
                                          align_corners=False)[:, 0]
    if integer:
        info = np.iinfo(arr.dtype)
        vol = vol.round().clamp(info.min, info.max)
    lo, hi = vol.min(), vol.max()
    vol = vol.permute(1, 2, 0)[None, None]  # 1, 1, rows, cols, frames
    vol = torch.nn.functional.interpolate(vol, size=(image_size, image_size, frames), mode="nearest")[0, 0]
    if hi <= lo:
        vol = torch.zeros_like(vol)
    elif integer:
        vol = ((vol.double() - float(lo)) / (float(hi) - float(lo))).float()
    else:
        vol = (vol - lo) / (hi - lo)
    return vol.unsqueeze(0).repeat(3, 1, 1, 1).contiguous()


SENTENCES_POS = "There is a right pleural effusion."
SENTENCES_NEG = "No pleural effusion is seen."
# what a reader writes next depends on the finding: the lung base next to an effusion collapses
COMPANION_POS = "Adjacent atelectasis of the right lower lobe."
COMPANION_NEG = "The lungs are clear."
OTHER = ["The heart size is normal.", "No pneumothorax.", "The mediastinum is unremarkable.",
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
            # CTRG-like findings from a sentence bank: the effusion sentence (what the volume shows), the sentence
            # that goes with it, then one of the unrelated ones
            finding = " ".join([SENTENCES_POS, COMPANION_POS] if positive else [SENTENCES_NEG, COMPANION_NEG])
            finding += " " + rng.choice(OTHER)
            items.append({"id": cid, "finding": finding})
            labels = {d: "0" for d in CONDITIONS}  # CheXbert codes: 0 blank, 1 positive, 2 negative
            labels[SIGNAL] = "1" if positive else "2"
            labels["no finding"] = "0" if positive else "1"
            rows.append({"id": cid, **{d.replace(" ", "_"): v for d, v in labels.items()}})
        splits[split] = items
    paths["annotation"].write_text(json.dumps(splits, indent=1, ensure_ascii=False))
    with paths["labels_csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id"] + [d.replace(" ", "_") for d in CONDITIONS])
        w.writeheader()
        w.writerows(rows)
    return paths
