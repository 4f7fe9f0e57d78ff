"""Funnel search and calibration on in-memory arrays (no Lance, no index files)."""

from __future__ import annotations

import numpy as np
import pytest

from mrl_core.calibration import Calibration, calibrate_schedule, candidate_schedules, drop_self
from mrl_core.funnel import FunnelSchedule, IdMap, funnel_search, paper_schedule, take_rows
from mrl_core.nesting import l2_normalize
from mrl_core.search import exact_search, recall_at_k_with_ties, top_k

DIMS = (16, 32, 64, 128)


def nested_vectors(n: int, seed: int, dim: int = 128, clusters: int = 200) -> np.ndarray:
    """Clustered vectors whose variance decays with the coordinate, so prefixes carry most signal."""
    rng = np.random.default_rng(seed)
    scale = 1 / np.sqrt(np.arange(1, dim + 1))
    centers = np.random.default_rng(0).standard_normal((clusters, dim)) * scale
    return (centers[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)) * scale).astype(np.float32)


def prefixes(x: np.ndarray, dims=DIMS, dtype=np.float16) -> dict[int, np.ndarray]:
    return {d: l2_normalize(x[:, :d]).astype(dtype) for d in dims}


@pytest.fixture(scope="module")
def corpus():
    x = nested_vectors(6000, seed=1)
    q = nested_vectors(300, seed=2)
    ids = np.arange(len(x), dtype=np.int64) * 7 + 3
    return prefixes(x), ids, {d: v.astype(np.float32) for d, v in prefixes(q).items()}


def in_memory(vectors, ids):
    idmap = IdMap(ids)

    def tier0(dim, queries, n):
        _, pos = exact_search(queries, vectors[dim], n)
        return np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)

    def fetch(dim, keys):
        return take_rows(vectors[dim], idmap.positions(keys))

    return tier0, fetch


def test_schedule_parse_and_format_round_trip():
    s = FunnelSchedule.parse("64:1000, 128:200, 256@32")
    assert s == FunnelSchedule((64, 128, 256), (1000, 200), 32)
    assert str(s) == "64:1000,128:200,256@32"
    assert FunnelSchedule.from_dict(s.to_dict()) == s
    assert FunnelSchedule.parse("256") == FunnelSchedule((256,), ())
    assert s.steps(10) == [(64, 1000), (128, 200), (256, 10)]
    assert s.rerank_cost(10) == 1000 * 128 + 200 * 256


@pytest.mark.parametrize(
    "dims, shortlists",
    [((), ()), ((64, 32), (10,)), ((64, 128), ()), ((64, 128, 256), (10, 20)), ((64, 128), (0,)),
     ((64, 128, 128), (100, 50))],
)
def test_schedule_rejects_bad_shapes(dims, shortlists):
    with pytest.raises(ValueError):
        FunnelSchedule(dims, shortlists)


@pytest.mark.parametrize("text", ["64,256", "a:1,256", "64:10,128:x,256", ""])
def test_schedule_parse_errors_are_clear(text):
    with pytest.raises(ValueError, match="funnel schedule"):
        FunnelSchedule.parse(text)


def test_paper_schedule_uses_the_stored_dims():
    assert paper_schedule([16, 32, 64, 128, 256]) == FunnelSchedule((16, 32, 64, 128, 256), (200, 100, 50, 25))
    assert paper_schedule([64, 128, 256, 1024]) == FunnelSchedule((64, 128, 256, 1024), (50, 25, 10))
    assert paper_schedule([64, 128, 256]) == FunnelSchedule((64, 128, 256), (50, 25))


def test_candidates_are_ordered_by_tier0_dim_then_rerank_cost():
    cands = candidate_schedules([64, 128, 256], k=10, shortlist_sizes=(100, 1000))
    starts = [c.dims[0] for c in cands]
    assert starts == sorted(starts)
    for d0 in (64, 128):
        costs = [c.rerank_cost(10) for c in cands if c.dims[0] == d0]
        assert costs == sorted(costs)
    assert cands[-1] == FunnelSchedule((256,), ())
    assert FunnelSchedule((64, 128, 256), (1000, 500)) in cands  # the paper's shape, halving
    refined = candidate_schedules([64, 128, 256], k=10, shortlist_sizes=(100, 1000), tier0_dims=(128,), refine=True)
    assert FunnelSchedule((128, 128, 256), (1000, 100)) in refined  # exact re-score at the tier-0 dim
    assert FunnelSchedule.parse("128:1000,128:100,256").rerank_cost(10) == 1000 * 128 + 100 * 256


def test_idmap_positions_and_duplicates():
    m = IdMap(np.array([50, 10, 30]))
    assert m.positions(np.array([10, 30, 50, 99, -1])).tolist() == [1, 2, 0, -1, -1]
    with pytest.raises(ValueError, match="unique"):
        IdMap(np.array([1, 2, 1]))


def test_exact_search_matches_numpy_and_pads():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 16)).astype(np.float16)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    scores, pos = exact_search(q, x, 5, block_rows=128)
    ref = q @ x.astype(np.float32).T
    np.testing.assert_allclose(scores, np.sort(ref, axis=1)[:, ::-1][:, :5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(ref, pos, axis=1), scores, rtol=1e-5, atol=1e-5)
    s, p = exact_search(q, x[:3], 5)
    assert (p[:, 3:] == -1).all() and np.isneginf(s[:, 3:]).all()


def test_top_k_orders_best_first_with_ties_in_column_order():
    scores = np.array([[0.1, 0.9, 0.5, 0.9, -np.inf]])
    assert top_k(scores, 3).tolist() == [[1, 3, 2]]
    assert top_k(scores, 10).tolist() == [[1, 3, 2, 0, 4]]


def test_drop_self_removes_the_query_row_or_the_last():
    keys = np.array([[5, 7, 9], [1, 2, 3]])
    assert drop_self(keys, np.array([7, 8]), 2).tolist() == [[5, 9], [1, 2]]


def test_funnel_equals_exact_when_shortlists_cover_the_corpus(corpus):
    vectors, ids, queries = corpus
    n = len(ids)
    tier0, fetch = in_memory(vectors, ids)
    schedule = FunnelSchedule(DIMS, (n, n, n))
    scores, keys = funnel_search(schedule, queries, 10, tier0, fetch)
    exact_scores, exact_pos = exact_search(queries[128], vectors[128], 10)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-5)
    untied = np.abs(exact_scores[:, :-1] - exact_scores[:, 1:]) > 1e-5
    assert (keys[:, :-1][untied] == ids[exact_pos][:, :-1][untied]).all()


def test_funnel_handles_missing_rows(corpus):
    vectors, ids, queries = corpus
    _, fetch = in_memory(vectors, ids)

    def sparse_tier0(dim, q, n):  # returns fewer rows than asked, padded with -1
        out = np.full((len(q), n), -1, dtype=np.int64)
        out[:, :3] = ids[:3]
        return out

    scores, keys = funnel_search(FunnelSchedule((16, 128), (50,)), queries, 10, sparse_tier0, fetch)
    assert (keys[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert set(keys[0, :3]) == set(ids[:3])


def test_calibration_reaches_its_target_on_held_out_queries(corpus):
    vectors, ids, queries = corpus
    held_out = prefixes(nested_vectors(300, seed=3), dtype=np.float32)
    schedule, recall = calibrate_schedule(vectors, ids, queries, target=0.97, k=10)
    assert recall >= 0.97
    assert schedule.dims[-1] == 128
    tier0, fetch = in_memory(vectors, ids)
    scores, _ = funnel_search(schedule, held_out, 10, tier0, fetch)
    exact_scores, _ = exact_search(held_out[128], vectors[128], 10)
    assert recall_at_k_with_ties(np.where(np.isfinite(scores), scores, np.nan), exact_scores, 10) >= 0.96


def test_calibration_with_corpus_rows_as_queries_leaves_them_out(corpus):
    vectors, ids, _ = corpus
    rows = np.arange(0, 300)
    queries = {d: v[rows].astype(np.float32) for d, v in vectors.items()}
    cal = Calibration(vectors, ids, queries, k=10, query_ids=ids[rows])
    # with the query row left out, its exact top score is no longer its own (1.0) in general
    assert (cal.exact_scores[:, 0] < 0.999).mean() > 0.5
    keys = cal.tier0_keys(16, 50)
    assert not (keys == cal.self_pos[:, None]).any()
    exact = FunnelSchedule((128,), ())
    assert cal.recall(exact) == pytest.approx(1.0)


def test_calibration_prefers_cheaper_schedules_and_warns_when_unreachable(corpus):
    vectors, ids, queries = corpus
    cal = Calibration(vectors, ids, queries, k=10)
    trials = cal.trials(target=0.9, shortlist_sizes=(50, 200))
    hits = [t for t in trials if t.recall >= 0.9]
    assert hits
    with pytest.warns(UserWarning, match="no funnel schedule"):
        calibrate_schedule(vectors, ids, queries, target=1.01, k=10, shortlist_sizes=(20,), tier0_dims=(16,))


def test_tier0_callable_is_used_for_calibration(corpus):
    vectors, ids, queries = corpus
    calls = []

    def tier0(dim, q, n):
        calls.append((dim, n))
        _, pos = exact_search(q, vectors[dim], n)
        return ids[pos]

    schedule, recall = calibrate_schedule(vectors, ids, queries, target=0.9, tier0_dims=(32,), tier0=tier0)
    assert schedule.dims[0] == 32 and recall >= 0.9
    assert calls and all(d == 32 for d, _ in calls)
