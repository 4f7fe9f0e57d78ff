"""The Ray Data plan of the embed job: read shards -> preprocess (CPU tasks) -> encode
(actors, one model per GPU) -> write uncommitted Lance fragments -> one report row per write.

Every row carries its shard, its position in the shard and the shard's record count, so the
driver's ``CommitLog`` can tell when a shard is complete and drop repeated outputs. Rows that
cannot be embedded travel with ``_error`` set and are reported as skipped, never written.

``build_plan`` lays the stages out two ways. With encoder actors (GPUs) the stages are separate:
CPU tasks read and tokenise, the actors only run the model, CPU tasks write. Without them all four
stages run in one task per shard (``embed_shards``), chunk by chunk: on a CPU-only machine the
tokeniser is the bottleneck, and shipping tokens and embeddings between processes through the
object store would only take cores from it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from mrl_core.defaults import FRAGMENT_ROWS
from mrl_core.device import describe
from mrl_core.encoders import get_encoder
from mrl_core.ledger import encode_positions
from mrl_core.settings import EmbedSettings
from mrl_core.sources import Shard, ShardError, read_shard
from mrl_core.storage import derive_ids, embedding_arrays
from pipelines.cli import configure_logging
from pipelines.gpu_check import ray_node, worker_device
from pipelines.layout import Layout

logger = logging.getLogger(__name__)

META_COLUMNS = ["_pos", "_total", "_version", "_skipped", "_error", "_t_read", "_t_pre", "_t_enc"]


@dataclass(frozen=True)
class PlanConfig:
    """What every stage needs: the dataset's settings, where to write, how to treat errors.
    Small and picklable."""

    output: str
    settings: EmbedSettings  # with its dims resolved: the columns written
    modality: str
    on_error: str
    storage_options: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    input_storage_options: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    chunk_rows: int = FRAGMENT_ROWS  # records read, tokenised and written together (one fragment)
    keep_schema: pa.Schema | None = None  # the dataset's types of the kept columns

    @property
    def out_options(self) -> dict[str, str]:
        """Storage options for the output dataset."""
        return dict(self.storage_options)


def _column(n: int, value: Any, type_: pa.DataType) -> pa.Array:
    """``n`` copies of ``value`` (null when None), built in C."""
    return pa.nulls(n, type_) if value is None else pa.repeat(pa.scalar(value, type_), n)


def _meta(table: pa.Table, shard: Shard, total: int, skipped: list, error: str | None,
          elapsed: float) -> pa.Table:
    """Attach the per-row bookkeeping columns; skipped records ride on the shard's first row."""
    n = table.num_rows
    skipped_json = (pa.concat_arrays([pa.array([json.dumps(skipped)], pa.string()), pa.nulls(n - 1, pa.string())])
                    if n else pa.array([], pa.string()))
    return (
        table.append_column("_total", _column(n, total, pa.int64()))
        .append_column("_version", _column(n, shard.version, pa.string()))
        .append_column("_skipped", skipped_json)
        .append_column("_error", _column(n, error, pa.string()))
        .append_column("_t_read", _column(n, elapsed / max(n, 1), pa.float64()))
    )


def _embeddable(batch: pa.Table) -> np.ndarray:
    """Boolean mask of the rows to embed: no ``_error`` and a real position (not a placeholder)."""
    ok = batch.column("_error").is_null().to_numpy(zero_copy_only=False)
    return ok & (batch.column("_pos").to_numpy() >= 0)


def _read_one(shard: Shard, cfg: PlanConfig) -> pa.Table:
    """Stage 1: read and validate one shard, assign ids; a failed or empty shard becomes one
    placeholder row (``_pos`` -1) that reports it."""
    start = time.perf_counter()
    s = cfg.settings
    try:
        records = read_shard(shard, s.text_column, s.read_columns, dict(cfg.input_storage_options),
                             cfg.modality, s.max_record_bytes)
        _check_columns(records.table, shard, cfg)
    except ShardError as exc:
        if cfg.on_error == "fail":
            raise
        placeholder = pa.table({"_pos": pa.array([-1], pa.int64()), "_input": pa.array([None], pa.string())})
        return _finish_read(placeholder, shard, cfg, 0, [], str(exc), start)
    table = records.table
    if table.num_rows == 0:  # nothing to embed: one placeholder row reports the shard
        table = pa.table({"_pos": pa.array([-1], pa.int64()), "_input": pa.array([None], pa.string())})
    return _finish_read(table, shard, cfg, records.total, records.skipped, None, start)


_ARROW_CAST_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)


def shard_ids(shard: Shard, settings: EmbedSettings, modality: str,
              storage_options: Mapping[str, str] | None) -> np.ndarray | None:
    """The ``--id-column`` ids of a shard's valid records (a Ray task's work before the plan
    runs), or None when the shard cannot be read: the plan then reports it by name."""
    try:
        records = read_shard(shard, settings.text_column, [settings.id_column], storage_options,
                             modality, settings.max_record_bytes)
        return records.table.column(settings.id_column).cast(pa.int64()).to_numpy()
    except (ShardError, *_ARROW_CAST_ERRORS):
        return None


def _check_columns(table: pa.Table, shard: Shard, cfg: PlanConfig) -> None:
    """Raise ``ShardError`` when kept columns do not fit the dataset's types, or the
    ``--id-column`` is not unique non-negative integers, before anything of the shard is written."""
    if not table.num_rows:
        return
    if cfg.keep_schema is not None and len(cfg.keep_schema):
        try:
            table.select(cfg.keep_schema.names).cast(cfg.keep_schema)
        except _ARROW_CAST_ERRORS as exc:
            raise ShardError(shard.uri, f"kept column types do not match the dataset's "
                                        f"({', '.join(f'{f.name}: {f.type}' for f in cfg.keep_schema)}): "
                                        f"{exc}") from exc
    id_column = cfg.settings.id_column
    if id_column:
        column = table.column(id_column)
        try:
            ids = column.cast(pa.int64())
        except _ARROW_CAST_ERRORS as exc:
            raise ShardError(shard.uri, f"id column {id_column!r} is {column.type}, not integers") from exc
        if ids.null_count:
            raise ShardError(shard.uri, f"id column {id_column!r} has {ids.null_count} null value(s)")
        values = ids.to_numpy()
        if (values < 0).any():
            raise ShardError(shard.uri, f"id column {id_column!r} has negative ids "
                                        f"(first: {values[values < 0][0]})")
        if len(np.unique(values)) != len(values):
            raise ShardError(shard.uri, f"id column {id_column!r} repeats ids within the shard")


def _finish_read(table: pa.Table, shard: Shard, cfg: PlanConfig, total: int, skipped: list,
             error: str | None, start: float) -> pa.Table:
    pos = table.column("_pos").to_numpy()
    id_column = cfg.settings.id_column
    if id_column and error is None and pos[0] >= 0:
        ids = table.column(id_column).cast(pa.int64())
        if id_column not in cfg.settings.keep:
            table = table.drop_columns([id_column])
    else:
        ids = pa.array(derive_ids(shard.key, np.maximum(pos, 0)), pa.int64())
    table = table.append_column("id", ids).append_column("shard", _column(table.num_rows, shard.uri, pa.string()))
    return _meta(table, shard, total, skipped, error, time.perf_counter() - start)


@lru_cache(maxsize=2)
def _cached_encoder(settings: EmbedSettings, device: str | None) -> Any:
    return get_encoder(settings.encoder, device=device, **settings.encoder_options)


@lru_cache(maxsize=4)
def _fetch(ref: ray.ObjectRef) -> Any:
    """The preprocessor behind ``ref``, deserialised once per worker, not once per batch."""
    return ray.get(ref)


def _preprocessor(cfg: PlanConfig, preprocessor: Any) -> Any:
    if isinstance(preprocessor, ray.ObjectRef):
        return _fetch(preprocessor)
    if preprocessor is not None:
        return preprocessor
    enc = _cached_encoder(cfg.settings, "cpu")
    return getattr(enc, "preprocessor", None) or enc.preprocess


def preprocess(batch: pa.Table, cfg: PlanConfig, preprocessor: Any = None) -> pa.Table:
    """Stage 2 (CPU tasks): tokenise or decode; a row that fails gets ``_error`` instead.

    ``preprocessor`` is the encoder's picklable CPU half (or a reference to it), so these
    tasks never load model weights; without one the encoder is loaded once per worker.
    """
    start = time.perf_counter()
    pre = _preprocessor(cfg, preprocessor)
    good = np.flatnonzero(_embeddable(batch))
    inputs = batch.column("_input")
    if len(good) == batch.num_rows:  # no bad rows: no gather
        features, failed = _preprocess_rows(pre, inputs.to_pylist())
    else:
        features, failed = _preprocess_rows(pre, inputs.take(pa.array(good)).to_pylist())
    if failed:
        errors = batch.column("_error").to_pylist()
        for j, reason in failed.items():
            errors[int(good[j])] = reason
        batch = batch.set_column(batch.schema.get_field_index("_error"), "_error", pa.array(errors, pa.string()))
        good = np.delete(good, np.fromiter(failed, dtype=np.int64, count=len(failed)))
    columns = features_to_columns(features, good, batch.num_rows)
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
    rows = np.asarray(rows, dtype=np.int64)
    every = len(rows) == n  # all rows have features (the usual case): no scatter
    if "ids" in features and "lengths" in features:
        lengths = np.asarray(features["lengths"], dtype=np.int64)
        if not every:
            lengths = np.zeros(n, dtype=np.int64)
            lengths[rows] = features["lengths"]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        out["_f_ids"] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(features["ids"], pa.int64()))
    for key, value in features.items():
        if key in ("ids", "lengths"):
            continue
        if every:
            full = value
        else:
            full = np.zeros((n, *value.shape[1:]), dtype=value.dtype)
            full[rows] = value
        out[f"_f_{key}"] = pa.FixedShapeTensorArray.from_numpy_ndarray(full) if full.ndim > 1 else pa.array(full)
    return out


def columns_to_features(batch: pa.Table, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse of ``features_to_columns`` for the selected ``rows``."""
    sub = batch.select([name for name in batch.column_names if name.startswith("_f_")])
    if len(rows) != batch.num_rows:
        sub = sub.take(pa.array(rows, pa.int64()))
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
    """Stage 3 (actor pool): one model per actor, on the GPU Ray gave it (``device`` "auto"),
    or on the CPU (``device`` "cpu", the GPU request kept). An actor that holds a GPU torch cannot
    use stops the job (``mrl_core.device.DeviceError``) before it embeds anything."""

    def __init__(self, cfg: PlanConfig, device: str = "auto") -> None:
        configure_logging()  # this actor's own process: its INFO lines go to the worker's log
        self.cfg = cfg
        spec = cfg.settings.encoder
        torch_device = worker_device(device, what=f"encoder {spec}")
        self.encoder = get_encoder(spec, device=str(torch_device), **cfg.settings.encoder_options)
        self.gpu_ids = [str(i) for i in ray.get_gpu_ids()]
        logger.info(f"encoder actor on node {ray_node()} (node id {ray.get_runtime_context().get_node_id()}): "
                    f"GPU ids [{','.join(self.gpu_ids)}], model on {describe(torch_device)}")
        self.busy = 0.0

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        out = encode(batch, self.cfg, self.encoder)
        self.busy += time.perf_counter() - start
        return out


def encode(batch: pa.Table, cfg: PlanConfig, encoder: Any = None) -> pa.Table:
    """Embed a preprocessed batch: ``_f_*`` feature columns -> ``emb_<d>`` columns.

    ``encoder`` defaults to one loaded on the CPU once per worker process.
    """
    start = time.perf_counter()
    if encoder is None:
        encoder = _cached_encoder(cfg.settings, "cpu")
    rows = np.flatnonzero(_embeddable(batch))
    if len(rows) == batch.num_rows:
        emb = encoder.embed_features(columns_to_features(batch, rows))
    else:
        emb = np.zeros((batch.num_rows, encoder.dim), dtype=np.float32)
        if len(rows):
            emb[rows] = encoder.embed_features(columns_to_features(batch, rows))
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():  # a record the model cannot embed is skipped, never written
        emb[~finite] = 0.0
        errors = batch.column("_error").to_pylist()
        for i in np.flatnonzero(~finite):
            errors[i] = errors[i] or "the encoder produced NaN or inf"
        batch = batch.set_column(batch.schema.get_field_index("_error"), "_error", pa.array(errors, pa.string()))
    batch = batch.drop_columns([c for c in batch.column_names if c.startswith("_f_")])
    for name, col in embedding_arrays(emb, cfg.settings.dims, cfg.settings.dtype).items():
        batch = batch.append_column(name, col)
    elapsed = time.perf_counter() - start
    return batch.append_column("_t_enc", _column(batch.num_rows, elapsed / max(batch.num_rows, 1), pa.float64()))


def write_fragments(batch: pa.Table, cfg: PlanConfig, schema: pa.Schema) -> pa.Table:
    """Stage 4 (CPU tasks): write the batch's good rows as uncommitted Lance fragments, one set
    per shard (so the driver commits a shard's rows together, once it is complete), and return
    one report row: per shard, its fragments and the positions written and skipped."""
    start = time.perf_counter()
    ok = _embeddable(batch)
    report = _shard_report(batch, ok)
    codes, uris = _shard_codes(batch)
    for code, uri in enumerate(uris):
        mine = ok & (codes == code)
        if mine.any():
            rows = batch.filter(pa.array(mine)).select(schema.names).cast(schema)
            written = lance.fragment.write_fragments(rows, cfg.output, schema=schema, storage_options=cfg.out_options)
            report[uri]["fragments"] = [f.to_json() for f in written]
    times = {c: float(pc.sum(batch.column(c)).as_py() or 0.0) for c in ("_t_read", "_t_pre", "_t_enc")}
    times["_t_write"] = time.perf_counter() - start
    return pa.table({
        "report": [json.dumps({"shards": report})],
        "rows": [int(ok.sum())],
        **{k: [v] for k, v in times.items()},
    })


def _shard_codes(batch: pa.Table) -> tuple[np.ndarray, list[str]]:
    """Each row's shard as a code into the list of the batch's shard URIs."""
    shard_ids = batch.column("shard").combine_chunks().dictionary_encode()
    return shard_ids.indices.to_numpy(zero_copy_only=False), shard_ids.dictionary.to_pylist()


def _shard_report(batch: pa.Table, ok: np.ndarray) -> dict:
    """Per shard in the batch: record count, version, positions written, skipped records, error."""
    positions = batch.column("_pos").to_numpy()
    codes, uris = _shard_codes(batch)
    report: dict[str, dict[str, Any]] = {}
    for code, uri in enumerate(uris):
        mine = codes == code
        first = int(np.argmax(mine))
        entry = {"total": int(batch.column("_total")[first].as_py()),
                 "version": batch.column("_version")[first].as_py(), "skipped": [], "error": None,
                 "fragments": []}
        for text in pc.drop_null(batch.column("_skipped").filter(pa.array(mine))).to_pylist():
            entry["skipped"].extend(json.loads(text))
        placeholder = mine & (positions < 0)
        if placeholder.any():
            entry["error"] = batch.column("_error")[int(np.argmax(placeholder))].as_py()
        failed = np.flatnonzero(mine & ~ok & (positions >= 0))
        if len(failed):
            reasons = batch.column("_error").take(pa.array(failed)).to_pylist()
            entry["skipped"].extend([int(positions[i]), reason] for i, reason in zip(failed, reasons))
        entry["positions"] = encode_positions(positions[mine & ok])
        report[uri] = entry
    return report


def read_shards(batch: pa.Table, cfg: PlanConfig) -> Iterator[pa.Table]:
    """Stage 1 (CPU tasks) for a batch of shard rows: the shards' records in slices of
    ``cfg.chunk_rows``, bookkeeping columns attached."""
    for row in batch.to_pylist():
        table = _read_one(Shard(**row), cfg)
        for lo in range(0, table.num_rows, cfg.chunk_rows):
            yield table.slice(lo, cfg.chunk_rows)


def read_and_preprocess(batch: pa.Table, cfg: PlanConfig, preprocessor: Any = None) -> Iterator[pa.Table]:
    """Stages 1-2 in one CPU task per shard (staged layout): preprocessed chunks, streamed."""
    for chunk in read_shards(batch, cfg):
        yield preprocess(chunk, cfg, preprocessor)


def embed_shards(batch: pa.Table, cfg: PlanConfig, schema: pa.Schema) -> Iterator[pa.Table]:
    """All four stages in one CPU task per shard, chunk by chunk: one report row (and one
    Lance fragment) per chunk of ``cfg.chunk_rows`` records."""
    for chunk in read_shards(batch, cfg):
        yield write_fragments(encode(preprocess(chunk, cfg), cfg), cfg, schema)


def build_plan(shards: Sequence[Shard], cfg: PlanConfig, schema: pa.Schema, layout: Layout, batch_rows: int,
               preprocessor: Any = None, device: str = "auto") -> ray.data.Dataset:
    """The Ray Data plan over ``shards``: one report row per written fragment (see the module doc).

    ``layout.gpus_per_actor`` None: no encoder actors; all stages run in up to ``layout.tasks``
    concurrent CPU tasks, one shard each. Otherwise (0 included) the staged layout: CPU tasks read
    and preprocess (with ``preprocessor``, the encoder's picklable CPU half, when it has one), a
    pool of ``layout.min_actors``..``max_actors`` encoder actors (``initial_actors`` asked for at
    start, so an autoscaler starts their nodes) embeds batches of ``batch_rows`` rows on
    ``device``, and CPU tasks write fragments of ``cfg.chunk_rows`` rows.
    """
    items = ray.data.from_items([asdict(s) for s in shards], override_num_blocks=len(shards))
    if layout.gpus_per_actor is None:
        tasks = max(1, min(layout.tasks or len(shards), len(shards)))
        plan = items.map_batches(embed_shards, fn_kwargs={"cfg": cfg, "schema": schema}, batch_size=1,
                                 batch_format="pyarrow", compute=ray.data.TaskPoolStrategy(size=tasks))
        # one operator, nothing to reserve resources against: start every task at once
        # (with the reservation on, Ray Data runs one task until the first one finishes)
        plan.context.op_resource_reservation_enabled = False
        return plan
    pre_ref = ray.put(preprocessor) if preprocessor is not None else None
    pool = ray.data.ActorPoolStrategy(min_size=layout.min_actors, max_size=layout.max_actors,
                                      initial_size=layout.initial_actors)
    # encoder actors are costly to start (a model each, often a GPU node to boot): once asked
    # for, keep them. Ray Data's utilisation-based downscaling would cancel actors still pending
    # on nodes the autoscaler is starting, which it then counts as actors that died at start.
    items.context.autoscaling_config = replace(items.context.autoscaling_config,
                                               actor_pool_util_downscaling_threshold=0.0)
    return (
        items.map_batches(read_and_preprocess, fn_kwargs={"cfg": cfg, "preprocessor": pre_ref}, batch_size=1,
                          batch_format="pyarrow")
        .map_batches(Encode, fn_constructor_kwargs={"cfg": cfg, "device": device}, batch_size=batch_rows,
                     batch_format="pyarrow", compute=pool,
                     num_gpus=layout.gpus_per_actor, num_cpus=0)  # its CPUs are left to the tokenising tasks
        .map_batches(write_fragments, fn_kwargs={"cfg": cfg, "schema": schema},
                     batch_size=cfg.chunk_rows, batch_format="pyarrow")
    )
