"""Funnel retrieval over nested prefixes: a tier-0 shortlist, then exact re-ranks with longer ones.

A schedule is a chain of stored prefix dims with a shortlist size after each but the last:
``64:1000,128:200,256`` searches the 64-dim tier for 1000 candidates, re-ranks them exactly with
128 dims keeping 200, then with 256 dims keeping k. Nothing here knows Lance or FAISS indexes:
vectors come through a ``fetch`` function, tier 0 through a ``tier0`` function. Choosing a
schedule for a corpus is ``mrl_core.calibration``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mrl_core.defaults import K
from mrl_core.search import search_threads, threads_for, top_k

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

    def rerank_cost(self, k: int = K) -> int:
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


def take_rows(vectors: np.ndarray, positions: np.ndarray, scratch: bool = False) -> np.ndarray:
    """float32 rows of ``vectors`` at ``positions``; NaN rows where the position is -1.

    ``scratch=True`` writes into a per-thread buffer that the next such call overwrites (for a
    caller that consumes the rows at once, as re-ranking does).
    """
    positions = np.asarray(positions, dtype=np.int64)
    shape = (len(positions), vectors.shape[1])
    if scratch:
        rows = np.take(vectors, np.maximum(positions, 0), axis=0,
                       out=_scratch("rows", shape, vectors.dtype), mode="clip")
    else:
        rows = vectors[np.maximum(positions, 0)]
    if rows.dtype == np.float32:
        out = rows
    else:  # torch converts float16 several times faster than numpy's astype
        out = _scratch("f32", shape, np.float32) if scratch else np.empty(shape, dtype=np.float32)
        torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(rows)))
    out[positions < 0] = np.nan
    return out


def score_candidates(queries: np.ndarray, keys: np.ndarray, dim: int, fetch: Fetch) -> np.ndarray:
    """Exact scores [Q, n] of each query against its candidates at ``dim``; -inf for missing keys."""
    q_count, n = keys.shape
    out = np.empty((q_count, n), dtype=np.float32)
    step = max(1, GATHER_ROWS // max(n, 1))
    with search_threads(threads_for(q_count * n * dim)):  # no threads for a tiny re-rank
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
