"""Exact inner-product top-k, recall@k counting ties, and the threads a search runs on: the leaf
that evaluation, the funnel, calibration and ``Corpus`` all search with.

``exact_search`` runs FAISS's brute-force kernels over blocks of corpus rows (as FAISS's
``contrib/exhaustive_search.knn_ground_truth`` does), so memory stays bounded by the block: one
query is a SIMD scan of the rows, two or more a BLAS matrix product with a running top-k, so every
batch size runs at the machine's matrix-multiply (or memory) speed. FAISS picks BLAS only from
``distance_compute_blas_threshold`` (queries x dims); that threshold is set to 1 here, once, for the
process, and single queries keep the scan by passing a selector (which always scans). A float16
corpus is converted to float32 a cache-sized chunk (or for many queries a block) at a time into
one reused buffer, never whole; a float32 one, read-only included, is searched in place.

``search_threads`` runs small searches on one thread, where starting threads costs more than they
save, and large ones on all cores; the counts are per calling thread (``benchmarks/exact_kernels.py``
measures the kernels and thread counts).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

import faiss
import numpy as np
import torch

BLOCK_ROWS = 1 << 16
"""Corpus rows searched per block, whose best k are merged into the running result."""

CONVERT_ROWS = 1 << 12
"""Rows of a float16 corpus converted to float32 at a time for few queries: 4 MiB at 256 dims,
read back from cache by the kernel that scores them."""

FEW_QUERIES = 64
"""Below this many queries a float16 block is converted ``CONVERT_ROWS`` at a time; from it, whole
(the conversion is shared by enough queries to cost little, and one matrix product per block is
one parallel region, not sixteen)."""

SORT_COLUMNS = 256
"""Rows of scores up to this long are ranked by a full stable sort (cheaper than a partition)."""

MERGE_COLUMNS = 1 << 12
"""Candidates per query gathered from blocks before they are cut back to the best k."""

SERIAL_WORK = 1 << 28
"""Multiply-adds (queries x rows x dims) of one parallel region below which it runs on one thread:
a few milliseconds of work. On a shared machine a parallel region waits for its slowest thread,
and a region much shorter than a scheduler time slice can take many times its work."""

ALL_THREADS = max(1, torch.get_num_threads())
"""Threads a large search runs on: torch's count at import (the usable cores, or OMP_NUM_THREADS)."""

FAISS_BLAS_THRESHOLD = faiss.cvar.distance_compute_blas_threshold
"""FAISS's own BLAS threshold, before this module lowers it (queries x dims from which FAISS uses BLAS)."""

faiss.cvar.distance_compute_blas_threshold = 1  # BLAS from two queries on (one scans: a selector)
_SCAN = faiss.IDSelectorAll()  # FAISS scans (no BLAS) whenever a selector is given


def threads_for(work: float) -> int:
    """Threads for a search of ``work`` multiply-adds: one below ``SERIAL_WORK``, else ``ALL_THREADS``."""
    return 1 if work < SERIAL_WORK else ALL_THREADS


@contextlib.contextmanager
def search_threads(n: int, torch_threads: int | None = None) -> Iterator[None]:
    """Run FAISS (OpenMP) on ``n`` threads and torch on ``torch_threads`` (default ``n``) meanwhile,
    in the calling thread only: OpenMP's and MKL's thread counts are per thread, so concurrent
    callers do not disturb each other."""
    t = n if torch_threads is None else torch_threads
    before, before_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    if before != t:
        torch.set_num_threads(t)
    if before_faiss != n:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        if before != t:
            torch.set_num_threads(before)
        if before_faiss != n:
            faiss.omp_set_num_threads(before_faiss)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` best scores per row, best first (ties in column order)."""
    n = scores.shape[1]
    if n <= SORT_COLUMNS or k * 4 >= n:  # a stable sort of a short row is cheaper than a partition
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    picked = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -picked), axis=1)
    return np.take_along_axis(part, order, axis=1)


def merge_top_k(
    scores_a: np.ndarray, keys_a: np.ndarray, scores_b: np.ndarray, keys_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two per-query result lists, best first; key -1 (missing) never wins."""
    scores = np.concatenate([scores_a, scores_b], axis=1)
    keys = np.concatenate([keys_a, keys_b], axis=1)
    scores = np.where(keys < 0, -np.inf, scores)
    pick = top_k(scores, k)
    return np.take_along_axis(scores, pick, axis=1), np.take_along_axis(keys, pick, axis=1)


def exact_search(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    exclude: np.ndarray | None = None,
    block_rows: int = BLOCK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-``k``: (scores [Q, k] float32, row positions [Q, k]), best
    first. Fewer than k rows: padded with -inf / -1.

    ``corpus`` may be float16 (converted a cache-sized chunk at a time) and read-only (a memory
    map, an Arrow buffer: never copied whole). ``exclude`` [Q]: one corpus row per query to leave
    out (its own row, for leave-one-out search); -1 excludes nothing.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or corpus.ndim != 2 or q.shape[1] != corpus.shape[1]:
        raise ValueError(f"queries {q.shape} and corpus {corpus.shape} must be 2-D with the same dims")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(corpus)
    block_rows = max(1, min(block_rows, n))
    skip = None if exclude is None else np.asarray(exclude, dtype=np.int64)
    want = k + (skip is not None)  # one more, in case the excluded row is among them
    # each FAISS call is one parallel region: its work decides its threads (few queries: chunks,
    # one thread); float16 converts on one thread (memory-bound: a second thread gains little)
    threads = 1 if len(q) < FEW_QUERIES else threads_for(len(q) * block_rows * q.shape[1])
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    step = min(CONVERT_ROWS if len(q) < FEW_QUERIES else block_rows, block_rows)
    buffer = None if corpus.dtype == np.float32 else _conversion_buffer(step, corpus.shape[1])
    with torch.inference_mode(), search_threads(threads, torch_threads=1):
        for start in range(0, n, block_rows):
            s, i = _search_block(q, corpus[start : start + block_rows], want, buffer)
            i = np.where(i >= 0, i + start, -1)
            if skip is not None:
                s = np.where(i == skip[:, None], -np.inf, s)
            parts.append((s, i))
            if sum(p[0].shape[1] for p in parts) > MERGE_COLUMNS:
                parts = [_best(parts, k)]
    if len(parts) == 1 and parts[0][0].shape[1] == k and skip is None:
        s, i = parts[0]  # one block: FAISS's own ranking
    else:
        s, i = _best(parts, k)
    return s, np.where(np.isfinite(s), i, -1)


def _best(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (scores, positions) of the candidate lists ``parts``, best first, padded with
    -inf / -1; position -1 never wins."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    positions = np.concatenate([p[1] for p in parts], axis=1)
    scores = np.where(positions < 0, -np.inf, scores)
    pick = top_k(scores, k)
    scores, positions = np.take_along_axis(scores, pick, axis=1), np.take_along_axis(positions, pick, axis=1)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        positions = np.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
    return scores, positions


def _search_block(
    q: np.ndarray, rows: np.ndarray, k: int, buffer: torch.Tensor | None
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions in ``rows``) [Q, <=k per chunk] of the best rows, by FAISS: float32 rows
    in place, others converted into ``buffer`` a chunk of its rows at a time, the results of the
    chunks side by side."""
    if buffer is None:
        return _knn(q, np.ascontiguousarray(rows), k)
    step = len(buffer)
    parts_s, parts_i = [], []
    for lo in range(0, len(rows), step):
        chunk = buffer[: min(step, len(rows) - lo)]
        chunk.copy_(torch.from_numpy(np.ascontiguousarray(rows[lo : lo + step])))
        s, i = _knn(q, chunk.numpy(), k)
        parts_s.append(s)
        parts_i.append(np.where(i >= 0, i + lo, -1))
    return np.concatenate(parts_s, axis=1), np.concatenate(parts_i, axis=1)


_BUFFERS = threading.local()


def _conversion_buffer(rows: int, dim: int) -> torch.Tensor:
    """A float32 [rows, dim] buffer of this thread's, reused across calls (a fresh one costs a page
    fault per 4 KiB on first touch, more than a single query's scan of a small corpus); buffers for
    many queries (a whole block) are not kept: their page faults are shared by the queries."""
    if rows * dim > CONVERT_ROWS * 1024:
        return torch.empty((rows, dim), dtype=torch.float32)
    held = getattr(_BUFFERS, "buffer", None)
    if held is None or held.numel() < rows * dim:
        held = _BUFFERS.buffer = torch.empty(rows * dim, dtype=torch.float32)
    return held[: rows * dim].view(rows, dim)


def _knn(q: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's exact inner-product top-min(k, N) of ``q`` [Q, d] among float32 ``rows`` [N, d],
    best first: a SIMD scan for one query, BLAS for more."""
    kk = min(k, len(rows))
    scores = np.empty((len(q), kk), dtype=np.float32)
    positions = np.empty((len(q), kk), dtype=np.int64)
    if kk:
        faiss.knn_inner_product(
            faiss.swig_ptr(q), faiss.swig_ptr(rows), q.shape[1], len(q), len(rows), kk,
            faiss.swig_ptr(scores), faiss.swig_ptr(positions), _SCAN if len(q) == 1 else None,
        )
    return scores, positions


def _take_read_only_warning() -> None:
    """Torch warns once per process when it views a read-only array; the views here are only read
    (converted into a buffer), so that one warning is taken here, at import, where it says nothing."""
    view = np.zeros(1, dtype=np.float16)
    view.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(view)


_take_read_only_warning()


def recall_at_k_with_ties(
    found_scores: np.ndarray, exact_scores: np.ndarray, k: int = 10, tol: float = 1e-4
) -> float:
    """Recall@k counting ties, as ANN benchmarks do.

    ``found_scores`` [Q, >=k]: the full-dim scores of the rows a search returned (NaN where it
    returned fewer); ``exact_scores`` [Q, >=k]: exact full-dim top scores, descending. A returned
    row is a hit when its score reaches the query's k-th exact score (minus ``tol``, for float16
    storage), so duplicates tied with the true neighbours are not counted as misses.
    """
    found = np.asarray(found_scores, dtype=np.float64)[:, :k]
    exact = np.asarray(exact_scores, dtype=np.float64)
    if found.shape[0] != exact.shape[0]:
        raise ValueError(f"{found.shape[0]} queries of results, {exact.shape[0]} of exact scores")
    if exact.shape[1] < k:
        raise ValueError(f"exact_scores has {exact.shape[1]} columns, fewer than k={k}")
    threshold = exact[:, k - 1 : k] - tol
    hits = np.nan_to_num(found, nan=-np.inf) >= threshold
    return float(hits.sum() / (k * found.shape[0]))


def scores_of(queries: np.ndarray, corpus: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Inner products [Q, n] of each query with the corpus rows at ``positions`` [Q, n];
    NaN where the position is -1."""
    safe = np.where(positions < 0, 0, positions)
    s = np.einsum("qd,qnd->qn", queries, corpus[safe], dtype=np.float32)
    return np.where(positions < 0, np.nan, s)
