"""Matryoshka (MRL) embeddings at web scale: nested encoders, multi-resolution Lance datasets,
tiered FAISS funnel retrieval. ``import mrl_core`` stays light: names below load on first use."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mrl_core.calibration import calibrate_schedule
    from mrl_core.corpus import Corpus
    from mrl_core.funnel import FunnelSchedule
    from mrl_core.index import build_index

_LAZY = {
    "Corpus": "mrl_core.corpus",
    "FunnelSchedule": "mrl_core.funnel",
    "calibrate_schedule": "mrl_core.calibration",
    "build_index": "mrl_core.index",
}

__all__ = ["Corpus", "FunnelSchedule", "build_index", "calibrate_schedule"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mrl_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
