"""MedTrinity-style captioning data: rows `{image, id, caption}` from a Hugging Face `datasets` folder
(`save_to_disk`), a hub snapshot (a folder of parquet shards, e.g. `25M_demo/*.parquet`, any shard naming), a
datasets cache folder (`load_dataset(..., cache_dir=...)`: its arrow files, picked by `hf_config`), a parquet file,
or a jsonl file whose `image` is a path relative to the file.

Parquet is read lazily: ids and captions up front (text only), images one row group at a time when a row is asked
for (memory bounded by a row group, a few cached per reader), decoded by the caller's loader threads.

`open_rows` checks the source and its columns without decoding any image (torch-free, so the plan calls it before
anything is submitted); `split` is the seeded 90/10 split of the lab's notebook with configurable sizes;
`ImageRows.image(i)` decodes one image to RGB and returns None (logging the id) when it does not decode, so a
bad image is skipped and counted, never a crash. `write_synthetic` writes a small set in all three formats from
real medical images that scikit-image ships (immunohistochemistry, retina fundus, cell microscopy, retinal
microaneurysms), with one caption per image kind: the caption is learnable from the image.
"""
from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core.errors import DatasetError

log = logging.getLogger("medtrinity")


@dataclass
class ImageRows:
    """Rows of one dataset: ids and captions in memory, images decoded on demand."""
    source: Path
    ids: list[str]
    captions: list[str]
    images: Any                      # a sequence of PIL images, bytes, {"bytes", "path"} dicts or file paths
    base: Path = Path(".")           # folder that relative image paths start from
    failed: dict[str, str] = field(default_factory=dict)   # id -> why its image did not decode

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int):
        """Row i's image as RGB, or None when it does not decode (named in the log once, counted in `failed`)."""
        from PIL import Image

        try:
            value = self.images[i]
            if isinstance(value, dict):
                value = value.get("bytes") or value.get("path")
            if isinstance(value, (bytes, bytearray)):
                img = Image.open(io.BytesIO(value))
            elif isinstance(value, str):
                img = Image.open(self.base / value)
            else:
                img = value
            img.load()
            return img.convert("RGB")
        except Exception as e:  # PIL raises many kinds for a bad file
            if self.ids[i] not in self.failed:
                self.failed[self.ids[i]] = f"{type(e).__name__}: {e}"
                log.warning("image of row %s does not decode (%s): skipped", self.ids[i], type(e).__name__)
            return None


def open_rows(path: Optional[str], image_column: str = "image", caption_column: str = "caption",
              id_column: str = "id", hf_config: Optional[str] = None) -> ImageRows:
    """The dataset at `path` (a save_to_disk folder, a hub snapshot of parquet shards, a datasets cache folder, a
    .parquet file or a .jsonl file), columns checked."""
    if not path:
        raise DatasetError("data.path", "give a datasets folder (save_to_disk), a hub snapshot or datasets cache "
                                        "folder, a .parquet file or a .jsonl file")
    p = Path(path)
    if p.is_dir() and _is_save_to_disk(p):
        rows, columns, base = _from_datasets_folder(p), None, p
    elif p.is_dir():
        shards = _parquet_shards(p, hf_config)
        arrows = [] if shards else _cache_arrow_files(p, hf_config)
        if shards:
            rows, base = ParquetColumns(shards, image_column), p
        elif arrows:
            rows, base = _from_arrow_files(p, arrows), p
        else:
            raise DatasetError("data.path", f"{p} is not a datasets folder (save_to_disk), holds no parquet shards"
                                            + (f" for data.hf_config '{hf_config}'" if hf_config else "")
                                            + " and no datasets-cache arrow files; for a cache folder give "
                                              "data.hf_config (e.g. 25M_demo)")
    elif p.suffix == ".parquet" and p.is_file():
        rows, columns, base = ParquetColumns([p], image_column), None, p.parent
    elif p.suffix == ".jsonl" and p.is_file():
        rows, columns, base = _from_jsonl(p), None, p.parent
    elif not p.exists():
        raise DatasetError("data.path", f"{p} not found")
    else:
        raise DatasetError("data.path", f"{p} is not a datasets folder, a .parquet or a .jsonl file")
    columns = list(rows.keys()) if isinstance(rows, (dict, ParquetColumns)) else rows.column_names
    for name, col in (("data.image_column", image_column), ("data.caption_column", caption_column),
                      ("data.id_column", id_column)):
        if col not in columns:
            raise DatasetError(name, f"{p} has no column '{col}' (columns: {', '.join(columns)})")
    if isinstance(rows, ParquetColumns):
        ids, captions, images = rows.text(id_column), rows.text(caption_column), rows
    elif isinstance(rows, dict):
        ids, captions, images = rows[id_column], rows[caption_column], rows[image_column]
    else:  # a datasets.Dataset: read the text columns, keep images lazy (decoded per row, by us)
        from datasets import Image as HFImage

        if isinstance(rows.features.get(image_column), HFImage):
            rows = rows.cast_column(image_column, HFImage(decode=False))
        ids, captions = rows[id_column], rows[caption_column]
        images = _LazyColumn(rows, image_column)
    if not ids:
        raise DatasetError("data.path", f"{p} has no rows")
    return ImageRows(p, [str(i) for i in ids], [str(c) for c in captions], images, base)


class _LazyColumn:
    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[int(i)][self.column]


def _from_datasets_folder(p: Path):
    try:
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(p))
    except Exception as e:
        raise DatasetError("data.path", f"{p} is not a readable datasets folder (save_to_disk): "
                                        f"{type(e).__name__}: {str(e)[:200]}") from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DatasetError("data.path", f"{p} has splits {list(ds)} but no 'train'")
        ds = ds["train"]
    return ds


def _is_save_to_disk(p: Path) -> bool:
    return any((p / n).is_file() for n in ("dataset_dict.json", "state.json", "dataset_info.json")) and \
        not any(p.glob("*.parquet"))


def _parquet_shards(p: Path, hf_config: Optional[str]) -> list[Path]:
    """The parquet shards of a hub snapshot: <p>/<hf_config>/**.parquet when that folder exists, else every parquet
    file under p, in name order (the hub's shard names sort in order; any other naming is read in its sort order)."""
    root = p / hf_config if hf_config and (p / hf_config).is_dir() else p
    shards = sorted(root.rglob("*.parquet"))
    if hf_config and root == p and p.name != hf_config:
        configs = sorted({s.relative_to(p).parts[0] for s in shards if len(s.relative_to(p).parts) > 1})
        if configs:   # a snapshot of several configs without this one: never read the others' rows instead
            raise DatasetError("data.hf_config", f"{hf_config!r} is not a folder of the snapshot {p}; its folders "
                                                 f"with parquet shards are {configs[:12]}")
    train = [s for s in shards if "train" in s.name or "train" in s.parent.name]
    return train or shards


def _cache_arrow_files(p: Path, hf_config: Optional[str]) -> list[Path]:
    """The train split's arrow files in a datasets cache folder (`<cache>/<dataset>/<config>/<version>/<hash>/
    <builder>-train*.arrow`), for the folder of `hf_config` (a path component equal to it or starting with
    '<hf_config>-')."""
    if not hf_config:
        return []
    found = [f for f in sorted(p.rglob("*.arrow")) if "-train" in f.name and any(
        part == hf_config or part.startswith(hf_config + "-") for part in f.relative_to(p).parts[:-1])]
    if found:
        newest = max(found, key=lambda f: f.parent.stat().st_mtime).parent  # one build of the config
        found = [f for f in found if f.parent == newest]
    return found


def _from_arrow_files(p: Path, files: list[Path]):
    try:
        from datasets import Dataset, concatenate_datasets

        parts = [Dataset.from_file(str(f)) for f in files]  # memory-mapped: nothing is read until asked for
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    except Exception as e:
        raise DatasetError("data.path", f"{p}: the datasets cache files {[f.name for f in files][:3]} are not "
                                        f"readable: {type(e).__name__}: {str(e)[:200]}") from None


class ParquetColumns:
    """One or more parquet files read lazily: column names from the schema, text columns in full, the image column
    one row group at a time (a few row groups cached), so memory is bounded by a row group, not the dataset.
    Indexing gives row i's image value; safe to call from several loader threads."""

    def __init__(self, files: list[Path], image_column: str, cache: int = 4):
        import threading

        import pyarrow.parquet as pq

        self.files, self.image_column, self.cache = files, image_column, cache
        self.readers, self.groups = [], []   # groups: (start row, file index, row group index, rows)
        start = 0
        for f in files:
            try:
                reader = pq.ParquetFile(str(f))
            except Exception as e:
                raise DatasetError("data.path", f"{f} is not a readable parquet file: {type(e).__name__}: "
                                                f"{str(e)[:200]}") from None
            self.readers.append(reader)
            for g in range(reader.metadata.num_row_groups):
                n = reader.metadata.row_group(g).num_rows
                self.groups.append((start, len(self.readers) - 1, g, n))
                start += n
        self.rows = start
        self._starts = [g[0] for g in self.groups]
        self._lock = threading.Lock()
        self._cached: dict = {}
        names = [set(r.schema_arrow.names) for r in self.readers]
        self._columns = [c for c in self.readers[0].schema_arrow.names if all(c in n for n in names)]

    def keys(self) -> list[str]:
        return list(self._columns)

    def __len__(self) -> int:
        return self.rows

    def text(self, column: str) -> list:
        """A text column in full, read batch by batch (never the image column)."""
        out: list = []
        for reader in self.readers:
            for batch in reader.iter_batches(columns=[column], batch_size=4096):
                out += batch.column(0).to_pylist()
        return out

    def __getitem__(self, i: int):
        import bisect

        g = bisect.bisect_right(self._starts, int(i)) - 1
        start, f, rg, _ = self.groups[g]
        with self._lock:
            column = self._cached.pop(g, None)
            if column is None:
                column = self.readers[f].read_row_group(rg, columns=[self.image_column]).column(0)
            self._cached[g] = column  # most recently used last
            while len(self._cached) > self.cache:
                self._cached.pop(next(iter(self._cached)))
        return column[int(i) - start].as_py()


def _from_jsonl(p: Path) -> dict:
    columns: dict[str, list] = {}
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError("data.path", f"{p} line {n} is not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError("data.path", f"{p} line {n} is not a JSON object")
            for k, v in row.items():
                columns.setdefault(k, []).append(v)
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise DatasetError("data.path", f"{p}: not every line has the same keys ({sorted(columns)})")
    return columns


def split(n: int, seed: int, test_fraction: float = 0.1, train_size: Optional[int] = None,
          test_size: Optional[int] = None) -> tuple[list[int], list[int]]:
    """The lab's split: a seeded shuffle, `test_fraction` held out, then at most train_size / test_size of each."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(n * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return train[:train_size] if train_size else train, test[:test_size] if test_size else test


# ---------------------------------------------------------------- synthetic data
KINDS = {
    "immunohistochemistry": "immunohistochemistry section of tissue with brown stained nuclei",
    "retina": "colour fundus photograph of the retina with the optic disc and vessels",
    "cell": "phase contrast microscopy of a single cell on a grey background",
    "microaneurysms": "grayscale retinal angiogram with small bright microaneurysms",
}


def synthetic_captions() -> list[str]:
    return list(KINDS.values())


def write_synthetic(folder: Path, n: int = 48, size: int = 48, seed: int = 0) -> Path:
    """n rows (cycling through the image kinds, random crops and flips of the real images) as a datasets folder
    `hf/`, `rows.parquet` and `rows.jsonl` + `images/`; one row's image is a truncated PNG (a bad image the
    reader must skip). Idempotent."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder = Path(folder)
    if (folder / "rows.jsonl").is_file() and (folder / "hf").is_dir() and (folder / "rows.parquet").is_file():
        return folder
    rng = np.random.default_rng(seed)
    sources = {k: getattr(skimage.data, k)() for k in KINDS}
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        kind = list(KINDS)[i % len(KINDS)]
        img = sources[kind]
        h, w = img.shape[:2]
        c = int(min(h, w) * rng.uniform(0.35, 0.6))
        y, x = int(rng.integers(0, h - c)), int(rng.integers(0, w - c))
        crop = Image.fromarray(img[y:y + c, x:x + c]).convert("RGB").resize((size, size))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, format="PNG")
        data = buf.getvalue()
        if i == n - 1:
            data = data[: len(data) // 3]  # a truncated file: the reader must skip it and name it
        name = f"images/{i:05d}.png"
        (folder / name).write_bytes(data)
        rows.append({"id": f"syn{i:05d}", "caption": KINDS[kind], "image": name, "bytes": data})
    with (folder / "rows.jsonl").open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], "caption": r["caption"], "image": r["image"]}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": [{"bytes": r["bytes"], "path": r["image"]} for r in rows],
                      "id": [r["id"] for r in rows], "caption": [r["caption"] for r in rows]})
    pq.write_table(table, str(folder / "rows.parquet"))
    from datasets import Dataset, Features, Image as HFImage, Value

    features = Features({"image": HFImage(), "id": Value("string"), "caption": Value("string")})
    Dataset.from_dict({"image": [{"bytes": r["bytes"], "path": None} for r in rows], "id": [r["id"] for r in rows],
                       "caption": [r["caption"] for r in rows]}, features=features).save_to_disk(str(folder / "hf"))
    return folder
