"""Device-hours of a run or a study from the scheduler's accounting (JobRow.attempts): elapsed time x the devices
each attempt held (GPUs or NPUs from its generic resources; CPUs on CPU-only jobs, the same arithmetic), and how
many of them were lost: the whole of an attempt that failed, timed out, was cancelled or requeued, except the part
up to the last checkpoint that attempt completed (read from the run folder: checkpoints/<tag>/COMPLETE, whose
modification time is when it was complete). Everything else spent is kept (a running attempt counts as kept so
far)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from core.run_folder import CHECKPOINT_MARKER as MARKER
from core.scheduler import Attempt, JobRow, category

UNIT_NAMES = {"gpu": "GPU-h", "npu": "NPU-h", "cpu": "CPU-h"}


def checkpoint_times(run_dir: str) -> list[float]:
    """When each complete checkpoint of a run was finished (epoch seconds, sorted); empty without any."""
    if not run_dir:
        return []
    try:
        return sorted(p.stat().st_mtime for p in (Path(run_dir) / "checkpoints").glob(f"*/{MARKER}"))
    except OSError:
        return []


def lost_seconds(a: Attempt, checkpoints: list[float]) -> int:
    """Seconds of this attempt whose work is gone: none for a completed or running one; for one that ended
    otherwise (failed, timeout, cancelled, node failure, requeued) the time since its last checkpoint (all of it
    without one)."""
    if a.state == "RUNNING" or category(a.state) == "done" or a.elapsed_s <= 0:
        return 0
    end = a.end or (a.start + a.elapsed_s)
    saved = [t for t in checkpoints if a.start <= t <= end] if a.start else []
    if not saved:
        return a.elapsed_s
    return max(0, min(a.elapsed_s, int(round(end - saved[-1]))))


def usage(rows: Iterable[JobRow], run_dir: Optional[str] = None) -> dict[str, dict[str, float]]:
    """{unit: {'hours', 'kept', 'lost'}} over every attempt of these jobs (unit: gpu / npu / cpu)."""
    out: dict[str, dict[str, float]] = {}
    cache: dict[str, list[float]] = {}
    for r in rows:
        folder = run_dir if run_dir is not None else r.run_dir
        if folder not in cache:
            cache[folder] = checkpoint_times(folder)
        for a in r.attempts:
            if not a.count:
                continue
            u = out.setdefault(a.unit, {"hours": 0.0, "kept": 0.0, "lost": 0.0})
            lost = lost_seconds(a, cache[folder]) * a.count / 3600.0
            u["hours"] += a.hours
            u["lost"] += lost
            u["kept"] += a.hours - lost
    return out


def add(*usages: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for us in usages:
        for unit, d in us.items():
            o = out.setdefault(unit, {"hours": 0.0, "kept": 0.0, "lost": 0.0})
            for f in o:
                o[f] += d.get(f, 0.0)
    return out


def describe(u: dict[str, dict[str, float]]) -> str:
    """'1.25 GPU-h (0.40 lost)' (devices first, then CPUs); '' when nothing was spent."""
    parts = []
    for unit in ("gpu", "npu", "cpu"):
        if unit in u and u[unit]["hours"] > 0:
            d = u[unit]
            parts.append(f"{_num(d['hours'])} {UNIT_NAMES[unit]}" + (f" ({_num(d['lost'])} lost)" if d["lost"] > 0
                                                                      else ""))
    return ", ".join(parts)


def _num(h: float) -> str:
    return f"{h:.2f}" if h >= 0.1 else f"{h:.3f}" if h >= 0.001 else f"{h:.1e}"
