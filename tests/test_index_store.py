"""Index artifacts: versions, the CURRENT swap under concurrent readers, and S3 (moto's server)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mrl_core import Corpus, objectstore
from mrl_core.funnel import FunnelSchedule
from mrl_core.index import (
    Calibrated,
    CalibrationOptions,
    add_vectors,
    build_index,
    new_manifest,
    train_index,
)
from mrl_core.index_store import (
    CLAIM,
    CURRENT,
    MANIFEST,
    TIER0_FILE,
    IndexNotFoundError,
    default_index_uri,
    list_versions,
    load_index,
    prune_versions,
    publish,
    read_current,
    read_manifest,
    set_current,
)
from mrl_core.storage import rows_signature


def vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = 1 / np.sqrt(np.arange(1, 257))
    centers = np.random.default_rng(0).standard_normal((50, 256)) * scale
    return (centers[rng.integers(0, 50, n)] + 0.5 * rng.standard_normal((n, 256)) * scale).astype(np.float32)


def test_fsspec_options_map_lance_names_to_s3fs():
    lance_style = {
        "aws_endpoint": "http://127.0.0.1:9000", "aws_access_key_id": "k", "aws_secret_access_key": "s",
        "aws_region": "eu-west-1", "allow_http": "true", "anon": False,
    }
    assert objectstore.fsspec_options("s3://b/x", lance_style) == {
        "key": "k", "secret": "s", "anon": False,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
    }
    assert objectstore.fsspec_options("/local/path", {"a": 1}) == {"a": 1}
    assert default_index_uri("s3://b/data/x.lance/") == "s3://b/data/x.lance.indexes"


def test_versions_current_and_prune(tmp_path, corpus_writer):
    uri = str(tmp_path / "v.lance")
    corpus_writer(uri, vectors(800, 1))
    index_uri = default_index_uri(uri)
    with pytest.raises(IndexNotFoundError, match="pipelines/index.py"):
        read_current(index_uri)
    made = [build_index(uri, funnel="64:100,256", calibration_queries=0).version for _ in range(3)]
    assert made == ["v000001", "v000002", "v000003"] == list_versions(index_uri)
    assert read_current(index_uri) == "v000003"
    for v in made:
        assert objectstore.exists(f"{index_uri}/{v}/{TIER0_FILE}") and objectstore.exists(f"{index_uri}/{v}/{MANIFEST}")
    set_current(index_uri, "v000001")
    assert Corpus.open(uri).manifest.version == "v000001"
    with pytest.raises(ValueError):
        set_current(index_uri, "../elsewhere")
    assert prune_versions(index_uri, keep=1) == ["v000002"]  # v000001 is current: kept
    assert list_versions(index_uri) == ["v000001", "v000003"]
    unpublished = build_index(uri, funnel="64:100,256", calibration_queries=0, make_current=False)
    assert unpublished.version == "v000004" and read_current(index_uri) == "v000001"


def test_publish_writes_a_new_version_and_swaps_current_when_asked(tmp_path, corpus_writer):
    uri = str(tmp_path / "p.lance")
    ds = corpus_writer(uri, vectors(600, 7))
    index_uri = str(tmp_path / "elsewhere" / "indexes")
    trained = train_index(ds, "IDMap,Flat", 64)
    index, params = add_vectors(trained, ds)
    chosen = Calibrated(FunnelSchedule.parse("64:100,256"))
    manifest = new_manifest(uri, ds, index, trained.factory, params, chosen, CalibrationOptions())
    assert manifest.version == "" and manifest.rows == 600 and manifest.column == "emb_64"
    assert manifest.rows_signature == rows_signature(ds) and manifest.schedule_recall is None
    assert manifest.calibration == {"target": 0.99, "k": 10, "trials": []}
    assert manifest.params["code_bytes_per_vector"] == 64 * 4 + 8

    first = publish(index_uri, index, manifest, make_current=False)
    assert first.version == "v000001" and list_versions(index_uri) == ["v000001"]
    assert len(first.tier0_sha256) == 64 and first.index_bytes > 600 * 64 * 4
    assert first.bytes_per_vector == round(first.index_bytes / 600, 2)
    with pytest.raises(IndexNotFoundError):
        read_current(index_uri)
    loaded, again = load_index(index_uri, "v000001")
    assert again == first and loaded.ntotal == 600

    second = publish(index_uri, index, new_manifest(uri, ds, index, trained.factory, params,
                                                    chosen, CalibrationOptions()))
    assert second.version == "v000002" == read_current(index_uri)
    assert read_manifest(index_uri) == second


def test_a_corrupt_index_file_is_detected(tmp_path, corpus_writer):
    uri = str(tmp_path / "c.lance")
    corpus_writer(uri, vectors(300, 2))
    m = build_index(uri, funnel="64:50,256", calibration_queries=0)
    path = f"{default_index_uri(uri)}/{m.version}/{TIER0_FILE}"
    data = bytearray(objectstore.read_bytes(path))
    data[-1] ^= 0xFF
    objectstore.write_bytes(path, bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_index(default_index_uri(uri))
    objectstore.write_bytes(f"{default_index_uri(uri)}/{CURRENT}", b"garbage\n")
    with pytest.raises(ValueError, match="not an index version"):
        read_current(default_index_uri(uri))


def test_current_swap_under_concurrent_readers(tmp_path, corpus_writer):
    """Readers open and search in threads while a writer builds and swaps versions: no errors, and
    every reader sees one whole version (the checksum of its index file matches its manifest)."""
    uri = str(tmp_path / "swap.lance")
    x = vectors(3000, 3)
    corpus_writer(uri, x)
    schedules = ["64:200,256", "32:300,256", "128:100,256"]
    build_index(uri, funnel=FunnelSchedule.parse(schedules[0]), calibration_queries=0)
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: set[tuple[str, str]] = set()
    queries = vectors(8, 4)

    def reader() -> None:
        while not stop.is_set():
            try:
                corpus = Corpus.open(uri)
                table = corpus.search(queries, k=5)
                assert table.num_rows == 40
                m = corpus.manifest
                assert corpus.index.ntotal == m.rows == 3000
                assert m.column == f"emb_{m.dim}" and corpus.schedule.dims[0] == m.dim
                seen.add((m.version, str(corpus.schedule)))
            except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(1, 7):
            build_index(uri, funnel=FunnelSchedule.parse(schedules[i % 3]), calibration_queries=0)
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    if errors:
        raise errors[0]
    assert read_current(default_index_uri(uri)) == "v000007"
    for version, schedule in seen:  # each reader's (version, schedule) pair is the one written
        assert str(read_manifest(default_index_uri(uri), version).funnel_schedule()) == schedule
    assert len({v for v, _ in seen}) >= 2, "readers should have seen the swap"


def test_index_round_trips_through_s3(s3_endpoint, make_bucket, corpus_writer, tmp_path):
    options = s3_endpoint["storage_options"]
    bucket = make_bucket("mrl-index")
    uri = f"{bucket}/data/corpus.lance"
    x = vectors(2000, 5)
    corpus_writer(uri, x, storage_options=options, rows_per_file=500)
    manifest = build_index(uri, storage_options=options, calibration_queries=200)
    index_uri = default_index_uri(uri)
    assert index_uri.startswith("s3://")
    assert read_current(index_uri, options) == manifest.version
    fs = objectstore.filesystem(index_uri, options)
    listed = sorted(p.rsplit("/", 1)[-1] for p in fs.find(index_uri))
    assert listed == sorted([CLAIM, CURRENT, MANIFEST, TIER0_FILE])
    index, loaded = load_index(index_uri, storage_options=options)
    assert loaded == manifest and index.ntotal == 2000

    corpus = Corpus.open(uri, storage_options=options)
    q = vectors(20, 6)
    remote = corpus.search(q, k=5, columns=["text"])
    assert remote.num_rows == 100 and remote["text"].null_count == 0
    # the same dataset and index copied to local disk give the same answers
    local = tmp_path / "copy"
    fs.get(uri.removeprefix("s3://"), str(local / "corpus.lance"), recursive=True)
    fs.get(index_uri.removeprefix("s3://"), str(local / "corpus.lance.indexes"), recursive=True)
    same = Corpus.open(str(local / "corpus.lance")).search(q, k=5, columns=["text"])
    assert same["id"].to_pylist() == remote["id"].to_pylist()
    # an explicit index URI on S3 works as well
    other = f"{bucket}/indexes/corpus"
    build_index(uri, index_uri=other, storage_options=options, funnel="paper", calibration_queries=0)
    assert Corpus.open(uri, storage_options=options, index_uri=other).schedule.dims[0] == 16
