"""One writer for a folder of results: CSV tables, metrics.json and PNG plots, each written atomically
(core.run_folder.atomic_path: a reader never sees half a file, a failed write leaves the old file).

    out = ResultFolder(run_dir / "results")
    out.csv("patients.csv", ["patient_id", "label"], rows)      # lists, or dicts with `fieldnames`
    out.json("metrics.json", metrics)
    out.figure("metrics.png", fig)                               # saves, then closes the figure

Every method returns the file's path; `written` lists them in the order they were written. The file names and
columns stay the workload's own.
"""
from __future__ import annotations

import csv as _csv
from pathlib import Path
from typing import Any, Iterable, Sequence

from core.run_folder import atomic_path, write_json_atomic


class ResultFolder:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.written: list[Path] = []

    def path(self, name: str) -> Path:
        return self.folder / name

    def _done(self, path: Path) -> Path:
        self.written.append(path)
        return path

    def csv(self, name: str, header: Sequence[str], rows: Iterable, fieldnames: bool = False,
            extrasaction: str = "raise") -> Path:
        """A CSV table (the csv module's dialect, utf-8). `rows`: sequences in `header`'s order, or with
        `fieldnames=True` dicts keyed by the header (`extrasaction="ignore"` drops other keys)."""
        path = self.path(name)
        with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
            if fieldnames:
                w = _csv.DictWriter(f, fieldnames=list(header), extrasaction=extrasaction)
                w.writeheader()
            else:
                w = _csv.writer(f)
                w.writerow(header)
            w.writerows(rows)
        return self._done(path)

    def dataframe(self, name: str, df, index: bool = False) -> Path:
        """A pandas DataFrame as CSV (DataFrame.to_csv; no compression guessed from the temporary file's name)."""
        path = self.path(name)
        with atomic_path(path) as tmp:
            df.to_csv(tmp, index=index, compression=None)
        return self._done(path)

    def json(self, name: str, data: Any) -> Path:
        """metrics.json and the like (core.run_folder.write_json_atomic: indent 1, str() for the rest)."""
        return self._done(write_json_atomic(self.path(name), data))

    def figure(self, name: str, fig, dpi: int = 100) -> Path:
        """A matplotlib figure as PNG; the figure is closed afterwards."""
        from core.plotting import pyplot

        path = self.path(name)
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=dpi)
        finally:
            pyplot().close(fig)
        return self._done(path)
