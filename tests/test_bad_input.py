"""Bad input: corrupt or truncated files, wrong column types, invalid or odd Unicode, huge
records, NaN/inf query vectors. Each is a clear error naming the shard (or query) or a counted
skip naming the record, and never a damaged dataset.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import write_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mrl_core import Corpus
from mrl_core.ledger_store import read_ledger
from mrl_core.settings import EmbedSettings
from mrl_core.sources import Shard, ShardError, format_of, read_shard
from mrl_core.storage import StorageError, embedding_arrays, ids_of_rows
from pipelines.embed import EmbedConfig, EmbedError, run_embed

UNICODE_EDGE_CASES = [
    "naïve café résumé",                      # Latin with diacritics
    "e\u0301\u0301 combining marks",           # stacked combining accents
    "שלום עולם مرحبا بالعالم",                  # right-to-left scripts
    "\u202eright-to-left override",            # a bidi control character
    "👩‍👩‍👧‍👦 family emoji (ZWJ sequence)",      # zero-width joiners
    "\U0001d54f\U0001d550 \U00010348 astral",  # outside the Basic Multilingual Plane
    "zero\u200bwidth\u200cspace",             # invisible characters inside a word
    "nul \x00 inside",                         # a NUL character
    "\u200b",                                  # only a zero-width space (not whitespace)
    "中文 日本語 한국어",                          # CJK
    "\ufdfa\ufdfa",                            # one character that expands a lot under NFKC
]
BLANK_UNICODE = ["\u3000", "\u00a0\u2028", " \t\u2003 "]  # ideographic, no-break, line sep, em space


def shard(path: Path, data: bytes, fmt: str | None = None) -> Shard:
    path.write_bytes(data)
    return Shard(str(path), len(data), "v", fmt or format_of(str(path)))


def parquet_bytes(table: pa.Table, **kwargs) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **kwargs)
    return sink.getvalue()


def tar_bytes(samples: dict[str, dict[str, bytes]], compress: bool = False) -> bytes:
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w:gz" if compress else "w") as tar:
        for key, fields in samples.items():
            for ext, payload in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return sink.getvalue()


def member_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [m.offset for m in tar]


TEXTS = [f"record number {i} about matryoshka embeddings" for i in range(400)]
GOOD_PARQUET = parquet_bytes(pa.table({"text": TEXTS, "url": [f"u{i}" for i in range(400)]}))
EXTENSION = {"parquet": "parquet", "jsonl": "jsonl", "text": "txt", "wds": "tar"}
GOOD_TAR = tar_bytes({f"s{i:03d}": {"text": t.encode(), "url": b"u"} for i, t in enumerate(TEXTS[:20])})


# ----------------------------------------------------------------------------- whole shards


@pytest.mark.parametrize("name, damage", [
    ("page-header", lambda d: d[:4] + b"\xff" * 32 + d[36:]),
    ("text-pages", lambda d: d[:1000] + b"\xde\xad\xbe\xef" * 4 + d[1016:]),  # inside the text column
    ("footer-length", lambda d: d[:-8] + b"\xff\xff\xff\x7f" + d[-4:]),
    ("footer-magic", lambda d: d[:-4] + b"PAR0"),
    ("truncated", lambda d: d[: len(d) * 2 // 3]),
    ("empty", lambda d: b""),
])
def test_corrupt_parquet_is_a_shard_error_naming_it(tmp_path, name, damage):
    s = shard(tmp_path / f"{name}.parquet", damage(GOOD_PARQUET))
    with pytest.raises(ShardError, match=rf"{name}\.parquet: not a readable Parquet file"):
        read_shard(s, "text")


@pytest.mark.parametrize("values, kind", [
    ([1, 2, 3], "int64"),
    ([1.5, 2.5, None], "double"),
    ([["a"], ["b"], []], "list<element: string>"),
    ([{"t": "a"}, {"t": "b"}, None], "struct<t: string>"),
    ([True, False, True], "bool"),
])
def test_wrong_column_type_is_a_shard_error_naming_the_type(tmp_path, values, kind):
    s = shard(tmp_path / "typed.parquet", parquet_bytes(pa.table({"text": values})))
    with pytest.raises(ShardError, match=rf"typed\.parquet: column 'text' is {kind}, expected string or binary"):
        read_shard(s, "text")


@pytest.mark.parametrize("cut", ["mid-member", "at-member-boundary", "mid-header", "no-end-marker", "gzip"])
def test_truncated_tar_is_a_shard_error_never_a_short_shard(tmp_path, cut):
    """tarfile itself stops quietly at a truncation between members, which would commit the
    shard with samples missing; the reader checks for the end-of-archive marker."""
    offsets = member_offsets(GOOD_TAR)
    data = {
        "mid-member": GOOD_TAR[: offsets[7] + 512 + 10],
        "at-member-boundary": GOOD_TAR[: offsets[10]],
        "mid-header": GOOD_TAR[: offsets[10] + 100],
        "no-end-marker": GOOD_TAR[: offsets[-1] + 1024],
        "gzip": gzip.compress(tar_bytes({"a": {"text": b"x" * 5000}}))[:-60],
    }[cut]
    s = shard(tmp_path / "cut.tar", data)
    with pytest.raises(ShardError, match=r"cut\.tar: .*truncated"):
        read_shard(s, "text")
    complete = read_shard(shard(tmp_path / "whole.tar", GOOD_TAR), "text", ["url"])
    assert complete.total == 20 and complete.table["_input"].to_pylist() == TEXTS[:20]


def test_tar_member_names_are_never_used_as_paths(tmp_path):
    """Members named ``../x`` or ``/etc/x`` are read in memory, never extracted to disk."""
    data = tar_bytes({"../../escape": {"text": b"one"}, "/abs/path": {"text": b"two"}, "ok": {"text": b"three"}})
    evil = shard(tmp_path / "evil.tar", data)
    before = set(Path(tmp_path).parent.rglob("*"))
    records = read_shard(evil, "text")
    assert sorted(records.table["_input"].to_pylist()) == ["one", "three", "two"]
    assert set(Path(tmp_path).parent.rglob("*")) - before == set()
    assert not Path("/abs/path.text").exists()


# ----------------------------------------------------------------------------- records


def test_jsonl_records_of_the_wrong_type_are_counted_skips(tmp_path):
    lines = [
        {"text": "a fine record", "url": 1},
        {"text": 42, "url": "x"},
        {"text": {"nested": "object"}, "url": [1, 2]},
        {"text": ["a", "list"], "url": None},
        {"text": True, "url": {"k": "v"}},
        {"text": "another fine one", "url": "https://x/é"},
        {"url": "no text at all"},
    ]
    data = "\n".join(json.dumps(x) for x in lines).encode()
    records = read_shard(shard(tmp_path / "mixed.jsonl", data), "text", ["url"])
    assert records.total == 7
    assert records.table["_input"].to_pylist() == ["a fine record", "another fine one"]
    reasons = dict(records.skipped)
    assert reasons[1] == "field 'text' is a JSON number, expected a string"
    assert reasons[2] == "field 'text' is a JSON object, expected a string"
    assert reasons[3] == "field 'text' is a JSON array, expected a string"
    assert reasons[4] == "field 'text' is a JSON boolean, expected a string"
    assert reasons[6] == "null text"
    # a kept field whose values mix JSON types is kept as JSON text, not a crash
    assert records.table["url"].to_pylist() == ["1", "https://x/é"]


def test_invalid_unicode_is_a_counted_skip(tmp_path):
    # JSON escapes that decode to lone surrogates (not valid Unicode, cannot be stored as UTF-8)
    data = b'{"text": "lone \\ud800 high"}\n{"text": "fine", "url": "bad \\udfff url"}\n{"text": "\\udc00"}\n'
    records = read_shard(shard(tmp_path / "surrogates.jsonl", data), "text", ["url"])
    assert records.table["_input"].to_pylist() == ["fine"]
    assert [p for p, _ in records.skipped] == [0, 2]
    assert all("lone surrogate" in r for _, r in records.skipped)
    assert records.table["url"].to_pylist()[0].startswith("bad \ufffd")

    # Parquet string columns can hold invalid UTF-8 (writers do not always validate)
    values = pa.py_buffer(b"okbad\xff\xfeok2")
    offsets = pa.py_buffer(np.array([0, 2, 7, 10], dtype=np.int32).tobytes())
    raw = pa.Array.from_buffers(pa.string(), 3, [None, offsets, values])
    data = parquet_bytes(pa.table({"text": raw, "url": raw}))
    records = read_shard(shard(tmp_path / "badutf8.parquet", data), "text", ["url"])
    assert records.table["_input"].to_pylist() == ["ok", "ok2"]
    assert records.skipped == [(1, "invalid UTF-8 at byte 3")]
    assert records.table["url"].to_pylist() == ["ok", "ok2"]
    assert pa.types.is_string(records.table.schema.field("_input").type)

    # invalid UTF-8 bytes in text and JSONL files
    records = read_shard(shard(tmp_path / "bad.txt", b"good\n\xff\xfe\nalso good\n"), "text")
    assert records.skipped == [(1, "invalid UTF-8 at byte 0")] and records.total == 3


def test_unicode_edge_cases_are_embedded_intact_and_blank_ones_skipped(tmp_path):
    lines = UNICODE_EDGE_CASES + BLANK_UNICODE
    data = b"\xef\xbb\xbf" + "\n".join(json.dumps({"text": t}) for t in lines).encode()
    records = read_shard(shard(tmp_path / "unicode.jsonl", data), "text")
    assert records.table["_input"].to_pylist() == UNICODE_EDGE_CASES
    assert records.skipped == [(len(UNICODE_EDGE_CASES) + i, "empty text") for i in range(len(BLANK_UNICODE))]
    # a byte-order mark is not part of the first record of a text file either
    text = read_shard(shard(tmp_path / "bom.txt", b"\xef\xbb\xbffirst\r\nsecond\r\n"), "text")
    assert text.table["_input"].to_pylist() == ["first", "second"]


def test_huge_records_are_skipped_and_large_ones_kept(tmp_path):
    limit = 1 << 20
    near = "x" * (limit - 10)
    over = "y" * (limit + 1)
    one_word = "z" * (limit // 2)  # no spaces at all: a single huge "word"
    data = parquet_bytes(pa.table({"text": ["short", near, over, one_word, "é" * (limit // 2 + 1)]}))
    records = read_shard(shard(tmp_path / "huge.parquet", data), "text")
    assert records.table["_pos"].to_pylist() == [0, 1, 3]
    assert [p for p, _ in records.skipped] == [2, 4]
    assert all(f"over the {limit}-byte limit" in r for _, r in records.skipped)  # UTF-8 bytes, not chars


# ----------------------------------------------------------------------------- any damage at all


def _valid(records, total_hint: int | None = None) -> None:
    """The invariants every successful read must hold, whatever the bytes were."""
    positions = records.table["_pos"].to_pylist()
    skipped = [p for p, _ in records.skipped]
    assert len(set(positions)) == len(positions)
    assert sorted(positions + skipped) == list(range(records.total))
    for text in records.table["_input"].to_pylist():
        assert isinstance(text, str) and text.strip()
        text.encode("utf-8")  # storable
    if total_hint is not None:
        assert records.total <= total_hint


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(["parquet", "jsonl", "text", "wds"]),
    edits=st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=16)), min_size=1, max_size=4),
    cut=st.none() | st.floats(0, 1),
)
def test_any_corruption_is_a_shard_error_or_a_consistent_read(tmp_path, fmt, edits, cut):
    """Overwrite random byte ranges (and maybe truncate) a valid shard of any format: the read
    fails with ``ShardError`` or returns records whose positions and skips account for every
    record exactly once, with only non-empty, valid Unicode text."""
    good = {
        "parquet": GOOD_PARQUET,
        "jsonl": "\n".join(json.dumps({"text": t}) for t in TEXTS[:50]).encode(),
        "text": "\n".join(TEXTS[:50]).encode(),
        "wds": GOOD_TAR,
    }[fmt]
    data = bytearray(good)
    for where, patch in edits:
        at = int(where * (len(data) - 1))
        data[at:at + len(patch)] = patch
    if cut is not None:
        data = data[: int(cut * len(data))]
    try:
        records = read_shard(shard(tmp_path / f"fuzz.{EXTENSION[fmt]}", bytes(data), fmt), "text")
    except ShardError as exc:
        assert "fuzz." in str(exc)
        return
    _valid(records)


# ----------------------------------------------------------------------------- vectors


def test_non_finite_embeddings_are_never_written():
    emb = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    emb[2, 5] = np.nan
    with pytest.raises(StorageError, match=r"1 row\(s\) \(batch rows \[2\]\) contain NaN or inf"):
        embedding_arrays(emb, (16, 64))
    emb[2, 5] = np.inf
    with pytest.raises(StorageError, match="NaN or inf"):
        embedding_arrays(emb, (16, 64), dtype="float32")
    emb[2, 5] = 1e6  # finite, but no float16 can hold it unnormalised
    with pytest.raises(StorageError, match="overflow float16"):
        embedding_arrays(emb, (16, 64), normalize=False)
    out = embedding_arrays(emb, (16, 64))  # normalised it fits
    assert np.isfinite(out["emb_64"].flatten().to_numpy(zero_copy_only=False)).all()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("vec") / "c.lance")
    emb = np.random.default_rng(2).normal(size=(500, 256)).astype(np.float32)
    write_corpus(uri, emb)
    from mrl_core.index import build_index

    build_index(uri, funnel="paper", calibration_queries=10)
    return Corpus.open(uri), emb


@pytest.mark.parametrize("bad, message", [
    ("nan", r"query vector\(s\) \[1\] contain NaN or inf"),
    ("inf", r"query vector\(s\) \[1\] contain NaN or inf"),
    ("-inf", r"query vector\(s\) \[1\] contain NaN or inf"),
    ("zero", r"query vector\(s\) \[1\] are all zeros"),
])
def test_nan_inf_and_zero_query_vectors_are_refused(small_corpus, bad, message):
    """Query vectors are the only user-supplied vectors (stored ones come from the encoder)."""
    corpus, emb = small_corpus
    queries = emb[:3].copy()
    queries[1] = 0.0 if bad == "zero" else 0.5
    if bad != "zero":
        queries[1, 7] = float(bad)
    with pytest.raises(ValueError, match=message):
        corpus.search(queries, k=5)
    with pytest.raises(ValueError, match=message):
        corpus.search(queries, k=5, exact=True)
    assert corpus.search(queries[[0, 2]], k=5).num_rows == 10  # the good ones still work


@pytest.mark.parametrize("queries, error", [
    (np.zeros((2, 100), dtype=np.float32) + 1, ValueError),   # wrong dim
    (np.ones((2, 3, 256), dtype=np.float32), ValueError),     # wrong rank
    (np.ones((0, 256), dtype=np.float32), ValueError),        # no queries
    ([], ValueError),
    (["text", np.ones(256)], TypeError),                      # texts and vectors mixed
    ([[1.0, "a"] * 128], TypeError),                          # not numbers
])
def test_malformed_queries_are_clear_errors(small_corpus, queries, error):
    corpus, _ = small_corpus
    with pytest.raises(error):
        corpus.search(queries, k=5)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def local_ray():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield


def test_embed_job_with_every_kind_of_bad_input(tmp_path, local_ray):
    """One run over shards of every kind of damage (``on_error="skip"``): broken shards are
    reported failed and left out of the ledger, bad records are counted skips, and the dataset
    holds exactly the good records, each with finite unit-norm prefixes. Fixing a broken shard
    and re-running adds just it."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.parquet").write_bytes(parquet_bytes(pa.table({"text": TEXTS[:30], "url": ["u"] * 30})))
    (src / "b.parquet").write_bytes(GOOD_PARQUET[: len(GOOD_PARQUET) // 2])                  # truncated
    (src / "c.tar").write_bytes(GOOD_TAR[: member_offsets(GOOD_TAR)[5]])                      # truncated
    (src / "d.parquet").write_bytes(parquet_bytes(pa.table({"text": [1, 2], "url": ["u", "v"]})))  # wrong type
    big = "large record " * 70_000  # ~900 KB, under the limit: embedded (tokens truncated)
    lines = [json.dumps({"text": t, "url": u}) for t, u in [
        ("fine", "u"), (7, "u"), ("lone \ud800", "u"), ("x" * (2 << 20), "u"), (big, {"k": 1}), (big, 5),
        *[(t, "u") for t in UNICODE_EDGE_CASES], ("\u3000", "u")]]
    (src / "e.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\nnot json\n")
    out = str(tmp_path / "out.lance")

    summary = run_embed(EmbedConfig(input=str(src), output=out, settings=EmbedSettings(keep=("url",)),
                                    on_error="skip", progress=False))

    failed = {Path(u).name: r for u, r in summary.shards_failed.items()}
    assert set(failed) == {"b.parquet", "c.tar", "d.parquet"}
    assert "not a readable Parquet file" in failed["b.parquet"] and "truncated" in failed["c.tar"]
    assert "column 'text' is int64" in failed["d.parquet"]
    e_good = [0, 4, 5, *range(6, 6 + len(UNICODE_EDGE_CASES))]
    e_skipped = {1, 2, 3, 6 + len(UNICODE_EDGE_CASES), 7 + len(UNICODE_EDGE_CASES)}
    assert summary.records_skipped == len(e_skipped)
    assert {p for s, p, _ in summary.skipped_examples if s.endswith("e.jsonl")} == e_skipped
    ds = lance.dataset(out)
    assert set(read_ledger(ds)) == {str(src / "a.parquet"), str(src / "e.jsonl")}
    expected = np.concatenate([ids_of_rows(ds, str(src / "a.parquet"), np.arange(30)),
                               ids_of_rows(ds, str(src / "e.jsonl"), np.array(e_good))])
    table = ds.to_table()
    np.testing.assert_array_equal(np.sort(table["id"].to_numpy()), np.sort(expected))
    for name in ("emb_64", "emb_128", "emb_256"):
        vectors = np.stack(table[name].to_numpy(zero_copy_only=False)).astype(np.float32)
        assert np.isfinite(vectors).all()
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=3e-3)
    urls = dict(zip(table["id"].to_pylist(), table["url"].to_pylist()))
    e_ids = ids_of_rows(ds, str(src / "e.jsonl"), np.array([4, 5]))
    assert [urls[int(i)] for i in e_ids] == ['{"k": 1}', "5"]

    (src / "b.parquet").write_bytes(GOOD_PARQUET)  # fix one broken shard; re-run
    again = run_embed(EmbedConfig(input=str(src), output=out, settings=EmbedSettings(keep=("url",)),
                                  on_error="skip", progress=False))
    assert again.rows_written == 400 and again.shards_skipped_committed == 2
    ids = lance.dataset(out).to_table(columns=["id"])["id"].to_numpy()
    assert len(ids) == len(np.unique(ids)) == len(expected) + 400


def test_a_kept_column_of_another_type_is_a_shard_error(tmp_path, local_ray):
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"text": ["a b", "c d"], "url": ["u", "v"]}), src / "a.parquet")
    pq.write_table(pa.table({"text": ["e f", "g h"], "url": [{"x": 1}, {"x": 2}]}), src / "b.parquet")
    summary = run_embed(EmbedConfig(input=str(src), output=str(tmp_path / "o.lance"),
                                    settings=EmbedSettings(keep=("url",)),
                                    on_error="skip", progress=False))
    assert list(summary.shards_failed) == [str(src / "b.parquet")] and summary.rows_written == 2


@pytest.mark.parametrize("ids", [[1, 1, 2], [1, None, 3], ["a", "b", "c"], [-1, 5, 6]])
def test_a_bad_id_column_is_a_shard_error(tmp_path, local_ray, ids):
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"text": ["a b", "c d", "e f"], "uid": ids}), src / "a.parquet")
    with pytest.raises(EmbedError, match=r"a\.parquet.*uid"):
        run_embed(EmbedConfig(input=str(src), output=str(tmp_path / "o.lance"),
                              settings=EmbedSettings(id_column="uid"), progress=False))


def test_parquet_shards_are_read_with_column_projection(tmp_path):
    """Only the text, kept and id columns are read from a wide Parquet shard (its footer and
    those columns' chunks), not the whole file: bytes counted through the filesystem itself."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    class Counting(LocalFileSystem):
        protocol = "counting"
        read = 0

        def _open(self, path, mode="rb", **kw):
            f = super()._open(path, mode, **kw)
            raw = f.read

            def counted(n=-1):
                data = raw(n)
                Counting.read += len(data)
                return data

            f.read = counted
            return f

    fsspec.register_implementation("counting", Counting, clobber=True)
    rng = np.random.default_rng(0)
    wide = pa.table({"text": [f"row {i} of a wide table" for i in range(2000)], "id": np.arange(2000),
                     **{f"blob{j}": [rng.bytes(300) for _ in range(2000)] for j in range(8)}})
    path = tmp_path / "wide.parquet"
    pq.write_table(wide, path)
    size = path.stat().st_size
    shard = Shard(f"counting://{path}", size, "v", "parquet")
    records = read_shard(shard, "text", ["id"])
    assert records.table.num_rows == 2000 and records.table.column_names == ["_pos", "_input", "id"]
    print(f"read {Counting.read:,} of {size:,} bytes for 2 of 10 columns")
    assert Counting.read < size / 4  # the blobs are never read
