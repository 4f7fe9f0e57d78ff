"""Object-store faults (moto's S3 behind ``FaultProxy``) and crashes while an index version is
published: transient errors and slow responses are retried with backoff, a permanent error
fails naming the object, and a crashed build or ``CURRENT`` swap leaves the previous index
version valid and queryable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_corpus
from faultproxy import FaultProxy

from mrl_core import Corpus, objectstore
from mrl_core.index import build_index
from mrl_core.index_store import (
    IndexNotFoundError,
    list_versions,
    load_index,
    prune_versions,
    read_current,
)
from mrl_core.ledger_store import read_ledger
from mrl_core.sources import ShardError, list_shards, read_shard
from mrl_core.storage import derive_ids, ids_of_rows
from pipelines.embed import EmbedConfig, EmbedError, run_embed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def proxy(s3_endpoint):
    """A FaultProxy in front of moto (no faults until a test adds rules)."""
    p = FaultProxy(s3_endpoint["endpoint_url"]).start()
    yield p
    p.stop()


@pytest.fixture
def bucket(make_bucket):
    return make_bucket("faults")


def put_parquet(url: str, n: int, opts: dict, seed: int = 0) -> list[str]:
    texts = [f"matryoshka funnel search record {seed}-{i}" for i in range(n)]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts}), sink)
    objectstore.write_bytes(url, sink.getvalue().to_pybytes(), opts)
    return texts


# ----------------------------------------------------------------------------- reads and writes


def test_one_set_of_storage_options_configures_retries_timeouts_and_encryption_for_s3fs():
    """Lance's option names for timeouts, retries and server-side encryption configure the s3fs
    side (input shards, index files) too; Lance-only keys are dropped, not passed on."""
    opts = objectstore.fsspec_options("s3://b/x", {
        "aws_endpoint": "http://h:1", "timeout": "30s", "connect_timeout": "500ms", "client_max_retries": "3",
        "client_retry_timeout": "60", "allow_http": "true", "aws_server_side_encryption": "aws:kms",
        "aws_sse_kms_key_id": "key-1", "aws_sse_bucket_key_enabled": "true"})
    assert opts == {
        "client_kwargs": {"endpoint_url": "http://h:1"},
        "config_kwargs": {"read_timeout": 30.0, "connect_timeout": 0.5,
                          "retries": {"max_attempts": 4, "mode": "standard"}},
        "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "key-1", "BucketKeyEnabled": True},
    }
    with pytest.raises(ValueError, match="not a duration"):
        objectstore.fsspec_options("s3://b/x", {"timeout": "soon"})


def test_transient_errors_are_retried_with_backoff(proxy, s3_endpoint, bucket):
    """Six 503s in a row outlast botocore's own five attempts; our backoff layer outlasts them."""
    opts = proxy.storage_options(s3_endpoint["storage_options"])
    url = f"{bucket}/corpus/a.parquet"
    texts = put_parquet(url, 50, s3_endpoint["storage_options"])
    proxy.fail(503, first=6, method="GET", path="/corpus/a.parquet")
    assert objectstore.read_bytes(url, opts)[:4] == b"PAR1"
    assert proxy.injected == 6

    proxy.clear()
    proxy.fail(500, rate=0.4, seed=3)  # any request, listing included
    shards = list_shards(f"{bucket}/corpus/*.parquet", opts)
    records = read_shard(shards[0], "text", storage_options=opts)
    assert records.table["_input"].to_pylist() == texts and records.total == 50
    assert proxy.injected > 0


def test_slow_responses_are_retried_after_the_timeout(proxy, s3_endpoint, bucket):
    """A response slower than the ``timeout`` storage option is abandoned and retried, by s3fs
    (the option mapped to botocore's read timeout) and by Lance's own object store alike."""
    base = s3_endpoint["storage_options"]
    url = f"{bucket}/corpus/a.parquet"
    put_parquet(url, 20, base)
    lance.write_dataset(pa.table({"id": np.arange(100)}), f"{bucket}/ds.lance", storage_options=base)
    opts = {**proxy.storage_options(base), "timeout": "1s", "connect_timeout": "1s"}

    proxy.slow(4.0, first=1, method="GET", path="/corpus/a.parquet")
    start = time.perf_counter()
    assert objectstore.read_bytes(url, opts)[:4] == b"PAR1"
    assert time.perf_counter() - start < 3.5, "the slow response was waited for, not retried"

    proxy.clear()
    slow = proxy.slow(4.0, first=2, method="GET", path="/ds.lance/data/")
    start = time.perf_counter()
    ids = lance.dataset(f"{bucket}/ds.lance", storage_options=opts).to_table()["id"].to_numpy()
    assert ids.tolist() == list(range(100)) and slow.applied >= 1
    assert time.perf_counter() - start < 7.5


def test_lance_dataset_and_index_through_a_flaky_endpoint(proxy, s3_endpoint, bucket):
    """Lance writes and reads, the index build, publish and ``Corpus.search`` all go through a
    store that fails 20% of requests (500/503): Lance's and our retries absorb every one."""
    opts = proxy.storage_options(s3_endpoint["storage_options"])
    proxy.fail(503, rate=0.1, seed=1)
    proxy.fail(500, rate=0.1, seed=2)
    uri = f"{bucket}/flaky.lance"
    emb = np.random.default_rng(0).normal(size=(1500, 256)).astype(np.float32)
    write_corpus(uri, emb, storage_options=opts, rows_per_file=500)
    manifest = build_index(uri, storage_options=opts, funnel="paper", calibration_queries=50)
    corpus = Corpus.open(uri, storage_options=opts)
    hits = corpus.search(emb[:20], k=5)
    assert manifest.rows == 1500 and hits.num_rows == 100
    top = hits.filter(pa.compute.equal(hits["rank"], 1))["id"].to_numpy()
    np.testing.assert_array_equal(top, derive_ids(1, np.arange(20)))
    assert proxy.injected > 10


def test_embed_end_to_end_through_a_flaky_slow_endpoint(proxy, s3_endpoint, bucket):
    """The whole embed job, input and output on S3, with 15% of requests failing, 10% slow and
    30% of commits answered with an error after they succeeded: it finishes with every input id
    exactly once."""
    base = s3_endpoint["storage_options"]
    sizes = {}
    for i in range(4):
        url = f"{bucket}/corpus/s{i}.parquet"
        put_parquet(url, 60, base, seed=i)
        sizes[url] = 60
    opts = proxy.storage_options(base)
    proxy.fail(503, rate=0.1, seed=4)
    proxy.fail(500, rate=0.05, seed=5)
    proxy.slow(0.3, rate=0.1, seed=6)
    proxy.lose(503, rate=0.3, method="PUT", path="/_versions/", seed=7)  # commits done, answers lost
    out = f"{bucket}/emb.lance"
    summary = run_embed(EmbedConfig(input=f"{bucket}/corpus/*.parquet", output=out, storage_options=opts,
                                    commit_every=1, progress=False))
    injected = proxy.injected
    proxy.clear()
    ds = lance.dataset(out, storage_options=base)
    ids = ds.to_table(columns=["id"])["id"].to_numpy()
    expected = np.concatenate([ids_of_rows(ds, u, np.arange(n)) for u, n in sizes.items()])
    np.testing.assert_array_equal(np.sort(ids), np.sort(expected))
    assert set(read_ledger(ds)) == set(sizes) and summary.rows_written == 240
    assert injected > 5


def test_a_commit_whose_answer_is_lost_is_not_applied_twice(proxy, s3_endpoint, bucket):
    """The store executes a commit but the client hears 503 (the ambiguous outcome): the client's
    retry meets 412 (the version exists), Lance recognises its own commit, and the rows and the
    ledger entry are there once."""
    from mrl_core.ledger_store import record

    base = s3_endpoint["storage_options"]
    opts = proxy.storage_options(base)
    uri = f"{bucket}/lost.lance"
    lance.write_dataset(pa.table({"id": np.arange(10)}), uri, storage_options=base)
    ds = lance.dataset(uri, storage_options=opts)
    fragments = lance.fragment.write_fragments(pa.table({"id": np.arange(100, 110)}), uri, schema=ds.schema,
                                               storage_options=opts)
    lost = proxy.lose(503, first=1, method="PUT", path="/_versions/")
    ds = lance.LanceDataset.commit(ds, lance.LanceOperation.Append(fragments), read_version=ds.version,
                                   storage_options=opts)
    assert lost.applied == 1
    proxy.lose(503, first=1, method="PUT", path="/_versions/")
    record(ds, {"shard-b": {"rows": 10}}, opts)
    fresh = lance.dataset(uri, storage_options=base)
    assert sorted(fresh.to_table()["id"].to_pylist()) == [*range(10), *range(100, 110)]
    assert read_ledger(fresh) == {"shard-b": {"rows": 10}} and fresh.version == 3


# ----------------------------------------------------------------------------- permanent errors


def test_permanent_errors_fail_at_once_naming_the_object(proxy, s3_endpoint, bucket, monkeypatch):
    base = s3_endpoint["storage_options"]
    opts = proxy.storage_options(base)
    denied, gone = f"{bucket}/corpus/denied.parquet", f"{bucket}/corpus/gone.parquet"
    put_parquet(denied, 5, base)
    put_parquet(gone, 5, base)
    proxy.fail(403, path="/corpus/denied.parquet")

    start = time.perf_counter()
    with pytest.raises(PermissionError, match=denied):
        objectstore.read_bytes(denied, opts)
    with pytest.raises(FileNotFoundError, match=f"{bucket}/corpus/nothing"):
        objectstore.read_bytes(f"{bucket}/corpus/nothing", opts)
    assert time.perf_counter() - start < 5, "a permanent error was retried"

    shards = {s.uri: s for s in list_shards(f"{bucket}/corpus/", base)}
    objectstore.remove(gone, base)  # deleted between listing and reading
    with pytest.raises(ShardError, match=r"shard s3://.*gone\.parquet: cannot open"):
        read_shard(shards[gone], "text", storage_options=opts)
    with pytest.raises(ShardError, match=r"denied\.parquet: cannot open"):
        read_shard(shards[denied], "text", storage_options=opts)

    # the embed job stops naming the shard; nothing of it is committed
    out = f"{bucket}/emb.lance"
    with pytest.raises(EmbedError, match=r"denied\.parquet"):
        run_embed(EmbedConfig(input=f"{bucket}/corpus/*.parquet", output=out, input_storage_options=opts,
                              storage_options=base, progress=False))
    assert denied not in read_ledger(lance.dataset(out, storage_options=base))

    # an error that never clears fails after the last attempt, naming the object
    monkeypatch.setattr(objectstore, "RETRY_ATTEMPTS", 2)
    proxy.fail(503, path="/corpus/a-flaky-one")
    with pytest.raises(OSError, match=rf"{bucket}/corpus/a-flaky-one: failed after 2 attempts"):
        objectstore.read_bytes(f"{bucket}/corpus/a-flaky-one", {**opts, "client_max_retries": "1"})

    # Lance names the dataset path in its error
    proxy.fail(403, path="/denied.lance")
    with pytest.raises((OSError, ValueError), match=r"denied\.lance"):
        lance.dataset(f"{bucket}/denied.lance", storage_options=opts).count_rows()


# ----------------------------------------------------------------------------- index crashes

CRASH = r"""
import os, sys
from mrl_core import index, objectstore
point, uri = sys.argv[1], sys.argv[2]
if point == "tier0":  # die half way through uploading the FAISS file
    def put_file(local, url, storage_options=None):
        data = open(local, "rb").read()
        objectstore.write_bytes(url, data[: len(data) // 2], storage_options)
        os._exit(17)
    objectstore.put_file = put_file
elif point == "manifest":  # die after the FAISS file, before the manifest
    write_bytes = objectstore.write_bytes
    def guarded(url, data, storage_options=None):
        if url.endswith("manifest.json"):
            os._exit(17)
        return write_bytes(url, data, storage_options)
    objectstore.write_bytes = guarded
elif point == "swap":  # die inside the CURRENT swap: temp file written, rename not done
    rename = os.replace
    def no_rename(src, dst):
        if str(dst).endswith("CURRENT"):
            os._exit(17)
        return rename(src, dst)
    os.replace = no_rename
index.build_index(uri, funnel="paper", calibration_queries=20)
os._exit(0)
"""


@pytest.fixture(scope="module")
def indexed_corpus(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("crash") / "c.lance")
    emb = np.random.default_rng(1).normal(size=(2000, 256)).astype(np.float32)
    write_corpus(uri, emb)
    build_index(uri, funnel="paper", calibration_queries=20)
    return uri, emb


@pytest.mark.parametrize("point", ["tier0", "manifest", "swap"])
def test_crash_while_publishing_an_index_keeps_the_previous_version(point, indexed_corpus):
    """The process dies (``os._exit``, no cleanup) while writing the FAISS file, before the
    manifest, or inside the ``CURRENT`` swap: ``CURRENT`` still names the previous complete
    version, which opens and answers queries; the next build publishes past the debris."""
    uri, emb = indexed_corpus
    index_uri = uri + ".indexes"
    before = read_current(index_uri)
    proc = subprocess.run([sys.executable, "-c", CRASH, point, uri], cwd=REPO, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 17, proc.stderr.decode()[-2000:]

    assert read_current(index_uri) == before
    corpus = Corpus.open(uri)
    assert corpus.manifest.version == before
    hits = corpus.search(emb[:3], k=3)
    assert hits["id"].to_pylist()[::3] == derive_ids(1, np.arange(3)).tolist()
    debris = list_versions(index_uri)[-1]
    assert debris != before
    if point != "swap":  # a half-published version cannot be loaded by mistake
        with pytest.raises((IndexNotFoundError, ValueError)):
            load_index(index_uri, debris)
    else:
        assert any(name.startswith(".CURRENT.tmp") for name in os.listdir(index_uri))

    after = build_index(uri, funnel="paper", calibration_queries=20)
    assert read_current(index_uri) == after.version > debris
    assert Corpus.open(uri).search(emb[:1], k=1)["id"].to_pylist() == derive_ids(1, np.arange(1)).tolist()
    prune_versions(index_uri, keep=1)  # the debris goes with the old versions
    assert list_versions(index_uri) == [after.version]
