"""The fast search paths give today's results: exact search's kernels (float16 in chunks, read-only
arrays, FAISS's BLAS), a flat tier 0 searched over its own vectors, per-call nprobe without a lock,
threads by the size of the work, and ``funnel="auto"`` following the timings calibration recorded.

Nothing here is timed: speed is measured by ``benchmarks/funnel_bench.py``.
"""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest
import torch

from mrl_core import Corpus
from mrl_core.calibration import Calibration, faster_methods, method_at
from mrl_core.corpus import result_matrix
from mrl_core.funnel import FunnelSchedule, IdMap, score_candidates, take_rows
from mrl_core.index import build_index
from mrl_core.index_store import IndexManifest
from mrl_core.nesting import l2_normalize
from mrl_core.search import ALL_THREADS, exact_search, search_threads, threads_for
from mrl_core.tier0 import Tier0Index, flat_vectors, new_index

K = 10


def reference(queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k scores by NumPy in float64."""
    s = queries.astype(np.float64) @ corpus.astype(np.float64).T
    return -np.sort(-s, axis=1)[:, :k]


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    return l2_normalize(rng.standard_normal((9000, 48)).astype(np.float32))


@pytest.mark.parametrize("queries", [1, 7, 300])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("read_only", [False, True])
def test_exact_search_matches_numpy_at_every_batch_size(vectors, queries, dtype, read_only):
    corpus = vectors.astype(dtype)
    corpus.flags.writeable = not read_only
    q = l2_normalize(np.random.default_rng(queries).standard_normal((queries, 48)).astype(np.float32))
    scores, pos = exact_search(q, corpus, K, block_rows=4000)
    np.testing.assert_allclose(scores, reference(q, corpus, K), rtol=1e-5, atol=1e-5)
    rescored = np.take_along_axis(q @ corpus.astype(np.float32).T, pos, axis=1)
    np.testing.assert_allclose(rescored, scores, rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_exact_search_leaves_rows_out_and_pads(vectors):
    q = vectors[:5]
    scores, pos = exact_search(q, vectors.astype(np.float16), 3, exclude=np.arange(5), block_rows=1000)
    assert not (pos == np.arange(5)[:, None]).any(), "each query's own row is left out"
    s, p = exact_search(q, vectors[:2], 4)
    assert (p[:, 2:] == -1).all() and np.isneginf(s[:, 2:]).all()


def test_threads_follow_the_work_and_stay_in_the_calling_thread():
    assert threads_for(1000) == 1
    assert threads_for(1e12) == ALL_THREADS
    before, before_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    started, done, seen = threading.Event(), threading.Event(), {}

    def worker():  # a thread already running, as in a pool of concurrent callers
        torch.get_num_threads(), faiss.omp_get_max_threads()
        started.set()
        done.wait()
        seen["torch"], seen["faiss"] = torch.get_num_threads(), faiss.omp_get_max_threads()

    t = threading.Thread(target=worker)
    t.start()
    started.wait()
    with search_threads(1):
        assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
        done.set()
        t.join()
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (before, before_faiss)
    assert (seen["torch"], seen["faiss"]) == (before, before_faiss), "other threads keep their counts"


def test_a_tiny_rerank_runs_on_one_thread(vectors):
    ids = np.arange(len(vectors), dtype=np.int64) * 3 + 1
    idmap, threads = IdMap(ids), []

    def fetch(dim, keys):
        threads.append(torch.get_num_threads())
        return take_rows(vectors[:, :dim], idmap.positions(keys))

    q = vectors[:2]
    keys = np.stack([ids[:50], ids[50:100]])
    keys[1, 7] = -1
    scores = score_candidates(q, keys, 48, fetch)
    expected = np.einsum("qnd,qd->qn", vectors[idmap.positions(keys)], q)
    np.testing.assert_allclose(scores[keys >= 0], expected[keys >= 0], rtol=1e-6, atol=1e-6)
    assert np.isneginf(scores[1, 7]) and threads == [1]


@pytest.mark.parametrize("batch", [1, 5, 400])
def test_flat_tier0_over_its_own_vectors_returns_what_faiss_returns(vectors, batch):
    index = new_index("IDMap,Flat", 48)
    ids = np.arange(len(vectors), dtype=np.int64) * 5 + 2
    index.add_with_ids(vectors, ids)
    tier0 = Tier0Index(index, gpu=False)
    view, view_ids = flat_vectors(index)
    assert view.shape == vectors.shape and np.shares_memory(view, faiss.rev_swig_ptr(
        faiss.downcast_index(index.index).get_xb(), 1)) and (view_ids == ids).all()
    q = l2_normalize(np.random.default_rng(batch).standard_normal((batch, 48)).astype(np.float32))
    s, i = tier0.search(q, 20)
    s_ref, i_ref = index.search(q, 20)
    np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-5)
    untied = np.abs(np.diff(s_ref, axis=1)) > 1e-5
    assert (i[:, :-1][untied] == i_ref[:, :-1][untied]).all()
    index.add_with_ids(vectors[:10], ids[:10] + 1)  # the index grows: the view follows it
    assert sorted(tier0.search(vectors[:1], 2)[1][0].tolist()) == [ids[0], ids[0] + 1]


def test_concurrent_callers_pass_their_own_nprobe(vectors):
    index = new_index("IVF32,Flat", 48)
    index.train(vectors)
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    q = vectors[:64] + 0.05
    expected = {}
    for nprobe in (1, 4, 32):
        faiss.extract_index_ivf(index).nprobe = nprobe
        expected[nprobe] = index.search(q, K)[1]
    faiss.extract_index_ivf(index).nprobe = 1
    tier0 = Tier0Index(index, gpu=False)
    tier0._lock.acquire()  # held throughout: a CPU search that took it would never finish
    errors = []

    def caller(nprobe):
        for _ in range(20):
            if not (tier0.search(q, K, nprobe)[1] == expected[nprobe]).all():
                errors.append(nprobe)

    threads = [threading.Thread(target=caller, args=(p,)) for p in (1, 4, 32, 1, 32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a search waited for the lock"
    tier0._lock.release()
    assert not errors
    assert faiss.extract_index_ivf(index).nprobe == 1, "the shared index is never changed"


# ----------------------------------------------------------------------------- funnel or exact


def test_faster_methods_and_the_nearest_batch_size():
    seconds = {"1": {"funnel": 1e-3, "exact": 5e-3}, "10": {"funnel": 4e-4, "exact": 3e-4},
               "1000": {"funnel": 1e-4, "exact": 2e-4}}
    methods = faster_methods(seconds)
    assert methods == {"1": "funnel", "10": "exact", "1000": "funnel"}
    assert [method_at(methods, n) for n in (1, 3, 4, 10, 100, 101, 1000, 5000)] == [
        "funnel", "funnel", "exact", "exact", "exact", "funnel", "funnel", "funnel"]
    assert method_at({}, 1000) == "funnel"


def test_calibration_times_the_funnel_and_exact_search_at_each_batch_size(vectors):
    by_dim = {16: l2_normalize(vectors[:, :16]).astype(np.float16), 48: vectors.astype(np.float16)}
    queries = {d: v[:40].astype(np.float32) for d, v in by_dim.items()}
    cal = Calibration(by_dim, np.arange(len(vectors)), queries, k=K)
    speed = cal.speed(FunnelSchedule((16, 48), (100,)))
    assert list(speed) == ["1", "10", "40"], "the large batch is capped at the calibration queries"
    assert all(s["funnel"] > 0 and s["exact"] > 0 for s in speed.values())


def test_old_manifests_without_timings_still_load():
    manifest = IndexManifest(
        version="v000001", dataset_uri="x", dataset_version=1, rows_signature="s", rows=1, column="emb_8",
        dim=8, full_dim=8, stored_dims=[8], metric="cosine", factory="IDMap,Flat", params={},
        build_seconds=0.0, built_at="", bytes_per_vector=0.0, index_bytes=0, encoder="e",
        encoder_fingerprint="f",
    )
    raw = manifest.to_json().replace('"auto_search": {},', "").replace('"search_seconds": {},', "")
    assert "auto_search" not in raw and "search_seconds" not in raw
    old = IndexManifest.from_json(raw)
    assert old.auto_search == {} and old.search_seconds == {} and old == manifest
    manifest.auto_search = {"1": "funnel"}
    assert IndexManifest.from_json(manifest.to_json()).auto_search == {"1": "funnel"}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, corpus_writer):
    """3,000 clustered rows with a calibrated index."""
    rng = np.random.default_rng(3)
    scale = 1 / np.sqrt(np.arange(1, 257))
    centres = np.random.default_rng(0).standard_normal((40, 256)) * scale
    x = (centres[rng.integers(0, 40, 3200)] + 0.5 * rng.standard_normal((3200, 256)) * scale).astype(np.float32)
    uri = str(tmp_path_factory.mktemp("speed") / "small.lance")
    corpus_writer(uri, x[:3000])
    manifest = build_index(uri, calibration_queries=200)
    return uri, manifest, x[3000:]


def test_calibration_records_its_timings_and_choice(small_corpus):
    _, manifest, _ = small_corpus
    assert sorted(manifest.search_seconds, key=int) == ["1", "10", "200"]
    assert all(s["funnel"] > 0 and s["exact"] > 0 for s in manifest.search_seconds.values())
    assert manifest.auto_search == faster_methods(manifest.search_seconds)


def test_auto_follows_the_recorded_timings(small_corpus):
    uri, manifest, queries = small_corpus
    corpus = Corpus.open(uri)
    funnel = str(corpus.schedule)
    for methods in ({"1": "funnel", "200": "exact"}, {"1": "exact", "200": "funnel"}):
        corpus.manifest.auto_search = methods
        for count in (1, 200):
            q = queries[:count]
            auto = corpus.search(q, k=K)
            want = (corpus.search(q, k=K, exact=True) if method_at(methods, count) == "exact"
                    else corpus.search(q, k=K, funnel=funnel))
            assert auto.equals(want), (methods, count)
            explicit = corpus.search(q, k=K, funnel=funnel)  # an explicit schedule always runs the funnel
            assert explicit.equals(corpus.search(q, k=K, funnel=FunnelSchedule.parse(funnel)))
    uncached = Corpus.open(uri, cache_bytes=0)  # the manifest alone decides: the same results uncached
    uncached.manifest.auto_search = corpus.manifest.auto_search = {"1": "exact"}
    assert uncached.search(queries[:3], k=K).equals(corpus.search(queries[:3], k=K))
    assert uncached._tiers == {}


def test_auto_results_equal_the_funnel_or_exact_search(small_corpus):
    uri, _, queries = small_corpus
    corpus = Corpus.open(uri)
    corpus.manifest.auto_search = {}
    auto = corpus.search(queries, k=K)
    exact = corpus.search(queries, k=K, exact=True)
    a = result_matrix(auto, "score", len(queries), K)
    e = result_matrix(exact, "score", len(queries), K)
    assert (a <= e + 1e-5).all()
