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
from typing import Any

PROJECT_LOGGERS = ("mrl_core", "pipelines", "__main__")
NOISE = (
    "lance is not fork-safe",  # Lance's fork hook: Ray and the tokenisers fork and exec, they share nothing
)
"""Third-party warnings shown only with ``--verbose``."""
_VERBOSE = False


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
    global _VERBOSE
    _VERBOSE = verbose
    if not verbose:  # other libraries' notices, not the user's business unless asked for
        for pattern in NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    if "ray" in sys.modules:
        quiet_ray()


def quiet_ray() -> None:
    """Keep Ray's own console lines (its INFO and notices, Ray Data's execution lines, its notebook
    hints) to errors unless the CLI runs ``--verbose``; Ray Data still writes them to its log file
    in the Ray session directory. Call before ``ray.init``: Ray's notices come from it."""
    if _VERBOSE:
        return
    import ray  # noqa: F401  (configures the "ray" logger on import: adjust it after)

    logging.getLogger("ray").setLevel(logging.ERROR)
    with warnings.catch_warnings():  # tqdm.auto's "IProgress not found" when Ray Data is imported in Jupyter
        warnings.filterwarnings("ignore", message="IProgress not found")
        import ray.data  # noqa: F401  (configures its loggers on import: adjust them after)
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":  # the console, not the session log file
            handler.setLevel(logging.ERROR)


def start_ray(**init_args: Any) -> None:
    """``ray.init(**init_args)`` unless Ray is up, with Ray's console kept quiet (``quiet_ray``).

    Ray starts its processes with fork and exec, so Lance's fork warning is not the user's
    business here.
    """
    import ray

    quiet_ray()
    if ray.is_initialized():
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NOISE[0])
        ray.init(**init_args)


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
