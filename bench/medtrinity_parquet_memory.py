"""Peak memory of opening a large MedTrinity-style parquet shard set with the BLIP reader and reading random rows,
against the data's size: the reader keeps ids and captions and a few row groups of images, never the whole image
column (it used to read the whole file with to_pydict).

    python bench/medtrinity_parquet_memory.py [--rows 20000] [--image-kb 64]

Prints the data's size, the process's peak RSS growth while opening and reading 500 random rows, and their ratio
(on the dev machine: 160 MiB for 500 MiB of data, 163 MiB for 1 GiB: the growth does not follow the data's size).
The reading runs in a fresh process (VmHWM, the libraries imported first), so the peak is the reader's own."""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import random, sys
def kib(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
sys.path.insert(0, sys.argv[2])
import pyarrow.parquet, PIL.Image  # libraries first: what is measured is the reading
before = kib("VmRSS:")
from core.data.medtrinity import open_rows
rows = open_rows(sys.argv[1], hf_config="25M_demo")
rng = random.Random(0)
for _ in range(500):
    rows.images[rng.randrange(len(rows))]
print((kib("VmHWM:") - before) * 1024)
"""


def write(folder: Path, rows: int, image_kb: int, shards: int = 4) -> int:
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "25M_demo").mkdir(parents=True)
    per = rows // shards
    for s in range(shards):
        images = [{"bytes": os.urandom(image_kb * 1024), "path": None} for _ in range(per)]
        table = pa.table({"image": images, "id": [f"r{s}_{i}" for i in range(per)],
                          "caption": [f"caption of row {i} " * 8 for i in range(per)]})
        pq.write_table(table, str(folder / "25M_demo" / f"train-{s:05d}-of-{shards:05d}.parquet"),
                       row_group_size=100)  # what datasets writes for image features
    return sum(f.stat().st_size for f in (folder / "25M_demo").iterdir())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--image-kb", type=int, default=64)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        size = write(Path(tmp), a.rows, a.image_kb)
        out = subprocess.run([sys.executable, "-c", CHILD, tmp, str(REPO)], capture_output=True, text=True, check=True)
        peak = int(out.stdout.strip().splitlines()[-1])
    print(f"data {size / 2**20:.0f} MiB in {a.rows} rows; reader peak growth {peak / 2**20:.0f} MiB "
          f"({peak / size:.3f} of the data)")


if __name__ == "__main__":
    main()
