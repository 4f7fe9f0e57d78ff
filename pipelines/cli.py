"""What every CLI of the project shares: logging set up for a person, and ``KEY=VALUE`` flags.

The library (``mrl_core``) only logs through ``logging``; a CLI decides what the user sees.
``configure_logging`` shows the project's own INFO lines on stderr as plain text (no level or
logger prefix: they read as the job's report) and keeps third-party loggers at WARNING unless
``verbose``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings

PROJECT_LOGGERS = ("mrl_core", "pipelines", "__main__")
NOISE = (
    "lance is not fork-safe",  # Lance's fork hook: Ray and the tokenisers fork and exec, they share nothing
)
"""Third-party warnings shown only with ``--verbose``."""


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
    if not verbose:  # other libraries' notices, not the user's business unless asked for
        for pattern in NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default shown, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is argparse.SUPPRESS or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


_RUST_LOCATION = re.compile(r",?\s*/\S+\.rs:\d+:\d+")


def error_line(exc: BaseException) -> str:
    """``exc`` as the one line a CLI prints after ``error:``: Lance's Rust source locations
    (``, /home/runner/.../commit.rs:653:26``) dropped, whitespace collapsed."""
    return " ".join(_RUST_LOCATION.sub("", str(exc)).split()) or type(exc).__name__


def key_value(text: str) -> tuple[str, str]:
    """An argparse ``type`` for ``KEY=VALUE`` flags (``--storage-option``): the pair, or a usage
    error naming what was given. A repeated flag with ``action="append"`` gives a list of pairs:
    ``dict(args.storage_option)``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value
