"""The settings that shape a dataset's rows, defined once, and how a later run inherits them.

``EmbedSettings`` is what the embed CLI parses, what the Ray plan's stages read, and what the
dataset records (``mrl.info``): the encoder and its options, the stored dims and dtype, which
input column is embedded, which are kept, where ids come from, the input format and the record
size limit. Everything else about a run (where the input and output are, retries, actors,
progress) is not a setting of the dataset and lives with the run.

A run on an existing dataset takes every setting from it (``resolve_settings``): a setting given
again must agree, and one that conflicts is refused before anything is written, so a job re-run
with fewer flags than the dataset was made with can never write rows of another shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from mrl_core.defaults import ENCODER, MAX_RECORD_BYTES

DTYPES = ("float16", "float32")
FORMATS = ("parquet", "jsonl", "text", "wds")
FORMAT_OF_EXTENSION = {
    ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".txt": "text", ".text": "text", ".tar": "wds",
}
"""The input format a file's extension names (``--format`` overrides it)."""


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


FLAGS = {
    "encoder": "--encoder", "encoder_options": "--encoder-option", "dims": "--dims",
    "dtype": "--dtype", "text_column": "--text-column", "keep": "--keep",
    "id_column": "--id-column", "format": "--format", "max_record_bytes": "--max-record-bytes",
}
"""The CLI flag of each setting (errors name the flag a user can give or leave out)."""

RESERVED_OPTIONS = ("device",)
"""Loader options the pipeline sets itself (``--device``), never recorded as encoder options."""


class SettingsConflictError(ValueError):
    """A run asked for a setting that differs from the one the dataset was made with."""


class SettingsMissingError(ValueError):
    """A dataset written before its settings were recorded, and a setting that cannot be inferred."""


def resolve_settings(
    given: Mapping[str, Any] | EmbedSettings | None,
    recorded: EmbedSettings | None,
    dataset: str,
    full_dim: int | None = None,
    unknown: Sequence[str] = (),
) -> EmbedSettings:
    """The settings a run on ``dataset`` uses.

    ``given``: the settings the run asks for (the CLI's explicit flags; an ``EmbedSettings`` gives
    all of them). ``recorded``: the dataset's, or None for a new dataset, which then takes
    ``given`` over the defaults. ``unknown``: settings a dataset written before they were
    recorded cannot tell; each must be given once. A given setting that differs from the
    recorded one raises ``SettingsConflictError`` naming the flag and both values; dims agree
    when they are the same once the full dim ``full_dim`` is added.
    """
    given = dict(given.to_dict() if isinstance(given, EmbedSettings) else given or {})
    bad = sorted(set(given) - set(FLAGS))
    if bad:
        raise ValueError(f"unknown setting(s) {bad}; settings are {sorted(FLAGS)}")
    reserved = sorted(set(given.get("encoder_options") or {}) & set(RESERVED_OPTIONS))
    if reserved:
        raise ValueError(f"encoder option(s) {reserved} are set by the pipeline (use --device), not recorded")
    if recorded is None:
        return EmbedSettings(**given)
    missing = [name for name in unknown if name not in given]
    if missing:
        flags = ", ".join(FLAGS[name] for name in missing)
        raise SettingsMissingError(
            f"dataset {dataset} was written before its settings were recorded and {flags} cannot "
            f"be told from it: give {flags} once (the value it was made with); later runs inherit it"
        )
    conflicts = [
        f"{FLAGS[name]}: the dataset has {_show(getattr(recorded, name))}, this run asks for {_show(value)}"
        for name, value in given.items()
        if name not in unknown and not _agrees(name, value, getattr(recorded, name), full_dim)
    ]
    if conflicts:
        raise SettingsConflictError(
            f"dataset {dataset} was made with other settings; refusing to write rows of another shape "
            f"({'; '.join(conflicts)}). Leave the flag out to use the dataset's setting, or write to a "
            f"new dataset."
        )
    return recorded.with_(**{name: given[name] for name in unknown if name in given})


def parse_option_value(text: str) -> Any:
    """An ``--encoder-option`` value: JSON when it parses (numbers, true/false, null, lists),
    else the string itself (``pooling=cls``, ``query_prefix=query: ``)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _agrees(name: str, given: Any, recorded: Any, full_dim: int | None) -> bool:
    if name == "dims":
        given_dims = set(int(d) for d in given or ())
        if not given_dims:
            return True  # "the encoder's dims" is no request: the dataset's dims stand
        if full_dim is not None:
            given_dims.add(full_dim)
        return sorted(given_dims) == sorted(recorded)
    if name == "keep":
        return set(given or ()) == set(recorded or ())
    if name == "encoder_options":
        return dict(given or {}) == dict(recorded or {})
    return given == recorded


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or "(none)"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "(none)"
    return repr(value)


def _verify_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
