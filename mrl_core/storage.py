"""The Lance data model: one row per record, one ``emb_<dim>`` column per stored resolution.

Columns: ``id`` (int64, stable), ``shard`` (source URI), the pass-through columns, then
``emb_<d>`` as ``fixed_size_list<float16|float32>[d]``, each prefix L2-normalised on its own.
Dataset-level facts live in Lance's dataset config under ``mrl.*`` keys: the encoder
(``mrl.info``) and the shard ledger (``mrl.shard/<uri>``, one key per committed shard).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mrl_core.nesting import l2_normalize

PIPELINE_VERSION = "1"
INFO_KEY = "mrl.info"
LEDGER_PREFIX = "mrl.shard/"
EMB_PREFIX = "emb_"
POSITION_BITS = 24
"""Low bits of a derived id: the row's position in its shard (up to 16.7M rows per shard)."""


class StorageError(ValueError):
    """A dataset that does not match what the caller expects (encoder, dims, schema)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What produced a dataset's embeddings; a later job refuses to mix in another encoder."""

    encoder: str
    fingerprint: str
    full_dim: int
    dims: tuple[int, ...]
    trained_dims: tuple[int, ...]
    dtype: str = "float16"
    metric: str = "cosine"
    normalized: bool = True
    modality: str = "text"
    pipeline_version: str = PIPELINE_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """The info as a JSON string (what is stored under ``mrl.info``)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DatasetInfo:
        """Parse what ``to_json`` wrote."""
        raw = json.loads(text)
        raw["dims"] = tuple(raw["dims"])
        raw["trained_dims"] = tuple(raw["trained_dims"])
        return cls(**raw)

    def check_compatible(self, other: DatasetInfo, uri: str) -> None:
        """Raise unless ``other`` writes the same embeddings (encoder, weights, dims, dtype)."""
        mine = (self.encoder, self.fingerprint, self.dims, self.dtype, self.metric)
        theirs = (other.encoder, other.fingerprint, other.dims, other.dtype, other.metric)
        if mine != theirs:
            raise StorageError(
                f"dataset {uri} holds embeddings from encoder {self.encoder!r} "
                f"(fingerprint {self.fingerprint}, dims {list(self.dims)}, {self.dtype}, "
                f"{self.metric}); refusing to add embeddings from {other.encoder!r} "
                f"(fingerprint {other.fingerprint}, dims {list(other.dims)}, {other.dtype}, "
                f"{other.metric}). Write to a new dataset instead."
            )


def emb_column(dim: int) -> str:
    """The column holding the ``dim``-dim prefix: ``emb_<dim>``."""
    return f"{EMB_PREFIX}{dim}"


def embedding_dims(schema: pa.Schema) -> list[int]:
    """The stored resolutions of a dataset, ascending, read off its ``emb_<d>`` columns."""
    return sorted(
        int(f.name[len(EMB_PREFIX):])
        for f in schema
        if f.name.startswith(EMB_PREFIX) and f.name[len(EMB_PREFIX):].isdigit()
    )


def make_schema(dims: Sequence[int], dtype: str, passthrough: Iterable[pa.Field] = ()) -> pa.Schema:
    """``id``, ``shard``, the pass-through fields, then one ``emb_<d>`` vector column per dim."""
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    fields = [pa.field("id", pa.int64(), nullable=False), pa.field("shard", pa.string())]
    fields += list(passthrough)
    fields += [pa.field(emb_column(d), pa.list_(value_type, d)) for d in dims]
    return pa.schema(fields)


def embedding_arrays(
    embeddings: np.ndarray, dims: Sequence[int], dtype: str = "float16", normalize: bool = True
) -> dict[str, pa.FixedSizeListArray]:
    """{``emb_<d>``: fixed-size-list array of the first d dims}, each prefix L2-normalised.

    Refuses NaN or inf (an encoder that failed on some input), and values that overflow float16:
    such a row would poison every search that touches it.
    """
    np_type = np.float16 if dtype == "float16" else np.float32
    finite = np.isfinite(embeddings).all(axis=1) if embeddings.ndim == 2 else np.isfinite(embeddings)
    if not np.all(finite):
        bad = np.flatnonzero(~finite)
        raise StorageError(
            f"embeddings of {len(bad)} row(s) (batch rows {bad[:10].tolist()}) contain NaN or inf; "
            f"refusing to write them"
        )
    out = {}
    for d in dims:
        head = embeddings[:, :d].astype(np.float32, copy=False)
        if normalize:
            head = l2_normalize(head)
        if np_type is np.float16 and not normalize and np.abs(head).max(initial=0) > np.finfo(np.float16).max:
            raise StorageError(f"embedding values overflow float16 at {d} dims; store them as float32")
        flat = pa.array(np.ascontiguousarray(head, dtype=np_type).reshape(-1))
        out[emb_column(d)] = pa.FixedSizeListArray.from_arrays(flat, d)
    return out


def shard_key(shard: str) -> int:
    """A 39-bit key for a shard URI: the high bits of every id derived for its rows."""
    digest = hashlib.blake2b(shard.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - (63 - POSITION_BITS))


def derive_ids(shard: str, positions: np.ndarray) -> np.ndarray:
    """Stable int64 ids from the shard URI and each row's position in the shard."""
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) and (positions.min() < 0 or positions.max() >= 1 << POSITION_BITS):
        raise ValueError(
            f"shard {shard} has more than {1 << POSITION_BITS} rows; split it or pass --id-column"
        )
    return (np.int64(shard_key(shard)) << np.int64(POSITION_BITS)) | positions


def open_dataset(
    uri: str, storage_options: Mapping[str, str] | None = None, version: int | None = None
) -> lance.LanceDataset:
    """Open an existing Lance dataset, optionally at a version."""
    return lance.dataset(uri, version=version, storage_options=dict(storage_options or {}))


def try_open(uri: str, storage_options: Mapping[str, str] | None = None) -> lance.LanceDataset | None:
    """The dataset at ``uri``, or None when there is none yet."""
    try:
        return open_dataset(uri, storage_options)
    except (ValueError, FileNotFoundError, OSError) as exc:
        if "not found" in str(exc).lower() or "does not exist" in str(exc).lower():
            return None
        raise


def read_info(ds: lance.LanceDataset) -> DatasetInfo:
    """The encoder info recorded in a dataset by the embed pipeline."""
    raw = ds.config().get(INFO_KEY)
    if raw is None:
        raise StorageError(f"dataset {ds.uri} has no '{INFO_KEY}': it was not written by mrl embed")
    return DatasetInfo.from_json(raw)


def read_ledger(ds: lance.LanceDataset) -> dict[str, dict[str, Any]]:
    """{shard URI: ledger entry} for every shard whose rows are fully committed."""
    return {
        k[len(LEDGER_PREFIX):]: json.loads(v)
        for k, v in ds.config().items()
        if k.startswith(LEDGER_PREFIX)
    }


def ledger_updates(entries: Mapping[str, Mapping[str, Any] | None]) -> dict[str, str | None]:
    """Config updates that record (or, with None, drop) ledger entries for shards."""
    return {
        LEDGER_PREFIX + shard: None if e is None else json.dumps(e, sort_keys=True)
        for shard, e in entries.items()
    }


def sql_string_list(values: Iterable[str]) -> str:
    """A SQL ``IN (...)`` list of string literals, quotes escaped."""
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def delete_shards(ds: lance.LanceDataset, shards: Iterable[str]) -> int:
    """Delete every row of the given shards; return how many there were."""
    shards = list(shards)
    if not shards:
        return 0
    predicate = f"shard IN ({sql_string_list(shards)})"
    n = ds.count_rows(filter=predicate)
    if n:
        ds.delete(predicate)
    return n


def column_to_numpy(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A ``fixed_size_list`` column as [N, dim] numpy in its stored float type (float16 stays)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).reshape(-1, dim)


def rows_signature(ds: lance.LanceDataset) -> str:
    """A hash of which rows a dataset version holds (fragments, their row counts and deletions).

    Two versions with the same signature hold the same rows (a config update does not change it),
    so an index built on one serves the other.
    """
    parts = sorted(
        (m.id, m.physical_rows, json.dumps(m.to_json().get("deletion_file"), sort_keys=True))
        for m in (f.metadata for f in ds.get_fragments())
    )
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]
