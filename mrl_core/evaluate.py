"""Evaluation of nested embeddings, per prefix dim.

- Search: per-prefix exact search and each prefix's recall@k counting ties against full-dim
  exact search (``prefix_recall``); the search itself is ``mrl_core.search``.
- Classification: 1-NN / k-NN accuracy and linear-probe accuracy on each prefix.
- Retrieval with right answers (class labels): precision@k, recall@k, mAP@k, MRR@k.
- The paper's baselines that need no training: PCA/SVD rotation of the full embedding and
  random rotation (which keeps full-dim quality and destroys prefix order).
- Adaptive classification: a cascade over dims that stops at the first prefix whose head is
  confident enough, with thresholds calibrated to a target accuracy.

Everything takes and returns numpy; torch does the heavy matrix products on the CPU threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mrl_core.calibration import Calibration
from mrl_core.funnel import FunnelSchedule, funnel_search
from mrl_core.nesting import l2_normalize
from mrl_core.search import exact_search, recall_at_k_with_ties, scores_of

# ---------------------------------------------------------------------------------------------
# per-prefix search


def prefix_search(
    queries: np.ndarray, corpus: np.ndarray, dim: int, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` on the first ``dim`` coordinates, each side re-normalised (cosine)."""
    return exact_search(
        l2_normalize(np.ascontiguousarray(queries[:, :dim], dtype=np.float32)),
        l2_normalize(np.ascontiguousarray(corpus[:, :dim], dtype=np.float32)),
        k,
        exclude=exclude,
    )


def prefix_recall(
    queries: np.ndarray,
    corpus: np.ndarray,
    dims: Sequence[int],
    k: int = 10,
    reference: tuple[np.ndarray, np.ndarray] | None = None,
    exact_scores: np.ndarray | None = None,
) -> dict[int, float]:
    """Recall@k, counting ties, of each prefix searched alone against full-dim exact search.

    ``queries``/``corpus`` hold the embedding to score the prefixes of; the reference is exact
    search over their full dims unless ``reference`` = (base queries, base corpus) is given, as
    when the prefixes come from an adaptor and the truth from the base model it adapts.
    ``exact_scores`` [Q, >=k]: the reference's exact top scores when already computed.
    """
    ref_q, ref_c = reference if reference is not None else (queries, corpus)
    ref_q = l2_normalize(np.asarray(ref_q, dtype=np.float32))
    ref_c = l2_normalize(np.asarray(ref_c, dtype=np.float32))
    exact = exact_scores if exact_scores is not None else exact_search(ref_q, ref_c, k)[0]
    out = {}
    for m in dims:
        _, ids = prefix_search(queries, corpus, m, k)
        out[int(m)] = recall_at_k_with_ties(scores_of(ref_q, ref_c, ids), exact, k)
    return out


# ---------------------------------------------------------------------------------------------
# classification


def knn_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int = 1,
) -> float:
    """Cosine k-NN accuracy (majority vote, ties to the nearer class); k=1 is the paper's 1-NN."""
    _, ids = exact_search(l2_normalize(test_x), l2_normalize(train_x), k)
    votes = np.asarray(train_y)[ids]
    pred = votes[:, 0] if k == 1 else np.array([_vote(row) for row in votes])
    return float(np.mean(pred == np.asarray(test_y)))


def _vote(labels: np.ndarray) -> int:
    values, counts = np.unique(labels, return_counts=True)
    best = values[counts == counts.max()]
    return int(next(lbl for lbl in labels if lbl in best))  # the nearest among the tied


def linear_probe_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
    seed: int = 0,
) -> float:
    """Accuracy of a multinomial logistic regression (full-batch L-BFGS) on frozen features.

    Features are standardised with the training set's mean and std first.
    """
    torch.manual_seed(seed)
    xtr = torch.from_numpy(np.asarray(train_x, dtype=np.float32))
    xte = torch.from_numpy(np.asarray(test_x, dtype=np.float32))
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    ytr = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
    n_classes = int(max(ytr.max().item(), int(np.max(test_y))) + 1)
    head = torch.nn.Linear(xtr.shape[1], n_classes)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(xtr), ytr)
        loss = loss + weight_decay * head.weight.pow(2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = head(xte).argmax(1).numpy()
    return float(np.mean(pred == np.asarray(test_y)))


def per_dim(
    metric, dims: Sequence[int], train_x: np.ndarray, *args, normalize: bool = True, **kwargs
) -> dict[int, float]:
    """``metric(train_x[:, :m], args[0], args[1][:, :m], args[2], **kwargs)`` for every dim m.

    For the classification metrics above: ``per_dim(knn_accuracy, dims, xtr, ytr, xte, yte)``.
    Each prefix is re-normalised first unless ``normalize=False``.
    """
    train_y, test_x, test_y = args
    out = {}
    for m in dims:
        a, b = train_x[:, :m], test_x[:, :m]
        if normalize:
            a, b = l2_normalize(np.ascontiguousarray(a)), l2_normalize(np.ascontiguousarray(b))
        out[int(m)] = metric(a, train_y, b, test_y, **kwargs)
    return out


# ---------------------------------------------------------------------------------------------
# retrieval with labels


def label_retrieval_metrics(
    retrieved: np.ndarray,
    query_labels: np.ndarray,
    corpus_labels: np.ndarray,
    k: int = 10,
    num_relevant: np.ndarray | None = None,
) -> dict[str, float]:
    """Precision@k, recall@k, mAP@k and MRR@k where a hit is a corpus row of the query's label.

    ``retrieved`` [Q, >=k]: corpus row ids in rank order (-1 for none). ``num_relevant`` [Q]:
    how many corpus rows are relevant to each query (default: counted from ``corpus_labels``).
    AP@k = sum_i P@i * rel_i / min(k, R), as in the MRL paper's mAP@10.
    """
    ids = np.asarray(retrieved)[:, :k]
    corpus_labels = np.asarray(corpus_labels)
    query_labels = np.asarray(query_labels)
    rel = (ids >= 0) & (corpus_labels[np.where(ids < 0, 0, ids)] == query_labels[:, None])
    if num_relevant is None:
        labels, counts = np.unique(corpus_labels, return_counts=True)
        lookup = dict(zip(labels.tolist(), counts.tolist()))
        num_relevant = np.array([lookup.get(lbl, 0) for lbl in query_labels.tolist()])
    return {
        f"precision@{k}": float(rel.mean()),
        f"recall@{k}": recall_at_k(rel, num_relevant),
        f"map@{k}": map_at_k(rel, num_relevant),
        f"mrr@{k}": mrr_at_k(rel),
    }


def recall_at_k(relevant: np.ndarray, num_relevant: np.ndarray) -> float:
    """Mean over queries of (relevant rows in the top k) / (relevant rows in the corpus).

    ``relevant`` [Q, k] booleans in rank order; queries with nothing relevant are skipped.
    """
    relevant = np.asarray(relevant, dtype=bool)
    num_relevant = np.asarray(num_relevant, dtype=np.float64)
    ok = num_relevant > 0
    return float(np.mean(relevant[ok].sum(1) / num_relevant[ok])) if ok.any() else 0.0


def map_at_k(relevant: np.ndarray, num_relevant: np.ndarray) -> float:
    """Mean average precision at k = width of ``relevant`` [Q, k] (booleans in rank order)."""
    relevant = np.asarray(relevant, dtype=np.float64)
    k = relevant.shape[1]
    precision = np.cumsum(relevant, axis=1) / np.arange(1, k + 1)
    denom = np.minimum(np.asarray(num_relevant, dtype=np.float64), k)
    ok = denom > 0
    if not ok.any():
        return 0.0
    return float(np.mean((precision * relevant).sum(1)[ok] / denom[ok]))


def mrr_at_k(relevant: np.ndarray) -> float:
    """Mean reciprocal rank of the first relevant row within ``relevant`` [Q, k] (0 if none)."""
    relevant = np.asarray(relevant, dtype=bool)
    first = np.argmax(relevant, axis=1)
    rr = np.where(relevant.any(1), 1.0 / (first + 1), 0.0)
    return float(rr.mean())


# ---------------------------------------------------------------------------------------------
# baselines that need no training


def pca_rotation(x: np.ndarray, center: bool = True) -> np.ndarray:
    """The orthogonal [d, d] matrix whose columns are the principal directions of ``x``.

    ``x @ R`` orders coordinates by variance (the SVD/PCA baseline: its m-prefix is the rank-m
    projection) while keeping every inner product, so full-dim neighbours are unchanged.
    """
    x = np.asarray(x, dtype=np.float64)
    if center:
        x = x - x.mean(0)
    _, vecs = np.linalg.eigh(x.T @ x)
    rot = vecs[:, ::-1]
    # a deterministic sign per direction: its largest coordinate positive
    signs = np.sign(rot[np.abs(rot).argmax(0), np.arange(rot.shape[1])])
    return np.ascontiguousarray(rot * np.where(signs == 0, 1, signs), dtype=np.float32)


def random_rotation(dim: int, seed: int = 0) -> np.ndarray:
    """A uniformly random orthogonal [dim, dim] matrix (QR of a Gaussian, signs fixed)."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return np.ascontiguousarray(q * np.sign(np.diag(r)), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# adaptive classification


@dataclass(frozen=True)
class CascadeResult:
    """A cascade's outcome: accuracy, mean dims used per input, and what each input used."""

    accuracy: float
    expected_dims: float
    predictions: np.ndarray
    dims_used: np.ndarray


def cascade_predict(
    probs: Sequence[np.ndarray], dims: Sequence[int], thresholds: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's adaptive classification: walk the dims from the smallest, stop at the first
    whose max softmax probability reaches its threshold (the last dim always answers).

    ``probs``: one [N, C] probability array per dim; ``thresholds``: one per dim but the last
    (a longer list is cut). Returns (predictions [N], dims used [N]).
    """
    if len(probs) != len(dims):
        raise ValueError(f"{len(probs)} probability arrays for {len(dims)} dims")
    n = probs[0].shape[0]
    pred = np.asarray(probs[-1]).argmax(1)
    used = np.full(n, dims[-1], dtype=np.int64)
    open_ = np.ones(n, dtype=bool)
    for p, m, t in zip(probs[:-1], dims[:-1], thresholds):
        p = np.asarray(p)
        stop = open_ & (p.max(1) >= t)
        pred[stop] = p[stop].argmax(1)
        used[stop] = m
        open_ &= ~stop
    return pred, used


def cascade_evaluate(
    probs: Sequence[np.ndarray],
    labels: np.ndarray,
    dims: Sequence[int],
    thresholds: Sequence[float],
) -> CascadeResult:
    """Accuracy and expected dims of ``cascade_predict`` on labelled data."""
    pred, used = cascade_predict(probs, dims, thresholds)
    return CascadeResult(float(np.mean(pred == labels)), float(used.mean()), pred, used)


def calibrate_cascade(
    probs: Sequence[np.ndarray],
    labels: np.ndarray,
    dims: Sequence[int],
    target_accuracy: float,
    grid: Sequence[float] | None = None,
) -> list[float]:
    """Per-dim confidence thresholds with the fewest expected dims at ``target_accuracy``.

    Greedy coordinate search on held-out data: start from "always use the full dim" and keep
    lowering the one threshold that saves the most dims per unit of accuracy lost, while the
    accuracy stays at or above the target. ``grid`` defaults to 1.0 down to 0 in 0.01 steps.
    """
    grid = np.asarray(sorted(grid if grid is not None else np.linspace(0, 1, 101))[::-1])
    labels = np.asarray(labels)
    pos = [0] * (len(dims) - 1)  # index into grid per dim; grid[0] is the strictest
    grid = np.concatenate([[np.inf], grid])

    def run(p: list[int]) -> CascadeResult:
        return cascade_evaluate(probs, labels, dims, [grid[i] for i in p])

    best = run(pos)
    while True:
        moves = []
        for j in range(len(pos)):
            for step in (1, 5, 20):
                if pos[j] + step >= len(grid):
                    continue
                trial = pos.copy()
                trial[j] += step
                res = run(trial)
                if res.accuracy + 1e-12 < target_accuracy:
                    continue
                saved = best.expected_dims - res.expected_dims
                if saved <= 0:
                    continue
                lost = max(best.accuracy - res.accuracy, 0.0)
                moves.append((saved / (lost + 1e-6), saved, trial, res))
        if not moves:
            break
        _, _, pos, best = max(moves, key=lambda mv: (mv[0], mv[1]))
    return [float(grid[i]) for i in pos]


def cascade_frontier(
    probs: Sequence[np.ndarray],
    labels: np.ndarray,
    dims: Sequence[int],
    thresholds: Sequence[float] | None = None,
) -> list[tuple[float, float, float]]:
    """(threshold, expected dims, accuracy) for one shared threshold swept over ``thresholds``."""
    ts = thresholds if thresholds is not None else np.linspace(0, 1, 41)
    out = []
    for t in ts:
        res = cascade_evaluate(probs, labels, dims, [t] * (len(dims) - 1))
        out.append((float(t), res.expected_dims, res.accuracy))
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [N, C] logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(1, keepdims=True))
    return (z / z.sum(1, keepdims=True)).astype(np.float32)


def format_per_dim(rows: Mapping[str, Mapping[int, float]], digits: int = 3) -> str:
    """A markdown table: one row per method, one column per dim."""
    dims = sorted({m for r in rows.values() for m in r})
    head = "| method | " + " | ".join(str(m) for m in dims) + " |"
    sep = "|---|" + "---|" * len(dims)
    lines = [head, sep]
    for name, r in rows.items():
        cells = [f"{r[m]:.{digits}f}" if m in r else "" for m in dims]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# funnel retrieval against full-dim retrieval


def funnel_vs_exact(
    corpus_by_dim: Mapping[int, np.ndarray],
    queries_by_dim: Mapping[int, np.ndarray],
    schedules: Mapping[str, object],
    k: int = 10,
    query_labels: np.ndarray | None = None,
    corpus_labels: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Exact full-dim search and each funnel schedule (``FunnelSchedule`` or its string) over
    in-memory prefixes: recall@k counting ties against the exact search, the re-rank cost, and
    with labels the label metrics (``label_retrieval_metrics``) of both.

    ``corpus_by_dim[d]`` / ``queries_by_dim[d]``: each stored prefix, normalised; tier 0 is exact.
    """
    cal = Calibration(corpus_by_dim, np.arange(len(corpus_by_dim[max(corpus_by_dim)])),
                      queries_by_dim, k=k)
    full = cal.full
    _, exact_ids = exact_search(cal.queries[full], np.asarray(cal.vectors[full], dtype=np.float32), k)
    rows: dict[str, dict[str, float]] = {f"exact {full}": {"recall@k vs exact": 1.0, "rerank values/query": 0}}
    found = {f"exact {full}": exact_ids}
    for name, schedule in schedules.items():
        sched = schedule if isinstance(schedule, FunnelSchedule) else FunnelSchedule.parse(str(schedule))
        _, keys = funnel_search(sched, cal.queries, k, cal.flat_tier0(sched.dims[0]), cal.fetch)
        found[name] = keys
        scores = scores_of(cal.queries[full], np.asarray(cal.vectors[full], dtype=np.float32), keys)
        rows[name] = {"recall@k vs exact": recall_at_k_with_ties(scores, cal.exact_scores, k),
                      "rerank values/query": sched.rerank_cost(k)}
    if query_labels is not None and corpus_labels is not None:
        for name, ids in found.items():
            rows[name].update(label_retrieval_metrics(ids, query_labels, corpus_labels, k))
    return rows
