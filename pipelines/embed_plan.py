"""The Ray Data plan of the embed job: read shards -> preprocess (CPU tasks) -> encode
(actors, one model per GPU) -> write uncommitted Lance fragments -> one report row per batch.

Every row carries its shard, its position in the shard and the shard's record count, so the
driver's ``CommitLog`` can tell when a shard is complete and drop repeated outputs. Rows that
cannot be embedded travel with ``_error`` set and are reported as skipped, never written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import ray

from mrl_core.encoders import get_encoder
from mrl_core.ledger import encode_positions
from mrl_core.sources import Shard, ShardError, read_shard
from mrl_core.storage import derive_ids, embedding_arrays

META_COLUMNS = ["_pos", "_total", "_version", "_skipped", "_error", "_t_read", "_t_pre", "_t_enc"]


@dataclass(frozen=True)
class PlanConfig:
    """What every stage needs to know; small and picklable."""

    output: str
    encoder: str
    dims: tuple[int, ...]
    dtype: str
    input_column: str
    keep: tuple[str, ...]
    id_column: str | None
    modality: str
    max_record_bytes: int
    on_error: str
    storage_options: tuple[tuple[str, str], ...] = ()
    input_storage_options: tuple[tuple[str, str], ...] = ()
    encoder_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def out_options(self) -> dict[str, str]:
        """Storage options for the output dataset."""
        return dict(self.storage_options)


def _column(n: int, value: Any, type_: pa.DataType) -> pa.Array:
    return pa.array([value] * n, type_)


def _meta(table: pa.Table, shard: Shard, total: int, skipped: list, error: str | None,
          elapsed: float) -> pa.Table:
    """Attach the per-row bookkeeping columns; skipped records ride on the shard's first row."""
    n = table.num_rows
    skipped_json = [json.dumps(skipped)] + [None] * (n - 1) if n else []
    return (
        table.append_column("_total", _column(n, total, pa.int64()))
        .append_column("_version", _column(n, shard.version, pa.string()))
        .append_column("_skipped", pa.array(skipped_json, pa.string()))
        .append_column("_error", _column(n, error, pa.string()))
        .append_column("_t_read", _column(n, elapsed / max(n, 1), pa.float64()))
    )


def read_shards(batch: pa.Table, cfg: PlanConfig) -> pa.Table:
    """Stage 1 (a CPU task per shard): read, validate, assign ids."""
    out = [_read_one(Shard(**row), cfg) for row in batch.to_pylist()]
    return pa.concat_tables(out, promote_options="default")


def _read_one(shard: Shard, cfg: PlanConfig) -> pa.Table:
    start = time.perf_counter()
    keep = [*cfg.keep, *([cfg.id_column] if cfg.id_column and cfg.id_column not in cfg.keep else [])]
    try:
        records = read_shard(shard, cfg.input_column, keep, dict(cfg.input_storage_options),
                             cfg.modality, cfg.max_record_bytes)
    except ShardError as exc:
        if cfg.on_error == "fail":
            raise
        placeholder = pa.table({"_pos": pa.array([-1], pa.int64()), "_input": pa.array([None], pa.string())})
        return _finish_read(placeholder, shard, cfg, 0, [], str(exc), start)
    table = records.table
    if table.num_rows == 0:  # nothing to embed: one placeholder row reports the shard
        table = pa.table({"_pos": pa.array([-1], pa.int64()), "_input": pa.array([None], pa.string())})
    return _finish_read(table, shard, cfg, records.total, records.skipped, None, start)


def _finish_read(table: pa.Table, shard: Shard, cfg: PlanConfig, total: int, skipped: list,
             error: str | None, start: float) -> pa.Table:
    pos = table.column("_pos").to_numpy()
    if cfg.id_column and error is None and pos[0] >= 0:
        ids = table.column(cfg.id_column).cast(pa.int64())
        if cfg.id_column not in cfg.keep:
            table = table.drop_columns([cfg.id_column])
    else:
        ids = pa.array(derive_ids(shard.uri, np.maximum(pos, 0)), pa.int64())
    table = table.append_column("id", ids).append_column("shard", _column(table.num_rows, shard.uri, pa.string()))
    return _meta(table, shard, total, skipped, error, time.perf_counter() - start)


@lru_cache(maxsize=2)
def _cached_encoder(spec: str, device: str | None, kwargs: tuple) -> Any:
    return get_encoder(spec, device=device, **dict(kwargs))


def _preprocessor(cfg: PlanConfig, preprocessor: Any) -> Any:
    if isinstance(preprocessor, ray.ObjectRef):
        return ray.get(preprocessor)
    if preprocessor is not None:
        return preprocessor
    enc = _cached_encoder(cfg.encoder, "cpu", cfg.encoder_kwargs)
    return getattr(enc, "preprocessor", None) or enc.preprocess


def preprocess(batch: pa.Table, cfg: PlanConfig, preprocessor: Any = None) -> pa.Table:
    """Stage 2 (CPU tasks): tokenise or decode; a row that fails gets ``_error`` instead.

    ``preprocessor`` is the encoder's picklable CPU half (or a reference to it), so these
    tasks never load model weights; without one the encoder is loaded once per worker.
    """
    start = time.perf_counter()
    pre = _preprocessor(cfg, preprocessor)
    errors = batch.column("_error").to_pylist()
    positions = batch.column("_pos").to_pylist()
    inputs = batch.column("_input").to_pylist()
    good = [i for i, (e, p) in enumerate(zip(errors, positions)) if e is None and p >= 0]
    features, failed = _preprocess_rows(pre, [inputs[i] for i in good])
    for j, reason in failed.items():
        errors[good[j]] = reason
    good = [g for j, g in enumerate(good) if j not in failed]
    columns = features_to_columns(features, good, batch.num_rows)
    batch = batch.set_column(batch.schema.get_field_index("_error"), "_error", pa.array(errors, pa.string()))
    batch = batch.drop_columns(["_input"])
    for name, col in columns.items():
        batch = batch.append_column(name, col)
    elapsed = time.perf_counter() - start
    return batch.append_column("_t_pre", _column(batch.num_rows, elapsed / max(batch.num_rows, 1), pa.float64()))


def _preprocess_rows(pre: Any, inputs: list) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """Features of ``inputs``; rows that make the preprocessor fail are found and left out."""
    if not inputs:
        return {}, {}
    try:
        return pre(inputs), {}
    except (ValueError, TypeError, OSError):
        pass
    failed, ok = {}, []
    for j, x in enumerate(inputs):
        try:
            pre([x])
            ok.append(j)
        except (ValueError, TypeError, OSError) as exc:
            failed[j] = f"cannot preprocess: {exc}"
    return (pre([inputs[j] for j in ok]) if ok else {}), failed


def features_to_columns(features: dict[str, np.ndarray], rows: list[int], n: int) -> dict[str, pa.Array]:
    """Features of the ``rows`` of a batch of ``n`` as Arrow columns (other rows empty/zero).

    Ragged token ids (``ids`` + ``lengths``) become one ``list<int64>`` column; any other
    per-row array becomes a fixed-shape tensor column.
    """
    out: dict[str, pa.Array] = {}
    if "ids" in features and "lengths" in features:
        lengths = np.zeros(n, dtype=np.int64)
        lengths[rows] = features["lengths"]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        out["_f_ids"] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(features["ids"], pa.int64()))
    for key, value in features.items():
        if key in ("ids", "lengths"):
            continue
        full = np.zeros((n, *value.shape[1:]), dtype=value.dtype)
        full[rows] = value
        out[f"_f_{key}"] = pa.FixedShapeTensorArray.from_numpy_ndarray(full) if full.ndim > 1 else pa.array(full)
    return out


def columns_to_features(batch: pa.Table, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse of ``features_to_columns`` for the selected ``rows``."""
    sub = batch.take(pa.array(rows, pa.int64()))
    features: dict[str, np.ndarray] = {}
    for name in sub.column_names:
        if not name.startswith("_f_"):
            continue
        col = sub.column(name).combine_chunks()
        key = name[3:]
        if key == "ids":
            features["ids"] = col.flatten().to_numpy()
            offsets = col.offsets.to_numpy()
            features["lengths"] = np.diff(offsets - offsets[0])
        elif isinstance(col, pa.FixedShapeTensorArray):
            features[key] = col.to_numpy_ndarray()
        else:
            features[key] = col.to_numpy(zero_copy_only=False)
    return features


class Encode:
    """Stage 3 (actor pool): one model per actor, on its GPU when it has one."""

    def __init__(self, cfg: PlanConfig) -> None:
        import torch

        self.cfg = cfg
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.encoder = get_encoder(cfg.encoder, device=device, **dict(cfg.encoder_kwargs))
        self.busy = 0.0

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        errors = batch.column("_error").to_pylist()
        positions = batch.column("_pos").to_numpy()
        rows = np.array([i for i, e in enumerate(errors) if e is None and positions[i] >= 0], dtype=np.int64)
        emb = np.zeros((batch.num_rows, self.encoder.dim), dtype=np.float32)
        if len(rows):
            emb[rows] = self.encoder.embed_features(columns_to_features(batch, rows))
        self.busy += time.perf_counter() - start
        batch = batch.drop_columns([c for c in batch.column_names if c.startswith("_f_")])
        for name, col in embedding_arrays(emb, self.cfg.dims, self.cfg.dtype).items():
            batch = batch.append_column(name, col)
        elapsed = time.perf_counter() - start
        return batch.append_column("_t_enc", _column(batch.num_rows, elapsed / max(batch.num_rows, 1), pa.float64()))


def write_fragments(batch: pa.Table, cfg: PlanConfig, schema: pa.Schema) -> pa.Table:
    """Stage 4 (CPU tasks): write the batch's good rows as uncommitted Lance fragments and
    return one report row: the fragments and, per shard, the positions written and skipped."""
    start = time.perf_counter()
    errors = batch.column("_error").to_pylist()
    positions = batch.column("_pos").to_numpy()
    good = np.array([i for i, e in enumerate(errors) if e is None and positions[i] >= 0], dtype=np.int64)
    fragments = []
    if len(good):
        rows = batch.take(pa.array(good)).select(schema.names).cast(schema)
        written = lance.fragment.write_fragments(rows, cfg.output, schema=schema, storage_options=cfg.out_options)
        fragments = [f.to_json() for f in written]
    report = _shard_report(batch, good, errors, positions)
    times = {c: float(np.sum(batch.column(c).to_numpy())) for c in ("_t_read", "_t_pre", "_t_enc")}
    times["_t_write"] = time.perf_counter() - start
    return pa.table({
        "report": [json.dumps({"fragments": fragments, "shards": report})],
        "rows": [len(good)],
        **{k: [v] for k, v in times.items()},
    })


def _shard_report(batch: pa.Table, good: np.ndarray, errors: list, positions: np.ndarray) -> dict:
    """Per shard in the batch: record count, version, positions written, skipped records, error."""
    shards = batch.column("shard").to_pylist()
    totals = batch.column("_total").to_numpy()
    versions = batch.column("_version").to_pylist()
    skipped_col = batch.column("_skipped").to_pylist()
    good_set = set(good.tolist())
    report: dict[str, dict[str, Any]] = {}
    written: dict[str, list[int]] = {}
    for i, uri in enumerate(shards):
        entry = report.setdefault(uri, {"total": int(totals[i]), "version": versions[i], "skipped": [], "error": None})
        if skipped_col[i]:
            entry["skipped"].extend(json.loads(skipped_col[i]))
        if positions[i] < 0:
            entry["error"] = errors[i]
        elif i in good_set:
            written.setdefault(uri, []).append(int(positions[i]))
        else:
            entry["skipped"].append([int(positions[i]), errors[i]])
    for uri, entry in report.items():
        entry["positions"] = encode_positions(np.array(written.get(uri, []), dtype=np.int64))
    return report
