"""Background loading shared by every dataset reader: the training loop asks for sample i while the next ones load."""
from __future__ import annotations


class Prefetcher:
    """Loads upcoming samples in background threads (decoders such as nibabel's gunzip, PIL and torch's resampling
    release the GIL), so the training step does not wait for the disk. `get(i)` returns sample i (loading it now if
    it was not queued), `ahead(indices)` queues the next ones; at most `keep` results are held."""

    def __init__(self, load, workers: int, keep: int = 64):
        from concurrent.futures import ThreadPoolExecutor

        self.load, self.keep = load, keep
        self.pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
        self.futures: dict = {}

    def ahead(self, indices) -> None:
        if self.pool is None:
            return
        for i in indices:
            if i not in self.futures:
                self.futures[i] = self.pool.submit(self.load, i)
        while len(self.futures) > self.keep:
            self.futures.pop(next(iter(self.futures)))

    def get(self, i):
        fut = self.futures.pop(i, None)
        return fut.result() if fut is not None else self.load(i)
