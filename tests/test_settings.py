"""A dataset remembers how it was made: later runs (embed.py appending, reindex.py) inherit every
setting, a conflicting flag is refused before anything is written, a shard lacking a kept column
is a shard error, ids never collide, and one index version per build."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import docstring_lines

from mrl_core import Corpus
from mrl_core.encoders import get_encoder
from mrl_core.index import build_index
from mrl_core.index_store import claim_version, default_index_uri, load_index, read_current, read_manifest
from mrl_core.ledger_store import LEGACY_PREFIX, ledger_files, read_ledger
from mrl_core.sources import list_shards
from mrl_core.storage import (
    INFO_KEY,
    PIPELINE_VERSION,
    derive_ids,
    embedding_arrays,
    legacy_shard_key,
    make_schema,
    read_info,
)
from pipelines import embed, reindex

LINES = docstring_lines(400)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield


def write_shard(path: Path, first: int, n: int, ids: range | None = None) -> pa.Table:
    """``n`` real docstring lines as ``body``, kept columns ``a`` (text) and ``b`` (int) and the
    user id column ``X``; ``first`` picks which lines."""
    ids = ids if ids is not None else range(first, first + n)
    table = pa.table({
        "body": LINES[first : first + n],
        "a": [f"a-{i}" for i in ids],
        "b": pa.array([i * 7 for i in ids], pa.int64()),
        "X": pa.array(list(ids), pa.int64()),
        "noise": ["unused"] * n,
    })
    pq.write_table(table, path)
    return table


MADE_WITH = ["--dtype", "float32", "--dims", "32,256", "--text-column", "body", "--keep", "a,b",
             "--id-column", "X", "--no-progress"]


def make(tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "in"
    src.mkdir()
    write_shard(src / "s1.parquet", 0, 40)
    write_shard(src / "s2.parquet", 40, 40)
    out = str(tmp_path / "out.lance")
    assert embed.main(["--input", str(src), "--output", out, *MADE_WITH]) == 0
    return src, out


def assert_rows_match_inputs(out: str, inputs: list[pa.Table]) -> None:
    """Every input record once: ids are the X column's, kept values as in the input, no nulls."""
    ds = lance.dataset(out)
    got = ds.to_table(columns=["id", "a", "b"]).sort_by("id")
    want = pa.concat_tables([t.select(["X", "a", "b"]) for t in inputs]).sort_by("X")
    assert got["id"].to_pylist() == want["X"].to_pylist()
    assert got["a"].to_pylist() == want["a"].to_pylist() and got["b"].to_pylist() == want["b"].to_pylist()
    assert got["a"].null_count == 0 and got["b"].null_count == 0
    assert ds.schema.field("emb_32").type == pa.list_(pa.float32(), 32)
    assert [f.name for f in ds.schema if f.name.startswith("emb_")] == ["emb_32", "emb_256"]


def assert_found_by_text(out: str, table: pa.Table) -> None:
    hits = Corpus.open(out, require_index=False).search(table["body"].to_pylist()[:5], k=1, exact=True)
    assert hits["id"].to_pylist() == table["X"].to_pylist()[:5]


@pytest.mark.parametrize("later", ["reindex", "embed"])
def test_a_later_run_with_no_flags_inherits_every_setting(tmp_path, later):
    src, out = make(tmp_path)
    info = read_info(lance.dataset(out))
    assert (info.settings.text_column, info.settings.keep, info.settings.id_column) == ("body", ("a", "b"), "X")
    assert info.settings.dims == (32, 256) and info.dtype == "float32" and info.kept_types == {
        "a": "string", "b": "int64"}
    s1 = pq.read_table(src / "s1.parquet")
    s2 = write_shard(src / "s2.parquet", 40, 20)  # shrunk: its last 20 records are gone
    s3 = write_shard(src / "s3.parquet", 100, 30)  # a new shard
    if later == "reindex":
        assert reindex.main(["--input", str(src), "--dataset", out, "--no-progress"]) == 0
        assert_rows_match_inputs(out, [s1, s2, s3])
    else:
        (src / "s2.parquet").unlink()  # embed.py only appends: leave the changed shard out
        assert embed.main(["--input", str(src), "--output", out, "--no-progress"]) == 0
        old_s2 = write_shard(tmp_path / "old.parquet", 40, 40)
        assert_rows_match_inputs(out, [s1, old_s2, s3])
    assert_found_by_text(out, s3)
    assert read_info(lance.dataset(out)).settings == info.settings


CONFLICTS = [
    (["--dtype", "float16"], "--dtype: the dataset has 'float32', this run asks for 'float16'"),
    (["--dims", "64,256"], "--dims: the dataset has 32,256, this run asks for 64,256"),
    (["--text-column", "a"], "--text-column: the dataset has 'body', this run asks for 'a'"),
    (["--keep", "a"], "--keep: the dataset has a,b, this run asks for a"),
    (["--id-column", "b"], "--id-column: the dataset has 'X', this run asks for 'b'"),
    (["--encoder", "wordllama-128"], "--encoder: the dataset has 'wordllama-256', this run asks for 'wordllama-128'"),
    (["--format", "jsonl"], "--format: the dataset has None, this run asks for 'jsonl'"),
    (["--max-record-bytes", "100"], "--max-record-bytes: the dataset has 1048576, this run asks for 100"),
    (["--encoder-option", "batch_tokens=64"], "--encoder-option: the dataset has (none), this run asks for"),
]


def test_a_conflicting_flag_is_refused_before_anything_is_written(tmp_path, capsys):
    src, out = make(tmp_path)
    write_shard(src / "s3.parquet", 100, 10)  # there is work to do: a refusal must stop it
    version = lance.dataset(out).version
    for flags, message in CONFLICTS:
        for job in ("embed", "reindex"):
            capsys.readouterr()
            if job == "embed":
                assert embed.main(["--input", str(src), "--output", out, "--no-progress", *flags]) == 1
            else:
                assert reindex.main(["--input", str(src), "--dataset", out, "--no-progress", *flags]) == 1
            assert message in capsys.readouterr().err, (job, flags)
            assert lance.dataset(out).version == version, (job, flags)
    # flags that agree (dims without the full dim, kept columns in another order) are accepted
    agree = ["--dtype", "float32", "--dims", "32", "--keep", "b,a", "--text-column", "body", "--no-progress"]
    assert embed.main(["--input", str(src), "--output", out, *agree]) == 0
    assert lance.dataset(out).count_rows() == 90


def test_a_shard_lacking_a_kept_column_is_a_shard_error_never_nulls(tmp_path, capsys):
    src, out = make(tmp_path)
    pq.write_table(write_shard(tmp_path / "full.parquet", 200, 5).drop_columns(["b"]), src / "s0.parquet")
    (src / "t.jsonl").write_text("".join(json.dumps({"body": f"line {i}", "a": "x", "X": 900 + i}) + "\n"
                                         for i in range(3)))
    rows = lance.dataset(out).count_rows()
    assert embed.main(["--input", str(src), "--output", out, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert ("s0.parquet" in err or "t.jsonl" in err) and "'b'" in err  # the first to fail stops the job
    assert lance.dataset(out).count_rows() == rows
    # with --on-error skip both bad shards are reported and left out of the ledger
    assert embed.main(["--input", str(src), "--output", out, "--no-progress", "--on-error", "skip"]) == 2
    ds = lance.dataset(out)
    assert ds.count_rows() == rows and set(read_ledger(ds)) == {str(src / "s1.parquet"), str(src / "s2.parquet")}
    assert ds.to_table(columns=["b"])["b"].null_count == 0


def test_duplicate_user_ids_across_shards_are_refused_naming_both(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_shard(src / "s1.parquet", 0, 10, ids=range(0, 10))
    write_shard(src / "s2.parquet", 10, 10, ids=range(5, 15))
    out = str(tmp_path / "out.lance")
    args = ["--input", str(src), "--output", out, "--text-column", "body", "--id-column", "X", "--no-progress"]
    assert embed.main(args) == 1
    err = capsys.readouterr().err
    assert "id 5 is in shard" in err and "s1.parquet" in err and "s2.parquet" in err
    assert not Path(out).exists()  # nothing written
    # --on-error skip: the later shard is reported and left out
    assert embed.main([*args, "--on-error", "skip"]) == 2
    assert set(read_ledger(lance.dataset(out))) == {str(src / "s1.parquet")}
    # a new shard repeating a committed row's id is refused too, naming the committed shard
    (src / "s2.parquet").unlink()
    write_shard(src / "s3.parquet", 20, 4, ids=range(9, 13))
    version = lance.dataset(out).version
    assert embed.main(args) == 1
    err = capsys.readouterr().err
    assert "id 9 of shard" in err and "s3.parquet" in err and "s1.parquet" in err
    assert lance.dataset(out).version == version


def legacy_dataset(src: Path, out: str) -> None:
    """A dataset exactly as pipeline version 1 wrote it: flat mrl.info, ids from a hash of the
    shard URI, ledger entries without keys."""
    encoder = get_encoder("wordllama-256", device="cpu")
    schema = make_schema((64, 128, 256), "float16", [pa.field("url", pa.string())])
    tables, ledger = [], {}
    for shard in list_shards(str(src)):
        table = pq.read_table(shard.uri)
        n = table.num_rows
        tables.append(pa.table({
            "id": derive_ids(legacy_shard_key(shard.uri), np.arange(n)), "shard": [shard.uri] * n,
            "url": table["url"], **embedding_arrays(encoder.encode(table["text"].to_pylist()), (64, 128, 256)),
        }, schema=schema))
        ledger[shard.uri] = {"rows": n, "skipped": 0, "version": shard.version, "committed_at": 0}
    ds = lance.write_dataset(pa.concat_tables(tables), out)
    old_info = {"encoder": "wordllama-256", "fingerprint": encoder.fingerprint, "full_dim": 256,
                "dims": [64, 128, 256], "trained_dims": [64, 128, 256], "dtype": "float16", "metric": "cosine",
                "normalized": True, "modality": "text", "pipeline_version": "1", "extra": {}}
    # pipeline 1 kept the ledger in one config key per shard
    ds.update_config({INFO_KEY: json.dumps(old_info), **{LEGACY_PREFIX + u: json.dumps(e) for u, e in ledger.items()}})


def test_a_dataset_from_before_recorded_settings_reindexes_once_told_its_text_column(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"text": LINES[i * 30 : i * 30 + 30], "url": [f"u{i}-{j}" for j in range(30)]}),
                       src / f"p{i}.parquet")
    out = str(tmp_path / "old.lance")
    legacy_dataset(src, out)
    info = read_info(lance.dataset(out))
    assert info.unknown == ("text_column",) and info.settings.keep == ("url",) and info.settings.id_column is None
    old_ids = sorted(lance.dataset(out).to_table(columns=["id"])["id"].to_pylist())
    pq.write_table(pa.table({"text": LINES[60:75], "url": [f"u2-{j}" for j in range(15)]}), src / "p2.parquet")
    version = lance.dataset(out).version
    assert reindex.main(["--input", str(src), "--dataset", out, "--no-progress"]) == 1
    assert "give --text-column once" in capsys.readouterr().err
    assert lance.dataset(out).version == version
    assert reindex.main(["--input", str(src), "--dataset", out, "--text-column", "text", "--no-progress"]) == 0
    ds = lance.dataset(out)
    info = read_info(ds)
    assert info.unknown == () and info.settings.text_column == "text" and info.pipeline_version == PIPELINE_VERSION
    # the per-key ledger moved into a ledger file, in one commit, every old shard with its key
    assert not [k for k in ds.config() if k.startswith(LEGACY_PREFIX)] and len(ledger_files(ds)) == 1
    assert set(read_ledger(ds)) == {str(src / f"p{i}.parquet") for i in range(3)}
    ids = ds.to_table(columns=["id"])["id"].to_pylist()
    assert len(ids) == 75 == len(set(ids)) and set(old_ids) <= set(ids)  # old rows kept their ids
    assert ds.to_table(columns=["url"])["url"].null_count == 0
    assert read_manifest(default_index_uri(out)).rows == 75
    assert reindex.main(["--input", str(src), "--dataset", out, "--no-progress"]) == 0  # inherited now


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_index_builds_each_get_their_own_version(tmp_path, where, corpus_writer, make_bucket,
                                                            s3_endpoint):
    opts = s3_endpoint["storage_options"] if where == "s3" else None
    base = make_bucket() if where == "s3" else str(tmp_path)
    uri = f"{base}/c.lance"
    vectors = np.random.default_rng(0).standard_normal((3000, 256)).astype(np.float32)
    corpus_writer(uri, vectors, storage_options=opts)
    index_uri = default_index_uri(uri)
    # the race itself: claimers that all listed the same versions get one version each
    claimed, lock = [], threading.Lock()
    start = threading.Barrier(6)

    def claim() -> None:
        start.wait()
        version = claim_version(index_uri, opts)
        with lock:
            claimed.append(version)

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == [f"v{i:06d}" for i in range(1, 7)]
    # two whole builds at once: two intact versions, CURRENT loadable all along
    results, errors = [], []

    def build() -> None:
        try:
            results.append(build_index(uri, storage_options=opts, funnel="paper", calibration_queries=20))
        except Exception as exc:  # noqa: BLE001 — a clear failure is allowed; collected below
            errors.append(exc)

    builders = [threading.Thread(target=build) for _ in range(2)]
    for t in builders:
        t.start()
    for t in builders:
        t.join()
    assert not errors and len({m.version for m in results}) == 2
    for manifest in results:
        index, loaded = load_index(index_uri, manifest.version, opts)  # checksum verified
        assert index.ntotal == 3000 and loaded.version == manifest.version
    assert read_current(index_uri, opts) in {m.version for m in results}
    assert Corpus.open(uri, opts).search(vectors[:2], k=1)["id"].to_pylist() == derive_ids(1, np.arange(2)).tolist()


def test_encoder_options_are_recorded_inherited_and_used_for_queries(tmp_path, make_static_dir):
    """An option that changes the embedding (truncation to 3 tokens): recorded with the dataset,
    part of its fingerprint, used by a later run and by Corpus for text queries."""
    model = make_static_dir(tmp_path / "static")
    words = [f"w{i}" for i in range(60)]
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=8)) for _ in range(40)]
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"text": lines[:20]}), src / "a.parquet")
    out = str(tmp_path / "o.lance")
    spec = f"static:{model}"
    assert embed.main(["--input", str(src), "--output", out, "--encoder", spec,
                       "--encoder-option", "max_tokens_per_text=3", "--no-progress"]) == 0
    info = read_info(lance.dataset(out))
    assert info.settings.encoder_options == {"max_tokens_per_text": 3}
    plain, cut = get_encoder(spec, device="cpu"), get_encoder(spec, device="cpu", max_tokens_per_text=3)
    assert info.fingerprint not in (plain.fingerprint, cut.fingerprint)  # options are in the fingerprint
    pq.write_table(pa.table({"text": lines[20:]}), src / "b.parquet")
    assert reindex.main(["--input", str(src), "--dataset", out, "--no-progress"]) == 0
    table = lance.dataset(out).to_table(columns=["shard", "emb_16"], filter=f"shard = '{src / 'b.parquet'}'")
    stored = np.stack(table["emb_16"].to_numpy(zero_copy_only=False)).astype(np.float32)
    want = cut.encode(lines[20:], dim=16)
    assert np.einsum("nd,nd->n", stored, want).min() > 0.999  # the new shard was cut at 3 tokens too
    corpus = Corpus.open(out)
    np.testing.assert_allclose(corpus.encode(lines[:2]), cut.encode(lines[:2]), atol=1e-6)
    other = ["--encoder", spec, "--encoder-option", "max_tokens_per_text=4", "--no-progress"]
    assert embed.main(["--input", str(src), "--output", out, *other]) == 1  # another option: refused
