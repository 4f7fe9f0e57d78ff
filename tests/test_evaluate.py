"""mrl_core.evaluate: metrics against hand-computed values on small cases."""

from __future__ import annotations

import numpy as np
import pytest

from mrl_core.evaluate import (
    calibrate_cascade,
    cascade_evaluate,
    cascade_frontier,
    cascade_predict,
    format_per_dim,
    knn_accuracy,
    label_retrieval_metrics,
    linear_probe_accuracy,
    map_at_k,
    mrr_at_k,
    pca_rotation,
    per_dim,
    prefix_recall,
    random_rotation,
    recall_at_k,
    softmax,
)
from mrl_core.search import exact_search, recall_at_k_with_ties, scores_of

pytestmark = pytest.mark.usefixtures("one_thread")


def test_recall_with_ties_counts_duplicates_as_hits():
    exact = np.array([[0.9, 0.8, 0.8]])
    # the search returned a duplicate of the 2nd neighbour instead of the 3rd: still 3/3
    assert recall_at_k_with_ties(np.array([[0.9, 0.8, 0.8]]), exact, k=3) == 1.0
    assert recall_at_k_with_ties(np.array([[0.9, 0.7, np.nan]]), exact, k=3) == pytest.approx(1 / 3)


def test_exact_search_orders_by_inner_product_and_excludes():
    corpus = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    queries = np.array([[1, 0], [0, 1]], dtype=np.float32)
    s, i = exact_search(queries, corpus, 2)
    assert i.tolist() == [[0, 2], [1, 2]]
    assert s[0].tolist() == pytest.approx([1.0, 0.6])
    s, i = exact_search(queries, corpus, 1, exclude=np.array([0, -1]))
    assert i.tolist() == [[2], [1]]
    # tiny blocks give the same answer as one block
    s2, i2 = exact_search(queries, corpus, 2, block_rows=1)
    assert i2.tolist() == [[0, 2], [1, 2]]


def test_scores_of_marks_missing_as_nan():
    q = np.eye(2, dtype=np.float32)
    c = np.array([[1, 0], [0.5, 0.5]], dtype=np.float32)
    out = scores_of(q, c, np.array([[0, -1], [1, 0]]))
    assert out[0, 0] == 1.0 and np.isnan(out[0, 1])
    assert out[1].tolist() == pytest.approx([0.5, 0.0])


def test_prefix_recall_full_dim_is_one_and_prefix_drops():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    q, c = x[:20], x[20:]
    r = prefix_recall(q, c, [2, 16], k=5)
    assert r[16] == 1.0
    assert r[2] < 0.6


def test_prefix_recall_against_a_reference_embedding():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    rot = random_rotation(8, seed=3)
    r = prefix_recall(x[:10] @ rot, x[10:] @ rot, [8], k=5, reference=(x[:10], x[10:]))
    assert r[8] == pytest.approx(1.0)


def test_knn_accuracy_hand_case():
    train = np.array([[1, 0], [0, 1], [1, 0.1]], dtype=np.float32)
    ytr = np.array([0, 1, 2])
    test = np.array([[1, 0.01], [0.1, 1]], dtype=np.float32)
    assert knn_accuracy(train, ytr, test, np.array([0, 1])) == 1.0
    # 3-NN with three different labels: the nearest one wins the tie
    assert knn_accuracy(train, ytr, test, np.array([0, 1]), k=3) == 1.0
    # the majority beats the nearest: neighbours of [1, 0] are labelled 0, 1, 1
    train = np.array([[1, 0], [1, 0.2], [1, 0.3], [0, 1]], dtype=np.float32)
    ytr = np.array([0, 1, 1, 2])
    q = np.array([[1, 0]], dtype=np.float32)
    assert knn_accuracy(train, ytr, q, np.array([1]), k=1) == 0.0
    assert knn_accuracy(train, ytr, q, np.array([1]), k=3) == 1.0


def test_linear_probe_separable():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    assert linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:]) > 0.95


def test_per_dim_slices_and_renormalises():
    seen = []

    def metric(a, ya, b, yb):
        seen.append((a.shape[1], float(np.linalg.norm(a[0]))))
        return float(a.shape[1])

    x = np.ones((4, 8), dtype=np.float32)
    out = per_dim(metric, [2, 8], x, np.zeros(4), x, np.zeros(4))
    assert out == {2: 2.0, 8: 8.0}
    assert seen[0][1] == pytest.approx(1.0)


def test_label_retrieval_metrics_hand_computed():
    corpus_labels = np.array([0, 0, 1, 1, 1])
    query_labels = np.array([0, 1])
    retrieved = np.array([[2, 0, 1], [2, 0, -1]])
    m = label_retrieval_metrics(retrieved, query_labels, corpus_labels, k=3)
    # q0: rel = [0,1,1], R=2: P@3=2/3, recall=1, AP=(1/2+2/3)/2, RR=1/2
    # q1: rel = [1,0,0], R=3: P@3=1/3, recall=1/3, AP=1/3, RR=1
    assert m["precision@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["recall@3"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["map@3"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1 / 3) / 2)
    assert m["mrr@3"] == pytest.approx((1 / 2 + 1) / 2)


def test_map_recall_mrr_edge_cases():
    rel = np.array([[True, False], [False, False]])
    assert map_at_k(rel, np.array([1, 0])) == 1.0  # the query with nothing relevant is skipped
    assert recall_at_k(rel, np.array([2, 0])) == 0.5
    assert mrr_at_k(rel) == 0.5


def test_pca_rotation_is_orthogonal_and_orders_variance():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 5)) * np.array([0.1, 3.0, 1.0, 0.5, 2.0])
    r = pca_rotation(x)
    assert np.allclose(r.T @ r, np.eye(5), atol=1e-5)
    var = (x @ r).var(0)
    assert np.all(np.diff(var) <= 1e-6)
    # inner products are kept exactly
    assert np.allclose((x @ r) @ (x @ r).T, x @ x.T, atol=1e-3)


def test_random_rotation_is_orthogonal_and_seeded():
    r = random_rotation(6, seed=2)
    assert np.allclose(r @ r.T, np.eye(6), atol=1e-5)
    assert np.array_equal(r, random_rotation(6, seed=2))


def test_cascade_hand_case():
    dims = [2, 4, 8]
    p_small = np.array([[0.9, 0.1], [0.6, 0.4], [0.55, 0.45]])
    p_mid = np.array([[0.2, 0.8], [0.3, 0.7], [0.52, 0.48]])
    p_full = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    pred, used = cascade_predict([p_small, p_mid, p_full], dims, [0.8, 0.6])
    assert pred.tolist() == [0, 1, 1]
    assert used.tolist() == [2, 4, 8]
    res = cascade_evaluate([p_small, p_mid, p_full], np.array([0, 1, 1]), dims, [0.8, 0.6])
    assert res.accuracy == 1.0
    assert res.expected_dims == pytest.approx((2 + 4 + 8) / 3)


def test_calibrate_cascade_meets_target_with_fewer_dims():
    rng = np.random.default_rng(0)
    n, dims = 400, [4, 16, 64]
    y = rng.integers(0, 2, n)
    probs = []
    for noise in (0.9, 0.5, 0.0):  # the smallest dim is noisiest
        conf = np.clip(rng.uniform(0.5, 1.0, n) - noise * rng.uniform(0, 0.5, n), 0.5, 1.0)
        wrong = rng.uniform(0, 1, n) < noise * 0.5
        lbl = np.where(wrong, 1 - y, y)
        p = np.zeros((n, 2))
        p[np.arange(n), lbl] = conf
        p[np.arange(n), 1 - lbl] = 1 - conf
        probs.append(p)
    full = cascade_evaluate(probs, y, dims, [np.inf, np.inf])
    assert full.accuracy == 1.0 and full.expected_dims == 64
    th = calibrate_cascade(probs, y, dims, target_accuracy=0.97)
    res = cascade_evaluate(probs, y, dims, th)
    assert res.accuracy >= 0.97
    assert res.expected_dims < 64
    frontier = cascade_frontier(probs, y, dims, [0.0, 1.01])
    assert frontier[0][1] == 4 and frontier[1][1] == 64


def test_softmax_rows_sum_to_one():
    p = softmax(np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1000.0]]))
    assert np.allclose(p.sum(1), 1.0)
    assert p[1, 2] == pytest.approx(1.0)


def test_format_per_dim_table():
    md = format_per_dim({"a": {8: 0.5, 16: 0.25}, "b": {16: 1.0}})
    assert md.splitlines()[0] == "| method | 8 | 16 |"
    assert "| b |  | 1.000 |" in md


def test_funnel_vs_exact_on_a_small_corpus():
    from mrl_core.evaluate import funnel_vs_exact
    from mrl_core.nesting import l2_normalize

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32) * np.linspace(3, 0.2, 16)
    labels = (x[:, 0] > 0).astype(int)
    q, c = x[:20], x[20:]
    by_dim = {d: l2_normalize(np.ascontiguousarray(c[:, :d])) for d in (4, 16)}
    q_by_dim = {d: l2_normalize(np.ascontiguousarray(q[:, :d])) for d in (4, 16)}
    rows = funnel_vs_exact(by_dim, q_by_dim, {"wide": "4:380,16", "narrow": "4:10,16"}, k=5,
                           query_labels=labels[:20], corpus_labels=labels[20:])
    assert rows["exact 16"]["recall@k vs exact"] == 1.0
    assert rows["wide"]["recall@k vs exact"] == pytest.approx(1.0)  # the shortlist is the corpus
    assert rows["narrow"]["recall@k vs exact"] < 1.0
    assert rows["narrow"]["rerank values/query"] == 10 * 16
    assert rows["wide"]["map@5"] == pytest.approx(rows["exact 16"]["map@5"])
