"""The Lance data model: one row per record, one ``emb_<dim>`` column per stored resolution.

Columns: ``id`` (int64, stable), ``shard`` (source URI), the pass-through columns, then
``emb_<d>`` as ``fixed_size_list<float16|float32>[d]``, each prefix L2-normalised on its own.
Dataset-level facts live in Lance's dataset config under ``mrl.*`` keys: how the rows were made
(``mrl.info``) and which files hold the shard ledger (``mrl.ledger``; ``ledger_store``).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mrl_core.ledger_store import read_ledger, record
from mrl_core.nesting import l2_normalize
from mrl_core.settings import FORMAT_OF_EXTENSION, EmbedSettings

PIPELINE_VERSION = "3"
"""2: settings recorded in ``mrl.info``; 3: the ledger in files (``ledger_store``), not config keys."""
INFO_KEY = "mrl.info"
EMB_PREFIX = "emb_"
POSITION_BITS = 24
"""Low bits of a derived id: the row's position in its shard (up to 16.7M rows per shard)."""


class StorageError(ValueError):
    """A dataset that does not match what the caller expects (encoder, dims, schema)."""


@dataclass(frozen=True)
class DatasetInfo:
    """How a dataset's rows were made (``mrl.info``): its settings and what follows from them.

    ``fingerprint`` identifies the encoder with its options (``encoder_fingerprint``);
    ``kept_types`` the Arrow types of the kept columns; ``unknown`` (never stored) the settings a
    dataset written before they were recorded cannot tell (see ``read_info``).
    """

    settings: EmbedSettings
    fingerprint: str
    full_dim: int
    trained_dims: tuple[int, ...]
    kept_types: Mapping[str, str] = field(default_factory=dict)
    metric: str = "cosine"
    normalized: bool = True
    modality: str = "text"
    pipeline_version: str = PIPELINE_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    unknown: tuple[str, ...] = ()

    @property
    def encoder(self) -> str:
        """The encoder spec (``settings.encoder``)."""
        return self.settings.encoder

    @property
    def dims(self) -> tuple[int, ...]:
        """The stored dims (``settings.dims``)."""
        return self.settings.dims

    @property
    def dtype(self) -> str:
        """The stored vector type (``settings.dtype``)."""
        return self.settings.dtype

    def to_json(self) -> str:
        """The info as a JSON string (what is stored under ``mrl.info``)."""
        raw = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "unknown"}
        raw["settings"] = self.settings.to_dict()
        raw["trained_dims"] = list(self.trained_dims)
        raw["kept_types"] = dict(self.kept_types)
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DatasetInfo:
        """Parse what ``to_json`` wrote (unknown keys from newer writers are ignored)."""
        raw = json.loads(text)
        if "settings" not in raw:
            raise StorageError("mrl.info predates recorded settings: read it with read_info(dataset)")
        known = {f.name for f in fields(cls)} - {"unknown"}
        raw = {k: v for k, v in raw.items() if k in known}
        raw["settings"] = EmbedSettings.from_dict(raw["settings"])
        raw["trained_dims"] = tuple(raw["trained_dims"])
        return cls(**raw)


def encoder_fingerprint(fingerprint: str, options: Mapping[str, Any]) -> str:
    """The fingerprint of an encoder loaded with ``options``: its own when there are none, else a
    hash of it and the options, so a dataset, its index and ``Corpus`` agree on both."""
    if not options:
        return fingerprint
    text = json.dumps(dict(options), sort_keys=True, default=str)
    return hashlib.sha256(f"{fingerprint}\0{text}".encode()).hexdigest()[:16]


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


MAX_SHARD_KEY = (1 << (63 - POSITION_BITS)) - 1
"""Shard keys fill the 39 high bits of an id (the sign bit stays 0)."""


def derive_ids(key: int, positions: np.ndarray) -> np.ndarray:
    """Stable int64 ids of a shard's rows: its ``key`` (from the ledger) in the high bits, each
    row's position in the shard in the low ``POSITION_BITS``."""
    positions = np.asarray(positions, dtype=np.int64)
    if not 0 <= key <= MAX_SHARD_KEY:
        raise ValueError(f"shard key {key} is outside 0..{MAX_SHARD_KEY}")
    if len(positions) and (positions.min() < 0 or positions.max() >= 1 << POSITION_BITS):
        raise ValueError(f"a shard has more than {1 << POSITION_BITS} rows; split it or pass --id-column")
    return (np.int64(key) << np.int64(POSITION_BITS)) | positions


def legacy_shard_key(shard: str) -> int:
    """The key pipeline version 1 derived from a shard's URI (39 bits of a hash): the key of its
    ledger entries that record none. New shards get sequential keys (``assign_shard_keys``),
    which cannot collide."""
    digest = hashlib.blake2b(shard.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - (63 - POSITION_BITS))


def ledger_key(shard: str, entry: Mapping[str, Any]) -> int:
    """The key of a committed shard: recorded in its ledger entry, or (pipeline 1) its URI hash."""
    key = entry.get("key")
    return legacy_shard_key(shard) if key is None else int(key)


def ids_of_rows(ds: lance.LanceDataset, shard: str, positions: np.ndarray) -> np.ndarray:
    """The derived ids of the records at ``positions`` of a committed ``shard`` (from its ledger
    entry's key): which row a record became."""
    entry = read_ledger(ds).get(shard)
    if entry is None:
        raise KeyError(f"shard {shard} has no ledger entry in {ds.uri}")
    return derive_ids(ledger_key(shard, entry), positions)


def assign_shard_keys(ledger: Mapping[str, Mapping[str, Any]], shards: Sequence[str]) -> dict[str, int]:
    """A key for each of ``shards``: its own when the ledger has it (a changed shard keeps its ids),
    else the next unused one after every key the ledger holds. Keys never collide."""
    used = {ledger_key(s, e) for s, e in ledger.items()}
    next_key = 1 + max((int(e["key"]) for e in ledger.values() if e.get("key") is not None), default=0)
    out = {}
    for shard in shards:
        if shard in ledger:
            out[shard] = ledger_key(shard, ledger[shard])
            continue
        while next_key in used:
            next_key += 1
        if next_key > MAX_SHARD_KEY:
            raise StorageError(f"no shard keys left (all {MAX_SHARD_KEY} used)")
        out[shard], next_key = next_key, next_key + 1
        used.add(out[shard])
    return out


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
    """How the dataset's rows were made (``mrl.info``).

    A dataset written before its settings were recorded (pipeline version 1) gets them inferred
    where that is unambiguous: the encoder, dims and dtype from its info, the kept columns and
    their types from its schema, derived ids (no id column) when its rows' ids carry their
    shards' keys, the format from its shards' extensions when every one names a format. What
    cannot be told (always the text column) is listed in ``unknown``: a run must give it once.
    """
    raw = ds.config().get(INFO_KEY)
    if raw is None:
        raise StorageError(f"dataset {ds.uri} has no '{INFO_KEY}': it was not written by mrl embed")
    data = json.loads(raw)
    return DatasetInfo.from_json(raw) if "settings" in data else _legacy_info(ds, data)


def _legacy_info(ds: lance.LanceDataset, data: Mapping[str, Any]) -> DatasetInfo:
    keep = tuple(f.name for f in ds.schema if f.name not in ("id", "shard") and not f.name.startswith(EMB_PREFIX))
    unknown = ["text_column"]
    sample = ds.head(1024, columns=["id", "shard"])
    ids, shards = sample["id"].to_numpy(), sample["shard"].to_pylist()
    derived = all(int(i) >> POSITION_BITS == legacy_shard_key(s) for i, s in zip(ids, shards))
    if not derived:
        unknown.append("id_column")
    by_extension = all(posixpath.splitext(s)[1].lower() in FORMAT_OF_EXTENSION for s in read_ledger(ds))
    if not by_extension:
        unknown.append("format")
    settings = EmbedSettings(encoder=data["encoder"], dims=data["dims"], dtype=data.get("dtype", "float16"),
                             keep=keep)
    return DatasetInfo(
        settings=settings, fingerprint=data["fingerprint"], full_dim=data["full_dim"],
        trained_dims=tuple(data["trained_dims"]), kept_types=kept_types(ds.schema, keep),
        metric=data.get("metric", "cosine"), normalized=data.get("normalized", True),
        modality=data.get("modality", "text"), pipeline_version=data.get("pipeline_version", "1"),
        extra=data.get("extra", {}), unknown=tuple(unknown),
    )


def kept_types(schema: pa.Schema, keep: Sequence[str]) -> dict[str, str]:
    """{kept column: its Arrow type as text}, as ``mrl.info`` records them."""
    return {name: str(schema.field(name).type) for name in keep}


def sql_string_list(values: Iterable[str]) -> str:
    """A SQL ``IN (...)`` list of string literals, quotes escaped."""
    return ", ".join(sql_literal(v) for v in values)


def sql_literal(value: str) -> str:
    """A SQL string literal, quotes escaped."""
    return "'" + value.replace("'", "''") + "'"


def rename_shards(ds: lance.LanceDataset, renames: Mapping[str, str]) -> int:
    """Give committed shards new URIs: their rows' ``shard`` column, then their ledger entries.

    Rows keep their ids. A crash between the two steps is finished by calling it again with the
    same renames (the rows are renamed already). Returns the rows renamed.
    """
    ledger = read_ledger(ds)
    renames = {old: new for old, new in renames.items() if old != new}
    taken = sorted(new for new in renames.values() if new in ledger and new not in renames)
    if taken:
        raise StorageError(f"cannot rename shards onto {taken[:3]}: committed shards of that name exist")
    rows = 0
    for old, new in renames.items():
        rows += ds.update({"shard": sql_literal(new)}, where=f"shard = {sql_literal(old)}")["num_rows_updated"]
    moved = {old: new for old, new in renames.items() if old in ledger}
    _move_entries(ds, ledger, moved)
    return rows


def rebase_shards(ds: lance.LanceDataset, old_root: str, new_root: str) -> int:
    """Move every committed shard under ``old_root`` to the same path under ``new_root`` (an input
    directory that moved): rows' ``shard`` column in one update, then the ledger. Rows keep their
    ids and vectors. Idempotent, so a crash in between is finished by running it again."""
    old_root, new_root = old_root.rstrip("/") + "/", new_root.rstrip("/") + "/"
    ledger = read_ledger(ds)
    moved = {u: new_root + u[len(old_root):] for u in ledger if u.startswith(old_root)}
    taken = sorted(new for new in moved.values() if new in ledger)
    if taken:
        raise StorageError(f"cannot rebase {old_root} onto {new_root}: shards {taken[:3]} exist under both")
    expression = f"concat({sql_literal(new_root)}, substr(shard, {len(old_root) + 1}))"
    rows = ds.update({"shard": expression}, where=f"starts_with(shard, {sql_literal(old_root)})")["num_rows_updated"]
    _move_entries(ds, ledger, moved)
    return rows


def _move_entries(ds: lance.LanceDataset, ledger: Mapping[str, Any], moved: Mapping[str, str]) -> None:
    """Move the ledger entries of ``moved`` ({old URI: new URI}) to their new URIs in one commit."""
    if moved:
        record(ds, {**dict.fromkeys(moved), **{new: ledger[old] for old, new in moved.items()}})


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
