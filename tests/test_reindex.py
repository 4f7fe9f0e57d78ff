"""The scheduled re-index: only changes are embedded, the index follows, swaps are atomic."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from mrl_core import Corpus
from mrl_core.index_store import default_index_uri, list_versions, read_manifest
from mrl_core.ledger_store import read_ledger
from mrl_core.storage import ids_of_rows
from pipelines.reindex import ReindexConfig, main, run_reindex

REPO = Path(__file__).resolve().parents[1]
WORDS = ["vector", "search", "index", "matryoshka", "nested", "embedding", "lance", "ray", "shard", "encoder",
         "query", "funnel", "prefix", "recall", "cosine", "tier", "rerank"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield


def write_shard(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(4, 14))) + f" {seed}:{i}" for i in range(n)]
    pq.write_table(pa.table({"text": texts}), path)


def ids_of(uri: str) -> np.ndarray:
    return np.sort(lance.dataset(uri).to_table(columns=["id"])["id"].to_numpy())


def expected(sizes: dict[Path, int], out: str) -> np.ndarray:
    """Every record's id once, from each shard's ledger key and its positions."""
    ds = lance.dataset(out)
    return np.sort(np.concatenate([ids_of_rows(ds, str(p), np.arange(n)) for p, n in sizes.items()]))


def cfg(src: Path, out: str, **kw) -> ReindexConfig:
    return ReindexConfig(input=str(src), dataset=out, progress=False, **kw)


def test_reindex_follows_added_changed_and_removed_shards(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    sizes = {src / f"s{i}.parquet": 300 for i in range(4)}
    for i, p in enumerate(sizes):
        write_shard(p, 300, i)
    out = str(tmp_path / "emb.lance")

    first = run_reindex(cfg(src, out))
    assert first.index_action == "built" and len(first.shards_new) == 4
    np.testing.assert_array_equal(ids_of(out), expected(sizes, out))
    assert read_manifest(default_index_uri(out)).rows == 1200

    # add one shard, change one (other content and size), remove one
    write_shard(src / "s4.parquet", 150, 40)
    write_shard(src / "s1.parquet", 200, 41)
    os.remove(src / "s3.parquet")
    sizes = {src / "s0.parquet": 300, src / "s1.parquet": 200, src / "s2.parquet": 300, src / "s4.parquet": 150}

    second = run_reindex(cfg(src, out, max_remove_fraction=0.5))  # a quarter of the rows goes
    assert second.shards_new == [str(src / "s4.parquet")]
    assert second.shards_changed == [str(src / "s1.parquet")]
    assert second.shards_removed == [str(src / "s3.parquet")]
    assert second.rows_removed == 300 and second.rows_replaced == 300 and second.rows_embedded == 350
    assert second.index_action == "added" and second.recall >= 0.98
    np.testing.assert_array_equal(ids_of(out), expected(sizes, out))
    assert set(read_ledger(lance.dataset(out))) == {str(p) for p in sizes}
    manifest = read_manifest(default_index_uri(out))
    assert manifest.rows == 950 and manifest.params["incremental_from"] == first.index_version
    # the index holds exactly the dataset's ids: every row finds itself
    corpus = Corpus.open(out)
    table = lance.dataset(out).to_table(columns=["id", "emb_256"])
    vectors = np.stack(table["emb_256"].to_numpy(zero_copy_only=False)).astype(np.float32)
    hits = corpus.search(vectors[:50], k=1, funnel="64:20,256")
    np.testing.assert_array_equal(hits["id"].to_numpy(), table["id"].to_numpy()[:50])

    # nothing changed: nothing to do, and the CLI exits 0
    third = run_reindex(cfg(src, out))
    assert third.nothing_to_do and third.rows_embedded == 0
    assert main(["--input", str(src), "--dataset", out, "--no-progress"]) == 0
    assert list_versions(default_index_uri(out)) == [first.index_version, second.index_version]


def test_growth_past_the_factor_retrains_and_retention_prunes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_shard(src / "a.parquet", 200, 1)
    out = str(tmp_path / "emb.lance")
    run_reindex(cfg(src, out))
    for i in range(3):
        write_shard(src / f"b{i}.parquet", 200, 10 + i)
    grown = run_reindex(cfg(src, out, growth_factor=2.0, keep_index_versions=1, compact=True))
    assert grown.index_action == "retrained" and "grew from 200 to 800" in grown.index_reason
    assert grown.compacted
    assert list_versions(default_index_uri(out)) == [grown.index_version]
    tags = lance.dataset(out).tags.list()
    assert set(tags) == {f"index-{grown.index_version}"}
    assert Corpus.open(out).rows == 800


def test_queries_during_reindex_never_fail_or_mix_versions(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_shard(src / "a.parquet", 400, 1)
    out = str(tmp_path / "emb.lance")
    run_reindex(cfg(src, out))
    old_ids = set(ids_of(out).tolist())
    query = np.random.default_rng(0).normal(size=(4, 256)).astype(np.float32)
    errors, results, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                corpus = Corpus.open(out)
                table = corpus.search(query, k=5)
                results.append((corpus.manifest.dataset_version, set(table["id"].to_pylist())))
            except Exception as exc:  # noqa: BLE001 — any error is a failure of the test
                errors.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for round_ in range(2):
            write_shard(src / f"n{round_}.parquet", 200, 100 + round_)
            run_reindex(cfg(src, out))
            os.remove(src / "a.parquet") if round_ == 1 else None
        run_reindex(cfg(src, out, allow_mass_remove=True))  # a.parquet was half the rows
    finally:
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert len({v for v, _ in results}) >= 2, "readers never saw a swap; make the test longer"
    by_version = {}
    for dataset_version, ids in results:
        allowed = by_version.setdefault(dataset_version, set(
            lance.dataset(out, version=dataset_version).to_table(columns=["id"])["id"].to_pylist()))
        assert ids <= allowed, f"an index built on dataset version {dataset_version} returned other rows"
    assert not old_ids & set(ids_of(out).tolist())  # shard a's rows are gone in the end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A real Ray head started with ``ray start --head`` on free ports, stopped afterwards."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    port, dash = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    # every port free and explicit: another Ray on this machine (this module's own) holds the defaults
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                    "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
                    f"--temp-dir={temp}", "--disable-usage-stats", *ports], check=True, env=env,
                   capture_output=True, timeout=180)
    try:
        yield {"bin": ray_bin, "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        _stop_head(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_head(temp: str) -> None:
    """Stop only this head's processes (`ray stop` would stop every Ray on the machine)."""

    def pids() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and temp.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 15
        while pids() and time.time() < deadline:
            time.sleep(0.2)


def test_embed_and_reindex_submitted_as_ray_jobs(ray_head, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_shard(src / "a.parquet", 100, 1)
    out = str(tmp_path / "emb.lance")

    def submit(*args: str) -> str:
        for _attempt in range(30):  # the head's job agent comes up a few seconds after `ray start`
            proc = subprocess.run(
                [ray_head["bin"], "job", "submit", "--address", ray_head["dashboard"], "--working-dir",
                 str(REPO), "--", "python", *args],
                env=ray_head["env"], capture_output=True, text=True, timeout=400,
            )
            if "No available agent" not in proc.stderr:
                break
            time.sleep(2)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    log = submit("pipelines/embed.py", "--input", str(src), "--output", out, "--no-progress")
    assert "embedded 100 rows from 1 shard(s)" in log
    write_shard(src / "b.parquet", 50, 2)
    log = submit("pipelines/reindex.py", "--input", str(src), "--dataset", out, "--no-progress")
    assert "1 added, 0 changed, 0 removed" in log
    np.testing.assert_array_equal(ids_of(out), expected({src / "a.parquet": 100, src / "b.parquet": 50}, out))
    assert read_manifest(default_index_uri(out)).rows == 150
