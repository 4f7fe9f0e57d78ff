"""The shard ledger in files: the manifest stays small at any shard count, versions keep their own
ledger, a crash between the file and the commit changes nothing, old per-key ledgers migrate."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from mrl_core import ledger_store
from mrl_core.dataset import prepare_output
from mrl_core.ledger_store import COMPACT_EVERY, LEDGER_DIR, LEGACY_PREFIX, ledger_files, read_ledger, record
from mrl_core.storage import INFO_KEY, StorageError


def entry(i: int) -> dict:
    return {"rows": 100 + i, "skipped": 0, "version": f"etag-{i}", "key": i + 1, "committed_at": 0.0}


def new_dataset(uri: str, storage_options: dict | None = None) -> lance.LanceDataset:
    return lance.write_dataset(pa.table({"id": pa.array(np.arange(3), pa.int64())}), uri,
                               storage_options=storage_options)


def latest_manifest_bytes(uri: str) -> int:
    manifests = sorted(Path(uri, "_versions").glob("*.manifest"), key=lambda p: p.stat().st_mtime_ns)
    return manifests[-1].stat().st_size


def test_entries_round_trip_replace_and_remove(tmp_path):
    ds = new_dataset(str(tmp_path / "d.lance"))
    assert read_ledger(ds) == {} and ledger_files(ds) == []
    record(ds, {"a": entry(0), "b": entry(1)})
    record(ds, {"b": entry(2), "c": entry(3)})  # b replaced
    record(ds, {"a": None})  # a removed
    fresh = lance.dataset(ds.uri)
    assert read_ledger(fresh) == {"b": entry(2), "c": entry(3)}
    assert len(ledger_files(fresh)) == 3 and fresh.version == ds.version
    record(ds, {})  # nothing to record: no new version
    assert lance.dataset(ds.uri).version == fresh.version


def test_the_manifest_does_not_grow_with_the_shards(tmp_path):
    uri = str(tmp_path / "d.lance")
    ds = new_dataset(uri)
    empty = latest_manifest_bytes(uri)
    record(ds, {f"s3://bucket/corpus/part-{i:06d}.parquet": entry(i) for i in range(5000)})
    record(ds, {"s3://bucket/corpus/one-more.parquet": entry(5000)})
    assert latest_manifest_bytes(uri) < empty + 1024  # one config key per shard: ~850 KB here
    assert len(read_ledger(lance.dataset(uri))) == 5001


def test_each_version_keeps_its_own_ledger(tmp_path):
    ds = new_dataset(str(tmp_path / "d.lance"))
    record(ds, {"a": entry(0)})
    before = ds.version
    record(ds, {"a": None, "b": entry(1)})
    assert read_ledger(lance.dataset(ds.uri, version=before)) == {"a": entry(0)}
    assert read_ledger(lance.dataset(ds.uri)) == {"b": entry(1)}


def test_files_are_compacted_into_one(tmp_path):
    ds = new_dataset(str(tmp_path / "d.lance"))
    expected = {}
    for i in range(COMPACT_EVERY + 3):
        update = {f"s{i}": entry(i), **({f"s{i - 5}": None} if i % 7 == 6 else {})}
        record(ds, update)
        for shard, e in update.items():
            if e is None:
                expected.pop(shard, None)
            else:
                expected[shard] = e
        files = ledger_files(ds)
        assert 1 <= len(files) < COMPACT_EVERY
        assert read_ledger(lance.dataset(ds.uri)) == expected
    assert len(ledger_files(ds)) == 4  # compacted once, then three more files


def test_a_crash_between_the_file_and_the_commit_changes_nothing(tmp_path, monkeypatch):
    uri = str(tmp_path / "d.lance")
    ds = new_dataset(uri)
    record(ds, {"a": entry(0)})
    version = ds.version

    def crash(*args, **kwargs):
        raise OSError("killed before the config commit")

    monkeypatch.setattr(lance.LanceDataset, "update_config", crash)
    with pytest.raises(OSError, match="killed"):
        record(ds, {"a": None, "b": entry(1)})
    monkeypatch.undo()
    fresh = lance.dataset(uri)
    assert fresh.version == version and read_ledger(fresh) == {"a": entry(0)}
    assert len(list(Path(uri, LEDGER_DIR).iterdir())) == 2  # the orphan file, named by no version
    record(fresh, {"b": entry(1)})
    assert read_ledger(lance.dataset(uri)) == {"a": entry(0), "b": entry(1)}


def test_a_per_key_ledger_is_read_and_moved_into_a_file_in_one_commit(tmp_path):
    ds = new_dataset(str(tmp_path / "d.lance"))
    ds.update_config({LEGACY_PREFIX + "old-a": json.dumps(entry(0)), LEGACY_PREFIX + "old-b": json.dumps(entry(1))})
    assert read_ledger(ds) == {"old-a": entry(0), "old-b": entry(1)}
    version = ds.version
    record(ds, {"old-b": None, "new": entry(2)})
    fresh = lance.dataset(ds.uri)
    assert fresh.version == version + 1
    assert not [k for k in fresh.config() if k.startswith(LEGACY_PREFIX)]
    assert read_ledger(fresh) == {"old-a": entry(0), "new": entry(2)} and len(ledger_files(fresh)) == 1


def test_a_missing_ledger_file_is_named(tmp_path):
    ds = new_dataset(str(tmp_path / "d.lance"))
    record(ds, {"a": entry(0)})
    (Path(ds.uri, LEDGER_DIR) / ledger_files(ds)[0]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"ledger file .*{ledger_files(ds)[0]} named by dataset .* missing"):
        read_ledger(lance.dataset(ds.uri))


def test_on_s3_with_the_datasets_own_storage_options(make_bucket, s3_endpoint):
    opts = s3_endpoint["storage_options"]
    uri = f"{make_bucket()}/d.lance"
    ds = new_dataset(uri, opts)
    record(lance.dataset(uri, storage_options=opts), {"a": entry(0)})
    record(lance.dataset(uri, storage_options=opts), {"b": entry(1)})
    assert read_ledger(lance.dataset(uri, storage_options=opts)) == {"a": entry(0), "b": entry(1)}
    assert ledger_store.objectstore.list_names(f"{uri}/{LEDGER_DIR}", opts) == ledger_files(lance.dataset(
        uri, storage_options=opts))
    assert ds.version == 1


def test_a_dataset_from_a_newer_pipeline_is_refused_before_any_write(tmp_path, corpus_writer):
    uri = str(tmp_path / "d.lance")
    ds = corpus_writer(uri, np.random.default_rng(0).standard_normal((10, 256)).astype(np.float32))
    info = json.loads(ds.config()[INFO_KEY])
    ds.update_config({INFO_KEY: json.dumps({**info, "pipeline_version": "99"})})
    version = lance.dataset(uri).version
    with pytest.raises(StorageError, match=r"written by a newer mrl-embed \(pipeline version 99"):
        prepare_output(uri, None)
    assert lance.dataset(uri).version == version


def test_lance_maintenance_leaves_the_ledger_alone(tmp_path):
    """compact_files (the re-index's --compact) and cleanup_old_versions know nothing of _mrl/."""
    from datetime import timedelta

    uri = str(tmp_path / "d.lance")
    ds = new_dataset(uri)
    for i in range(3):
        lance.write_dataset(pa.table({"id": pa.array([10 + i], pa.int64())}), uri, mode="append")
        record(lance.dataset(uri), {f"s{i}": entry(i)})
    lance.dataset(uri).optimize.compact_files()
    lance.dataset(uri).cleanup_old_versions(older_than=timedelta(0), delete_unverified=True)
    fresh = lance.dataset(uri)
    assert read_ledger(fresh) == {f"s{i}": entry(i) for i in range(3)} and fresh.count_rows() == 6
    assert ds.version == 1
