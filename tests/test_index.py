"""Index build and funnel search over a real-text corpus: 50,000 docstring lines of the installed
packages embedded with WordLlama, queried with 1,000 held-out lines."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import faiss
import lance
import numpy as np
import pyarrow as pa
import pytest

from mrl_core import Corpus
from mrl_core.corpus import EncoderMismatchError, result_matrix
from mrl_core.funnel import FunnelSchedule
from mrl_core.index import (
    BuildOptions,
    CalibrationOptions,
    add_vectors,
    build_index,
    calibrate,
    calibration_data,
    measure_recall,
    train_index,
)
from mrl_core.index_add import add_local, add_with_ray, group_fragments
from mrl_core.index_store import (
    CURRENT,
    IndexMismatchError,
    IndexNotFoundError,
    default_index_uri,
    load_index,
    read_current,
)
from mrl_core.index_update import update_index
from mrl_core.search import recall_at_k_with_ties
from mrl_core.storage import INFO_KEY, DatasetInfo, embedding_dims, read_info
from mrl_core.tier0 import (
    candidate_factories,
    choose_factory,
    estimate_index_bytes,
    mergeable,
    sample_tier0,
)

K = 10
REPO = Path(__file__).resolve().parents[1]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def logged(name: str = "mrl_core") -> Iterator[list[str]]:
    """The messages ``name``'s loggers log at INFO and above meanwhile."""
    handler, logger = _Lines(), logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def built(text_dataset):
    """The 50k dataset with an index built with every default."""
    with logged() as lines:
        manifest = build_index(text_dataset)
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
    build_index(uri, calibration_queries=200)
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
    build_index(uri, calibration_queries=50)
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
    with logged() as lines:
        manifest = build_index(uri, factory="IVF64,SQ8", use_ray=True, calibration_queries=300,
                               tier0_candidates=1, shortlist_sizes=(100, 500, 2000))
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
    manifest = build_index(small_copy, funnel=FunnelSchedule((32, 256), (300,)), calibration_queries=100)
    assert manifest.schedule == {"dims": [32, 256], "shortlists": [300], "nprobe": None}
    assert 0 < manifest.schedule_recall <= 1 and manifest.dim == 32
    paper = build_index(small_copy, funnel="paper", calibration_queries=0)
    assert paper.schedule["dims"] == [16, 32, 64, 128, 256] and paper.schedule_recall is None
    assert read_current(default_index_uri(small_copy)) == paper.version


def test_build_errors(tmp_path, corpus_writer, small_copy):
    with pytest.raises(ValueError, match="stored dim"):
        build_index(small_copy, tier0_dim=48)
    with pytest.raises(ValueError, match="factory"):
        build_index(small_copy, factory="NotAFactory", funnel="paper")
    uri = str(tmp_path / "no_info.lance")
    lance.write_dataset(pa.table({"id": pa.array([1, 2], pa.int64())}), uri)
    with pytest.raises(ValueError, match="mrl.info"):
        build_index(uri)
    assert not (tmp_path / "no_info.lance.indexes" / CURRENT).exists()
    shutil.rmtree(tmp_path / "no_info.lance")


# ----------------------------------------------------------------------------- the build's steps


def clustered(n: int, seed: int) -> np.ndarray:
    """Vectors around 50 centres, their energy falling with the dim as nested embeddings' does."""
    rng = np.random.default_rng(seed)
    scale = 1 / np.sqrt(np.arange(1, 257))
    centres = np.random.default_rng(0).standard_normal((50, 256)) * scale
    noise = 0.5 * rng.standard_normal((n, 256)) * scale
    return (centres[rng.integers(0, 50, n)] + noise).astype(np.float32)


def ivf_lists(index: faiss.Index) -> list[list[int]]:
    """The ids of each IVF list, sorted."""
    lists = faiss.extract_index_ivf(index).invlists
    sizes = [lists.list_size(i) for i in range(lists.nlist)]
    return [sorted(faiss.rev_swig_ptr(lists.get_ids(i), n).tolist()) if n else []
            for i, n in enumerate(sizes)]


@pytest.fixture(scope="module")
def fragments(tmp_path_factory, corpus_writer):
    """4,000 clustered rows in 8 fragments of 500."""
    uri = str(tmp_path_factory.mktemp("steps") / "fragments.lance")
    corpus_writer(uri, clustered(4000, 1), rows_per_file=500)
    return uri


def test_choose_factory_picks_the_last_candidate():
    for rows, dim, budget in ((50_000, 64, None), (841_708, 128, 128), (20_000_000, 64, 40)):
        assert choose_factory(rows, dim, budget) == candidate_factories(rows, dim, budget)[-1]


def test_train_index_gives_an_empty_trained_index(fragments):
    ds = lance.dataset(fragments)
    flat = train_index(ds, "IDMap,Flat", 64)
    assert flat.params == {"gpus": 0} and flat.index().ntotal == 0 and flat.index().d == 64
    ivf = train_index(ds, "IVF16,SQ8", 64, train_rows=1000, seed=3)
    assert (ivf.factory, ivf.dim) == ("IVF16,SQ8", 64)
    assert ivf.params["nlist"] == 16 and ivf.params["train_rows"] == 1000
    assert ivf.params["train_seconds"] >= 0
    a, b = ivf.index(), ivf.index()
    assert a.is_trained and a.ntotal == 0
    a.add_with_ids(np.ones((2, 64), np.float32), np.array([1, 2], np.int64))
    assert b.ntotal == 0, "each use gets its own copy"
    with pytest.raises(ValueError, match="factory"):
        train_index(ds, "NotAFactory", 64)


def test_group_fragments_cuts_runs_of_similar_row_counts():
    assert group_fragments([(0, 10), (1, 10), (2, 10), (3, 10)], 2) == [[0, 1], [2, 3]]
    assert group_fragments([(7, 30), (8, 5), (9, 5)], 2) == [[7], [8, 9]]
    assert group_fragments([(0, 1), (1, 1), (2, 1)], 1) == [[0, 1, 2]]
    assert group_fragments([(0, 1), (1, 1)], 8) == [[0], [1]]


def test_adding_in_ray_tasks_gives_the_same_index_as_adding_here(fragments):
    ds = lance.dataset(fragments)
    assert len(ds.get_fragments()) == 8
    trained = train_index(ds, "IVF16,Flat", 64, train_rows=2000)
    here, there = trained.index(), trained.index()
    add_local(here, ds, 64)
    with logged() as lines:
        add_with_ray(there, ds, 64)
    assert any(line.startswith("adding vectors from 8 fragments in") for line in lines)
    ids = ds.to_table(columns=["id"])["id"].to_numpy()
    assert here.ntotal == there.ntotal == len(ids)
    assert ivf_lists(there) == ivf_lists(here), "every row in the same list under the same id"
    assert sorted(i for ids_ in ivf_lists(there) for i in ids_) == sorted(ids.tolist())
    index, params = add_vectors(trained, ds, use_ray=True)
    assert params["ray"] is True and ivf_lists(index) == ivf_lists(here)
    assert add_vectors(trained, ds)[1]["ray"] is False, "4,000 rows: added here by default"
    assert mergeable(here) and not mergeable(train_index(ds, "HNSW8", 64).index())


def test_calibrate_finds_the_schedule_and_trains_its_tier0(fragments):
    ds = lance.dataset(fragments)
    options = CalibrationOptions(calibration_queries=200)
    with logged() as lines:
        chosen = calibrate(ds, options)
    assert chosen.recall >= chosen.required > options.target_recall
    assert chosen.schedule.dims[-1] == 256 and (chosen.queries, chosen.rows) == (200, 4000)
    assert chosen.tier0 is not None and chosen.tier0.factory == "IDMap,Flat"
    assert chosen.tier0.dim == chosen.schedule.dims[0] and chosen.tier0.index().ntotal == 0
    assert chosen.trials and any(line.startswith("  flat tier 0") for line in lines)
    record = chosen.record(options)
    assert record["target"] == 0.99 and record["queries"] == 200 and record["rows"] == 4000
    assert record["required"] == round(chosen.required, 5)
    assert len(record["trials"]) == len(chosen.trials)
    # the schedule over the built tier 0 reaches what calibration measured
    index, _ = add_vectors(chosen.tier0, ds)
    assert measure_recall(ds, index, chosen.schedule, options).recall == pytest.approx(
        chosen.recall, abs=0.01)
    with pytest.raises(ValueError, match="calibration queries"):
        calibrate(ds, CalibrationOptions(calibration_queries=0))


def test_calibrate_tunes_a_quantised_tier0(fragments):
    ds = lance.dataset(fragments)
    chosen = calibrate(ds, CalibrationOptions(calibration_queries=100, tier0_candidates=1),
                       BuildOptions(factory="IVF16,Flat", train_rows=1000))
    assert chosen.tier0.factory == "IVF16,Flat" and chosen.schedule.nprobe is not None
    assert any(t.tier0 == "IVF16,Flat" for t in chosen.trials)
    assert chosen.tier0.params["nlist"] == 16


def test_recall_on_a_sample_searches_a_tier0_over_that_sample(fragments):
    ds = lance.dataset(fragments)
    index, _ = add_vectors(train_index(ds, "IDMap,Flat", 64), ds)
    dims = embedding_dims(ds.schema)
    sample, rows = calibration_data(ds, dims, K, 50, 1000, seed=0)
    probe = sample_tier0(index, sample)
    assert rows == 1000 and probe is not index and probe.ntotal == 1000
    assert sorted(faiss.vector_to_array(probe.id_map)) == sorted(sample.ids)
    everything, _ = calibration_data(ds, dims, K, 50, 10_000, seed=0)
    assert sample_tier0(index, everything) is index
    measured = measure_recall(ds, index, FunnelSchedule.parse("64:200,256"),
                              CalibrationOptions(calibration_queries=100, calibration_rows=1000))
    assert (measured.rows, measured.queries) == (1000, 100) and 0 < measured.recall <= 1
    assert index.ntotal == 4000, "the index itself is left as it was"


def test_build_takes_option_objects_and_refuses_unknown_knobs(fragments):
    manifest = build_index(fragments, funnel="64:200,256",
                           options=BuildOptions(factory="IVF16,Flat"),
                           calibration=CalibrationOptions(calibration_queries=50), train_rows=1000)
    assert manifest.factory == "IVF16,Flat" and manifest.params["train_rows"] == 1000
    assert manifest.calibration["queries"] == 50 and manifest.params["ray"] is False
    with pytest.raises(TypeError, match="log"):
        build_index(fragments, log=print)


def test_an_incremental_update_records_its_build_time(tmp_path, corpus_writer):
    uri = str(tmp_path / "grow.lance")
    corpus_writer(uri, clustered(1500, 5))
    build_index(uri, funnel="64:1000,256", calibration_queries=100)
    corpus_writer(uri, clustered(300, 6), shard="shard-1", mode="append", key=2)
    started = time.time()
    update = update_index(uri)
    took = time.time() - started
    assert (update.action, update.added) == ("added", 300) and update.recall is not None
    seconds = update.manifest.build_seconds
    assert took / 2 <= seconds <= took + 0.01, (seconds, took)
    assert load_index(default_index_uri(uri))[1].build_seconds == seconds


def test_the_cli_logs_the_build_on_stderr(tmp_path, corpus_writer):
    uri = str(tmp_path / "cli.lance")
    corpus_writer(uri, clustered(500, 7))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "pipelines/index.py", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    out = run("--dataset", uri, "--funnel", "paper", "--calibration-queries", "0")
    assert out.returncode == 0, out.stderr
    assert "of memory" in out.stderr and "published" in out.stderr and "of memory" not in out.stdout
    assert out.stdout.startswith("index v000001: IDMap,Flat over emb_16")
    bad = run("--dataset", uri, "--storage-option", "no-equals-sign")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_the_build_times_the_funnel_against_exact_search_and_auto_follows(built, corpus, text_corpus):
    from mrl_core.calibration import faster_methods, method_at

    manifest = built[1]
    assert sorted(manifest.search_seconds, key=int) == ["1", "10", "1000"]
    assert all(s["funnel"] > 0 and s["exact"] > 0 for s in manifest.search_seconds.values())
    assert manifest.auto_search == faster_methods(manifest.search_seconds)
    raw = json.loads(Path(f"{default_index_uri(built[0])}/{manifest.version}/manifest.json").read_text())
    assert raw["auto_search"] == manifest.auto_search and raw["search_seconds"] == manifest.search_seconds
    q = text_corpus["query_embeddings"][:40]
    for count in (1, 10, 40):
        want = "exact" if method_at(manifest.auto_search, count) == "exact" else str(corpus.schedule)
        expected = (corpus.search(q[:count], k=K, exact=True) if want == "exact"
                    else corpus.search(q[:count], k=K, funnel=want))
        assert corpus.search(q[:count], k=K).equals(expected)
