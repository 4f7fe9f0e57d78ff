"""The methods benchmarks/funnel_bench.py times side by side, and how it times them.

A ``Method`` is a search function (float32 queries [B, d] -> ids [B, k]) with its memory. Every
method is timed the same way (``seconds_per_query``: the median over calls of one batch size) and
its recall measured the same way (by the caller, re-scoring the returned ids at the full dim).
Peers built here: bare FAISS flat at its best setting per batch size, LanceDB IVF_PQ with
refine_factor, and the FAISS indexes autofaiss picks for a memory budget, refined from the same
float16 vectors the funnel re-ranks with.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from mrl_core.funnel import take_rows
from mrl_core.search import FAISS_BLAS_THRESHOLD, search_threads, top_k

Search = Callable[[np.ndarray], np.ndarray]
"""queries [B, d] float32 -> ids [B, k] (-1 where fewer were found)."""


@dataclass
class Method:
    """One row of the benchmark: a search, its memory in bytes, and what it is."""

    name: str
    search: Search
    memory: int
    note: str = ""
    settings: dict[int, str] = field(default_factory=dict)
    """The setting used at each batch size, when it depends on the batch size."""


def windows(count: int, batch: int, max_queries: int) -> list[slice]:
    """Query slices of ``batch`` queries each over the first ``max_queries`` of ``count`` queries;
    a batch larger than half of them: the first and the last ``batch`` queries."""
    if batch * 2 > count:
        return [slice(0, batch), slice(count - batch, count)]
    n = min(count, max_queries)
    return [slice(lo, lo + batch) for lo in range(0, n - batch + 1, batch)]


def seconds_per_query(search: Search, queries: np.ndarray, batch: int, max_queries: int, repeats: int = 1) -> float:
    """Median over calls of (seconds / queries) of ``search`` sent ``batch`` queries at a time
    (after one warm-up call)."""
    parts = windows(len(queries), batch, max_queries)
    search(queries[parts[0]])
    times = []
    for _ in range(repeats):
        for part in parts:
            started = time.perf_counter()
            search(queries[part])
            times.append((time.perf_counter() - started) / batch)
    return statistics.median(times)


def in_batches(search: Search, queries: np.ndarray, batch: int) -> np.ndarray:
    """ids [Q, k] of every query, searched ``batch`` at a time (untimed: for recall)."""
    return np.concatenate([search(queries[lo : lo + batch]) for lo in range(0, len(queries), batch)])


# ----------------------------------------------------------------------------- bare FAISS flat


def flat_settings() -> list[tuple[str, int, bool]]:
    """(label, threads, BLAS for every batch) settings bare FAISS flat is timed with."""
    most = faiss.omp_get_max_threads()
    return [(f"{t} thread{'s' if t > 1 else ''}, {'BLAS' if blas else 'FAISS default'}", t, blas)
            for t in sorted({1, most}) for blas in (False, True)]


def flat_search(index: faiss.Index, k: int, threads: int, blas: bool) -> Search:
    """``index.search`` on ``threads`` threads, with FAISS's BLAS threshold at 1 (BLAS at every
    batch size) or at FAISS's own default (BLAS from 128,000 queries x dims)."""

    def search(q: np.ndarray) -> np.ndarray:
        before = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = 1 if blas else FAISS_BLAS_THRESHOLD
        try:
            with search_threads(threads):
                return index.search(q, k)[1]
        finally:
            faiss.cvar.distance_compute_blas_threshold = before

    return search


def best_setting(
    searches: dict[str, Search], queries: np.ndarray, batch: int, max_queries: int
) -> tuple[str, Search, float]:
    """(label, search, seconds per query) of the fastest of ``searches`` at ``batch``."""
    timed = {label: seconds_per_query(s, queries, batch, max_queries) for label, s in searches.items()}
    label = min(timed, key=timed.get)
    return label, searches[label], timed[label]


# ----------------------------------------------------------------------------- refine


def refined(search: Callable[[np.ndarray, int], np.ndarray], full: np.ndarray, ids: np.ndarray, k: int,
            factor: int) -> Search:
    """``search`` (returning row positions) for ``k * factor`` candidates, re-ranked exactly by their
    rows of ``full`` (float16, the funnel's re-rank tier): LanceDB's refine_factor; returns ``ids``."""

    def run(q: np.ndarray) -> np.ndarray:
        positions = search(q, k * factor)
        vecs = take_rows(full, positions.reshape(-1)).reshape(len(q), positions.shape[1], -1)
        scores = np.nan_to_num(np.einsum("qnd,qd->qn", vecs, q), nan=-np.inf)
        scores[positions < 0] = -np.inf
        best = np.take_along_axis(positions, top_k(scores, k), axis=1)
        return np.where(best >= 0, ids[np.maximum(best, 0)], -1)

    return run


# ----------------------------------------------------------------------------- LanceDB


def lancedb_table(work: Path, name: str, ids: np.ndarray, full: np.ndarray, partitions: int, sub_vectors: int):
    """A LanceDB table of (id, vector) with an IVF_PQ index (cosine), built once under ``work``."""
    import lancedb
    from lancedb.index import IvfPq

    db = lancedb.connect(str(work / "lancedb"))
    table_name = f"{name}_{len(ids)}_{partitions}_{sub_vectors}"
    if table_name in db.list_tables().tables:
        return db.open_table(table_name)
    flat = pa.array(np.ascontiguousarray(full, dtype=np.float32).reshape(-1))
    data = pa.table({"id": pa.array(ids), "vector": pa.FixedSizeListArray.from_arrays(flat, full.shape[1])})
    tbl = db.create_table(table_name, data)
    started = time.perf_counter()
    tbl.create_index("vector", config=IvfPq(distance_type="dot", num_partitions=partitions,
                                            num_sub_vectors=sub_vectors))
    print(f"LanceDB IVF_PQ{partitions},PQ{sub_vectors} built in {time.perf_counter() - started:.0f} s", flush=True)
    return tbl


def lancedb_search(tbl, k: int, nprobes: int, refine: int) -> Search:
    """LanceDB's batched vector search at ``nprobes`` and ``refine_factor``, as ids [B, k]."""

    def run(q: np.ndarray) -> np.ndarray:
        res = (tbl.search(list(q) if len(q) > 1 else q[0], vector_column_name="vector").distance_type("dot")
               .nprobes(nprobes).refine_factor(refine).limit(k).select(["id", "_distance"]).to_arrow())
        found = np.full((len(q), k), -1, dtype=np.int64)
        qi = res["query_index"].to_numpy() if "query_index" in res.column_names else np.zeros(res.num_rows, int)
        rank = np.zeros(len(qi), dtype=np.int64)
        for j in range(1, len(qi)):  # results come grouped by query, best first
            rank[j] = rank[j - 1] + 1 if qi[j] == qi[j - 1] else 0
        keep = rank < k
        found[qi[keep], rank[keep]] = res["id"].to_numpy()[keep]
        return found

    return run


# ----------------------------------------------------------------------------- autofaiss


def autofaiss_index(work: Path, vectors: np.ndarray, budget_bytes: int, train_rows: int = 65_536,
                    seed: int = 0) -> tuple[faiss.Index, dict]:
    """The FAISS index autofaiss picks for ``vectors`` (inner product) within ``budget_bytes``,
    built once under ``work``, and a record of the pick.

    autofaiss chooses the factory string (``get_optimal_index_keys_v2``, its own ranking for the
    memory budget); the index is built here with ``faiss.index_factory``, trained on a sample of
    ``train_rows``: autofaiss 2.18's own builder fails against FAISS 1.15 (``OPQMatrix(M=...)``:
    a TypeError in its ``index_factory``).
    """
    from autofaiss.external.optimize import get_optimal_index_keys_v2

    budget = f"{budget_bytes >> 20}MB"
    keys = get_optimal_index_keys_v2(len(vectors), vectors.shape[1], budget)
    key = keys[0]
    path = work / f"autofaiss-{len(vectors)}-{budget}-{key.replace(',', '_')}.faiss"
    record = {"budget": budget, "index_key": key, "candidates": list(dict.fromkeys(keys))[:6],
              "built_with": "faiss.index_factory (autofaiss's choice of factory)"}
    if path.exists():
        return faiss.read_index(str(path)), record
    started = time.perf_counter()
    index = faiss.index_factory(vectors.shape[1], key, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(len(vectors), min(train_rows, len(vectors)), replace=False))]
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    for lo in range(0, len(vectors), 1 << 17):
        index.add(np.ascontiguousarray(vectors[lo : lo + (1 << 17)], dtype=np.float32))
    faiss.write_index(index, str(path))
    print(f"autofaiss's pick within {budget}, {key}, built in {time.perf_counter() - started:.0f} s", flush=True)
    return index, record


def autofaiss_search(index: faiss.Index, nprobe: int) -> Callable[[np.ndarray, int], np.ndarray]:
    """(queries, n) -> ids of ``index`` at ``nprobe`` (and an HNSW coarse quantizer's efSearch at
    2 x nprobe, at least 64), passed per call."""
    ivf = faiss.extract_index_ivf(index)
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
        params.quantizer_params = faiss.SearchParametersHNSW(efSearch=max(64, 2 * nprobe))
    pre = faiss.downcast_index(index)
    if isinstance(pre, faiss.IndexPreTransform):
        params = faiss.SearchParametersPreTransform(index_params=params)
    return lambda q, n: index.search(np.ascontiguousarray(q, dtype=np.float32), n, params=params)[1]


def sweep(settings: Sequence[tuple[str, Search]], recall: Callable[[Search], float], target: float,
          queries: np.ndarray, batch: int, max_queries: int) -> list[tuple[str, Search, float, float]]:
    """(label, search, recall, seconds per query at ``batch``) of each setting, in order, stopping
    after the first that reaches ``target`` (the settings go from cheap to thorough)."""
    out = []
    for label, search in settings:
        r = recall(search)
        s = seconds_per_query(search, queries, batch, max_queries)
        out.append((label, search, r, s))
        print(f"  {label}: recall@10 {r:.4f}, {1 / s:,.0f} queries/s at batch {batch}", flush=True)
        if r >= target:
            break
    return out
