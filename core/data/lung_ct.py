"""Lung CT slices with patient-level labels, in the two formats the lab has, plus the patient split, the slice
sampling and a synthetic generator.

Formats (both give the same `Patient` list: id, label, slice files in series order):
- folders: `{data.path}/{patient_id}/` holds one patient's slices (PNG / JPEG, or a DICOM series: `.dcm` files or
  extension-less files with the DICM preamble, ordered by InstanceNumber then ImagePositionPatient z), and
  `data.labels_csv` is a CSV with `patient_id,label` (label an integer class 0..C-1).
- vitp: the ViTP / InternVL layout: a meta json `{name: {root, annotation, ...}}` whose annotation is a jsonl
  with one slice per row: `{"image": "<patient>/<slice>.png", "conversations": [{"from": "human", "value":
  "<image>\\n<cls>: 0|1|2|3."}, {"from": "gpt", "value": "2"}]}`. The patient is the row's `patient_id` key, else the
  image's folder; every row of a patient must carry the same answer.

Every problem is a `DatasetError` naming the spec field, the file and the line (the workload's planner turns it
into a FieldError before anything is submitted). Images that cannot be read are listed; a patient with no
readable slice is refused, and more than `max_unreadable` (a fraction of all slices) is refused too.
Nothing here imports torch: the planner reads the dataset too. `load_slice` returns a numpy array; the workload
makes tensors.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from core.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
SPLITS = ("train", "val", "test")
CLS_CHOICES = re.compile(r"<cls>\s*:\s*(.+?)\s*\.?\s*$", re.S)
LUNG_WINDOW = (-600.0, 1500.0)   # DICOM window (center, width) in HU


@dataclass
class Patient:
    id: str
    label: int
    slices: list[str]            # readable slice files, in series order
    where: str = ""              # where the label came from ("labels.csv line 5", "train.jsonl line 12")
    split: str = ""              # the lab's own split (vitp format with data.meta_splits), "" when none was given


@dataclass
class Scan:
    patients: list[Patient]                                        # sorted by id
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file, reason), skipped
    ignored: list[str] = field(default_factory=list)               # folders without a label (folders format)
    slices_total: int = 0                                          # before skipping unreadable ones

    def to_json(self) -> dict:
        return {"patients": [asdict(p) for p in self.patients], "unreadable": [list(u) for u in self.unreadable],
                "ignored": self.ignored, "slices_total": self.slices_total}

    @classmethod
    def from_json(cls, data: dict) -> "Scan":
        return cls([Patient(**p) for p in data["patients"]], [tuple(u) for u in data["unreadable"]],
                   data.get("ignored", []), data.get("slices_total", 0))


def natural_key(text: str):
    """'slice_10.png' after 'slice_9.png'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix:
        return False
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _slice_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES or is_dicom(p):
            out.append(p)
    return out


# ---------------------------------------------------------------- checking and ordering single slices
def check_slice(path: Path, verify: bool = True) -> tuple[Optional[str], tuple]:
    """(None or why the slice cannot be read, series sort key). DICOM headers are always read (they give the
    order); `verify` also checks that PNG / JPEG data decodes (PIL's verify) and that a DICOM has pixel data."""
    path = Path(path)
    if not path.is_file():
        return "file not found", (math.inf, 0.0, natural_key(path.name))
    if is_dicom(path):
        import pydicom

        try:
            ds = pydicom.dcmread(str(path), defer_size="1 KB", force=path.suffix.lower() not in DICOM_SUFFIXES)
        except Exception as e:  # pydicom raises InvalidDicomError, EOFError, struct errors, ...
            why = f"not a readable DICOM file ({type(e).__name__}: {str(e)[:80]})"
            return why, (math.inf, 0.0, natural_key(path.name))
        try:
            instance = float(ds.InstanceNumber)
        except (AttributeError, TypeError, ValueError):
            instance = math.inf
        pos = ds.get("ImagePositionPatient")
        z = float(pos[2]) if pos is not None and len(pos) == 3 else 0.0
        key = (instance, z, natural_key(path.name))
        if verify:
            if "PixelData" not in ds:
                return "DICOM file without pixel data", key
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                return "multi-frame DICOM (store the series as one file per slice)", key
        return None, key
    key = (0, 0.0, natural_key(path.name))
    if verify:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.verify()
        except UnidentifiedImageError:
            return "not an image PIL can read", key
        except Exception as e:  # truncated / corrupt data
            return f"corrupt image ({type(e).__name__}: {str(e)[:80]})", key
    return None, key


def _check_all(paths: list[Path], verify: bool, workers: int = 8) -> dict[Path, tuple]:
    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(zip(paths, pool.map(lambda p: check_slice(p, verify), paths)))


def _finish(found: dict[str, tuple[int, list[Path], str]], field_name: str, verify: bool, max_unreadable: float,
            ignored: list[str], workers: int = 8) -> Scan:
    """Check every slice, order each series, drop unreadable slices; refuse a patient left with none and a
    dataset with more than `max_unreadable` of its slices unreadable."""
    all_paths = [p for _, files, _ in found.values() for p in files]
    checked = _check_all(all_paths, verify, workers)
    patients, unreadable = [], []
    for pid in sorted(found, key=natural_key):
        label, files, where = found[pid]
        ok, bad = [], []
        for p in files:
            reason, key = checked[p]
            (bad if reason else ok).append((key, p, reason))
        bad.sort(key=lambda t: t[0])
        if not ok:
            first = bad[0]
            raise DatasetError(field_name, f"patient {pid} ({where}): none of its {len(files)} slice(s) can be read "
                                           f"(first: {first[1]}: {first[2]}); fix or remove the patient")
        unreadable += [(str(p), reason) for _, p, reason in bad]
        ok.sort(key=lambda t: t[0])
        patients.append(Patient(pid, label, [str(p) for _, p, _ in ok], where))
    total = len(all_paths)
    if unreadable and len(unreadable) > max_unreadable * total:
        shown = "; ".join(f"{f}: {r}" for f, r in unreadable[:3])
        raise DatasetError(field_name, f"{len(unreadable)} of {total} slices cannot be read, more than "
                                       f"data.max_unreadable ({max_unreadable:g} of all slices) allows "
                                       f"(first: {shown})")
    return Scan(patients, unreadable, ignored, total)


def _label(raw: str, num_classes: int, where: str, field_name: str, pid: str) -> int:
    text = str(raw).strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise DatasetError(field_name, f"{where}: label {text!r} of patient {pid} is not an integer class "
                                       f"(0..{num_classes - 1})")
    value = int(text)
    if not 0 <= value < num_classes:
        raise DatasetError(field_name, f"{where}: label {value} of patient {pid} is out of range: classes are "
                                       f"0..{num_classes - 1}")
    return value


# ---------------------------------------------------------------- folder per patient + labels CSV
def scan_folders(root, labels_csv, num_classes: int, verify: bool = True, max_unreadable: float = 0.02,
                 workers: int = 8) -> Scan:
    root, labels_csv = Path(root), Path(labels_csv)
    if not root.is_dir():
        raise DatasetError("data.path", f"{root}: folder of patient folders not found")
    if not labels_csv.is_file():
        raise DatasetError("data.labels_csv", f"{labels_csv}: labels CSV not found")
    found: dict[str, tuple[int, list[Path], str]] = {}
    lines: dict[str, int] = {}
    with labels_csv.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        if "patient_id" not in cols or "label" not in cols:
            raise DatasetError("data.labels_csv", f"{labels_csv}: needs the columns patient_id,label "
                                                  f"(found: {', '.join(reader.fieldnames or []) or 'none'})")
        for row in reader:
            line = reader.line_num
            where = f"{labels_csv} line {line}"
            pid = str(row[cols["patient_id"]] or "").strip()
            if not pid:
                raise DatasetError("data.labels_csv", f"{where}: empty patient_id")
            if pid in lines:
                raise DatasetError("data.labels_csv", f"{where}: patient {pid} is listed twice (also line "
                                                      f"{lines[pid]})")
            if "/" in pid or "\\" in pid or pid in (".", ".."):
                raise DatasetError("data.labels_csv", f"{where}: patient_id {pid!r} is not a folder name")
            lines[pid] = line
            label = _label(row[cols["label"]], num_classes, where, "data.labels_csv", pid)
            files = _slice_files(root / pid)
            if not files:
                what = "has no folder" if not (root / pid).is_dir() else "has no PNG / JPEG / DICOM slices in"
                raise DatasetError("data.path", f"patient {pid} ({labels_csv.name} line {line}) {what} {root / pid}")
            found[pid] = (label, files, f"{labels_csv.name} line {line}")
    if not found:
        raise DatasetError("data.labels_csv", f"{labels_csv}: no patient rows")
    ignored = sorted(p.name for p in root.iterdir()
                     if p.is_dir() and p.name not in found and not p.name.startswith("."))
    return _finish(found, "data.path", verify, max_unreadable, ignored, workers)


# ---------------------------------------------------------------- ViTP meta json + conversation jsonl
def _resolve(meta: Path, value: str) -> list[Path]:
    p = Path(value)
    if p.is_absolute():
        return [p]
    # relative to the meta file, else to the folder above it (ViTP_IN/ViTP_configs/meta.json with paths
    # relative to ViTP_IN/, where the lab's training runs)
    return [meta.parent / p, meta.parent.parent / p]


def _existing(meta: Path, name: str, key: str, value, want_dir: bool) -> Path:
    if not isinstance(value, str) or not value:
        raise DatasetError("data.meta", f"{meta}: entry '{name}' needs a '{key}' path")
    tried = _resolve(meta, value)
    for p in tried:
        if (p.is_dir() if want_dir else p.is_file()):
            return p
    raise DatasetError("data.meta", f"{meta}: entry '{name}' {key} '{value}' not found (tried "
                                    f"{', '.join(str(t) for t in tried)})")


def parse_row(row, where: str, choices: list[str]) -> tuple[str, str]:
    """(image, answer) of one jsonl row; DatasetError naming `where` (file and line) when it is not a slice-level
    `<cls>` row whose answer is among the choices."""
    if not isinstance(row, dict):
        raise DatasetError("data.meta", f"{where}: a row must be a JSON object with image and conversations")
    image = row.get("image")
    if isinstance(image, list):
        if len(image) != 1:
            raise DatasetError("data.meta", f"{where}: {len(image)} images in one row; write one slice per row")
        image = image[0]
    if not isinstance(image, str) or not image:
        raise DatasetError("data.meta", f"{where}: no 'image' path")
    conv = row.get("conversations")
    if not isinstance(conv, list):
        raise DatasetError("data.meta", f"{where}: no 'conversations' list")
    human = next((t for t in conv if isinstance(t, dict) and t.get("from") == "human"), None)
    answer = next((t for t in conv if isinstance(t, dict) and t.get("from") in ("gpt", "assistant")), None)
    if human is None or answer is None:
        raise DatasetError("data.meta", f"{where}: conversations need a 'human' and a 'gpt' turn")
    text = str(human.get("value", ""))
    if "<image>" not in text:
        raise DatasetError("data.meta", f"{where}: the human turn has no <image> placeholder")
    m = CLS_CHOICES.search(text)
    if not m:
        raise DatasetError("data.meta", f"{where}: the human turn has no '<cls>: {'|'.join(choices)}.' choices")
    row_choices = [c.strip() for c in m.group(1).split("|")]
    value = str(answer.get("value", "")).strip().rstrip(".").strip()
    if value not in row_choices:
        raise DatasetError("data.meta", f"{where}: answer {value!r} is not among the choices {'|'.join(row_choices)}")
    if row_choices != choices:
        raise DatasetError("data.meta", f"{where}: choices {'|'.join(row_choices)} differ from the classes "
                                        f"{'|'.join(choices)} (vitp.classes)")
    return image, value


NOT_A_PATIENT = {"", ".", "train", "training", "val", "valid", "validation", "test", "testing", "images", "image",
                 "imgs", "data", "slices", "png", "pngs"}


def patient_of(row: dict, image: str, where: str, pattern: Optional[str]) -> str:
    """The patient of a jsonl row: its `patient_id` field, else `pattern` (data.patient_pattern: a regex searched in
    the image path, its `patient` group or its first group), else the image's folder, unless that folder is a split
    or a generic name ('train/0001.png' as in the guide's example), which is refused: one patient called 'train'
    would put every slice of the split into one patient."""
    pid = str(row.get("patient_id") or "").strip()
    if pid:
        return pid
    if pattern:
        m = re.search(pattern, image)
        if not m:
            raise DatasetError("data.patient_pattern", f"{where}: {pattern!r} does not match the image path {image!r}")
        pid = (m.groupdict().get("patient") or (m.group(1) if m.groups() else m.group(0)) or "").strip()
        if not pid:
            raise DatasetError("data.patient_pattern", f"{where}: {pattern!r} matches {image!r} with an empty patient")
        return pid
    folder = Path(image).parent.name
    if folder.lower() in NOT_A_PATIENT:
        raise DatasetError("data.meta", f"{where}: cannot tell the patient of {image!r} (its folder "
                                        f"'{folder or '.'}' is not a patient): give each row a 'patient_id' field, "
                                        f"or set data.patient_pattern to a regex over the image path with a "
                                        f"(?P<patient>...) group, or keep each patient's slices in a folder of its "
                                        f"own (<patient>/<slice>.png)")
    return folder


def scan_vitp(meta, num_classes: int, verify: bool = True, max_unreadable: float = 0.02, workers: int = 8,
              patient_pattern: Optional[str] = None, meta_splits: Optional[dict] = None) -> Scan:
    """`meta_splits` ({entry: train|val|test}, data.meta_splits): the lab's own split, one annotation file per split;
    every entry must be named in it and each patient keeps the split of its entry."""
    meta = Path(meta)
    if not meta.is_file():
        raise DatasetError("data.meta", f"{meta}: ViTP meta json not found")
    try:
        entries = json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError("data.meta", f"{meta}: not valid JSON ({e})") from None
    if not isinstance(entries, dict) or not entries:
        raise DatasetError("data.meta", f"{meta}: expected an object of datasets {{name: {{root, annotation}}}}")
    choices = [str(i) for i in range(num_classes)]
    found: dict[str, tuple[int, list[Path], str]] = {}
    first_line: dict[str, str] = {}
    split_of: dict[str, str] = {}
    if meta_splits:
        unknown = sorted(set(meta_splits) - set(entries))
        if unknown:
            raise DatasetError("data.meta_splits", f"{meta} has no entry {', '.join(unknown)} (entries: "
                                                   f"{', '.join(entries)})")
        unnamed = [n for n in entries if n not in meta_splits]
        if unnamed:
            raise DatasetError("data.meta_splits", f"{meta}: entry {', '.join(unnamed)} has no split; name every "
                                                   f"entry (train, val or test)")
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise DatasetError("data.meta", f"{meta}: entry '{name}' must be an object with root and annotation")
        entry_split = (meta_splits or {}).get(name, "")
        root = _existing(meta, name, "root", entry.get("root"), want_dir=True)
        ann = _existing(meta, name, "annotation", entry.get("annotation"), want_dir=False)
        with ann.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{ann} line {n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError("data.meta", f"{where}: not valid JSON ({e.msg})") from None
                image, answer = parse_row(row, where, choices)
                pid = patient_of(row, image, where, patient_pattern)
                if entry_split:
                    if split_of.setdefault(pid, entry_split) != entry_split:
                        raise DatasetError("data.meta_splits", f"{where}: patient {pid} is in the {entry_split} "
                                                               f"split here but in {split_of[pid]} at "
                                                               f"{first_line[pid]}; a patient belongs to one split")
                label = int(answer)
                if pid in found:
                    if found[pid][0] != label:
                        raise DatasetError("data.meta", f"{where}: patient {pid} has answer {label} here but "
                                                        f"{found[pid][0]} at {first_line[pid]} (labels are per "
                                                        f"patient)")
                    found[pid][1].append(root / image)
                else:
                    found[pid] = (label, [root / image], f"{ann.name} line {n}")
                    first_line[pid] = where
    if not found:
        raise DatasetError("data.meta", f"{meta}: the annotation files have no rows")
    out = _finish(found, "data.meta", verify, max_unreadable, [], workers)
    for p in out.patients:
        p.split = split_of.get(p.id, "")
    return out


def scan(data, num_classes: int) -> Scan:
    """The spec's `data:` section (format folders or vitp) -> Scan."""
    if data.format == "vitp":
        return scan_vitp(data.meta, num_classes, data.verify_images, data.max_unreadable,
                         patient_pattern=getattr(data, "patient_pattern", None),
                         meta_splits=getattr(data, "meta_splits", None))
    return scan_folders(data.path, data.labels_csv, num_classes, data.verify_images, data.max_unreadable)


# ---------------------------------------------------------------- patient split and slice sampling
def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def given_split(patients: list[Patient]) -> Optional[dict[str, list[Patient]]]:
    """The lab's own split (every patient's `split` set from data.meta_splits), else None."""
    if not any(p.split for p in patients):
        return None
    out: dict[str, list[Patient]] = {s: [] for s in SPLITS}
    for p in sorted(patients, key=lambda p: natural_key(p.id)):
        out[p.split].append(p)
    return out


def split_patients(patients: list[Patient], fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict[str, list[Patient]]:
    """Train / val / test by patient, stratified by class, seeded: each class's patients (sorted by id) are
    shuffled with the seed and cut at the fractions (val and test rounded, train the rest)."""
    by_class: dict[int, list[Patient]] = {}
    for p in patients:
        by_class.setdefault(p.label, []).append(p)
    out: dict[str, list[Patient]] = {s: [] for s in SPLITS}
    _, f_val, f_test = fractions
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda p: natural_key(p.id))
        random.Random(f"{seed}:{label}").shuffle(group)
        n = len(group)
        n_test = _round(n * f_test)
        n_val = min(_round(n * f_val), n - n_test)
        if n - n_test - n_val < 1 and n_test + n_val > 0:  # keep at least one patient of each class in training
            if n_val:
                n_val -= 1
            else:
                n_test -= 1
        out["test"] += group[:n_test]
        out["val"] += group[n_test:n_test + n_val]
        out["train"] += group[n_test + n_val:]
    for s in SPLITS:
        out[s].sort(key=lambda p: natural_key(p.id))
    return out


def _bounds(n: int, k: int, j: int) -> tuple[int, int]:
    lo = min(j * n // k, n - 1)
    hi = max((j + 1) * n // k, lo + 1)
    return lo, min(hi, n)


def eval_slices(n: int, k: int) -> list[int]:
    """K fixed indices spread uniformly over a series of n slices: the middle of each of K equal strata."""
    return [min(int((j + 0.5) * n / k), n - 1) for j in range(k)]


def train_slice(n: int, k: int, j: int, seed: int, epoch: int, patient: int) -> int:
    """A random slice of stratum j (of K equal strata of the n slices), drawn anew every epoch; a function of
    (seed, epoch, patient, j) only, so a resumed run draws the same slices."""
    import numpy as np

    lo, hi = _bounds(n, k, j)
    rng = np.random.default_rng([seed % (2 ** 32), epoch, patient, j])
    return lo + int(rng.integers(hi - lo))


# ---------------------------------------------------------------- reading a slice
def load_slice(path, window: tuple[float, float] = LUNG_WINDOW):
    """A slice as a 2-D float32 array in [0, 1]: PNG / JPEG scaled by their bit depth (colour converted to
    grey), DICOM rescaled to HU (slope, intercept) and put through the window (center, width)."""
    import numpy as np

    path = Path(path)
    if is_dicom(path):
        import pydicom

        ds = pydicom.dcmread(str(path), force=True)
        arr = ds.pixel_array.astype(np.float32)
        arr = arr * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
        center, width = window
        arr = np.clip((arr - (center - width / 2)) / width, 0.0, 1.0)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            arr = 1.0 - arr
        return arr.astype(np.float32)
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(im, dtype=np.float32) / 65535.0
        if im.mode in ("I", "F"):
            arr = np.asarray(im, dtype=np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        if im.mode != "L":
            im = im.convert("L")
        return np.asarray(im, dtype=np.float32) / 255.0


# ---------------------------------------------------------------- synthetic dataset
CLASS_NAMES = ("normal", "bacterial", "viral", "pneumocystis")


def _synthetic_slice(label: int, t: float, size: int, rng) -> "object":
    """One slice: body and two dark lungs whose size follows the position t in the series, noise, and the class
    signal (1: one dense blob low in the right lung, 2: patches low in both lungs, 3: patches high and central in
    both lungs) on the slices between 10% and 90% of the series."""
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size), 0.05, np.float32)
    img[((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.38) ** 2 <= 1] = 0.55
    scale = 0.6 + 0.4 * math.sin(math.pi * t)
    for cx in (0.32, 0.68):
        img[((xx - cx) / (0.13 * scale)) ** 2 + ((yy - 0.5) / (0.25 * scale)) ** 2 <= 1] = 0.15
    if 0.1 <= t <= 0.9 and label:
        jx, jy = rng.uniform(-0.03, 0.03, 2)
        spots = {1: [(0.30, 0.62)], 2: [(0.26, 0.64), (0.74, 0.64)], 3: [(0.40, 0.40), (0.60, 0.40)]}[label]
        for cx, cy in spots:
            r = 0.09 if label == 1 else 0.07
            img[((xx - cx - jx) ** 2 + (yy - cy - jy) ** 2) <= r * r] = rng.uniform(0.8, 0.95)
    img += rng.normal(0, 0.04, img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _write_dicom(path: Path, pixels, pid: str, instance: int, z: float) -> None:
    """A CT slice as an uncompressed DICOM file: signed stored values HU + 1024 (RescaleIntercept -1024)."""
    import numpy as np
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", pid, instance
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1   # signed int16
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    # [0, 1] intensities -> HU so that the lung window (-600, 1500) gives them back: HU = -1350 + 1500 x
    hu = -1350.0 + 1500.0 * pixels
    ds.PixelData = np.round(hu + 1024).astype(np.int16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def write_synthetic(root, patients_per_class=(12, 12, 12, 12), slices=(30, 35), size: int = 64, seed: int = 0,
                    dicom_every: int = 0) -> dict:
    """A small dataset in both formats under `root` (idempotent; built in a temporary folder and renamed):
    slices/<patient>/slice_NNN.png (every `dicom_every`-th patient as a DICOM series with shuffled file names),
    labels.csv (patient_id,label), vitp_meta.json + vitp_train.jsonl (one `<cls>` row per slice, root slices/).
    The class is visible in the image (see `_synthetic_slice`)."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    paths = {"root": root, "slices": root / "slices", "labels_csv": root / "labels.csv",
             "meta": root / "vitp_meta.json", "jsonl": root / "vitp_train.jsonl"}
    if paths["labels_csv"].is_file() and paths["meta"].is_file():
        return paths
    if isinstance(patients_per_class, int):
        patients_per_class = (patients_per_class,) * len(CLASS_NAMES)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "slices").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    order = random.Random(seed)
    choices = "|".join(str(i) for i in range(len(patients_per_class)))
    labels, rows, n = [], [], 0
    for label, count in enumerate(patients_per_class):
        for _ in range(count):
            pid = f"P{n:04d}"
            folder = tmp / "slices" / pid
            folder.mkdir()
            k = int(rng.integers(slices[0], slices[1] + 1))
            dicom = dicom_every and n % dicom_every == dicom_every - 1
            names = [f"IM{v:05d}.dcm" for v in order.sample(range(100000), k)] if dicom else \
                [f"slice_{i:03d}.png" for i in range(k)]
            for i in range(k):
                img = _synthetic_slice(label, i / max(k - 1, 1), size, rng)
                if dicom:
                    _write_dicom(folder / names[i], img, pid, instance=i + 1, z=-2.5 * i)
                else:
                    Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L").save(folder / names[i])
                rows.append({"image": f"{pid}/{names[i]}", "conversations": [
                    {"from": "human", "value": f"<image>\n<cls>: {choices}."}, {"from": "gpt", "value": str(label)}]})
            labels.append((pid, label))
            n += 1
    with (tmp / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "label"])
        w.writerows(labels)
    (tmp / "vitp_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "vitp_meta.json").write_text(json.dumps({"lung_cls": {
        "root": "slices", "annotation": "vitp_train.jsonl", "data_augment": False, "repeat_time": 1,
        "length": len(rows), "max_dynamic_patch": 1}}, indent=1))
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first (or root exists): keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not paths["labels_csv"].is_file():
            raise
    return paths
