"""Property-based tests (hypothesis): nesting and normalisation, stored prefixes, ids, the
exactly-once commit log, and the funnel's invariants, over generated inputs rather than examples.
"""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mrl_core.funnel import FunnelSchedule, IdMap, funnel_search, take_rows
from mrl_core.ledger import CommitLog, decode_positions, encode_positions
from mrl_core.nesting import NestingSpec, l2_normalize, prefix
from mrl_core.objectstore import parse_seconds, redact
from mrl_core.search import exact_search, merge_top_k, top_k
from mrl_core.storage import POSITION_BITS, assign_shard_keys, derive_ids, embedding_arrays, ledger_key

SETTINGS = settings(max_examples=40, deadline=None)
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


def matrices(max_rows: int = 12, min_dim: int = 1, max_dim: int = 64):
    return st.tuples(st.integers(1, max_rows), st.integers(min_dim, max_dim)).flatmap(
        lambda shape: arrays(np.float32, shape, elements=finite))


# ----------------------------------------------------------------------------- nesting


@SETTINGS
@given(x=matrices())
def test_normalise_gives_unit_rows_in_the_same_direction(x):
    y = l2_normalize(x)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    out = np.linalg.norm(y.astype(np.float64), axis=1)
    big = norms > 1e-3
    np.testing.assert_allclose(out[big], 1.0, rtol=1e-4)
    assert (out[~big] <= 1.0 + 1e-4).all()
    cos = (x[big].astype(np.float64) * y[big]).sum(1) / norms[big]
    np.testing.assert_allclose(cos, 1.0, rtol=1e-4)
    np.testing.assert_allclose(l2_normalize(y[big]), y[big], rtol=1e-4, atol=1e-6)  # idempotent
    np.testing.assert_allclose(l2_normalize(torch.from_numpy(x)).numpy(), y, rtol=1e-4, atol=1e-6)
    assert (y[norms == 0] == 0).all()


@SETTINGS
@given(full=st.integers(1, 2048), dims=st.lists(st.integers(1, 2048), max_size=8))
def test_nesting_spec_is_increasing_and_ends_at_the_full_dim(full, dims):
    if any(d > full for d in dims):
        with pytest.raises(ValueError, match="exceed the model's embedding dim"):
            NestingSpec.for_model(full, dims)
        return
    spec = NestingSpec.for_model(full, dims)
    assert spec.dims[-1] == full and set(dims) <= set(spec.dims)
    assert all(a < b for a, b in zip(spec.dims, spec.dims[1:]))
    assert NestingSpec.for_model(full, ",".join(map(str, dims))).dims == spec.dims if dims else True


@SETTINGS
@given(x=matrices(min_dim=4), data=st.data())
def test_a_prefix_of_a_prefix_is_the_prefix(x, data):
    d2 = data.draw(st.integers(1, x.shape[1]))
    d1 = data.draw(st.integers(1, d2))
    np.testing.assert_array_equal(prefix(prefix(x, d2, normalize=False), d1, normalize=False), x[:, :d1])
    np.testing.assert_allclose(prefix(prefix(x, d2, normalize=False), d1), prefix(x, d1), rtol=1e-6, atol=1e-7)
    spec = NestingSpec.for_model(x.shape[1], [d1, d2])
    for d, p in spec.prefixes(x).items():
        np.testing.assert_allclose(p, l2_normalize(x[:, :d]), rtol=1e-6, atol=1e-7)


@SETTINGS
@given(x=matrices(min_dim=8), dtype=st.sampled_from(["float16", "float32"]), data=st.data())
def test_stored_prefixes_are_each_normalised_on_their_own(x, dtype, data):
    dims = sorted(set(data.draw(st.lists(st.integers(1, x.shape[1]), min_size=1, max_size=4))))
    norms = np.linalg.norm(x[:, : dims[0]], axis=1)
    assume((norms > 1e-2).all())
    columns = embedding_arrays(x, dims, dtype)
    assert list(columns) == [f"emb_{d}" for d in dims]
    for d in dims:
        stored = columns[f"emb_{d}"].flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32)
        assert columns[f"emb_{d}"].type.list_size == d and len(stored) == len(x)
        tol = 2e-3 if dtype == "float16" else 1e-5
        np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=tol * 2)
        np.testing.assert_allclose(stored, l2_normalize(x[:, :d]), atol=tol)


# ----------------------------------------------------------------------------- ids and the ledger


@SETTINGS
@given(legacy=st.lists(st.text(min_size=1, max_size=40), max_size=5, unique=True),
       new=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=5, unique=True),
       positions=st.lists(st.integers(0, (1 << POSITION_BITS) - 1), min_size=1, max_size=50, unique=True))
def test_ids_are_unique_stable_and_decodable(legacy, new, positions):
    # a ledger with shards of pipeline 1 (keys hashed from the URI) and one sequential key
    ledger = {s: {"rows": 1} for s in legacy}
    ledger["seq"] = {"rows": 1, "key": 7}
    new = [s for s in new if s not in ledger]
    keys = assign_shard_keys(ledger, [*new, "seq"])
    assert keys["seq"] == 7  # a committed shard keeps its key, so its rows keep their ids
    every = [ledger_key(s, e) for s, e in ledger.items()] + [keys[s] for s in new]
    assert len(set(every)) == len(every)  # never a collision, with legacy keys either
    pos = np.array(positions)
    all_ids = []
    for key in every:
        ids = derive_ids(key, pos)
        np.testing.assert_array_equal(ids, derive_ids(key, pos))  # stable
        np.testing.assert_array_equal(ids & ((1 << POSITION_BITS) - 1), pos)
        assert (ids >> POSITION_BITS == key).all() and (ids >= 0).all() and (ids != -1).all()
        all_ids.append(ids)
    merged = np.concatenate(all_ids)
    assert len(np.unique(merged)) == len(merged)
    with pytest.raises(ValueError, match="rows"):
        derive_ids(every[0], np.array([1 << POSITION_BITS]))


def test_new_shard_keys_skip_a_legacy_key_they_would_collide_with():
    """A legacy shard's hashed key that equals the next sequential key is never reused."""
    forced = {"old": {"rows": 1, "key": 1}, "hashed": {"rows": 1}}
    legacy_key = ledger_key("hashed", forced["hashed"])
    ledger = {"old": forced["old"], "hashed": forced["hashed"], "seq": {"rows": 1, "key": legacy_key - 1}}
    keys = assign_shard_keys(ledger, ["x", "y"])
    assert legacy_key not in keys.values() and len({*keys.values(), legacy_key, 1, legacy_key - 1}) == 5


@SETTINGS
@given(st.lists(st.integers(0, 2**31 - 1), max_size=200))
def test_positions_round_trip(positions):
    np.testing.assert_array_equal(decode_positions(encode_positions(np.array(positions, dtype=np.int64))),
                                  positions)


def _reports(total: int, chunk: int, skip: set[int], shard: str) -> list[dict]:
    """The write reports of one shard cut into chunks (as the embed stages do), skips included."""
    out = []
    for lo in range(0, total, chunk):
        span = range(lo, min(lo + chunk, total))
        written = [p for p in span if p not in skip]
        out.append({"fragments": [], "shards": {shard: {
            "total": total, "version": "v", "positions": encode_positions(np.array(written, dtype=np.int64)),
            "skipped": [[p, "bad"] for p in span if p in skip], "error": None}}})
    return out


@SETTINGS
@given(data=st.data(),
       shards=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 25)), min_size=1, max_size=4))
def test_commit_log_accepts_every_position_exactly_once_whatever_is_retried(data, shards):
    """Reports arrive in any order and any of them any number of times (Ray retrying tasks
    and restarting actors): each position is accepted once, repeats are dropped, and a shard
    completes exactly when all its records are accounted for."""
    log = CommitLog("unused://")
    reports, expected = [], {}
    for i, (total, chunk) in enumerate(shards):
        skip = set(data.draw(st.lists(st.integers(0, total - 1), max_size=total // 3, unique=True)))
        reports += _reports(total, chunk, skip, f"s{i}")
        expected[f"s{i}"] = (total, total - len(skip), len(skip))
    repeats = data.draw(st.lists(st.sampled_from(reports), max_size=2 * len(reports)))
    stream = data.draw(st.permutations(reports + repeats))
    accepted = [r for r in stream if log.accept(r)]
    assert len(accepted) == len(reports) and log.duplicates_dropped == len(repeats)
    assert sorted(log.completed) == sorted(expected)
    for uri, (total, written, skipped) in expected.items():
        progress = log.shards[uri]
        assert progress.done and progress.written == written and len(progress.skipped) == skipped
        assert int(progress.seen.sum()) == total


@SETTINGS
@given(data=st.data(), total=st.integers(2, 50))
def test_commit_log_never_completes_a_shard_with_records_missing(data, total):
    log = CommitLog("unused://")
    reports = _reports(total, max(1, total // 4), set(), "s")
    dropped = data.draw(st.integers(0, len(reports) - 1))
    for r in data.draw(st.permutations([r for i, r in enumerate(reports) if i != dropped])):
        log.accept(r)
    assert not log.shards["s"].done and log.completed == []


# ----------------------------------------------------------------------------- funnel


@st.composite
def corpora(draw):
    n = draw(st.integers(3, 60))
    dim = draw(st.sampled_from([8, 16, 32]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    if draw(st.booleans()):  # exact duplicates: ties
        vectors[n // 2:] = vectors[: n - n // 2]
    ids = rng.choice(1 << 40, size=n, replace=False).astype(np.int64)
    queries = rng.normal(size=(draw(st.integers(1, 5)), dim)).astype(np.float32)
    return vectors, ids, queries


def _tiers(vectors: np.ndarray, ids: np.ndarray, dims: list[int]):
    by_dim = {d: l2_normalize(vectors[:, :d]) for d in dims}
    idmap = IdMap(ids)

    def tier0(dim, queries, n):
        _, pos = exact_search(queries, by_dim[dim], min(n, len(ids)))
        return np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)

    def fetch(dim, keys):
        return take_rows(by_dim[dim], idmap.positions(keys))

    return by_dim, tier0, fetch


@SETTINGS
@given(corpus=corpora(), data=st.data())
def test_funnel_results_are_ranked_unique_real_rows_with_exact_scores(corpus, data):
    vectors, ids, queries = corpus
    dim = vectors.shape[1]
    dims = sorted({data.draw(st.sampled_from([d for d in (2, 4, 8, 16) if d < dim])), dim})
    k = data.draw(st.integers(1, len(ids)))
    shortlists = sorted((data.draw(st.integers(1, 2 * len(ids))) for _ in dims[:-1]), reverse=True)
    schedule = FunnelSchedule(tuple(dims), tuple(shortlists))
    by_dim, tier0, fetch = _tiers(vectors, ids, dims)
    q = {d: l2_normalize(queries[:, :d]) for d in dims}
    scores, keys = funnel_search(schedule, q, k, tier0, fetch)
    assert scores.shape == keys.shape == (len(queries), k)
    for row_s, row_k, query in zip(scores, keys, q[dim]):
        found = row_k[row_k >= 0]
        assert len(found) == len(set(found.tolist())) and set(found.tolist()) <= set(ids.tolist())
        valid = row_s[row_k >= 0]
        assert (np.diff(valid) <= 1e-6).all()  # best first
        exact = fetch(dim, found) @ query
        np.testing.assert_allclose(valid, exact, rtol=1e-5, atol=1e-5)
        assert (row_k >= 0).sum() == min(k, len(ids))  # shortlists are raised to k


@SETTINGS
@given(corpus=corpora(), data=st.data())
def test_funnel_with_shortlists_covering_the_corpus_is_exact_search(corpus, data):
    vectors, ids, queries = corpus
    dim = vectors.shape[1]
    dims = [4, dim] if dim > 4 else [dim]
    k = data.draw(st.integers(1, len(ids)))
    by_dim, tier0, fetch = _tiers(vectors, ids, dims)
    q = {d: l2_normalize(queries[:, :d]) for d in dims}
    scores, _ = funnel_search(FunnelSchedule(tuple(dims), (len(ids),) * (len(dims) - 1)), q, k, tier0, fetch)
    exact, _ = exact_search(q[dim], by_dim[dim], k)
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-5)  # equal up to ties


@SETTINGS
@given(a=arrays(np.float32, (3, 6), elements=finite), b=arrays(np.float32, (3, 5), elements=finite),
       k=st.integers(1, 11))
def test_merge_top_k_is_the_top_k_of_both(a, b, k):
    ka = np.arange(18).reshape(3, 6)
    kb = 100 + np.arange(15).reshape(3, 5)
    kb[:, 0] = -1  # a missing entry never wins
    s, keys = merge_top_k(a, ka, b, kb, k)
    both = np.concatenate([a, np.where(kb < 0, -np.inf, b)], axis=1)
    np.testing.assert_array_equal(s, np.take_along_axis(both, top_k(both, k), axis=1))
    assert not ((keys == -1) & np.isfinite(s)).any()
    assert (np.diff(s, axis=1) <= 0).all()


@SETTINGS
@given(ids=st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=100, unique=True),
       probe=st.lists(st.integers(-(2**62), 2**62), max_size=20))
def test_idmap_finds_known_ids_and_only_them(ids, probe):
    arr = np.array(ids, dtype=np.int64)
    idmap = IdMap(arr)
    np.testing.assert_array_equal(idmap.positions(arr), np.arange(len(arr)))
    pos = idmap.positions(np.array(probe, dtype=np.int64))
    for p, i in zip(pos, probe):
        assert (p == -1) == (i not in set(ids)) and (p == -1 or arr[p] == i)
    if len(ids) > 1:
        with pytest.raises(ValueError, match="unique"):
            IdMap(np.concatenate([arr, arr[:1]]))


@SETTINGS
@given(dims=st.lists(st.integers(1, 4096), min_size=1, max_size=6, unique=True), data=st.data())
def test_schedule_text_round_trips(dims, data):
    dims = sorted(dims)
    shortlists = sorted((data.draw(st.integers(1, 10_000)) for _ in dims[:-1]), reverse=True)
    nprobe = data.draw(st.none() | st.integers(1, 1024))
    schedule = FunnelSchedule(tuple(dims), tuple(shortlists), nprobe)
    assert FunnelSchedule.parse(str(schedule)) == schedule
    assert FunnelSchedule.from_dict(schedule.to_dict()) == schedule


# ----------------------------------------------------------------------------- options


@SETTINGS
@given(value=st.floats(0, 1e5, allow_nan=False), unit=st.sampled_from(["", "s", "ms", "m", "h"]))
def test_durations_parse(value, unit):
    text = f"{value:.3f}{unit}"
    scale = {"": 1, "s": 1, "ms": 1e-3, "m": 60, "h": 3600}[unit]
    assert parse_seconds(text) == pytest.approx(float(f"{value:.3f}") * scale)


@SETTINGS
@given(secret=st.text(alphabet=string.ascii_letters + string.digits + "-._~!$&'()*+,;=%:@/?#",
                     min_size=6, max_size=30).filter(lambda s: "*" not in s),
       key=st.sampled_from(["aws_secret_access_key", "aws_access_key_id", "aws_session_token", "token",
                            "google_service_account_key", "azure_storage_account_key", "password"]))
def test_redact_never_shows_a_secret(secret, key):
    shown = redact({key: secret, "aws_region": "us-east-1", "aws_endpoint": f"http://u:{secret}@h:1"})
    assert secret not in repr({k: v for k, v in shown.items() if k != "aws_region"})
