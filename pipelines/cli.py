"""What every CLI of the project shares: logging set up for a person, and ``KEY=VALUE`` flags.

The library (``mrl_core``) only logs through ``logging``; a CLI decides what the user sees.
``configure_logging`` shows the project's own INFO lines on stderr as plain text (no level or
logger prefix: they read as the job's report) and keeps third-party loggers at WARNING unless
``verbose``.
"""

from __future__ import annotations

import argparse
import logging
import sys

PROJECT_LOGGERS = ("mrl_core", "pipelines", "__main__")


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Project INFO lines to stderr as plain text; DEBUG with ``verbose``; WARNING with ``quiet``.

    Other libraries' loggers stay at WARNING (INFO with ``verbose``). Safe to call twice.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_mrl_cli", False)]:
        root.removeHandler(old)
    handler._mrl_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)


def key_value(text: str) -> tuple[str, str]:
    """An argparse ``type`` for ``KEY=VALUE`` flags (``--storage-option``): the pair, or a usage
    error naming what was given. A repeated flag with ``action="append"`` gives a list of pairs:
    ``dict(args.storage_option)``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value
