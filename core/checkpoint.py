"""DeepSpeed checkpoints that always resume: atomic tags, completion markers, RNG and data position, pruning,
and conversion to DeepSpeed's universal format when the number of ranks changed.

Layout under the run folder's `checkpoints/`:
  .staging/<tag>/          DeepSpeed writes here first (every rank calls save_checkpoint: one rank alone hangs)
  <tag>/                   renamed from .staging once all ranks wrote; holds DeepSpeed's files, our
                           rng_rank<R>.pt per rank and COMPLETE (JSON: step, world size, stage, checksum)
  latest                   the newest complete tag, written last (atomically)
  universal/<tag>/         ds_to_universal output, made when resuming on another world size
A folder without COMPLETE is never loaded. Finding checkpoints but no loadable one is an error, never a silent
fresh start (DeepSpeed's own load_checkpoint returns (None, None) and carries on when `latest` is missing).
A background save (`train.async_checkpoint`) keeps the same order on disk: the files reach .staging from each
rank's writer thread (core.checkpoint_writer), each rank marks them durable (`.written_rank<R>`), and only then
does rank 0 write COMPLETE, rename and update `latest`; a rank killed mid-write leaves `latest` where it was.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from core.run_folder import CHECKPOINT_MARKER, fsync_path, write_text_atomic
from core.runtime import fault_point

log = logging.getLogger("checkpoint")

MARKER = CHECKPOINT_MARKER


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


@dataclass
class ResumePoint:
    tag: str
    step: int
    load_dir: Path          # folder that holds <tag>/ (the checkpoints root, or universal/)
    universal: bool         # loaded through DeepSpeed's universal format (other world size)
    meta: dict


class CheckpointManager:
    def __init__(self, root: Path, rank: int, world_size: int, keep_last: int = 2, barrier=None):
        self.root = Path(root)
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.barrier = barrier or (lambda: None)
        self._writer = None            # core.checkpoint_writer.BackgroundWriter, made by the first background save
        self._deepspeed_engine = None  # DeepSpeed's own checkpoint engine, put back for synchronous saves
        self._step = 0
        self.last_stall = 0.0          # seconds the last background save held training (the host copy)

    # ---------------------------------------------------------------- inspection
    def complete(self) -> list[tuple[int, str]]:
        """(step, tag) of complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for d in self.root.iterdir():
            if d.is_dir() and d.name.startswith("step") and (d / MARKER).is_file():
                out.append((json.loads((d / MARKER).read_text())["step"], d.name))
        return sorted(out)

    def leftovers(self) -> list[str]:
        """Folders that look like checkpoints but are not complete (a save that was killed)."""
        if not self.root.is_dir():
            return []
        found = [d.name for d in self.root.iterdir() if d.is_dir() and d.name.startswith("step")
                 and not (d / MARKER).is_file()]
        staging = self.root / ".staging"
        if staging.is_dir():
            found += [f".staging/{d.name}" for d in staging.iterdir() if d.is_dir()]
        return sorted(found)

    def resume_point(self, fresh: bool = False) -> Optional[ResumePoint]:
        """The newest complete checkpoint, or None for a run that has none. Raises when checkpoints exist but
        none is complete (unless fresh, which first moves them aside: nothing is deleted)."""
        done = self.complete()
        if fresh:
            if self.rank == 0 and self.root.exists() and (done or self.leftovers()):
                aside = self.root.with_name(f"{self.root.name}.discarded-{time.strftime('%Y%m%d-%H%M%S')}")
                self.root.rename(aside)
                log.info("--fresh: moved old checkpoints to %s", aside)
            self.barrier()
            return None
        if not done:
            left = self.leftovers()
            if left or (self.root / "latest").exists():
                raise CheckpointError(
                    f"{self.root}: found checkpoint folders {left or ['latest']} but none is complete (no {MARKER} "
                    f"marker): refusing to start from scratch. Resubmit with --fresh to move them aside and "
                    f"start over.")
            return None
        step, tag = done[-1]
        meta = json.loads((self.root / tag / MARKER).read_text())
        if meta["world_size"] == self.world_size:
            return ResumePoint(tag, step, self.root, False, meta)
        return ResumePoint(tag, step, self._universal(tag, meta), True, meta)

    def _universal(self, tag: str, meta: dict) -> Path:
        """Convert <tag> with DeepSpeed's ds_to_universal once (rank 0), for loading on another world size."""
        out_root = self.root / "universal"
        out = out_root / tag
        if self.rank == 0 and not (out / MARKER).is_file():
            shutil.rmtree(out, ignore_errors=True)
            out_root.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(self.root / tag), "--output_folder", str(out), "--num_extract_workers", "1",
                   "--num_merge_workers", "1"]
            if meta.get("zero_stage", 0) < 3:
                cmd.append("--inject_missing_state")
            log.info("%s was saved by %d ranks, resuming on %d: converting to DeepSpeed's universal format", tag,
                     meta["world_size"], self.world_size)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise CheckpointError(f"ds_to_universal failed for {self.root / tag}:\n{proc.stderr[-3000:]}")
            for name in (f"rng_rank{r}.pt" for r in range(meta["world_size"])):
                if (self.root / tag / name).is_file():
                    shutil.copy2(self.root / tag / name, out / name)
            write_text_atomic(out / MARKER, json.dumps({**meta, "universal_of": tag}), fsync=True)
            write_text_atomic(out_root / "latest", tag, fsync=True)
        self.barrier()
        if not (out / MARKER).is_file():
            raise CheckpointError(f"universal conversion of {tag} did not complete (see rank 0's log)")
        return out_root

    # ---------------------------------------------------------------- save / load
    def save(self, engine, step: int, client_state: dict, meta: Optional[dict] = None,
             background: bool = False) -> str:
        """All ranks call this together. DeepSpeed writes into .staging; once every rank's files are durable,
        rank 0 writes the marker, renames the folder and updates `latest` (written last, atomically).

        background=True returns once the state is copied into host memory: the files are written by this rank's
        writer thread (core.checkpoint_writer), each rank marks its files durable with `.written_rank<R>`, and
        rank 0's writer finalises the checkpoint when it sees every rank's mark. A previous background save is
        always finished (on this rank) before a new one starts, and `finish()` waits for the last one."""
        import torch

        tag = tag_for(step)
        staging = self.root / ".staging"
        self.finish()   # the previous background save of this rank (and on rank 0 its finalisation) first
        if self.rank == 0:
            shutil.rmtree(staging / tag, ignore_errors=True)  # a previous attempt that was killed
            staging.mkdir(parents=True, exist_ok=True)
        self.barrier()
        info = {"step": step, "world_size": self.world_size, "zero_stage": engine.zero_optimization_stage(),
                **(meta or {})}
        if not background:
            self._use_engine(engine, None)
            engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False,
                                   exclude_frozen_parameters=True)
            torch.save(rng_state(), staging / tag / f"rng_rank{self.rank}.pt")
            self.barrier()
            fault_point("after_shards", step)
            if self.rank == 0:
                self._finalize(tag, info)
            self.barrier()
            return tag
        writer = self._background_writer(engine, step)
        writer.copy_seconds = 0.0
        engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
        writer.save(rng_state(), str(staging / tag / f"rng_rank{self.rank}.pt"))
        self.last_stall = writer.copy_seconds
        mark = staging / tag / f".written_rank{self.rank}"
        failed = staging / tag / f".failed_rank{self.rank}"
        writer.on_error = lambda e: write_text_atomic(failed, f"{type(e).__name__}: {e}"[:500], fsync=True)
        writer.then(lambda: write_text_atomic(mark, str(step), fsync=True))
        if self.rank == 0:
            writer.then(lambda: self._finalize_when_written(tag, info))
        return tag

    def when_complete(self, fn) -> None:
        """Run `fn()` once the checkpoint just saved is complete on disk: now after a synchronous save, on this
        rank's writer thread after a background one (on rank 0 that is after COMPLETE and `latest`)."""
        if self._writer is not None and self._writer.busy():
            self._writer.then(fn)
        else:
            fn()

    def finish(self) -> float:
        """Wait for this rank's background save (rank 0: until it is finalised). Returns the seconds waited;
        a failed background write raises CheckpointError here."""
        writer = self._writer
        if writer is None or not writer.busy():
            if writer is not None:
                self._raise_writer_error(writer)
            return 0.0
        return self._raise_writer_error(writer)

    def _raise_writer_error(self, writer) -> float:
        try:
            return writer.wait()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"a background checkpoint write under {self.root} failed ({type(e).__name__}: "
                                  f"{e}); `latest` still names the last complete checkpoint") from e

    def _background_writer(self, engine, step: int):
        from core.checkpoint_writer import BackgroundWriter

        writer = self._writer
        if writer is None:
            pin = getattr(engine, "device", None) is not None and str(engine.device).split(":")[0] in ("cuda", "npu")
            writer = self._writer = BackgroundWriter(pin_memory=pin,
                                                     fault=lambda path: fault_point("during_write", self._step))
        self._step = step
        self._use_engine(engine, writer)
        return writer

    def _use_engine(self, engine, writer) -> None:
        """Point DeepSpeed at our writer for a background save, back at its own engine for a synchronous one."""
        own = self._deepspeed_engine
        if own is None:
            own = self._deepspeed_engine = engine.checkpoint_engine
        engine.checkpoint_engine = writer if writer is not None else own

    def _finalize_when_written(self, tag: str, info: dict, timeout: float = 3600.0) -> None:
        """Rank 0's writer thread: wait for every rank's `.written_rank<R>` mark, then finalise. A rank whose write
        failed marks `.failed_rank<R>` (rank 0 stops at once and says which); a rank that died mid-write never marks:
        either way the checkpoint stays in .staging and `latest` keeps naming the previous one."""
        folder = self.root / ".staging" / tag
        t0 = time.time()
        while not all((folder / f".written_rank{r}").is_file() for r in range(self.world_size)):
            failed = sorted(folder.glob(".failed_rank*"))
            if failed:
                why = failed[0].read_text(errors="replace").strip()
                raise CheckpointError(f"{folder}: rank {failed[0].name.removeprefix('.failed_rank')} could not write "
                                      f"its part ({why}); `latest` still names the last complete checkpoint")
            if time.time() - t0 > timeout:
                raise CheckpointError(f"{folder}: not every rank finished writing within {timeout:.0f} s")
            time.sleep(0.05)
        for r in range(self.world_size):
            (folder / f".written_rank{r}").unlink()
        fault_point("after_shards", info["step"])
        self._finalize(tag, info)

    def _finalize(self, tag: str, info: dict) -> None:
        """Rank 0: COMPLETE marker (fsynced), rename out of .staging, `latest`, prune old tags."""
        staging = self.root / ".staging"
        write_text_atomic(staging / tag / MARKER, json.dumps({**info, "time": time.time()}), fsync=True)
        final = self.root / tag
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging / tag, final)
        fsync_path(self.root)   # the renamed folder is on disk before `latest` names it
        write_text_atomic(self.root / "latest", tag, fsync=True)
        self._prune()

    def _prune(self) -> None:
        done = self.complete()
        for _, tag in done[:-self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(self.root / tag, ignore_errors=True)
            shutil.rmtree(self.root / "universal" / tag, ignore_errors=True)

    def load(self, engine, point: ResumePoint) -> dict:
        """Load weights, optimizer, scheduler and this rank's RNG; returns the client state."""
        import torch

        try:
            path, client = engine.load_checkpoint(str(point.load_dir), tag=point.tag, load_module_strict=False,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        except Exception as e:  # truncated or foreign files: say which checkpoint, keep it for inspection
            raise CheckpointError(f"checkpoint {point.load_dir / point.tag} is marked complete but cannot be loaded "
                                  f"({type(e).__name__}: {e}); nothing was overwritten. Move it aside to resume "
                                  f"from an older tag, or resubmit with --resume --fresh to start over") from e
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {point.load_dir / point.tag} (it returned None): "
                                  f"refusing to continue from fresh weights")
        rng_file = point.load_dir / point.tag / f"rng_rank{self.rank}.pt"
        if rng_file.is_file() and not point.universal:
            set_rng_state(torch.load(rng_file, weights_only=False))
        return client or {}
