"""Checkpoint files written in the background: training stalls only while the state is copied off the device.

`BackgroundWriter` is a DeepSpeed checkpoint engine (the object DeepSpeed hands every state dict it saves). Its
`save` copies the tensors into host memory (pinned on CUDA / NPU, so the copy is one DMA) and queues the copy;
one writer thread per rank then serialises each file next to its final name, fsyncs it and renames it in place,
in the order DeepSpeed asked. `then(fn)` queues a call after the files queued so far (the checkpoint manager uses
it to mark this rank's files durable, and on rank 0 to finalise the checkpoint once every rank's are). `wait()`
blocks until everything queued is on disk and raises what the thread met. Nothing is written outside the folder
DeepSpeed named, and a process killed mid-write leaves at most a `.tmp` file in the staging folder.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from core.run_folder import atomic_path

log = logging.getLogger("checkpoint")


def host_copy(obj: Any, pin: bool = False, buffer: Optional[Callable[[Any], Any]] = None) -> Any:
    """A copy of `obj` that later in-place updates of the training state cannot change: tensors copied into host
    memory (views become compact tensors), dicts / lists / tuples rebuilt, every other value kept (DeepSpeed's
    state dicts hold numbers, strings, torch.Size and small config objects besides tensors). `buffer(tensor)`
    gives the host tensor to copy into (reused between checkpoints: no page faults, no pinned allocations)."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        out = buffer(t) if buffer is not None else torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
        out.copy_(t)   # blocking: the copy is complete (a DMA into pinned memory on a device) when save returns
        return out
    if isinstance(obj, dict):
        copied = {k: host_copy(v, pin, buffer) for k, v in obj.items()}
        return type(obj)(copied) if type(obj) is not dict else copied
    if isinstance(obj, list):
        return [host_copy(v, pin, buffer) for v in obj]
    if type(obj) is tuple:
        return tuple(host_copy(v, pin, buffer) for v in obj)
    return obj


class HostBuffers:
    """Host tensors kept from one checkpoint to the next, one per (file name, position in its state dict): the
    second and later checkpoints copy into memory that is already mapped (and pinned), the first allocates. Safe
    because a new checkpoint starts only after the previous one is written (CheckpointManager.save)."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._kept: dict[tuple, Any] = {}
        self._file, self._i = "", 0

    def start(self, path: str) -> None:
        self._file, self._i = os.path.basename(path), 0

    def __call__(self, t):
        import torch

        key = (self._file, self._i)
        self._i += 1
        got = self._kept.get(key)
        if got is None or got.shape != t.shape or got.dtype != t.dtype:
            got = self._kept[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
        return got

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._kept.values())


class BackgroundWriter(TorchCheckpointEngine):
    """DeepSpeed checkpoint engine whose writes happen on a thread (see the module doc)."""

    def __init__(self, pin_memory: bool = False, fault: Optional[Callable[[str], None]] = None):
        super().__init__(None)
        self.name = "BackgroundWriter"
        self.pin = pin_memory
        self.fault = fault or (lambda path: None)
        self._queue: queue.Queue = queue.Queue()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
        self._thread.start()
        self.buffers = HostBuffers(pin_memory)
        self.copy_seconds = 0.0     # host copies of the checkpoint being saved (the stall)
        self.write_seconds = 0.0    # background writes of the last finished checkpoint
        # called on the writer thread with the first error of a save (the manager marks the rank failed, so rank 0
        # stops waiting for a mark that will never come)
        self.on_error: Optional[Callable[[BaseException], None]] = None

    # DeepSpeed's checkpoint-engine interface -----------------------------------------------------------------
    def save(self, state_dict, path: str):
        t0 = time.perf_counter()
        self.buffers.start(path)
        snapshot = host_copy(state_dict, self.pin, self.buffers)
        self.copy_seconds += time.perf_counter() - t0
        self._queue.put(("file", snapshot, str(path)))

    def preserves_storage_sharing(self):
        return False  # host_copy already gives every tensor its own compact storage

    # ours ------------------------------------------------------------------------------------------------------
    def then(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the writer thread once every file queued so far is durable."""
        self._queue.put(("call", fn, None))

    def wait(self) -> float:
        """Block until everything queued is written; raise the writer's error. Returns the seconds waited."""
        t0 = time.perf_counter()
        self._queue.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return time.perf_counter() - t0

    def busy(self) -> bool:
        return self._queue.unfinished_tasks > 0

    def _work(self) -> None:
        import torch

        started = None
        while True:
            kind, payload, path = self._queue.get()
            try:
                if self._error is None:
                    started = started or time.perf_counter()
                    if kind == "file":
                        self.fault(path)
                        with atomic_path(Path(path), fsync=True) as tmp:
                            torch.save(payload, tmp)
                    else:
                        payload()
                        self.write_seconds, started = time.perf_counter() - started, None
            except BaseException as e:  # kept for wait(): the training thread decides what a failed write means
                log.error("background checkpoint write failed: %s: %s", type(e).__name__, e)
                first, self._error = self._error is None, e
                if first and self.on_error is not None:
                    try:
                        self.on_error(e)
                    except Exception as mark_error:  # the original error is the one wait() raises
                        log.error("could not mark the failed write: %s", mark_error)
            finally:
                del payload
                self._queue.task_done()
