"""``Corpus``: a Lance dataset of nested embeddings with its current tier-0 index, searchable by
text or vector from a notebook.

    from mrl_core import Corpus
    corpus = Corpus.open("s3://bucket/pypi.lance", storage_options={...})
    corpus.search(["fast json parser"], k=10, columns=["name", "summary"]).to_pandas()

Longer prefixes for re-ranking are fetched by id: from memory when the tier fits the cache budget
(loaded on first use), else from Lance (``take`` of the rows' positions).

``search(..., where="section = 'python'")`` pre-filters with a Lance SQL filter: the result is the
best k among the matching rows. Tier 0 searches only matching rows (an exact scan over them when
they are few, else the FAISS index restricted to their ids by an ``IDSelector``), and the re-rank
reads only the matching rows tier 0 returns.
"""

from __future__ import annotations

import math
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import faiss
import lance
import numpy as np
import pyarrow as pa

from mrl_core.calibration import method_at
from mrl_core.defaults import CACHE_BYTES
from mrl_core.funnel import FunnelSchedule, IdMap, funnel_search, paper_schedule, take_rows
from mrl_core.index_store import (
    IndexManifest,
    IndexMismatchError,
    IndexNotFoundError,
    default_index_uri,
    load_index,
)
from mrl_core.search import BLOCK_ROWS, exact_search, merge_top_k, search_threads, threads_for
from mrl_core.storage import (
    DatasetInfo,
    column_to_numpy,
    emb_column,
    embedding_dims,
    encoder_fingerprint,
    open_dataset,
    read_info,
    rows_signature,
)
from mrl_core.tier0 import Tier0Index

RESULT_COLUMNS = ("query", "rank", "id", "score")

FILTER_SCAN_ROWS = 65_536
"""A filter matching at most this many rows is searched by an exact scan over them at the tier-0
dim (exact, and cheap at this size); more use the index restricted to the matching ids."""

FILTER_CACHE = 4
"""Filters whose matching ids a ``Corpus`` keeps (the most recently used)."""


@dataclass(frozen=True)
class Match:
    """The rows a filter matches: their ids and row positions, in position order."""

    where: str
    ids: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def selector(self) -> faiss.IDSelector:
        """A FAISS selector of these ids, built once (a hash set of them)."""
        return faiss.IDSelectorBatch(self.ids)


class EncoderMismatchError(RuntimeError):
    """The encoder installed here is not the one that embedded the dataset."""


class Corpus:
    """A dataset plus its index; create with ``Corpus.open``."""

    def __init__(
        self,
        dataset: lance.LanceDataset,
        info: DatasetInfo,
        index: Tier0Index | None,
        manifest: IndexManifest | None,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.dataset = dataset
        self.info = info
        self.index = index
        self.manifest = manifest
        self.dims = embedding_dims(dataset.schema)
        self.full_dim = self.dims[-1]
        self.rows = dataset.count_rows()
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._ids: np.ndarray | None = None
        self._idmap: IdMap | None = None
        self._tiers: dict[int, np.ndarray] = {}
        self._encoder = None
        self._matches: dict[str, Match] = {}
        self._selector_ok = True  # cleared when the index turns out to take no IDSelector (PQ fast-scan)
        self._schedule: tuple[dict | None, FunnelSchedule | None] = (None, None)  # (manifest's, parsed)
        self.filter_scan_rows = FILTER_SCAN_ROWS

    @classmethod
    def open(
        cls,
        uri: str,
        storage_options: Mapping[str, str] | None = None,
        *,
        index_uri: str | None = None,
        index_version: str | None = None,
        allow_stale_index: bool = False,
        snapshot: bool = True,
        require_index: bool = True,
        cache_bytes: int = CACHE_BYTES,
        gpu: bool | None = None,
    ) -> Corpus:
        """Open the dataset at ``uri`` with its current index (``<uri>.indexes`` unless ``index_uri``).

        Refuses an index built for another encoder; refuses one built for other rows than the
        dataset holds now (rows added or deleted since) unless ``allow_stale_index`` (then rows
        added since are not found by the funnel, and deleted rows are dropped from results).
        ``snapshot=True`` (default): when the dataset has changed since the index was built (a
        re-index in progress, or rows added without one), search the dataset version the index
        was built on, a consistent snapshot, with a warning; the mismatch is an error only when
        that version is gone or with ``snapshot=False``.
        ``require_index=False`` opens a dataset without an index (exact search and explicit
        schedules still work, with a flat tier 0). ``gpu``: search tier 0 on all GPUs (default:
        when FAISS sees one).
        """
        dataset = open_dataset(uri, storage_options)
        info = read_info(dataset)
        index_uri = index_uri or default_index_uri(uri)
        try:
            faiss_index, manifest = load_index(index_uri, index_version, storage_options)
        except IndexNotFoundError:
            if require_index:
                raise IndexNotFoundError(
                    f"dataset {uri} has no index at {index_uri}; build one with "
                    f"`python pipelines/index.py --dataset {uri}` (or open with require_index=False)"
                ) from None
            return cls(dataset, info, None, None, cache_bytes)
        if snapshot and manifest.rows_signature != rows_signature(dataset):
            dataset = _snapshot(uri, storage_options, manifest) or dataset
        check_index(manifest, dataset, info, allow_stale_index)
        return cls(dataset, info, Tier0Index(faiss_index, gpu), manifest, cache_bytes)

    def __repr__(self) -> str:
        index = ("no index" if self.manifest is None
                 else f"index {self.manifest.version} ({self.manifest.factory} on {self.manifest.column})")
        return f"Corpus({self.dataset.uri!r}, {self.rows:,} rows, dims {self.dims}, {index})"

    # ------------------------------------------------------------------ public

    @property
    def schedule(self) -> FunnelSchedule | None:
        """The funnel schedule calibrated at index build (``funnel="auto"``), parsed once per
        manifest schedule rather than on every search."""
        raw = None if self.manifest is None else self.manifest.schedule
        if self._schedule[0] is not raw:
            self._schedule = (raw, self.manifest.funnel_schedule())
        return self._schedule[1]

    def schedule_for(self, funnel: str | FunnelSchedule | None) -> FunnelSchedule:
        """The schedule ``search`` runs for ``funnel`` (None or "auto", "paper", a schedule or its string)."""
        if funnel is None or funnel == "auto":
            if self.schedule is None:
                raise IndexNotFoundError(
                    "funnel='auto' needs an index with a calibrated schedule; run pipelines/index.py"
                )
            return self.schedule
        if funnel == "paper":
            return paper_schedule(self.dims)
        if isinstance(funnel, str):
            funnel = FunnelSchedule.parse(funnel)
        if not isinstance(funnel, FunnelSchedule):
            raise TypeError(f"funnel must be None, 'auto', 'paper' or a FunnelSchedule, got {type(funnel).__name__}")
        missing = [d for d in funnel.dims if d not in self.dims]
        if missing:
            raise ValueError(f"funnel {funnel} uses dims {missing}; this dataset stores {self.dims}")
        return funnel

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [N, full_dim] embeddings of query ``texts`` with the dataset's own encoder: its
        ``encode_queries`` (the query prompt) where it has one, else ``encode``."""
        if self._encoder is None:
            from mrl_core.encoders import get_encoder

            options = self.info.settings.encoder_options  # recorded with the dataset
            encoder = get_encoder(self.info.encoder, **options)
            fingerprint = encoder_fingerprint(encoder.fingerprint, options)
            if fingerprint != self.info.fingerprint:
                raise EncoderMismatchError(
                    f"the encoder {self.info.encoder!r} found here has fingerprint {fingerprint}, "
                    f"but the dataset was embedded by fingerprint {self.info.fingerprint}: text queries "
                    f"would not be comparable. Install the same weights, or pass query vectors."
                )
            self._encoder = encoder
        encode = getattr(self._encoder, "encode_queries", self._encoder.encode)
        return np.asarray(encode(list(texts)), dtype=np.float32)

    def search(
        self,
        queries: str | Sequence[str] | np.ndarray,
        k: int = 10,
        funnel: str | FunnelSchedule | None = None,
        columns: Sequence[str] | None = None,
        exact: bool = False,
        batch_size: int = 1024,
        where: str | None = None,
    ) -> pa.Table:
        """Top-k rows per query as a table: ``query`` (position), ``rank`` (1 = best), ``id``,
        ``score`` (cosine at the schedule's last dim), then the requested ``columns``.

        ``queries``: texts (encoded with the dataset's encoder) or float vectors [Q, full_dim].
        ``funnel``: None/"auto" (the calibrated schedule; exact search where calibration timed it
        faster for this many queries, ``IndexManifest.auto_search``), "paper", or a ``FunnelSchedule``.
        ``exact=True``: brute-force search at the full dim, the reference.
        ``where``: a Lance SQL filter (``"section = 'python' AND year > 2020"``); the result is the
        best k among the rows it matches (fewer only when fewer match; none when none do).
        """
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if k > self.rows:
            raise ValueError(f"k={k} is larger than the corpus ({self.rows:,} rows)")
        columns = self._check_columns(columns)
        schedule = None if exact else self.schedule_for(funnel)
        match = None if where is None else self.match(where)
        texts, vectors = self._split_queries(queries)
        count = len(texts) if texts is not None else len(vectors)
        if schedule is not None and funnel in (None, "auto") and self._exact_is_faster(count):
            schedule = None  # calibration timed exact search faster at this batch size
        if match is not None and not len(match):  # nothing to search: an empty result
            nothing = (np.zeros((count, 0), np.float32), np.zeros((count, 0), np.int64))
            return self._table([(0, *nothing)], columns)
        parts = []
        for start in range(0, count, batch_size):
            if texts is not None:
                encoded = self.encode(texts[start : start + batch_size]).astype(np.float64)
                batch = self._check_vectors(encoded, start)
            else:
                batch = vectors[start : start + batch_size]
            by_dim = self._prefixes(batch, [self.full_dim] if schedule is None else schedule.dims)
            if schedule is None:
                scores, ids = self._flat(self.full_dim, by_dim[self.full_dim], k, match)
            else:
                scores, ids = funnel_search(
                    schedule, by_dim, k, lambda d, q, n, s=schedule: self._tier0(d, q, n, s.nprobe, match),
                    self._fetch,
                )
            parts.append((start, scores, ids))
        return self._table(parts, columns)

    def _exact_is_faster(self, queries: int) -> bool:
        """Whether ``funnel="auto"`` runs exact search for a call of ``queries`` queries: calibration
        timed it faster at the nearest batch size (``IndexManifest.auto_search``). The manifest alone
        decides, so results never depend on what is cached."""
        return self.manifest is not None and method_at(self.manifest.auto_search, queries) == "exact"

    def match(self, where: str) -> Match:
        """The rows the Lance SQL filter ``where`` matches (kept for the next searches with it);
        a ValueError naming the filter when Lance cannot run it."""
        if not isinstance(where, str) or not where.strip():
            raise ValueError(f"where must be a non-empty SQL filter string, got {where!r}")
        with self._lock:
            found = self._matches.pop(where, None)
            if found is not None:
                self._matches[where] = found  # most recently used last
                return found
        try:
            ids = self.dataset.to_table(columns=["id"], filter=where)["id"].to_numpy()
        except (ValueError, TypeError, NotImplementedError) as exc:
            message = re.sub(r", /\S+\.rs:\d+:\d+", "", str(exc))  # drop Lance's Rust source locations
            raise ValueError(f"invalid filter {where!r}: {message}") from exc
        positions = self._positions(ids)
        order = np.argsort(positions, kind="stable")
        found = Match(where, ids[order], positions[order])
        with self._lock:
            self._matches[where] = found
            while len(self._matches) > FILTER_CACHE:
                self._matches.pop(next(iter(self._matches)))
        return found

    def warm(self, funnel: str | FunnelSchedule | None = None) -> None:
        """Load the id map and cache the schedule's tiers now rather than on the first search."""
        self._positions(np.zeros(0, dtype=np.int64))
        dims = self.schedule_for(funnel).dims
        indexed = self.manifest is not None and dims[0] == self.manifest.dim and len(dims) > 1
        for dim in dims[1:] if indexed else dims:  # the index itself serves an indexed tier 0
            self._tier(dim)

    # ------------------------------------------------------------------ queries

    def _split_queries(self, queries: Any) -> tuple[list[str] | None, np.ndarray | None]:
        if isinstance(queries, str):
            queries = [queries]
        if isinstance(queries, (list, tuple)):
            if not queries:
                raise ValueError("no queries: got an empty list")
            if all(isinstance(q, str) for q in queries):
                return list(queries), None
            if any(isinstance(q, str) for q in queries):
                raise TypeError("queries mix texts and vectors; pass a list of texts or an array of vectors")
            nones = [i for i, q in enumerate(queries) if q is None]
            if nones:
                raise TypeError(f"query {nones[0]} is None: queries must be texts or an array of float vectors")
        try:
            vectors = np.asarray(queries)
            if np.iscomplexobj(vectors):
                raise TypeError("query vectors are complex numbers; embeddings are real: pass float vectors")
            vectors = vectors.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"queries must be texts or an array of float vectors: {exc}") from exc
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.ndim != 2:
            raise ValueError(f"query vectors must be [Q, {self.full_dim}], got shape {vectors.shape}")
        if len(vectors) == 0:
            raise ValueError("no queries: got an empty array")
        return None, self._check_vectors(vectors, 0)

    def _check_vectors(self, vectors: np.ndarray, offset: int) -> np.ndarray:
        if vectors.shape[1] != self.full_dim:
            raise ValueError(
                f"query vectors have {vectors.shape[1]} dims; this dataset's embeddings have "
                f"{self.full_dim} ({self.info.encoder}). Pass full-dim vectors from the same encoder, or texts."
            )
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if len(bad):
            raise ValueError(f"query vector(s) {(bad[:10] + offset).tolist()} contain NaN or inf")
        if not self.info.normalized:
            huge = np.flatnonzero(np.abs(vectors).max(axis=1) > np.finfo(np.float32).max)
            if len(huge):
                raise ValueError(f"query vector(s) {(huge[:10] + offset).tolist()} hold values beyond float32: "
                                 f"this dataset's dot products would overflow")
        if self.info.normalized:
            zero = np.flatnonzero(~np.any(vectors != 0, axis=1))
            if len(zero):
                raise ValueError(
                    f"query vector(s) {(zero[:10] + offset).tolist()} are all zeros (an empty text?): "
                    f"no direction to search for"
                )
        return vectors

    def _prefixes(self, vectors: np.ndarray, dims: Sequence[int]) -> dict[int, np.ndarray]:
        """float32 query prefixes at each dim, each normalised on its own (in float64, scaled by
        its largest value first, so a vector of any finite size keeps its direction)."""
        out = {}
        for d in set(dims) | {self.full_dim}:
            head = np.asarray(vectors[:, :d], dtype=np.float64)
            if self.info.normalized:
                scale = np.abs(head).max(axis=1, keepdims=True)
                head = head / np.where(scale > 0, scale, 1.0)
                norm = np.linalg.norm(head, axis=1, keepdims=True)
                head = head / np.where(norm > 0, norm, 1.0)
            out[d] = np.ascontiguousarray(head, dtype=np.float32)
        return out

    def _check_columns(self, columns: Sequence[str] | None) -> list[str]:
        if columns is None:
            return []
        if isinstance(columns, str):
            columns = [columns]
        names = self.dataset.schema.names
        unknown = [c for c in columns if c not in names]
        if unknown:
            raise ValueError(f"no column(s) {unknown} in the dataset; it has {names}")
        clash = [c for c in columns if c in ("query", "rank", "score")]
        if clash:
            raise ValueError(
                f"column(s) {clash} clash with the result's own columns; read them from the dataset directly"
            )
        return [c for c in dict.fromkeys(columns) if c != "id"]

    # ------------------------------------------------------------------ rows by id

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        if self._idmap is None:
            with self._lock:
                if self._idmap is None:
                    ids_all = self.dataset.to_table(columns=["id"])["id"].to_numpy()
                    self._ids, self._idmap = ids_all, IdMap(ids_all)
        return self._idmap.positions(ids)

    def _tier(self, dim: int) -> np.ndarray | None:
        """The ``emb_<dim>`` column in memory (row positions), or None when over the cache budget."""
        if dim in self._tiers:
            return self._tiers[dim]
        itemsize = 2 if self.info.dtype == "float16" else 4
        with self._lock:
            if dim not in self._tiers:
                used = sum(t.nbytes for t in self._tiers.values())
                if used + self.rows * dim * itemsize > self.cache_bytes:
                    return None
                column = self.dataset.to_table(columns=[emb_column(dim)])[emb_column(dim)]
                self._tiers[dim] = column_to_numpy(column, dim)
        return self._tiers[dim]

    def _fetch(self, dim: int, ids: np.ndarray) -> np.ndarray:
        """Vectors at ``dim`` for ``ids`` (NaN rows for -1 or ids not in the dataset)."""
        positions = self._positions(ids)
        tier = self._tier(dim)
        if tier is not None:
            return take_rows(tier, positions, scratch=True)
        out = np.full((len(ids), dim), np.nan, dtype=np.float32)
        valid = positions >= 0
        unique, inverse = np.unique(positions[valid], return_inverse=True)
        if len(unique):
            table = self.dataset.take(pa.array(unique), columns=[emb_column(dim)])
            out[valid] = column_to_numpy(table[emb_column(dim)], dim).astype(np.float32)[inverse]
        return out

    def _tier0(
        self, dim: int, queries: np.ndarray, n: int, nprobe: int | None, match: Match | None = None
    ) -> np.ndarray:
        """Ids of the n best rows at ``dim`` (of the rows ``match`` holds, when given): the index when
        it covers that dim, else a flat scan. Matching rows are all returned when they are at most n,
        scanned exactly when few, else searched with the index restricted to their ids."""
        indexed = self.index is not None and self.manifest is not None and dim == self.manifest.dim
        if indexed and nprobe is None and self.schedule is not None:  # an explicit schedule: calibrated probes
            nprobe = self.schedule.nprobe
        if match is None:
            return self.index.search(queries, n, nprobe)[1] if indexed else self._flat(dim, queries, n)[1]
        if len(match) <= n:  # every matching row is a candidate: the re-rank is exact over them
            return np.broadcast_to(match.ids, (len(queries), len(match)))
        if indexed and len(match) > self.filter_scan_rows and self._selector_ok:
            found = self._selector_search(queries, n, nprobe, match)
            if found is not None:
                return found
        return self._flat(dim, queries, n, match)[1]

    def _selector_search(self, queries: np.ndarray, n: int, nprobe: int | None, match: Match) -> np.ndarray | None:
        """Ids of the n best matching rows by the index, restricted to them by a FAISS ``IDSelector``
        (on the CPU index: GPU indexes take none); None when the index takes no selector.

        An IVF index probes ``nprobe / selectivity`` lists (at most all), so that it scores as many
        matching rows as the unfiltered search scores rows."""
        index = self.index.cpu_index
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is None:
            params = faiss.SearchParameters(sel=match.selector)
        else:
            probes = nprobe or self.index.default_nprobe or 1
            probes = min(int(ivf.nlist), math.ceil(probes * index.ntotal / len(match)))
            params = faiss.SearchParametersIVF(sel=match.selector, nprobe=probes)
        try:
            with search_threads(threads_for(len(queries) * len(match) * index.d)):
                return index.search(np.ascontiguousarray(queries, dtype=np.float32), n, params=params)[1]
        except RuntimeError:  # e.g. PQ fast-scan: "search params not supported for this index"
            self._selector_ok = False
            return None

    def _flat(
        self, dim: int, queries: np.ndarray, n: int, match: Match | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-n at ``dim`` over every row (or the rows ``match`` holds): from the cached tier,
        or streamed from Lance."""
        tier = self._tier(dim)
        if tier is not None and match is not None:
            best_s = np.full((len(queries), n), -np.inf, dtype=np.float32)
            best_i = np.full((len(queries), n), -1, dtype=np.int64)
            for lo in range(0, len(match), BLOCK_ROWS):
                s, i = exact_search(queries, tier[match.positions[lo : lo + BLOCK_ROWS]], n)
                ids = np.where(i >= 0, match.ids[lo:][np.maximum(i, 0)], -1)
                best_s, best_i = merge_top_k(best_s, best_i, s, ids, n)
            return best_s, best_i
        if tier is not None:
            self._positions(np.zeros(0, dtype=np.int64))
            scores, positions = exact_search(queries, tier, n)
            return scores, np.where(positions >= 0, self._ids[np.maximum(positions, 0)], -1)
        best_s = np.full((len(queries), n), -np.inf, dtype=np.float32)
        best_i = np.full((len(queries), n), -1, dtype=np.int64)
        column = emb_column(dim)
        where = None if match is None else match.where
        for batch in self.dataset.to_batches(columns=["id", column], filter=where, batch_size=1 << 16):
            if not batch.num_rows:  # a filtered scan may yield empty batches
                continue
            s, i = exact_search(queries, column_to_numpy(batch.column(1), dim), n)  # as the cached path
            ids = batch.column(0).to_numpy()
            best_s, best_i = merge_top_k(best_s, best_i, s, np.where(i >= 0, ids[np.maximum(i, 0)], -1), n)
        return best_s, best_i

    # ------------------------------------------------------------------ results

    def _table(self, parts: list[tuple[int, np.ndarray, np.ndarray]], columns: list[str]) -> pa.Table:
        query, rank, ids, scores = [], [], [], []
        for start, s, i in parts:
            valid = i >= 0
            q_idx, col = np.nonzero(valid)
            query.append(q_idx + start)
            rank.append(np.cumsum(valid, axis=1)[valid])
            ids.append(i[valid])
            scores.append(s[valid])
        table = pa.table(
            {
                "query": pa.array(np.concatenate(query).astype(np.int32)),
                "rank": pa.array(np.concatenate(rank).astype(np.int32)),
                "id": pa.array(np.concatenate(ids).astype(np.int64)),
                "score": pa.array(np.concatenate(scores).astype(np.float32)),
            }
        )
        if not columns:
            return table
        if table.num_rows:
            unique, inverse = np.unique(table["id"].to_numpy(), return_inverse=True)
            meta = self.dataset.take(pa.array(self._positions(unique)), columns=columns).take(pa.array(inverse))
        else:
            meta = self.dataset.schema.empty_table().select(columns)
        for name in columns:
            table = table.append_column(meta.schema.field(name), meta[name])
        return table


def _snapshot(
    uri: str, storage_options: Mapping[str, str] | None, manifest: IndexManifest
) -> lance.LanceDataset | None:
    """The dataset version ``manifest`` was built on, or None when it no longer exists."""
    try:
        pinned = open_dataset(uri, storage_options, version=manifest.dataset_version)
    except (ValueError, OSError):
        return None
    if rows_signature(pinned) != manifest.rows_signature:
        return None
    warnings.warn(
        f"dataset {uri} has changed since index {manifest.version} was built on its version "
        f"{manifest.dataset_version}: searching that version; run pipelines/reindex.py (or "
        f"pipelines/index.py) to include the changes", stacklevel=3,
    )
    return pinned


def check_index(manifest: IndexManifest, dataset: lance.LanceDataset, info: DatasetInfo, allow_stale: bool) -> None:
    """Raise ``IndexMismatchError`` when ``manifest`` does not describe this dataset's rows and encoder."""
    if manifest.encoder_fingerprint != info.fingerprint:
        raise IndexMismatchError(
            f"index {manifest.version} was built for encoder {manifest.encoder!r} (fingerprint "
            f"{manifest.encoder_fingerprint}), but dataset {dataset.uri} now holds {info.encoder!r} "
            f"(fingerprint {info.fingerprint}); rebuild it: python pipelines/index.py --dataset {dataset.uri}"
        )
    if manifest.column not in dataset.schema.names:
        raise IndexMismatchError(
            f"index {manifest.version} is over {manifest.column}, which dataset {dataset.uri} lacks"
        )
    if manifest.rows_signature != rows_signature(dataset):
        message = (
            f"index {manifest.version} was built for dataset version {manifest.dataset_version} "
            f"({manifest.rows:,} rows), but {dataset.uri} is now at version {dataset.version} "
            f"({dataset.count_rows():,} rows) with other rows; rebuild it: python pipelines/index.py "
            f"--dataset {dataset.uri}, or open with allow_stale_index=True to search the old index"
        )
        if not allow_stale:
            raise IndexMismatchError(message)
        warnings.warn(message, stacklevel=3)


def result_matrix(table: pa.Table, column: str, queries: int, k: int, fill: float = np.nan) -> np.ndarray:
    """A result ``column`` as a [queries, k] array by (query, rank), ``fill`` where a query has fewer
    rows; integer columns (``id``) stay integers when ``fill`` is an integer (ids exceed float64's
    53-bit precision)."""
    values = table[column].to_numpy()
    dtype = values.dtype if np.issubdtype(values.dtype, np.integer) and float(fill).is_integer() else np.float64
    out = np.full((queries, k), fill, dtype=dtype)
    q = table["query"].to_numpy()
    r = table["rank"].to_numpy() - 1
    keep = r < k
    out[q[keep], r[keep]] = values[keep]
    return out
