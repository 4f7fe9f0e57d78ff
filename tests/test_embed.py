"""The embed job end to end on a real local Ray: local files, moto's S3, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
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

from mrl_core.encoders import get_encoder
from mrl_core.ledger_store import read_ledger
from mrl_core.settings import EmbedSettings
from mrl_core.storage import derive_ids, emb_column, ids_of_rows, read_info
from pipelines.embed import EmbedConfig, EmbedError, main, run_embed

REPO = Path(__file__).resolve().parents[1]
WORDS = ["vector", "search", "index", "matryoshka", "nested", "embedding", "lance", "ray", "shard", "encoder", "query"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) + f" #{seed}-{i}" for i in range(n)]


def write_parquet(path: Path, n: int, seed: int, **extra) -> list[str]:
    t = texts(n, seed)
    pq.write_table(pa.table({"text": t, "url": [f"https://x/{seed}/{i}" for i in range(n)], **extra}), path)
    return t


def ids_of(uri: str, storage_options=None) -> np.ndarray:
    return np.sort(lance.dataset(uri, storage_options=storage_options).to_table(columns=["id"])["id"].to_numpy())


def expected_ids(shards: dict[str, int], out: str, storage_options=None) -> np.ndarray:
    """Every record's id once: each shard's ledger key in the high bits, its position below."""
    ds = lance.dataset(out, storage_options=storage_options)
    return np.sort(np.concatenate([ids_of_rows(ds, uri, np.arange(n)) for uri, n in shards.items()]))


def test_local_end_to_end_all_formats(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    corpus = write_parquet(src / "a.parquet", 300, 1)
    write_parquet(src / "b.parquet", 200, 2)
    (src / "c.jsonl").write_text("\n".join(json.dumps({"text": t, "url": "j"}) for t in texts(50, 3)) + "\n")
    (src / "d.txt").write_text("\n".join(texts(40, 4)) + "\n")
    out = str(tmp_path / "out.lance")

    # every format has the text: keeping the text column itself works for all four
    summary = run_embed(EmbedConfig(input=str(src), output=out, settings=EmbedSettings(keep=("text",)),
                                    commit_every=2, progress=False))

    assert summary.rows_written == 590 and summary.shards_done == 4 and not summary.shards_failed
    ds = lance.dataset(out)
    assert ds.schema.names == ["id", "shard", "text", "emb_64", "emb_128", "emb_256"]
    assert ds.schema.field("emb_64").type == pa.list_(pa.float16(), 64)
    sizes = {str(src / "a.parquet"): 300, str(src / "b.parquet"): 200, str(src / "c.jsonl"): 50,
             str(src / "d.txt"): 40}
    kept = ds.to_table(columns=["id", "text"], filter=f"shard = '{src / 'a.parquet'}'")
    by_id = dict(zip(kept["id"].to_pylist(), kept["text"].to_pylist()))
    a_ids = ids_of_rows(ds, str(src / "a.parquet"), np.arange(300))
    assert [by_id[int(i)] for i in a_ids] == corpus  # the stored text is the embedded one
    np.testing.assert_array_equal(ids_of(out), expected_ids(sizes, out))
    # each stored prefix is the encoder's prefix, normalised on its own
    table = ds.to_table(filter=f"shard = '{src / 'a.parquet'}'")
    order = np.argsort(table["id"].to_numpy())
    reference = get_encoder("wordllama-256", device="cpu").encode(corpus)
    for d in (64, 128, 256):
        stored = np.stack(table[emb_column(d)].to_numpy(zero_copy_only=False))[order].astype(np.float32)
        np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=2e-3)
        ref = reference[:, :d] / np.linalg.norm(reference[:, :d], axis=1, keepdims=True)
        assert (stored * ref).sum(1).min() > 0.999
    info = read_info(ds)
    assert info.encoder == "wordllama-256" and info.dims == (64, 128, 256) and info.metric == "cosine"
    assert info.fingerprint == get_encoder("wordllama-256").fingerprint
    assert set(read_ledger(ds)) == set(sizes)

    # a second run finds everything committed and writes nothing
    again = run_embed(EmbedConfig(input=str(src), output=out, progress=False))  # settings: the dataset's
    assert again.rows_written == 0 and again.shards_skipped_committed == 4
    np.testing.assert_array_equal(ids_of(out), expected_ids(sizes, out))

    # a new shard is added exactly once
    write_parquet(src / "e.parquet", 30, 5)
    assert run_embed(EmbedConfig(input=str(src), output=out, progress=False)).rows_written == 30
    np.testing.assert_array_equal(ids_of(out), expected_ids({**sizes, str(src / "e.parquet"): 30}, out))

    # LanceDB opens the output and searches an emb_<d> column
    import lancedb

    tbl = lancedb.connect(str(tmp_path)).open_table("out")
    hits = tbl.search(reference[0, :64] / np.linalg.norm(reference[0, :64]), vector_column_name="emb_64") \
        .metric("cosine").limit(3).to_arrow()
    assert hits["id"][0].as_py() == ids_of_rows(lance.dataset(out), str(src / "a.parquet"), np.array([0]))[0]


def test_staged_layout_matches_the_fused_cpu_layout(tmp_path):
    """``gpus_per_actor=0`` runs the GPU layout (tokenising tasks -> encoder actors -> writing
    tasks) on the CPU; it must write what the default one-task-per-shard layout writes."""
    src = tmp_path / "in"
    src.mkdir()
    write_parquet(src / "a.parquet", 120, 1)
    pq.write_table(pa.table({"text": ["fine", None, "  ", "also fine"], "url": list("abcd")}), src / "b.parquet")
    outs = {}
    for name, gpus in (("fused", None), ("staged", 0.0)):
        out = str(tmp_path / f"{name}.lance")
        summary = run_embed(EmbedConfig(input=str(src), output=out, settings=EmbedSettings(keep=("url",)),
                                        gpus_per_actor=gpus,
                                        batch_rows=50, progress=False))
        assert summary.rows_written == 122 and summary.records_skipped == 2 and summary.shards_done == 2
        table = lance.dataset(out).to_table()
        outs[name] = table.sort_by("id")
    assert outs["fused"]["id"].equals(outs["staged"]["id"]) and outs["fused"]["url"].equals(outs["staged"]["url"])
    for d in (64, 128, 256):
        np.testing.assert_array_equal(np.stack(outs["fused"][emb_column(d)].to_numpy(zero_copy_only=False)),
                                      np.stack(outs["staged"][emb_column(d)].to_numpy(zero_copy_only=False)))


def test_refuses_to_mix_encoders(tmp_path):
    write_parquet(tmp_path / "a.parquet", 20, 1)
    out = str(tmp_path / "o.lance")
    run_embed(EmbedConfig(input=str(tmp_path / "a.parquet"), output=out, progress=False))
    write_parquet(tmp_path / "b.parquet", 20, 2)
    conflict = "--encoder: the dataset has 'wordllama-256', this run asks for 'wordllama-128'"
    with pytest.raises(ValueError, match=conflict):
        run_embed(EmbedConfig(input=str(tmp_path), output=out, settings=EmbedSettings(encoder="wordllama-128"),
                              progress=False))
    assert lance.dataset(out).count_rows() == 20


def test_float32_and_explicit_dims(tmp_path):
    write_parquet(tmp_path / "a.parquet", 10, 1)
    out = str(tmp_path / "o.lance")
    run_embed(EmbedConfig(input=str(tmp_path), output=out, settings=EmbedSettings(dims=(16, 32), dtype="float32"),
                          progress=False))
    ds = lance.dataset(out)
    assert [n for n in ds.schema.names if n.startswith("emb_")] == ["emb_16", "emb_32", "emb_256"]
    assert ds.schema.field("emb_16").type == pa.list_(pa.float32(), 16)


def test_bad_records_are_skipped_and_reported_by_shard_and_row(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    huge = "word " * (2 * 1024 * 1024)  # 10 MB
    pq.write_table(pa.table({"text": ["good one", None, "", "   ", "good two", huge]}), src / "a.parquet")
    lines = [b'{"text": "fine"}', b'{"text": "bad \xff\xfe utf8"}', b"not json", b'["a list"]', b'{"text": "ok"}']
    (src / "b.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (src / "c.txt").write_bytes(b"alpha\n\xc3\x28 broken\nbeta\n")
    out = str(tmp_path / "o.lance")

    summary = run_embed(EmbedConfig(input=str(src), output=out, progress=False))

    assert summary.rows_written == 2 + 2 + 2
    skipped = {(Path(s).name, p): r for s, p, r in summary.skipped_examples}
    assert skipped[("a.parquet", 1)] == "null text"
    assert skipped[("a.parquet", 2)] == skipped[("a.parquet", 3)] == "empty text"
    assert "over the 1048576-byte limit" in skipped[("a.parquet", 5)]
    assert skipped[("b.jsonl", 1)].startswith("invalid UTF-8")
    assert skipped[("b.jsonl", 2)].startswith("invalid JSON")
    assert "expected an object" in skipped[("b.jsonl", 3)]
    assert skipped[("c.txt", 1)].startswith("invalid UTF-8")
    assert summary.records_skipped == 8
    ds = lance.dataset(out)
    recorded = json.loads(ds.config()["mrl.skipped"])
    assert recorded["records_skipped"] == 8
    # skipped records never block completion: every shard is in the ledger
    assert len(read_ledger(ds)) == 3
    kept = ids_of(out)
    a = str(src / "a.parquet")
    assert set(ids_of_rows(ds, a, np.array([0, 4]))) <= set(kept)
    assert not set(ids_of_rows(ds, a, np.array([1, 2, 3, 5]))) & set(kept)


def test_corrupt_shard_fails_by_default_and_keeps_committed_shards(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_parquet(src / "a.parquet", 50, 1)
    out = str(tmp_path / "o.lance")
    run_embed(EmbedConfig(input=str(src), output=out, progress=False))
    (src / "b.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(EmbedError, match=r"b\.parquet.*not a readable Parquet file"):
        run_embed(EmbedConfig(input=str(src), output=out, progress=False))
    ds = lance.dataset(out)
    assert ds.count_rows() == 50 and set(read_ledger(ds)) == {str(src / "a.parquet")}

    write_parquet(src / "c.parquet", 20, 3)
    summary = run_embed(EmbedConfig(input=str(src), output=out, on_error="skip", progress=False))
    assert list(summary.shards_failed) == [str(src / "b.parquet")]
    assert "not a readable Parquet file" in summary.shards_failed[str(src / "b.parquet")]
    assert summary.rows_written == 20
    ds = lance.dataset(out)
    assert ds.count_rows() == 70 and str(src / "b.parquet") not in read_ledger(ds)
    assert "b.parquet" in json.loads(ds.config()["mrl.skipped"])["failed_shards"][str(src / "b.parquet")]


def test_missing_text_column_names_shard_and_columns(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(EmbedError, match=r"a\.parquet: no column 'text' \(columns: body\)"):
        run_embed(EmbedConfig(input=str(tmp_path), output=str(tmp_path / "o.lance"), progress=False))


def test_rows_left_by_an_interrupted_commit_are_replaced_not_duplicated(tmp_path):
    """A crash between the data commit and the ledger commit leaves rows with no ledger entry."""
    src = tmp_path / "in"
    src.mkdir()
    write_parquet(src / "a.parquet", 40, 1)
    out = str(tmp_path / "o.lance")
    run_embed(EmbedConfig(input=str(src), output=out, progress=False))
    shard_b = str(src / "b.parquet")
    write_parquet(src / "b.parquet", 25, 2)
    # simulate the crash: append half of b's rows without its ledger entry
    ds = lance.dataset(out)
    half = ds.to_table(limit=12).to_pylist()
    for i, row in enumerate(half):
        row["id"], row["shard"] = int(derive_ids(2, np.array([i]))[0]), shard_b  # b's key would be 2
    lance.write_dataset(pa.Table.from_pylist(half, schema=ds.schema), out, mode="append")
    summary = run_embed(EmbedConfig(input=str(src), output=out, progress=False))
    assert summary.rows_replaced == 12
    np.testing.assert_array_equal(ids_of(out), expected_ids({str(src / "a.parquet"): 40, shard_b: 25}, out))


def test_resume_after_the_job_is_killed_mid_way(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    sizes = {}
    for i in range(40):
        write_parquet(src / f"p{i:02d}.parquet", 2000, i)
        sizes[str(src / f"p{i:02d}.parquet")] = 2000
    out = str(tmp_path / "o.lance")
    cmd = [sys.executable, str(REPO / "pipelines" / "embed.py"), "--input", str(src), "--output", out,
           "--commit-every", "1", "--batch-rows", "100", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "RAY_ADDRESS": ""})
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if read_ledger(lance.dataset(out)):
                    break
            except (ValueError, OSError):
                pass
            time.sleep(0.2)
        else:
            pytest.fail("the job committed nothing within 180 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    committed = read_ledger(lance.dataset(out))
    assert 0 < len(committed) < 40, "kill landed after the job finished; make the job longer"
    summary = run_embed(EmbedConfig(input=str(src), output=out, progress=False))
    assert summary.shards_skipped_committed == len(committed)
    np.testing.assert_array_equal(ids_of(out), expected_ids(sizes, out))


def test_s3_input_and_output_through_moto(s3_endpoint, make_bucket, tmp_path):
    import s3fs

    opts = s3_endpoint["storage_options"]
    bucket = make_bucket("embed")
    fs = s3fs.S3FileSystem(key="testing", secret="testing",
                           client_kwargs={"endpoint_url": s3_endpoint["endpoint_url"], "region_name": "us-east-1"})
    for i in range(3):
        write_parquet(tmp_path / f"s{i}.parquet", 40, i)
        fs.put(str(tmp_path / f"s{i}.parquet"), f"{bucket}/corpus/s{i}.parquet")
    out = f"{bucket}/emb.lance"
    summary = run_embed(EmbedConfig(input=f"{bucket}/corpus/*.parquet", output=out,
                                    settings=EmbedSettings(keep=("url",)),
                                    storage_options=opts, progress=False))
    assert summary.rows_written == 120
    expected = expected_ids({f"{bucket}/corpus/s{i}.parquet": 40 for i in range(3)}, out, opts)
    np.testing.assert_array_equal(ids_of(out, opts), expected)
    assert run_embed(EmbedConfig(input=f"{bucket}/corpus/*.parquet", output=out, settings=EmbedSettings(keep=("url",)),
                                 storage_options=opts, progress=False)).rows_written == 0


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--input", "--output", "--encoder", "--dims", "--dtype", "--text-column", "--keep",
                 "--id-column", "--format", "--storage-option", "--commit-every", "--on-error",
                 "--max-record-bytes", "--actors", "--gpus-per-actor", "--batch-rows"):
        assert flag in text
