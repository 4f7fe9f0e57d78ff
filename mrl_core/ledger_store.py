"""Where the shard ledger lives: Parquet files inside the dataset, named by one config key.

The ledger says which input shards a dataset holds completely ({shard URI: entry}, the entry
being rows, skipped records, the source version and the key its ids derive from). Its entries
are stored in immutable Parquet files under ``<dataset>/_mrl/ledger/``, and each dataset version's
config names the files that make up that version's ledger (``mrl.ledger``, oldest first). A later
file's entry for a shard replaces an earlier one, and a null entry removes the shard.

Recording entries (``record``) writes one new file, then makes one config commit naming it. So:

* the manifest, which Lance rewrites in full with every version, stays small however many shards
  the dataset holds. One config key per shard made it grow by about 170 bytes per shard
  (17 MB per version at 10^5 shards; ``benchmarks/dataset_scale.py``);
* a version's ledger never changes afterwards: reading an older version reads its ledger;
* the commit order is unchanged: the data commit first, then the ledger's. A crash between the two
  leaves a shard without its entry, which the next run re-embeds and replaces (``ledger.py``).
  A crash after the file is written but before the config commit leaves a file no version names,
  which is harmless.

Every ``COMPACT_EVERY`` files, ``record`` writes the whole ledger as one file instead, so reading
one takes at most that many files. Datasets written before (pipeline versions 1 and 2) keep their
entries in one config key per shard (``mrl.shard/<uri>``). Those are read as the oldest layer and
moved into a file, in the same config commit, the first time entries are recorded.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lance
import pyarrow as pa
import pyarrow.parquet as pq

from mrl_core import objectstore

LEDGER_KEY = "mrl.ledger"
"""Dataset config key: JSON ``{"files": [name, ...]}``, the ledger files of this version, oldest first."""
LEGACY_PREFIX = "mrl.shard/"
"""Config keys of the ledger of pipeline versions 1 and 2: ``mrl.shard/<uri>`` -> JSON entry."""
LEDGER_DIR = "_mrl/ledger"
COMPACT_EVERY = 32
_SCHEMA = pa.schema([pa.field("shard", pa.string(), nullable=False), pa.field("entry", pa.string())])

Entry = dict[str, Any]


def ledger_files(ds: lance.LanceDataset) -> list[str]:
    """The names of the ledger files of this dataset version, oldest first."""
    value = ds.config().get(LEDGER_KEY)
    return list(json.loads(value)["files"]) if value else []


def read_ledger(ds: lance.LanceDataset, storage_options: Mapping[str, str] | None = None) -> dict[str, Entry]:
    """{shard URI: ledger entry} for every shard this dataset version holds completely.

    ``storage_options`` default to those the dataset was opened with.
    """
    out = {k[len(LEGACY_PREFIX):]: json.loads(v) for k, v in ds.config().items() if k.startswith(LEGACY_PREFIX)}
    files = ledger_files(ds)
    if not files:
        return out
    options = _options(ds, storage_options)
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        tables = list(pool.map(lambda name: _read_file(ds.uri, name, options), files))
    for table in tables:
        shards, entries = table["shard"].to_pylist(), table["entry"].to_pylist()
        _apply(out, {s: None if e is None else json.loads(e) for s, e in zip(shards, entries)})
    return out


def record(ds: lance.LanceDataset, entries: Mapping[str, Mapping[str, Any] | None],
           storage_options: Mapping[str, str] | None = None) -> lance.LanceDataset:
    """Record ledger ``entries`` (None removes a shard) in one new dataset version; returns it.

    Writes one file (or, every ``COMPACT_EVERY`` files and on a dataset with a per-key ledger, the
    whole ledger as one file), then commits the config naming it.
    """
    if not entries:
        return ds
    options = _options(ds, storage_options)
    files = ledger_files(ds)
    legacy = [k for k in ds.config() if k.startswith(LEGACY_PREFIX)]
    if legacy or len(files) + 1 >= COMPACT_EVERY:
        whole = read_ledger(ds, options)
        _apply(whole, entries)
        files = [_write_file(ds, whole, options)]
    else:
        files = [*files, _write_file(ds, entries, options)]
    ds.update_config({LEDGER_KEY: json.dumps({"files": files}), **dict.fromkeys(legacy)})
    return ds


def _apply(ledger: dict[str, Entry], entries: Mapping[str, Mapping[str, Any] | None]) -> None:
    """Apply ``entries`` to ``ledger`` in place: an entry replaces the shard's, None removes it."""
    for shard, entry in entries.items():
        if entry is None:
            ledger.pop(shard, None)
        else:
            ledger[shard] = dict(entry)


def _write_file(ds: lance.LanceDataset, entries: Mapping[str, Mapping[str, Any] | None],
                options: Mapping[str, str]) -> str:
    """Write ``entries`` as a new ledger file of ``ds``; its name. The name starts with the version
    it is written for, so a directory listing sorts like the versions."""
    shards = sorted(entries)
    table = pa.table({
        "shard": shards,
        "entry": [None if entries[s] is None else json.dumps(entries[s], sort_keys=True) for s in shards],
    }, schema=_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    name = f"{ds.version + 1:010d}-{uuid.uuid4().hex[:12]}.parquet"
    objectstore.write_bytes(objectstore.join(ds.uri, LEDGER_DIR, name), sink.getvalue(), options)
    return name


def _read_file(uri: str, name: str, options: Mapping[str, str]) -> pa.Table:
    url = objectstore.join(uri, LEDGER_DIR, name)
    try:
        data = objectstore.read_bytes(url, options)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"ledger file {url} named by dataset {uri} is missing: the dataset was copied without its "
            f"{LEDGER_DIR}/ directory, or the file was deleted"
        ) from exc
    return pq.read_table(io.BytesIO(data))


def _options(ds: lance.LanceDataset, given: Mapping[str, str] | None) -> dict[str, str]:
    """``given``, or the options ``ds`` was opened with (less Lance's own ``user_agent``)."""
    if given is not None:
        return dict(given)
    return {k: v for k, v in (ds.latest_storage_options() or {}).items() if k != "user_agent"}
