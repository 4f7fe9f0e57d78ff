"""Exact inner-product top-k over blocks, and recall@k counting ties: the leaf that evaluation,
the funnel, calibration and ``Corpus`` all search with.

``exact_search`` is a matrix product plus a top-k per block of corpus rows (as FAISS's
``contrib/exhaustive_search.knn_ground_truth`` does), so memory stays bounded by the block and
the speed is the machine's GEMM speed at every batch size.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK_ROWS = 1 << 16
"""Corpus rows scored per block (converted to float32 a block at a time)."""

MAX_BLOCK_SCORES = 1 << 26
"""Scores held at once (queries x block rows): 256 MiB of float32."""


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

    ``corpus`` may be float16 (converted a block at a time). ``exclude`` [Q]: one corpus row per
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
    with torch.inference_mode():
        for start in range(0, n, block_rows):
            block_t = _as_float_tensor(corpus[start : start + block_rows]).T
            kk = min(k, block_t.shape[1])
            for lo in range(0, len(q), q_step):
                sim = torch.from_numpy(q[lo : lo + q_step]) @ block_t
                if skip is not None:
                    _leave_out(sim, skip[lo : lo + q_step] - start)
                s, i = sim.topk(kk, dim=1)
                rows = slice(lo, lo + q_step)
                best_s[rows], best_i[rows] = merge_top_k(
                    best_s[rows], best_i[rows], s.numpy(), i.numpy() + start, k
                )
    return best_s, np.where(np.isfinite(best_s), best_i, -1)


def _as_float_tensor(rows: np.ndarray) -> torch.Tensor:
    """float32 torch view (or copy) of ``rows``; read-only arrays (memory maps, Arrow buffers) are
    copied, since torch tensors are writable."""
    if not rows.flags.writeable:
        return torch.from_numpy(np.array(rows, dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(rows)).float()


def _leave_out(sim: torch.Tensor, local: np.ndarray) -> None:
    """Set ``sim[j, local[j]]`` to -inf where ``local[j]`` falls inside the block."""
    inside = (local >= 0) & (local < sim.shape[1])
    if inside.any():
        rows = np.flatnonzero(inside)
        sim[torch.from_numpy(rows), torch.from_numpy(local[rows])] = -torch.inf


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
