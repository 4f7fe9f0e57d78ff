"""Exact inner-product top-k over blocks, recall@k counting ties, and the thread count a search
runs on: the leaf that evaluation, the funnel, calibration and ``Corpus`` all search with.

``exact_search`` is a matrix product plus a top-k per block of corpus rows (as FAISS's
``contrib/exhaustive_search.knn_ground_truth`` does), so memory stays bounded by the block and
the speed is the machine's GEMM speed at every batch size. A float16 (or read-only) corpus is
converted to float32 a cache-sized chunk at a time when few queries share the conversion.
``search_threads`` runs small searches on one thread: starting threads costs more than they save
on them (``benchmarks/exact_kernels.py`` measures where).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
import torch

try:  # FAISS's OpenMP threads are set alongside torch's when FAISS is there
    import faiss
except ImportError:  # pragma: no cover - exact search itself needs only torch
    faiss = None

BLOCK_ROWS = 1 << 16
"""Corpus rows scored per block (converted to float32 a block at a time)."""

MAX_BLOCK_SCORES = 1 << 24
"""Scores held at once (queries x block rows): 64 MiB of float32."""

CONVERT_ROWS = 1 << 12
"""Rows of a float16 (or read-only) corpus converted at a time when few queries share the
conversion: 4 MiB of float32 at 256 dims, read back from cache by the matrix product."""

FEW_QUERIES = 64
"""Up to this many queries per call a float16 corpus is converted chunk by chunk (above it the
conversion of a whole block is shared by enough queries to be negligible)."""

SERIAL_WORK = 1 << 23
"""Multiply-adds (queries x rows x dims) below which a search runs on one thread."""

ALL_THREADS = max(1, torch.get_num_threads())
"""Threads a large search runs on: torch's default at import (the usable cores, or OMP_NUM_THREADS)."""


def threads_for(work: float) -> int:
    """Threads for a search of ``work`` multiply-adds: one below ``SERIAL_WORK``, else all."""
    return 1 if work < SERIAL_WORK else ALL_THREADS


@contextlib.contextmanager
def search_threads(n: int) -> Iterator[None]:
    """Run torch and FAISS on ``n`` threads meanwhile, in the calling thread only (OpenMP's and
    MKL's thread counts are per thread, so concurrent callers do not disturb each other)."""
    before = torch.get_num_threads()
    before_faiss = faiss.omp_get_max_threads() if faiss is not None else None
    if before != n:
        torch.set_num_threads(n)
    if before_faiss is not None and before_faiss != n:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)
        if before_faiss is not None and before_faiss != n:
            faiss.omp_set_num_threads(before_faiss)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` best scores per row, best first (ties in column order)."""
    n = scores.shape[1]
    if k >= n:  # noqa: SIM108
        part = np.broadcast_to(np.arange(n), scores.shape)
    else:
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

    ``corpus`` may be float16 (converted a block, or for few queries a cache-sized chunk, at a
    time) and read-only (a memory map, an Arrow buffer: never copied whole). ``exclude`` [Q]: one corpus row per
    query to leave out (its own row, for leave-one-out search); -1 excludes nothing.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or corpus.ndim != 2 or q.shape[1] != corpus.shape[1]:
        raise ValueError(f"queries {q.shape} and corpus {corpus.shape} must be 2-D with the same dims")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(corpus)
    block_rows = max(1, min(block_rows, n))
    q_step = max(1, MAX_BLOCK_SCORES // block_rows)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    skip = None if exclude is None else np.asarray(exclude, dtype=np.int64)
    chunked = len(q) <= FEW_QUERIES and corpus.dtype != np.float32
    with torch.inference_mode(), search_threads(threads_for(len(q) * n * q.shape[1])):
        for start in range(0, n, block_rows):
            block = corpus[start : start + block_rows]
            block_t = None if chunked else _as_float_tensor(block).T
            kk = min(k, len(block))
            for lo in range(0, len(q), q_step):
                q_t = torch.from_numpy(q[lo : lo + q_step])
                sim = _chunked_scores(q_t, block) if chunked else q_t @ block_t
                if skip is not None:
                    _leave_out(sim, skip[lo : lo + q_step] - start)
                s, i = sim.topk(kk, dim=1)
                rows = slice(lo, lo + q_step)
                best_s[rows], best_i[rows] = merge_top_k(
                    best_s[rows], best_i[rows], s.numpy(), i.numpy() + start, k
                )
    return best_s, np.where(np.isfinite(best_s), best_i, -1)


def _chunked_scores(queries: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """Scores [Q, len(rows)] of float32 ``queries`` against ``rows`` of any float type, converted to
    float32 ``CONVERT_ROWS`` at a time into one buffer that stays in cache."""
    out = torch.empty((len(queries), len(rows)), dtype=torch.float32)
    step = min(CONVERT_ROWS, len(rows))
    buffer = torch.empty((step, rows.shape[1]), dtype=torch.float32)
    for lo in range(0, len(rows), step):
        chunk = buffer[: min(step, len(rows) - lo)]
        chunk.copy_(_tensor_view(rows[lo : lo + step]))
        out[:, lo : lo + len(chunk)] = queries @ chunk.T
    return out


def _tensor_view(rows: np.ndarray) -> torch.Tensor:
    """``rows`` as a torch tensor without a copy, read-only arrays (memory maps, Arrow buffers)
    included: they are only ever read through it."""
    return torch.from_numpy(np.ascontiguousarray(rows))


def _as_float_tensor(rows: np.ndarray) -> torch.Tensor:
    """float32 torch view (float32 ``rows``) or copy (other float types) of ``rows``."""
    return _tensor_view(rows).float()


def _leave_out(sim: torch.Tensor, local: np.ndarray) -> None:
    """Set ``sim[j, local[j]]`` to -inf where ``local[j]`` falls inside the block."""
    inside = (local >= 0) & (local < sim.shape[1])
    if inside.any():
        rows = np.flatnonzero(inside)
        sim[torch.from_numpy(rows), torch.from_numpy(local[rows])] = -torch.inf


def _silence_read_only_warning() -> None:
    """Torch warns once per process when it views a read-only array; the views here are only
    read, so that one warning is taken here, at import, where it tells a user nothing."""
    view = np.zeros(1, dtype=np.float32)
    view.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(view)


_silence_read_only_warning()


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
