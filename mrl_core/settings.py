"""The settings that shape a dataset's rows, defined once.

``EmbedSettings`` is what the embed CLI parses, what the Ray plan's stages read, and what a
re-index passes on: the encoder and its options, the stored dims and dtype, which input column
is embedded, which are kept, where ids come from, the input format and the record size limit.
Everything else about a run (where the input and output are, retries, actors, progress) is not
a setting of the dataset and lives with the run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from mrl_core.defaults import ENCODER, MAX_RECORD_BYTES

DTYPES = ("float16", "float32")
FORMATS = ("parquet", "jsonl", "text", "wds")


@dataclass(frozen=True)
class EmbedSettings:
    """Every setting that shapes a dataset's rows.

    ``dims`` empty means the encoder's trained nesting dims; ``format`` None means each file's
    extension decides; ``encoder_options`` are keyword options of the encoder's loader.
    """

    encoder: str = ENCODER
    encoder_options: Mapping[str, Any] = field(default_factory=dict)
    dims: tuple[int, ...] = ()
    dtype: str = "float16"
    text_column: str = "text"
    keep: tuple[str, ...] = ()
    id_column: str | None = None
    format: str | None = None
    max_record_bytes: int = MAX_RECORD_BYTES

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims or ()))
        object.__setattr__(self, "keep", tuple(self.keep or ()))
        object.__setattr__(self, "encoder_options", dict(self.encoder_options or {}))
        _verify_choice("dtype", self.dtype, DTYPES)
        if self.format is not None:
            _verify_choice("format", self.format, FORMATS)
        if not self.text_column:
            raise ValueError("text_column must name the input column to embed")
        if self.max_record_bytes < 1:
            raise ValueError(f"max_record_bytes must be >= 1, got {self.max_record_bytes}")

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    @property
    def read_columns(self) -> tuple[str, ...]:
        """The input columns a shard must have besides the text: kept columns and the id column."""
        extra = (self.id_column,) if self.id_column and self.id_column not in self.keep else ()
        return (*self.keep, *extra)

    def with_(self, **changes: Any) -> EmbedSettings:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists for tuples)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["dims"], out["keep"] = list(self.dims), list(self.keep)
        out["encoder_options"] = dict(self.encoder_options)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> EmbedSettings:
        """Inverse of ``to_dict``; unknown keys (from newer writers) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def _verify_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
