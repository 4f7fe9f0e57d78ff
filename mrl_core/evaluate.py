"""Evaluation metrics for nested embeddings."""

from __future__ import annotations

import numpy as np


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
