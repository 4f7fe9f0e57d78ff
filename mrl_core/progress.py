"""Progress of long jobs: rows, rows/s, units done/total, ETA.

In a terminal or a notebook it is a ``tqdm`` bar (``tqdm.auto``: a widget in Jupyter); anywhere
else (a Ray job's log, CI, a file) it is a plain line at INFO on the ``mrl_core.progress`` logger
at most every ``every`` seconds, so logs stay readable instead of filling with carriage returns.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)


def interactive() -> bool:
    """Whether a person watches this process live: stderr is a terminal, or a Jupyter kernel runs."""
    return "ipykernel" in sys.modules or bool(getattr(sys.stderr, "isatty", lambda: False)())


def _tqdm() -> Any:
    """``tqdm.auto``'s bar (a widget in Jupyter) when it can draw one, else the text bar."""
    try:
        import ipywidgets  # noqa: F401  (tqdm.auto's notebook bar needs it)
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm
    return tqdm


class Progress:
    """``[label] rows | rows/s | <unit> done/total | ETA``: a bar when ``interactive()``, else lines."""

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
        self._bar: Any = None
        if enabled and interactive():
            self._bar = _tqdm()(total=total, desc=label, unit=f" {unit}", dynamic_ncols=True)

    def update(self, rows: int = 0, done: int | None = None) -> None:
        """Add ``rows`` and set the count of finished units; show when due."""
        self.rows += rows
        if done is not None:
            self.done = done
        if self._bar is not None:
            self._bar.n = self.done
            if self.unit != "rows":  # the bar counts rows itself otherwise
                self._bar.set_postfix_str(f"{self.rows:,} rows, {self.rate():,.0f} rows/s", refresh=False)
            self._bar.refresh()
            return
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            logger.info(self.line())

    def rate(self) -> float:
        """Rows per second so far."""
        return self.rows / max(time.perf_counter() - self.start, 1e-9)

    def line(self) -> str:
        """The current progress line."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        eta = "?"
        if self.done:
            eta = f"{elapsed * (self.total - self.done) / self.done:,.0f}s"
        if self.unit == "rows":
            return f"[{self.label}] {self.rows:,}/{self.total:,} rows | {self.rate():,.0f} rows/s | ETA {eta}"
        return (f"[{self.label}] {self.rows:,} rows | {self.rate():,.0f} rows/s | {self.unit} "
                f"{self.done}/{self.total} | ETA {eta}")

    def close(self) -> None:
        """Finish the bar, or log the final line."""
        if self._bar is not None:
            self._bar.n = self.done
            self._bar.close()
        elif self.enabled:
            logger.info(self.line())
