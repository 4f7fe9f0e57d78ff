"""Index build and funnel search over a real-text corpus: 50,000 docstring lines of the installed
packages embedded with WordLlama, queried with 1,000 held-out lines."""

from __future__ import annotations

import json
import shutil
import warnings

import lance
import numpy as np
import pyarrow as pa
import pytest

from mrl_core import Corpus
from mrl_core.corpus import EncoderMismatchError, result_matrix
from mrl_core.evaluate import recall_at_k_with_ties
from mrl_core.funnel import FunnelSchedule
from mrl_core.index import (
    CURRENT,
    IndexMismatchError,
    IndexNotFoundError,
    build_index,
    candidate_factories,
    choose_factory,
    default_index_uri,
    estimate_index_bytes,
    load_index,
    read_current,
)
from mrl_core.storage import INFO_KEY, DatasetInfo, read_info

K = 10


@pytest.fixture(scope="module")
def built(text_dataset):
    """The 50k dataset with an index built with every default."""
    lines: list[str] = []
    manifest = build_index(text_dataset, log=lines.append)
    return text_dataset, manifest, lines


@pytest.fixture(scope="module")
def corpus(built):
    return Corpus.open(built[0])


@pytest.fixture(scope="module")
def exact(corpus, text_corpus):
    table = corpus.search(text_corpus["query_embeddings"], k=K, exact=True)
    return result_matrix(table, "score", len(text_corpus["query_embeddings"]), K)


def recall(table: pa.Table, exact_scores: np.ndarray) -> float:
    return recall_at_k_with_ties(result_matrix(table, "score", len(exact_scores), K), exact_scores, K)


def test_factory_choice_by_size_and_memory():
    assert choose_factory(50_000, 128) == "IDMap,Flat"
    assert choose_factory(841_708, 128, 128) == "IVF2048,SQ4"
    assert choose_factory(841_708, 64, 128) == "IVF2048,SQ8"
    assert choose_factory(841_708, 16, 128) == "IVF2048,Flat"
    assert choose_factory(20_000_000, 128, 128).startswith("IVF32768,PQ")
    assert candidate_factories(841_708, 128, 128) == ["IDMap,PQ64x4fs", "IVF2048,SQ4"]
    assert candidate_factories(50_000, 128) == ["IDMap,Flat"]
    total, per_vector = estimate_index_bytes("IVF1024,SQ8", 1_000_000, 128)
    assert per_vector == 128 + 8 and total >= 136_000_000


def test_build_writes_a_calibrated_manifest(built, text_corpus):
    uri, manifest, lines = built
    index_uri = default_index_uri(uri)
    assert read_current(index_uri) == manifest.version == "v000001"
    assert manifest.rows == 50_000 and manifest.factory == "IDMap,Flat"
    assert manifest.column == f"emb_{manifest.dim}" and manifest.dim in (16, 32, 64, 128, 256)
    assert manifest.encoder == "wordllama-256"
    assert manifest.encoder_fingerprint == text_corpus["encoder"].fingerprint
    assert manifest.schedule_recall >= 0.99
    assert manifest.calibration["target"] == 0.99 and manifest.calibration["queries"] == 1000
    assert manifest.calibration["trials"]
    assert manifest.bytes_per_vector > 0 and manifest.index_bytes > 0
    assert manifest.dataset_version == lance.dataset(uri).version
    assert any("of memory" in line for line in lines), "the memory estimate is printed before building"
    index, loaded = load_index(index_uri)
    assert index.ntotal == 50_000 and loaded == manifest
    with open(f"{index_uri}/{manifest.version}/manifest.json") as f:
        raw = json.load(f)
    for key in ("dataset_uri", "dataset_version", "rows", "column", "dim", "metric", "factory", "params",
                "build_seconds", "bytes_per_vector", "schedule", "schedule_recall"):
        assert key in raw


def test_default_funnel_recall_and_calibrated_target_hold_on_held_out_queries(corpus, built, text_corpus, exact):
    manifest = built[1]
    table = corpus.search(text_corpus["query_embeddings"], k=K)
    r = recall(table, exact)
    assert r >= 0.95
    # the calibrated schedule meets its target on queries it never saw (0.005: sampling error of
    # a recall over 1,000 queries near 0.99)
    assert r >= manifest.calibration["target"] - 0.005, (str(corpus.schedule), r)


def test_paper_schedule_is_much_worse_with_wordllama(corpus, text_corpus, exact):
    table = corpus.search(text_corpus["query_embeddings"], k=K, funnel="paper")
    assert recall(table, exact) < 0.8


def test_funnel_equals_exact_when_shortlists_cover_the_corpus(corpus, text_corpus):
    q = text_corpus["query_embeddings"][:5]
    n = corpus.rows
    full = corpus.search(q, k=K, funnel=FunnelSchedule((64, 128, 256), (n, n)))
    ref = corpus.search(q, k=K, exact=True)
    np.testing.assert_allclose(full["score"].to_numpy(), ref["score"].to_numpy(), rtol=1e-5, atol=1e-5)
    s = result_matrix(ref, "score", 5, K)
    untied = np.abs(s[:, :-1] - s[:, 1:]) > 1e-5
    ids_f, ids_r = result_matrix(full, "id", 5, K, fill=-1), result_matrix(ref, "id", 5, K, fill=-1)
    assert ids_f.dtype == np.int64
    assert (ids_f[:, :-1][untied] == ids_r[:, :-1][untied]).all()


def test_result_table_layout_and_metadata_join(corpus, text_corpus):
    texts = text_corpus["query_texts"][:3]
    table = corpus.search(texts, k=5, columns=["text", "shard"])
    assert table.column_names == ["query", "rank", "id", "score", "text", "shard"]
    assert table.num_rows == 15
    assert table["query"].to_pylist() == [0] * 5 + [1] * 5 + [2] * 5
    assert table["rank"].to_pylist() == [1, 2, 3, 4, 5] * 3
    scores = result_matrix(table, "score", 3, 5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    ds = lance.dataset(corpus.dataset.uri)
    ids = table["id"].to_pylist()
    truth = ds.to_table(columns=["id", "text"], filter=f"id IN ({', '.join(map(str, ids))})").to_pydict()
    by_id = dict(zip(truth["id"], truth["text"]))
    assert table["text"].to_pylist() == [by_id[i] for i in ids]


def test_text_queries_match_vector_queries(corpus, text_corpus):
    by_text = corpus.search(text_corpus["query_texts"][:20], k=K)
    by_vec = corpus.search(text_corpus["query_embeddings"][:20], k=K)
    assert by_text["id"].to_pylist() == by_vec["id"].to_pylist()
    single = corpus.search(text_corpus["query_texts"][0], k=K)
    assert single["id"].to_pylist() == by_text["id"].to_pylist()[:K]


def test_batches_do_not_change_results(corpus, text_corpus):
    q = text_corpus["query_embeddings"][:50]
    a = corpus.search(q, k=K, batch_size=7)
    b = corpus.search(q, k=K)
    assert a.equals(b)


def test_uncached_tiers_fetch_from_lance(built, text_corpus, corpus):
    small = Corpus.open(built[0], cache_bytes=0)
    q = text_corpus["query_embeddings"][:20]
    a = small.search(q, k=K)
    b = corpus.search(q, k=K)
    assert a["id"].to_pylist() == b["id"].to_pylist()
    np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=1e-5)
    assert small._tiers == {}
    e = small.search(q, k=K, exact=True)
    assert e["id"].to_pylist() == corpus.search(q, k=K, exact=True)["id"].to_pylist()


@pytest.mark.parametrize(
    "queries, kwargs, error, match",
    [
        ([], {}, ValueError, "empty"),
        (np.zeros((0, 256), np.float32), {}, ValueError, "empty"),
        (np.ones((2, 128), np.float32), {}, ValueError, "128 dims.*256"),
        (np.ones((3, 3, 256), np.float32), {}, ValueError, "shape"),
        (np.where(np.eye(3, 256) > 0, np.nan, 1.0), {}, ValueError, "NaN or inf"),
        (np.full((2, 256), np.inf), {}, ValueError, "NaN or inf"),
        (np.zeros((2, 256), np.float32), {}, ValueError, "all zeros"),
        (np.ones((1, 256), np.float32), {"k": 50_001}, ValueError, "larger than the corpus"),
        (np.ones((1, 256), np.float32), {"k": 0}, ValueError, "positive"),
        (np.ones((1, 256), np.float32), {"columns": ["nope"]}, ValueError, "no column"),
        (np.ones((1, 256), np.float32), {"funnel": FunnelSchedule((48, 256), (10,))}, ValueError, "stores"),
        (np.ones((1, 256), np.float32), {"funnel": "fastest"}, ValueError, "funnel schedule"),
        (["text", np.ones(256)], {}, TypeError, "mix"),
        ([None], {}, TypeError, "texts or an array"),
    ],
)
def test_bad_input_is_a_clear_error(corpus, queries, kwargs, error, match):
    with pytest.raises(error, match=match):
        corpus.search(queries, **kwargs)


@pytest.fixture
def small_copy(text_dataset, tmp_path):
    """A 4,000-row copy of the corpus with its own index."""
    ds = lance.dataset(text_dataset)
    uri = str(tmp_path / "small.lance")
    lance.write_dataset(ds.to_table(limit=4000), uri, max_rows_per_file=1000)
    copy = lance.dataset(uri)
    copy.update_config({INFO_KEY: read_info(ds).to_json()})
    build_index(uri, calibration_queries=200, log=None)
    return uri


def test_index_for_other_rows_is_refused_unless_allowed(small_copy, text_dataset):
    lance.dataset(small_copy).update_config({"unrelated": "x"})  # a new version, same rows
    Corpus.open(small_copy)
    more = lance.dataset(text_dataset).to_table(offset=4000, limit=100)
    lance.write_dataset(more, small_copy, mode="append")
    with pytest.raises(IndexMismatchError, match="pipelines/index.py"):
        Corpus.open(small_copy, snapshot=False)
    with pytest.warns(UserWarning, match="allow_stale_index"):
        stale = Corpus.open(small_copy, allow_stale_index=True, snapshot=False)
    q = more["emb_256"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, 256)[:3]
    table = stale.search(q.astype(np.float32), k=5, exact=True)
    assert set(table["id"].to_pylist()) & set(more["id"].to_pylist()), "exact search sees the new rows"
    # by default: the dataset version the index was built on, a consistent snapshot, with a warning
    with pytest.warns(UserWarning, match="searching that version"):
        pinned = Corpus.open(small_copy)
    assert pinned.rows == 4000
    table = pinned.search(q.astype(np.float32), k=5, exact=True)
    assert not set(table["id"].to_pylist()) & set(more["id"].to_pylist()), "the snapshot has no new rows"


def test_deleted_rows_never_come_back(small_copy):
    ds = lance.dataset(small_copy)
    victim = ds.take([0], columns=["id", "emb_256"])
    q = victim["emb_256"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(1, 256).astype(np.float32)
    ds.delete(f"id = {victim['id'][0].as_py()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        corpus = Corpus.open(small_copy, allow_stale_index=True, snapshot=False)
    table = corpus.search(q, k=5)
    assert victim["id"][0].as_py() not in table["id"].to_pylist()
    assert table.num_rows == 5


def test_index_for_another_encoder_is_refused(small_copy):
    ds = lance.dataset(small_copy)
    info = read_info(ds)
    other = DatasetInfo(**{**info.__dict__, "fingerprint": "0123456789abcdef"})
    ds.update_config({INFO_KEY: other.to_json()})
    with pytest.raises(IndexMismatchError, match="encoder"):
        Corpus.open(small_copy, allow_stale_index=True)


def test_text_queries_need_the_datasets_encoder(tmp_path, corpus_writer):
    rng = np.random.default_rng(0)
    uri = str(tmp_path / "other.lance")
    corpus_writer(uri, rng.standard_normal((500, 256)).astype(np.float32), fingerprint="not-this-one")
    build_index(uri, calibration_queries=50, log=None)
    corpus = Corpus.open(uri)
    with pytest.raises(EncoderMismatchError, match="fingerprint"):
        corpus.search(["hello"])
    assert corpus.search(rng.standard_normal((2, 256)), k=3).num_rows == 6


def test_missing_index_is_a_clear_error(tmp_path, corpus_writer):
    uri = str(tmp_path / "bare.lance")
    corpus_writer(uri, np.random.default_rng(0).standard_normal((100, 256)).astype(np.float32))
    with pytest.raises(IndexNotFoundError, match="pipelines/index.py"):
        Corpus.open(uri)
    bare = Corpus.open(uri, require_index=False)
    q = np.random.default_rng(1).standard_normal((2, 256))
    assert bare.search(q, k=3, exact=True).num_rows == 6
    assert bare.search(q, k=3, funnel="64:20,256").num_rows == 6  # a flat tier 0 without index
    with pytest.raises(IndexNotFoundError):
        bare.search(q, k=3)


def test_ivf_tier0_added_with_ray_over_fragments(text_dataset, tmp_path):
    ds = lance.dataset(text_dataset)
    uri = str(tmp_path / "ivf.lance")
    lance.write_dataset(ds.to_table(limit=10_000), uri, max_rows_per_file=2500)
    lance.dataset(uri).update_config({INFO_KEY: read_info(ds).to_json()})
    lines: list[str] = []
    manifest = build_index(uri, factory="IVF64,SQ8", use_ray=True, calibration_queries=300,
                           tier0_candidates=1, shortlist_sizes=(100, 500, 2000), log=lines.append)
    assert manifest.params["ray"] is True and manifest.rows == 10_000
    assert manifest.factory == "IVF64,SQ8" and manifest.schedule["nprobe"] is not None
    assert manifest.schedule_recall >= 0.99
    assert any("Ray tasks" in line for line in lines)
    index, _ = load_index(default_index_uri(uri))
    assert index.ntotal == 10_000
    corpus = Corpus.open(uri)
    ids = corpus.search(ds.take([5], columns=["emb_256"])["emb_256"].combine_chunks().flatten()
                        .to_numpy(zero_copy_only=False).reshape(1, 256).astype(np.float32), k=3)["id"]
    assert ds.take([5], columns=["id"])["id"][0].as_py() in ids.to_pylist()


def test_explicit_schedule_is_measured_and_kept(small_copy):
    manifest = build_index(small_copy, funnel=FunnelSchedule((32, 256), (300,)), calibration_queries=100, log=None)
    assert manifest.schedule == {"dims": [32, 256], "shortlists": [300], "nprobe": None}
    assert 0 < manifest.schedule_recall <= 1 and manifest.dim == 32
    paper = build_index(small_copy, funnel="paper", calibration_queries=0, log=None)
    assert paper.schedule["dims"] == [16, 32, 64, 128, 256] and paper.schedule_recall is None
    assert read_current(default_index_uri(small_copy)) == paper.version


def test_build_errors(tmp_path, corpus_writer, small_copy):
    with pytest.raises(ValueError, match="stored dim"):
        build_index(small_copy, tier0_dim=48, log=None)
    with pytest.raises(ValueError, match="factory"):
        build_index(small_copy, factory="NotAFactory", funnel="paper", log=None)
    uri = str(tmp_path / "no_info.lance")
    lance.write_dataset(pa.table({"id": pa.array([1, 2], pa.int64())}), uri)
    with pytest.raises(ValueError, match="mrl.info"):
        build_index(uri, log=None)
    assert not (tmp_path / "no_info.lance.indexes" / CURRENT).exists()
    shutil.rmtree(tmp_path / "no_info.lance")
