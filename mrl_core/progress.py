"""A one-line progress report for long jobs: rows, rows/s, units done/total, ETA.

Lines go to the ``mrl_core.progress`` logger at INFO (a CLI shows them on stderr), at most every
``every`` seconds, so a job's log stays readable in a terminal, a notebook and a Ray job's log.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


class Progress:
    """Logs ``[label] rows | rows/s | <unit> done/total | ETA`` at most every ``every`` seconds."""

    def __init__(self, total: int, label: str, unit: str = "shards", enabled: bool = True,
                 every: float = 2.0) -> None:
        self.total = total
        self.label = label
        self.unit = unit
        self.enabled = enabled
        self.every = every
        self.start = time.perf_counter()
        self.last = 0.0
        self.rows = 0
        self.done = 0

    def update(self, rows: int = 0, done: int | None = None) -> None:
        """Add ``rows`` and set the count of finished units; log when due."""
        self.rows += rows
        if done is not None:
            self.done = done
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            logger.info(self.line())

    def line(self) -> str:
        """The current progress line."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.rows / elapsed
        eta = "?"
        if self.done:
            eta = f"{elapsed * (self.total - self.done) / self.done:,.0f}s"
        return (f"[{self.label}] {self.rows:,} rows | {rate:,.0f} rows/s | {self.unit} "
                f"{self.done}/{self.total} | ETA {eta}")

    def close(self) -> None:
        """Log the final line."""
        if self.enabled:
            logger.info(self.line())
