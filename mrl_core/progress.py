"""A one-line progress report for long jobs: rows, rows/s, shards done/total, ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Prints ``rows | rows/s | shards done/total | ETA`` at most every ``every`` seconds."""

    def __init__(self, total_shards: int, enabled: bool = True, every: float = 2.0,
                 file: TextIO | None = None) -> None:
        self.total_shards = total_shards
        self.enabled = enabled
        self.every = every
        self.file = file or sys.stderr
        self.start = time.perf_counter()
        self.last = 0.0
        self.rows = 0
        self.shards_done = 0

    def update(self, rows: int = 0, shards_done: int | None = None) -> None:
        """Add ``rows`` and set the count of finished shards; print when due."""
        self.rows += rows
        if shards_done is not None:
            self.shards_done = shards_done
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            print(self.line(), file=self.file, flush=True)

    def line(self) -> str:
        """The current progress line."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.rows / elapsed
        eta = "?"
        if self.shards_done:
            left = elapsed * (self.total_shards - self.shards_done) / self.shards_done
            eta = f"{left:,.0f}s"
        return (f"[embed] {self.rows:,} rows | {rate:,.0f} rows/s | shards {self.shards_done}/"
                f"{self.total_shards} | ETA {eta}")

    def close(self) -> None:
        """Print the final line."""
        if self.enabled:
            print(self.line(), file=self.file, flush=True)
