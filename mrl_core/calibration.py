"""Calibration: the fastest funnel schedule whose recall@k (ties counted) against exact
full-dim search reaches a target, measured on a corpus held in memory.

Candidate schedules are tried per tier-0 dim, cheapest re-rank first; every one tried is a
``Trial`` (recall, re-rank cost, and seconds per query when timed), kept for the manifest. The
chosen funnel and exact search are then timed at batch 1 and at a large batch (``Calibration.speed``):
where exact search is faster, ``funnel="auto"`` runs it (``faster_methods``, ``method_at``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mrl_core.defaults import SHORTLISTS, TARGET_RECALL, K
from mrl_core.funnel import FunnelSchedule, IdMap, Tier0, funnel_search, score_candidates, take_rows
from mrl_core.search import exact_search, recall_at_k_with_ties, top_k

TIMED_CALLS = 32
"""Calls timed per batch size below the large batch (batch 1: 32 queries, one call each)."""

LARGE_BATCH = 1024
"""The large batch calibration times (all its queries in one batch when it has fewer)."""

SPEED_BATCHES = (1, 10, LARGE_BATCH)
"""Batch sizes at which calibration times the funnel against exact search."""

Search = Callable[[Mapping[int, np.ndarray]], object]
"""A search of queries given by prefix dim ({dim: [Q, dim]}), as timed by ``Calibration.seconds_per_query``."""


def candidate_schedules(
    stored_dims: Sequence[int], k: int = K, shortlist_sizes: Sequence[int] = SHORTLISTS,
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
        k: int = K,
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
        scores, pos = exact_search(self.queries[self.full], self.vectors[self.full], k + extra)
        if self.self_pos is not None:
            pos, scores = drop_self(pos, self.self_pos, k, scores)
        self.exact_scores = scores

    def fetch(self, dim: int, positions: np.ndarray) -> np.ndarray:
        """Vectors at ``dim`` by row position (the ``Fetch`` of in-memory calibration)."""
        return take_rows(self.vectors[dim], positions, scratch=True)

    def tier0_keys(self, dim: int, n: int, tier0: Tier0 | None = None) -> np.ndarray:
        """Row positions [Q, n] of the top rows per query at ``dim``: exact (flat) or via ``tier0``."""
        extra = 0 if self.self_pos is None else 1
        n_search = min(n + extra, self.rows)
        if tier0 is None:
            _, keys = exact_search(self.queries[dim], self.vectors[dim], n_search)
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
        target: float = TARGET_RECALL,
        shortlist_sizes: Sequence[int] = SHORTLISTS,
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
                t = top if schedule == widest else Trial(schedule, self.recall_of(schedule, mats),
                                                         schedule.rerank_cost(self.k))
                if t is not top:
                    out.append(t)
                if t.recall >= target:
                    break
        return out

    def flat_tier0(self, dim: int) -> Tier0:
        """Exact search over the ``dim`` prefix (float32 copy), as a ``Tier0`` returning row positions."""
        vectors = np.ascontiguousarray(self.vectors[dim], dtype=np.float32)
        return lambda _d, queries, n: exact_search(queries, vectors, n)[1]

    def funnel(self, schedule: FunnelSchedule, tier0: Tier0 | None = None) -> Search:
        """``schedule`` over these rows as a ``Search`` (tier 0 plus in-memory re-rank); ``tier0``
        returns ids, default flat."""
        if tier0 is None:
            search = self.flat_tier0(schedule.dims[0])
        else:
            search = lambda d, q, n: self.idmap.positions(tier0(d, q, n))  # noqa: E731
        return lambda queries: funnel_search(schedule, queries, self.k, search, self.fetch)

    def exact(self) -> Search:
        """Exact full-dim search over these rows, as stored (what ``Corpus.search(exact=True)`` runs)."""
        return lambda queries: exact_search(queries[self.full], self.vectors[self.full], self.k)

    def seconds_per_query(self, search: Search, batch: int, repeats: int = 2) -> float:
        """Seconds per query of ``search`` over the calibration queries sent ``batch`` at a time,
        best of ``repeats``: the first ``TIMED_CALLS`` calls' worth of queries (all, for the large batch)."""
        count = min(len(self.exact_scores), batch * TIMED_CALLS)
        parts = [{d: q[lo : min(lo + batch, count)] for d, q in self.queries.items()}
                 for lo in range(0, count, batch)]
        best = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            for part in parts:
                search(part)
            best = min(best, time.perf_counter() - started)
        return best / count

    def seconds(self, schedule: FunnelSchedule, tier0: Tier0 | None = None, repeats: int = 3) -> float:
        """Seconds per query of ``schedule`` over the calibration queries, batched as a search runs
        (tier 0 plus in-memory re-rank; best of ``repeats``). ``tier0`` returns ids; default flat."""
        return self.seconds_per_query(self.funnel(schedule, tier0), len(self.exact_scores), repeats)

    def speed(
        self, schedule: FunnelSchedule, tier0: Tier0 | None = None, batches: Sequence[int] = SPEED_BATCHES
    ) -> dict[str, dict[str, float]]:
        """Seconds per query of the funnel ``schedule`` and of exact full-dim search at each batch
        size (capped at the calibration queries): {"1": {"funnel": s, "exact": s}, "1000": ...}."""
        out: dict[str, dict[str, float]] = {}
        funnel, exact = self.funnel(schedule, tier0), self.exact()
        for batch in sorted({max(1, min(int(b), len(self.exact_scores))) for b in batches}):
            out[str(batch)] = {"funnel": self.seconds_per_query(funnel, batch),
                               "exact": self.seconds_per_query(exact, batch)}
        return out


def faster_methods(seconds: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    """{batch size: "exact" where exact search timed faster than the funnel, else "funnel"}."""
    return {batch: "exact" if s["exact"] < s["funnel"] else "funnel" for batch, s in seconds.items()}


def method_at(methods: Mapping[str, str], queries: int) -> str:
    """What ``funnel="auto"`` runs for a call of ``queries`` queries: the method of the measured
    batch size nearest it in ratio (the smaller on a tie); "funnel" when nothing was measured."""
    if not methods:
        return "funnel"
    nearest = min(methods, key=lambda b: (round(abs(math.log(max(queries, 1) / int(b))), 9), int(b)))
    return methods[nearest]


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
    target: float = TARGET_RECALL,
    k: int = K,
    shortlist_sizes: Sequence[int] = SHORTLISTS,
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
