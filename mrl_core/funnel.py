"""Funnel retrieval over nested prefixes, and its calibration, on in-memory arrays.

A schedule is a chain of stored prefix dims with a shortlist size after each but the last:
``64:1000,128:200,256`` searches the 64-dim tier for 1000 candidates, re-ranks them exactly with
128 dims keeping 200, then with 256 dims keeping k. Calibration picks the cheapest schedule whose
recall@k (counting ties) against exact full-dim search reaches a target. Nothing here knows Lance
or FAISS indexes: vectors come through a ``fetch`` function, tier 0 through a ``tier0`` function.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from mrl_core.evaluate import recall_at_k_with_ties

DEFAULT_SHORTLISTS = (100, 200, 500, 1000, 2000)
"""Tier-0 shortlist sizes tried by calibration, cheapest first."""

PAPER_SHORTLISTS = {16: 200, 32: 100, 64: 50, 128: 25, 256: 10}
"""The MRL paper's funnel (Kusupati et al. 2022): shortlist kept after searching with each dim."""

Fetch = Callable[[int, np.ndarray], np.ndarray]
"""(dim, keys [M]) -> vectors [M, dim] at that prefix; NaN rows for key -1 or an unknown key."""

Tier0 = Callable[[int, np.ndarray, int], np.ndarray]
"""(dim, queries [Q, dim], n) -> keys [Q, n] of the n best rows at that prefix, -1 padded."""

GATHER_ROWS = 1 << 15
"""Candidate vectors gathered at once while re-ranking (bounds the temporary memory)."""


@dataclass(frozen=True)
class FunnelSchedule:
    """Prefix dims searched in turn and the shortlist kept after each dim but the last.

    ``nprobe`` is the IVF tier-0 probe count (None: the index's own setting or not IVF).
    """

    dims: tuple[int, ...]
    shortlists: tuple[int, ...]
    nprobe: int | None = None

    def __post_init__(self) -> None:
        dims = tuple(int(d) for d in self.dims)
        shortlists = tuple(int(s) for s in self.shortlists)
        if not dims or any(d < 1 for d in dims) or any(b <= a for a, b in zip(dims[1:], dims[2:])) or (
            len(dims) > 1 and dims[1] < dims[0]
        ):
            raise ValueError(
                f"funnel dims must be positive and increasing (the second may repeat the first: an "
                f"exact re-score of a quantised tier 0), got {list(dims)}"
            )
        if len(shortlists) != len(dims) - 1:
            raise ValueError(
                f"a funnel over {len(dims)} dims needs {len(dims) - 1} shortlist sizes "
                f"(one after each dim but the last), got {list(shortlists)}"
            )
        if any(s < 1 for s in shortlists) or any(b > a for a, b in zip(shortlists, shortlists[1:])):
            raise ValueError(f"shortlists must be positive and non-increasing, got {list(shortlists)}")
        if self.nprobe is not None and int(self.nprobe) < 1:
            raise ValueError(f"nprobe must be >= 1, got {self.nprobe}")
        object.__setattr__(self, "dims", dims)
        object.__setattr__(self, "shortlists", shortlists)
        object.__setattr__(self, "nprobe", None if self.nprobe is None else int(self.nprobe))

    @classmethod
    def parse(cls, text: str) -> FunnelSchedule:
        """Parse ``"64:1000,128:200,256"`` (dim:shortlist pairs, the last dim bare; ``@nprobe`` optional)."""
        body, _, nprobe = text.strip().partition("@")
        dims, shortlists = [], []
        try:
            for i, part in enumerate(p.strip() for p in body.split(",")):
                dim, sep, size = part.partition(":")
                dims.append(int(dim))
                if sep:
                    shortlists.append(int(size))
                elif i != len(body.split(",")) - 1:
                    raise ValueError(f"dim {dim} needs a shortlist size ({dim}:N)")
            return cls(tuple(dims), tuple(shortlists), int(nprobe) if nprobe else None)
        except ValueError as exc:
            raise ValueError(f"bad funnel schedule {text!r} (expected e.g. '64:1000,128:200,256'): {exc}") from exc

    def __str__(self) -> str:
        parts = [f"{d}:{s}" for d, s in zip(self.dims, self.shortlists)] + [str(self.dims[-1])]
        return ",".join(parts) + (f"@{self.nprobe}" if self.nprobe else "")

    def steps(self, k: int) -> list[tuple[int, int]]:
        """(dim, rows kept) for each dim in turn; shortlists below k are raised to k."""
        return [(d, max(s, k)) for d, s in zip(self.dims, (*self.shortlists, k))]

    def rerank_cost(self, k: int = 10) -> int:
        """Stored values read to re-rank one query: sum of candidates x dim over the re-rank steps."""
        steps = self.steps(k)
        return sum(n_in * dim for (_, n_in), (dim, _) in zip(steps, steps[1:]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"dims": list(self.dims), "shortlists": list(self.shortlists), "nprobe": self.nprobe}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> FunnelSchedule:
        """Inverse of ``to_dict``."""
        return cls(tuple(raw["dims"]), tuple(raw["shortlists"]), raw.get("nprobe"))


def paper_schedule(stored_dims: Sequence[int]) -> FunnelSchedule:
    """The paper's funnel (16-32-64-128-256-full on 200-100-50-25-10) over the dims stored."""
    stored = sorted(set(stored_dims))
    full = stored[-1]
    dims = [d for d in sorted(PAPER_SHORTLISTS) if d in stored and d < full] + [full]
    return FunnelSchedule(tuple(dims), tuple(PAPER_SHORTLISTS[d] for d in dims[:-1]))


def candidate_schedules(
    stored_dims: Sequence[int], k: int = 10, shortlist_sizes: Sequence[int] = DEFAULT_SHORTLISTS,
    tier0_dims: Sequence[int] | None = None, rows: int | None = None, refine: bool = False,
) -> list[FunnelSchedule]:
    """Schedules calibration tries, by tier-0 dim, then cheapest re-rank first.

    For each tier-0 dim and shortlist size: straight to the full dim, and through every stored dim
    in between with the shortlist halved at each step (the paper's shape). With ``refine`` (a
    quantised tier 0) also: an exact re-score at the tier-0 dim first, keeping a smaller shortlist
    (``128:1000,128:200,256``). Tier 0 at the full dim is the plain ANN search, the last resort.
    """
    stored = sorted(set(int(d) for d in stored_dims))
    full = stored[-1]
    starts = sorted(set(tier0_dims)) if tier0_dims else stored
    sizes = sorted({max(k, min(int(s), rows) if rows else int(s)) for s in shortlist_sizes})
    out: list[FunnelSchedule] = []
    for d0 in starts:
        if d0 not in stored:
            raise ValueError(f"tier-0 dim {d0} is not a stored dim {stored}")
        mids = [d for d in stored if d0 < d < full]
        found: dict[tuple, FunnelSchedule] = {}

        def add(dims: tuple[int, ...], shortlists: tuple[int, ...], found=found) -> None:
            found.setdefault((dims, shortlists), FunnelSchedule(dims, shortlists))

        if d0 == full:
            add((full,), ())
        for s in sizes:
            if d0 != full:
                add((d0, full), (s,))
            if mids:
                chain = [s]
                for _ in mids:
                    chain.append(max(k, chain[-1] // 2))
                add((d0, *mids, full), tuple(chain))
            if refine:
                for s2 in (x for x in sizes if x < s):
                    add((d0, d0, full) if d0 != full else (full, full), (s, s2) if d0 != full else (s,))
        out += sorted(found.values(), key=lambda f: (f.rerank_cost(k), len(f.dims)))
    return out


class IdMap:
    """Row positions of int64 ids (e.g. FAISS ids back to rows of an array or a Lance dataset).

    Ids derived from (shard, position) come in runs of consecutive integers; when they do, a
    lookup searches the few run starts (cache-resident) instead of every id.
    """

    def __init__(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        self.order = np.argsort(ids, kind="stable")
        self.sorted = ids[self.order]
        if len(ids) > 1 and (self.sorted[1:] == self.sorted[:-1]).any():
            dup = self.sorted[1:][self.sorted[1:] == self.sorted[:-1]][0]
            raise ValueError(f"ids must be unique; id {int(dup)} occurs more than once")
        starts = np.flatnonzero(np.diff(self.sorted) != 1) + 1 if len(ids) else np.zeros(0, np.int64)
        self.runs = None
        if len(ids) and len(starts) + 1 <= len(ids) // 8:
            first = np.concatenate([[0], starts]).astype(np.int64)
            self.runs = (self.sorted[first], first, np.diff(np.append(first, len(ids))))

    def __len__(self) -> int:
        return len(self.sorted)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Position of each id, -1 where the id is unknown (or is -1)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self.sorted):
            return np.full(ids.shape, -1, dtype=np.int64)
        if self.runs is not None:
            run_first, run_index, run_len = self.runs
            r = np.searchsorted(run_first, ids, side="right") - 1
            rc = np.maximum(r, 0)
            offset = ids - run_first[rc]  # wraps negative on overflow: then not found, rightly
            found = (r >= 0) & (offset >= 0) & (offset < run_len[rc])
            return np.where(found, self.order[np.where(found, run_index[rc] + offset, 0)], -1)
        at = np.minimum(np.searchsorted(self.sorted, ids), len(self.sorted) - 1)
        return np.where(self.sorted[at] == ids, self.order[at], -1)


_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A per-thread buffer reused across calls (fresh large arrays cost a page fault per 4 KiB)."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    size = int(np.prod(shape))
    buf = buffers.get((name, np.dtype(dtype)))
    if buf is None or buf.size < size:
        buf = buffers[(name, np.dtype(dtype))] = np.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def gather(vectors: np.ndarray, positions: np.ndarray, scratch: bool = False) -> np.ndarray:
    """float32 rows of ``vectors`` at ``positions``; NaN rows where the position is -1.

    ``scratch=True`` writes into a per-thread buffer that the next such call overwrites (for a
    caller that consumes the rows at once, as re-ranking does).
    """
    positions = np.asarray(positions, dtype=np.int64)
    shape = (len(positions), vectors.shape[1])
    if scratch:
        rows = np.take(vectors, np.maximum(positions, 0), axis=0, out=_scratch("rows", shape, vectors.dtype), mode="clip")
    else:
        rows = vectors[np.maximum(positions, 0)]
    if rows.dtype == np.float32:
        out = rows
    else:  # torch converts float16 several times faster than numpy's astype
        out = _scratch("f32", shape, np.float32) if scratch else np.empty(shape, dtype=np.float32)
        torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(rows)))
    out[positions < 0] = np.nan
    return out


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` best scores per row, best first (ties in column order)."""
    n = scores.shape[1]
    if k >= n:
        part = np.broadcast_to(np.arange(n), scores.shape)
    else:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    picked = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -picked), axis=1)
    return np.take_along_axis(part, order, axis=1)


def exact_search(
    vectors: np.ndarray, queries: np.ndarray, k: int, block_rows: int = 1 << 16
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k: (scores [Q, k] float32, positions [Q, k]), best first.

    ``vectors`` may be float16; they are converted a block at a time. Fewer than k rows: padded
    with -inf / -1.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(vectors), block_rows):
        block = np.ascontiguousarray(vectors[start : start + block_rows], dtype=np.float32)
        s, i = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        best_s, best_i = merge_top_k(best_s, best_i, s, np.where(i >= 0, i + start, -1), k)
    return best_s, best_i


def merge_top_k(
    scores_a: np.ndarray, keys_a: np.ndarray, scores_b: np.ndarray, keys_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two per-query result lists, best first."""
    scores = np.concatenate([scores_a, scores_b], axis=1)
    keys = np.concatenate([keys_a, keys_b], axis=1)
    scores = np.where(keys < 0, -np.inf, scores)
    pick = top_k(scores, k)
    return np.take_along_axis(scores, pick, axis=1), np.take_along_axis(keys, pick, axis=1)


def score_candidates(queries: np.ndarray, keys: np.ndarray, dim: int, fetch: Fetch) -> np.ndarray:
    """Exact scores [Q, n] of each query against its candidates at ``dim``; -inf for missing keys."""
    q_count, n = keys.shape
    out = np.empty((q_count, n), dtype=np.float32)
    step = max(1, GATHER_ROWS // max(n, 1))
    for start in range(0, q_count, step):
        chunk = keys[start : start + step]
        vecs = fetch(dim, chunk.reshape(-1)).reshape(len(chunk), n, dim)
        q = np.ascontiguousarray(queries[start : start + step, :dim], dtype=np.float32)
        out[start : start + step] = np.einsum("qnd,qd->qn", vecs, q)
    np.nan_to_num(out, copy=False, nan=-np.inf)
    out[keys < 0] = -np.inf
    return out


def rerank(
    keys: np.ndarray, queries_by_dim: Mapping[int, np.ndarray], steps: Sequence[tuple[int, int]], fetch: Fetch
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank candidate ``keys`` [Q, n] exactly with each (dim, keep) step in turn.

    Returns (scores, keys) of the last step, best first; -inf / -1 where fewer rows were found.
    """
    scores = np.full(keys.shape, -np.inf, dtype=np.float32)
    for dim, keep in steps:
        scores = score_candidates(queries_by_dim[dim], keys, dim, fetch)
        pick = top_k(scores, min(keep, keys.shape[1]))
        scores = np.take_along_axis(scores, pick, axis=1)
        keys = np.take_along_axis(keys, pick, axis=1)
        keys = np.where(np.isfinite(scores), keys, -1)
    return scores, keys


def funnel_search(
    schedule: FunnelSchedule, queries_by_dim: Mapping[int, np.ndarray], k: int, tier0: Tier0, fetch: Fetch
) -> tuple[np.ndarray, np.ndarray]:
    """Tier-0 shortlist, then exact re-rank with each longer dim: (scores [Q, k], keys [Q, k]).

    Scores are exact at the schedule's last dim (a one-dim schedule re-scores tier 0's k exactly).
    """
    steps = schedule.steps(k)
    d0, n0 = steps[0]
    keys = tier0(d0, queries_by_dim[d0], n0)
    return rerank(keys, queries_by_dim, steps if len(steps) == 1 else steps[1:], fetch)


def drop_self(keys: np.ndarray, self_keys: np.ndarray, keep: int, scores: np.ndarray | None = None):
    """Remove each query's own key from its result row (else its last entry); keep ``keep`` columns."""
    is_self = keys == np.asarray(self_keys)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")
    keys = np.take_along_axis(keys, order, axis=1)[:, :keep]
    if scores is None:
        return keys
    return keys, np.take_along_axis(scores, order, axis=1)[:, :keep]


@dataclass
class Trial:
    """One schedule tried by calibration: its recall, its re-rank cost (stored values read per
    query) and, when timed, its seconds per query (tier 0 plus re-rank, batched)."""

    schedule: FunnelSchedule
    recall: float
    cost: int
    seconds: float | None = None
    tier0: str = "flat"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out: dict[str, Any] = {"tier0": self.tier0, "schedule": str(self.schedule),
                               "recall": round(self.recall, 5), "rerank_values": self.cost}
        if self.seconds is not None:
            out["queries_per_second"] = round(1 / max(self.seconds, 1e-9), 1)
        return out


class Calibration:
    """A corpus held in memory as prefixes, sample queries, and their exact full-dim top-k.

    ``vectors_by_dim[d]``: [N, d] (float16 or float32, each prefix normalised for cosine);
    ``ids``: the rows' ids (what a tier-0 index returns); ``queries_by_dim[d]``: [Q, d];
    ``query_ids``: when the queries are rows of the corpus, their ids, so that each query's own
    row is left out of both its exact and its funnel results (held-out queries in effect).
    """

    def __init__(
        self,
        vectors_by_dim: Mapping[int, np.ndarray],
        ids: np.ndarray,
        queries_by_dim: Mapping[int, np.ndarray],
        k: int = 10,
        query_ids: np.ndarray | None = None,
    ) -> None:
        self.vectors = {int(d): v for d, v in vectors_by_dim.items()}
        self.dims = sorted(self.vectors)
        self.full = self.dims[-1]
        self.queries = {int(d): np.ascontiguousarray(q, dtype=np.float32) for d, q in queries_by_dim.items()}
        missing = [d for d in self.dims if d not in self.queries]
        if missing:
            raise ValueError(f"queries lack the prefix dims {missing}")
        self.rows = len(self.vectors[self.full])
        if k > self.rows - (query_ids is not None):
            raise ValueError(f"k={k} is larger than the corpus ({self.rows} rows)")
        self.k = k
        self.itemsize = self.vectors[self.full].dtype.itemsize
        self.ids = np.asarray(ids, dtype=np.int64)
        self.idmap = IdMap(self.ids)
        self.self_pos = None if query_ids is None else self.idmap.positions(query_ids)
        extra = 0 if self.self_pos is None else 1
        scores, pos = exact_search(self.vectors[self.full], self.queries[self.full], k + extra)
        if self.self_pos is not None:
            pos, scores = drop_self(pos, self.self_pos, k, scores)
        self.exact_scores = scores

    def fetch(self, dim: int, positions: np.ndarray) -> np.ndarray:
        """Vectors at ``dim`` by row position (the ``Fetch`` of in-memory calibration)."""
        return gather(self.vectors[dim], positions, scratch=True)

    def tier0_keys(self, dim: int, n: int, tier0: Tier0 | None = None) -> np.ndarray:
        """Row positions [Q, n] of the top rows per query at ``dim``: exact (flat) or via ``tier0``."""
        extra = 0 if self.self_pos is None else 1
        n_search = min(n + extra, self.rows)
        if tier0 is None:
            _, keys = exact_search(self.vectors[dim], self.queries[dim], n_search)
        else:
            keys = self.idmap.positions(tier0(dim, self.queries[dim], n_search))
        if self.self_pos is not None:
            keys = drop_self(keys, self.self_pos, n_search - 1)
        return keys

    def score_matrices(self, keys0: np.ndarray) -> Mapping[int, np.ndarray]:
        """Exact scores [Q, n] of the tier-0 candidates at each stored dim, computed on first use."""
        cal = self

        class Lazy(dict):
            def __missing__(self, dim: int) -> np.ndarray:
                self[dim] = score_candidates(cal.queries[dim], keys0, dim, cal.fetch)
                return self[dim]

        return Lazy()

    def recall_of(self, schedule: FunnelSchedule, scores_by_dim: Mapping[int, np.ndarray]) -> float:
        """Recall@k counting ties of ``schedule`` run over precomputed candidate score matrices."""
        if schedule.dims[-1] != self.full:
            raise ValueError(f"schedule {schedule} must end at the full dim {self.full}")
        steps = schedule.steps(self.k)
        width = scores_by_dim[self.full].shape[1]
        cols = np.broadcast_to(np.arange(min(steps[0][1], width)), (len(self.exact_scores), min(steps[0][1], width)))
        scores = None
        for dim, keep in steps if len(steps) == 1 else steps[1:]:
            scores = np.take_along_axis(scores_by_dim[dim], cols, axis=1)
            pick = top_k(scores, min(keep, cols.shape[1]))
            cols = np.take_along_axis(cols, pick, axis=1)
            scores = np.take_along_axis(scores, pick, axis=1)
        found = np.where(np.isfinite(scores), scores, np.nan)
        return recall_at_k_with_ties(found, self.exact_scores, self.k)

    def recall(self, schedule: FunnelSchedule, tier0: Tier0 | None = None) -> float:
        """Recall@k counting ties of ``schedule``, tier 0 flat (exact) unless ``tier0`` is given."""
        d0, n0 = schedule.steps(self.k)[0]
        keys0 = self.tier0_keys(d0, n0, tier0)
        return self.recall_of(schedule, self.score_matrices(keys0))

    def trials(
        self,
        target: float = 0.99,
        shortlist_sizes: Sequence[int] = DEFAULT_SHORTLISTS,
        tier0_dims: Sequence[int] | None = None,
        tier0: Tier0 | None = None,
    ) -> list[Trial]:
        """Recall of candidate schedules, per tier-0 dim: the widest shortlist first (if even it
        misses ``target`` the dim is hopeless), then by re-rank cost up to the first that reaches it.

        Tier 0 is flat (exact) unless ``tier0`` is given.
        """
        out: list[Trial] = []
        for d0 in sorted(set(tier0_dims)) if tier0_dims else self.dims:
            candidates = candidate_schedules(
                self.dims, self.k, shortlist_sizes, (d0,), self.rows - 1, refine=tier0 is not None
            )
            if d0 == self.full and tier0 is None:  # flat at the full dim is exact search itself
                out.append(Trial(candidates[0], 1.0, 0))
                continue
            widest = max(candidates, key=lambda f: (f.steps(self.k)[0][1], -len(f.dims)))
            mats = self.score_matrices(self.tier0_keys(d0, widest.steps(self.k)[0][1], tier0))
            top = Trial(widest, self.recall_of(widest, mats), widest.rerank_cost(self.k))
            out.append(top)
            if top.recall < target:
                continue
            for schedule in candidates:
                t = top if schedule == widest else Trial(schedule, self.recall_of(schedule, mats), schedule.rerank_cost(self.k))
                if t is not top:
                    out.append(t)
                if t.recall >= target:
                    break
        return out

    def flat_tier0(self, dim: int) -> Tier0:
        """An exact FAISS flat index over the ``dim`` prefix, as a ``Tier0`` returning row positions."""
        index = faiss.IndexFlatIP(dim)
        index.add(np.ascontiguousarray(self.vectors[dim], dtype=np.float32))
        return lambda _d, queries, n: index.search(queries, n)[1]

    def seconds(self, schedule: FunnelSchedule, tier0: Tier0 | None = None, repeats: int = 3) -> float:
        """Seconds per query of ``schedule`` over the calibration queries, batched as a search runs
        (tier 0 plus in-memory re-rank; best of ``repeats``). ``tier0`` returns ids; default flat."""
        if tier0 is None:
            search = self.flat_tier0(schedule.dims[0])
        else:
            search = lambda d, q, n: self.idmap.positions(tier0(d, q, n))  # noqa: E731
        best = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            funnel_search(schedule, self.queries, self.k, search, self.fetch)
            best = min(best, time.perf_counter() - started)
        return best / len(self.exact_scores)


def cheapest_hits(trials: Sequence[Trial], target: float) -> dict[int, Trial]:
    """{tier-0 dim: its trial of least re-rank cost reaching ``target``}, by dim."""
    out: dict[int, Trial] = {}
    for t in trials:
        d0 = t.schedule.dims[0]
        if t.recall >= target and (d0 not in out or t.cost < out[d0].cost):
            out[d0] = t
    return dict(sorted(out.items()))


def pick(trials: Sequence[Trial], target: float) -> Trial:
    """The fastest timed trial reaching ``target`` (else the least re-rank cost among untimed ones);
    when none reaches it, the best recall, with a warning."""
    good = [t for t in trials if t.recall >= target]
    timed = [t for t in good if t.seconds is not None]
    if timed:
        return min(timed, key=lambda t: t.seconds)
    if good:
        return min(good, key=lambda t: (t.schedule.dims[0], t.cost))
    best = max(trials, key=lambda t: t.recall)
    warnings.warn(
        f"no funnel schedule reached recall@k {target}; the best, {best.schedule}, reached "
        f"{best.recall:.4f}", stacklevel=2,
    )
    return best


def calibrate_schedule(
    vectors_by_dim: Mapping[int, np.ndarray],
    ids: np.ndarray,
    queries_by_dim: Mapping[int, np.ndarray],
    target: float = 0.99,
    k: int = 10,
    shortlist_sizes: Sequence[int] = DEFAULT_SHORTLISTS,
    query_ids: np.ndarray | None = None,
    tier0_dims: Sequence[int] | None = None,
    tier0: Tier0 | None = None,
) -> tuple[FunnelSchedule, float]:
    """The fastest funnel schedule whose recall@k (ties counted) against exact full-dim search
    reaches ``target``, and that recall.

    For each tier-0 dim the cheapest re-rank reaching the target is found; those are timed on the
    queries (tier 0 flat unless ``tier0``, which maps (dim, queries, n) to ids) and the fastest
    wins. See ``Calibration`` for the arguments.
    """
    cal = Calibration(vectors_by_dim, ids, queries_by_dim, k, query_ids)
    trials = cal.trials(target, shortlist_sizes, tier0_dims, tier0)
    for hit in cheapest_hits(trials, target).values():
        hit.seconds = cal.seconds(hit.schedule, tier0)
    best = pick(trials, target)
    return best.schedule, best.recall
