"""The scheduled re-index never loses or corrupts: a failed, partial or mis-listed run leaves the
dataset and its index as they were. Each test is one finding of the re-index reliability review
(numbered as in RELIABILITY.md), broken on purpose."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from fsspec.implementations.local import LocalFileSystem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mrl_core import Corpus
from mrl_core.index_store import (
    CURRENT,
    MANIFEST,
    IndexDamagedError,
    default_index_uri,
    list_versions,
    read_current,
    read_manifest,
)
from mrl_core.lease import LeaseHeldError, acquire_lease, lease_uri
from mrl_core.ledger_store import read_ledger
from mrl_core.storage import StorageError, rename_shards
from pipelines import reindex
from pipelines.embed import EmbedConfig, EmbedError, run_embed
from pipelines.reindex import ReindexConfig, ReindexRefused, run_reindex

REPO = Path(__file__).resolve().parents[1]
WORDS = ["vector", "search", "index", "matryoshka", "nested", "embedding", "lance", "ray", "shard", "encoder",
         "query", "funnel", "prefix", "recall", "cosine", "tier", "rerank", "fragment", "ledger", "commit"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(5, 14))) + f" s{seed} r{i}" for i in range(n)]


def write_shard(path: Path, n: int, seed: int, **extra) -> list[str]:
    rows = texts(n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": rows, **extra}), path)
    return rows


def cfg(src: Path | str, out: str, **kw) -> ReindexConfig:
    return ReindexConfig(input=str(src), dataset=out, progress=False, settings=kw.pop("settings", None), **kw)


def snapshot(out: str) -> tuple[list, dict]:
    """Every row (id, shard, text, full-dim vector bytes) and the ledger (without times)."""
    ds = lance.dataset(out)
    table = ds.to_table(columns=["id", "shard", "text", "emb_256"]).sort_by("id")
    rows = list(zip(table["id"].to_pylist(), table["shard"].to_pylist(), table["text"].to_pylist(),
                    [bytes(np.asarray(v, np.float16).tobytes()) for v in table["emb_256"].to_pylist()]))
    ledger = {u: {k: v for k, v in e.items() if k != "committed_at"} for u, e in read_ledger(ds).items()}
    return rows, ledger


def make(tmp_path: Path, shards: int = 3, rows: int = 60) -> tuple[Path, str]:
    src = tmp_path / "in"
    for i in range(shards):
        write_shard(src / f"s{i}.parquet", rows, i)
    out = str(tmp_path / "emb.lance")
    run_reindex(cfg(src, out, settings={"keep": ("text",)}))
    return src, out


def found_by_own_text(out: str, funnel: bool) -> int:
    """How many rows the search finds by their own text at rank 1."""
    table = lance.dataset(out).to_table(columns=["id", "text"])
    corpus = Corpus.open(out)
    hits = corpus.search(table["text"].to_pylist(), k=1, exact=not funnel)
    return int((hits["id"].to_numpy() == table["id"].to_numpy()).sum())


# 1. ------------------------------------------------------------------------------------------------


def test_1_a_failed_run_leaves_a_changed_shards_committed_rows_as_they_were(tmp_path):
    src, out = make(tmp_path)
    before = snapshot(out)
    data = (src / "s1.parquet").read_bytes()
    (src / "s1.parquet").write_bytes(data[: len(data) // 2])  # half-uploaded: changed, unreadable
    with pytest.raises(EmbedError, match="s1.parquet"):
        run_reindex(cfg(src, out))
    assert snapshot(out) == before  # its 60 committed rows are still there, untouched
    summary = run_reindex(cfg(src, out, on_error="skip"))  # skipped: reported, old rows kept
    assert summary.shards_changed == [str(src / "s1.parquet")] and snapshot(out) == before


# 2. ------------------------------------------------------------------------------------------------


def test_2_an_unlistable_directory_stops_the_run_and_removes_nothing(tmp_path, monkeypatch):
    src = tmp_path / "in"
    for part in ("p1", "p2", "p3"):
        for i in range(2):
            write_shard(src / part / f"{part}-{i}.parquet", 30, hash((part, i)) % 1000)
    out = str(tmp_path / "emb.lance")
    run_reindex(cfg(src, out, settings={"keep": ("text",)}))
    before, current = snapshot(out), read_current(default_index_uri(out))
    listing = LocalFileSystem.ls

    def ls(self, path, detail=True, **kw):
        if str(path).rstrip("/").endswith("p2"):
            raise PermissionError(13, "Permission denied", str(path))
        return listing(self, path, detail=detail, **kw)

    monkeypatch.setattr(LocalFileSystem, "ls", ls)
    with pytest.raises(PermissionError, match="p2"):
        run_reindex(cfg(src, out))
    monkeypatch.setattr(LocalFileSystem, "ls", listing)
    assert snapshot(out) == before and read_current(default_index_uri(out)) == current

    # a committed shard the listing does not return but that exists is never removed
    with pytest.raises(ReindexRefused, match="exist but were not listed"):
        run_reindex(cfg(f"{src}/p[13]/*.parquet", out, allow_mass_remove=True))
    assert snapshot(out) == before
    # shards really gone: more than --max-remove-fraction is refused, unless allowed
    shutil.rmtree(src / "p3")
    with pytest.raises(ReindexRefused, match="more than --max-remove-fraction"):
        run_reindex(cfg(src, out))
    assert snapshot(out) == before
    summary = run_reindex(cfg(src, out, allow_mass_remove=True))
    assert summary.rows_removed == 60 and lance.dataset(out).count_rows() == 120


# 3. ------------------------------------------------------------------------------------------------


def test_3_the_index_follows_the_dataset_not_a_failed_runs_memory(tmp_path):
    src, out = make(tmp_path)
    table = pq.read_table(src / "s1.parquet")
    edited = table["text"].to_pylist()
    for i in range(50):
        edited[i] = " ".join(reversed(edited[i].split())) + " edited"
    pq.write_table(pa.table({"text": edited}), src / "s1.parquet")  # same row count, 50 rows edited
    # a re-index that embeds the changed shard and dies before it updates the index
    run_embed(EmbedConfig(input=str(src), output=out, progress=False, replace_changed=True))
    manifest = read_manifest(default_index_uri(out))
    assert manifest.dataset_version < lance.dataset(out).version  # the index is behind the dataset
    summary = run_reindex(cfg(src, out))
    assert summary.index_action == "added" and summary.rows_removed_from_index == 60
    assert summary.rows_added_to_index == 60
    exact, funnel = found_by_own_text(out, funnel=False), found_by_own_text(out, funnel=True)
    assert funnel == exact == lance.dataset(out).count_rows()


# 4. ------------------------------------------------------------------------------------------------


def test_4_one_file_is_one_shard_whatever_the_spelling_and_a_moved_root_keeps_its_rows(tmp_path, monkeypatch):
    src, out = make(tmp_path)
    before = snapshot(out)
    monkeypatch.chdir(tmp_path)
    for spelling in (f"file://{src}", "./in", "in/", f"{tmp_path}//in"):
        summary = run_embed(EmbedConfig(input=spelling, output=out, progress=False))
        assert summary.rows_written == 0 and summary.shards_skipped_committed == 3, spelling
        assert run_reindex(cfg(spelling, out)).nothing_to_do, spelling
    assert snapshot(out) == before and len(read_ledger(lance.dataset(out))) == 3
    # a ledger written with another spelling (an older version wrote file:// URIs) is renamed, not re-embedded
    ds = lance.dataset(out)
    rename_shards(ds, {u: f"file://{u}" for u in read_ledger(ds)})
    summary = run_reindex(cfg(src, out))
    assert summary.rows_embedded == 0 and summary.rows_renamed == 180 and not summary.shards_removed
    assert [r[0] for r in snapshot(out)[0]] == [r[0] for r in before[0]]
    # the input directory moved: without --rebase nothing is lost, with it rows and ids are kept
    moved = tmp_path / "moved"
    shutil.move(src, moved)
    with pytest.raises(ReindexRefused, match="max-remove-fraction"):
        run_reindex(cfg(moved, out))
    summary = run_reindex(cfg(moved, out, rebase=(str(src), str(moved))))
    assert summary.rows_embedded == 0 and summary.rows_renamed == 180 and not summary.shards_removed
    rows, ledger = snapshot(out)
    assert [(r[0], r[2], r[3]) for r in rows] == [(r[0], r[2], r[3]) for r in before[0]]
    assert set(ledger) == {str(moved / f"s{i}.parquet") for i in range(3)}
    assert found_by_own_text(out, funnel=True) == 180


# 5. ------------------------------------------------------------------------------------------------


def test_5_two_writers_never_double_rows(tmp_path):
    src, out = make(tmp_path, shards=2)
    write_shard(src / "s9.parquet", 40, 9)
    before = snapshot(out)
    with acquire_lease(out):  # another run holds the dataset
        with pytest.raises(LeaseHeldError, match=f"pid {__import__('os').getpid()}"):
            run_embed(EmbedConfig(input=str(src), output=out, progress=False))
        with pytest.raises(LeaseHeldError):
            run_reindex(cfg(src, out))
    assert snapshot(out) == before
    # a crashed holder on this host (its pid is gone) does not block the next run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"token": "x", "host": socket.gethostname(), "pid": int(dead.stdout), "acquired_at": time.time(),
             "expires_at": time.time() + 600}
    root = Path(lease_uri(out))
    root.mkdir(parents=True, exist_ok=True)
    (root / "g000007").write_text(json.dumps(stale))
    assert run_embed(EmbedConfig(input=str(src), output=out, progress=False)).rows_written == 40
    # two whole embed jobs at once: one refuses, every row once
    write_shard(src / "s10.parquet", 40, 10)
    script = ["-m", "pipelines.embed", "--input", str(src), "--output", out, "--no-progress"]
    jobs = [subprocess.Popen([sys.executable, *script], cwd=REPO, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(job.wait(timeout=300), job.stderr.read()) for job in jobs]
    assert sorted(code for code, _ in results) == [0, 1], results
    assert any("being written by another run" in err for _, err in results)
    ids = lance.dataset(out).to_table(columns=["id"])["id"].to_numpy()
    assert len(ids) == len(set(ids.tolist())) == 60 + 60 + 40 + 40


# 6. ------------------------------------------------------------------------------------------------


def test_6_empty_shards_are_recorded_and_nothing_to_do_writes_nothing(tmp_path):
    src, out = make(tmp_path, shards=2)
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), src / "empty.parquet")
    run_reindex(cfg(src, out))
    assert read_ledger(lance.dataset(out))[str(src / "empty.parquet")]["rows"] == 0
    version, index = lance.dataset(out).version, list_versions(default_index_uri(out))
    ray.shutdown()
    try:
        summary = run_reindex(cfg(src, out))
        assert summary.nothing_to_do and not ray.is_initialized()  # no Ray started
    finally:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    assert lance.dataset(out).version == version and list_versions(default_index_uri(out)) == index
    assert not list(Path(lease_uri(out)).glob("g*"))  # and no lease left behind


# 7, 8. ---------------------------------------------------------------------------------------------


def test_8_kept_types_come_from_the_dataset_and_a_misfit_is_a_named_shard_error(tmp_path):
    src = tmp_path / "in"
    (src).mkdir()
    (src / "a.parquet").write_bytes(b"PAR1 not parquet at all")  # corrupt, listed first
    write_shard(src / "b.parquet", 20, 2, url=pa.array(range(20), pa.int64()))
    out = str(tmp_path / "emb.lance")
    with pytest.raises(EmbedError, match="a.parquet"):
        run_reindex(cfg(src, out, settings={"keep": ("url",)}))
    run_reindex(cfg(src, out, settings={"keep": ("url",)}, on_error="skip"))
    ds = lance.dataset(out)
    assert ds.schema.field("url").type == pa.int64() and set(read_ledger(ds)) == {str(src / "b.parquet")}
    (src / "a.parquet").unlink()
    write_shard(src / "c.parquet", 20, 3, url=[f"text-{i}" for i in range(20)])  # another type
    with pytest.raises(EmbedError, match="c.parquet"):
        run_reindex(cfg(src, out))
    summary = run_reindex(cfg(src, out, on_error="skip"))
    assert summary.shards_new == [str(src / "c.parquet")] and lance.dataset(out).count_rows() == 20


# 9. ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated manifest", "tier0 deleted", "tier0 outside", "no checksum",
                                    "current names a missing version"])
def test_9_damaged_index_artifacts_are_named_and_rebuilt(tmp_path, damage):
    src, out = make(tmp_path, shards=2)
    index_uri = default_index_uri(out)
    version = read_current(index_uri)
    folder = Path(index_uri) / version
    manifest = json.loads((folder / MANIFEST).read_text())
    if damage == "truncated manifest":
        (folder / MANIFEST).write_text(json.dumps(manifest)[:200])
        named = MANIFEST
    elif damage == "tier0 deleted":
        (folder / manifest["tier0_file"]).unlink()
        named = manifest["tier0_file"]
    elif damage == "tier0 outside":
        (folder / MANIFEST).write_text(json.dumps({**manifest, "tier0_file": "../v000001/tier0.faiss"}))
        named = "not a file of its own version directory"
    elif damage == "no checksum":
        (folder / MANIFEST).write_text(json.dumps({**manifest, "tier0_sha256": ""}))
        named = "no valid checksum"
    else:
        (Path(index_uri) / CURRENT).write_text("v000099\n")
        named = "CURRENT names v000099"
    with pytest.raises(IndexDamagedError, match="python pipelines/index.py --dataset") as caught:
        Corpus.open(out)
    assert named in str(caught.value)
    summary = run_reindex(cfg(src, out))  # nothing else changed: the damage alone makes it rebuild
    assert summary.index_action == "retrained" and "damaged" in summary.index_reason
    assert found_by_own_text(out, funnel=True) == 120


# 10. -----------------------------------------------------------------------------------------------


def test_10_query_vectors_are_normalised_in_float64_and_checked(tmp_path):
    src, out = make(tmp_path, shards=1)
    corpus = Corpus.open(out)
    vectors = np.stack(lance.dataset(out).to_table(columns=["emb_256"])["emb_256"].to_numpy(zero_copy_only=False))
    unit = vectors[:5].astype(np.float64)
    expected = corpus.search(unit, k=3)
    for scale in (1e20, 1e-25, 1e200, 1e-200):
        got = corpus.search(unit * scale, k=3)
        assert got["id"].to_pylist() == expected["id"].to_pylist(), scale
        np.testing.assert_allclose(got["score"].to_numpy(), expected["score"].to_numpy(), atol=1e-6)
    with pytest.raises(TypeError, match="complex"):
        corpus.search(unit + 1j, k=3)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="batch_size"):
            corpus.search(unit, k=3, batch_size=bad)


def test_10_an_index_of_a_tiny_dataset_builds_and_searches(tmp_path):
    src = tmp_path / "in"
    write_shard(src / "tiny.parquet", 10, 1)
    out = str(tmp_path / "tiny.lance")
    run_embed(EmbedConfig(input=str(src), output=out, progress=False))
    result = subprocess.run([sys.executable, "pipelines/index.py", "--dataset", out], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    corpus = Corpus.open(out)
    queries = texts(10, 1)
    assert corpus.search(queries, k=3)["id"].to_pylist() == corpus.search(queries, k=3, exact=True)["id"].to_pylist()


# 11. -----------------------------------------------------------------------------------------------


def test_11_an_output_that_is_not_a_dataset_is_refused_and_literal_brackets_work(tmp_path):
    src = tmp_path / "in[1]"
    write_shard(src / "a[2].parquet", 20, 1)
    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match="not a Lance dataset"):
        run_embed(EmbedConfig(input=str(src / "a[2].parquet"), output=str(mine), progress=False))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    out = str(tmp_path / "emb.lance")
    assert run_embed(EmbedConfig(input=str(src / "a[2].parquet"), output=out, progress=False)).rows_written == 20
    assert reindex.main(["--input", str(src), "--dataset", out, "--no-progress"]) == 0


# property --------------------------------------------------------------------------------------------

STEPS = st.lists(st.sampled_from(["add", "change", "remove", "corrupt", "rerun"]), min_size=2, max_size=3)


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=STEPS, seed=st.integers(0, 10_000))
def test_any_sequence_of_changes_and_failures_leaves_the_dataset_equal_to_its_input(tmp_path_factory, steps,
                                                                                        seed):
    """After each good run the dataset holds exactly the inputs' records; after each failed run it
    is what it was before; the funnel finds every row by its text as often as exact search."""
    tmp = tmp_path_factory.mktemp("seq")
    src, out = tmp / "in", str(tmp / "emb.lance")
    rng = np.random.default_rng(seed)
    for i in range(3):
        write_shard(src / f"s{i}.parquet", 25, seed * 10 + i)
    run_reindex(cfg(src, out, settings={"keep": ("text",)}, allow_mass_remove=True))
    counter = 3
    for step in steps:
        shards = sorted(src.glob("*.parquet"))
        before = snapshot(out)
        if step == "add":
            write_shard(src / f"s{counter}.parquet", int(rng.integers(5, 30)), seed * 10 + counter)
            counter += 1
        elif step == "change" and shards:
            write_shard(shards[rng.integers(len(shards))], int(rng.integers(5, 30)), seed * 10 + counter)
            counter += 1
        elif step == "remove" and len(shards) > 1:
            shards[rng.integers(len(shards))].unlink()
        elif step == "corrupt" and shards:
            victim = shards[rng.integers(len(shards))]
            good = victim.read_bytes()
            victim.write_bytes(good[: len(good) // 3])
            with pytest.raises(EmbedError):
                run_reindex(cfg(src, out, allow_mass_remove=True))
            assert snapshot(out) == before  # a failed run changes nothing
            victim.write_bytes(good)  # the upload completes
        run_reindex(cfg(src, out, allow_mass_remove=True))
        rows, ledger = snapshot(out)
        inputs = {str(p): pq.read_table(p)["text"].to_pylist() for p in sorted(src.glob("*.parquet"))}
        assert set(ledger) == set(inputs)
        assert sorted((r[1], r[2]) for r in rows) == sorted((s, t) for s, ts in inputs.items() for t in ts)
        assert found_by_own_text(out, funnel=True) == found_by_own_text(out, funnel=False) == len(rows)
