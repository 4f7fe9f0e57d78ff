"""The tier-0 FAISS index over one stored prefix: its factory, training, search and tuning.

The factory follows the corpus size and a memory budget (``candidate_factories``,
``choose_factory``); ``new_index`` makes an empty inner-product index that takes the rows' ``id``s,
``fit_index`` trains it (on the GPUs when there are some); ``Tier0Index`` searches it on the CPU
or sharded over all GPUs; ``tune_tier0`` finds the shortlists (and IVF nprobe) with which it
reaches a recall target on a calibration sample. Nothing here reads Lance: building tier 0 from
a dataset is ``mrl_core.index``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Sequence

import faiss
import numpy as np

from mrl_core.calibration import Calibration, Trial, candidate_schedules, cheapest_hits
from mrl_core.funnel import FunnelSchedule
from mrl_core.search import exact_search, search_threads, threads_for

logger = logging.getLogger(__name__)

FLAT_MAX_ROWS = 200_000
"""Below this many rows tier 0 is a flat (exact) index."""
PQ_MIN_ROWS = 10_000_000
"""From this many rows tier 0 is IVF-PQ."""
ID_BYTES = 8
"""Bytes of a row's id in the index (int64)."""
GPU_MAX_K = 2048
"""The most results faiss-gpu returns per query."""


# ----------------------------------------------------------------------------- factory choice


def nlist_for(rows: int) -> int:
    """IVF list count: the power of two nearest 2*sqrt(rows) (from 8M rows on: 8*sqrt), >= 64."""
    target = (8 if rows >= 8_000_000 else 2) * math.sqrt(max(rows, 1))
    return max(64, 1 << round(math.log2(target)))


def choose_factory(rows: int, dim: int, max_bytes_per_vector: float | None = None) -> str:
    """The default FAISS factory string for ``rows`` vectors of ``dim`` dims.

    Flat below ``FLAT_MAX_ROWS``; IVF with the richest codec whose codes plus the 8-byte id fit
    ``max_bytes_per_vector`` (Flat, SQ8, SQ4, then PQ) below ``PQ_MIN_ROWS``; IVF-PQ from there.
    """
    return candidate_factories(rows, dim, max_bytes_per_vector)[-1]


def candidate_factories(
    rows: int, dim: int, max_bytes_per_vector: float | None = None
) -> list[str]:
    """Tier-0 factories calibration builds and times for ``rows`` x ``dim`` (the last: default).

    Between ``FLAT_MAX_ROWS`` and ``PQ_MIN_ROWS`` a flat fast-scan PQ (4-bit codes, every row
    scanned) is tried before IVF: on corpora whose neighbours spread over many IVF lists (the
    PyPI summaries need a quarter of them probed) a compressed full scan is faster to 0.99.
    """
    if rows < FLAT_MAX_ROWS:
        return ["IDMap,Flat"]
    budget = max_bytes_per_vector if max_bytes_per_vector else math.inf
    nlist = nlist_for(rows)
    if rows < PQ_MIN_ROWS:
        out = []
        m = dim // 2
        if m >= 1 and dim % m == 0 and m / 2 + ID_BYTES <= budget:
            out.append(f"IDMap,PQ{m}x4fs")
        for codec, code in (("Flat", 4 * dim), ("SQ8", dim), ("SQ4", dim / 2)):
            if code + ID_BYTES <= budget:
                return [*out, f"IVF{nlist},{codec}"]
    fitting = [m for m in (dim // 2, dim // 4, dim // 8, dim // 16)
               if m >= 1 and dim % m == 0 and m + ID_BYTES <= budget]
    return [f"IVF{nlist},PQ{max(fitting, default=max(1, dim // 16))}"]


def new_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index from ``factory``, in an IDMap when it cannot take ids."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"bad FAISS factory string {factory!r} for {dim} dims: {exc}") from exc
    if faiss.try_extract_index_ivf(index) is None and not isinstance(
        faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)
    ):
        index = faiss.IndexIDMap(index)
    return index


def is_exact(factory: str) -> bool:
    """Whether ``factory`` builds an exact (flat, unquantised) index."""
    return factory.replace("IDMap2,", "").replace("IDMap,", "") == "Flat"


def code_bytes(index: faiss.Index) -> int:
    """Bytes one vector's code takes in ``index`` (without the id)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return int(ivf.code_size)
    inner = faiss.downcast_index(index)
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    return int(getattr(inner, "code_size", 4 * index.d))


def estimate_index_bytes(factory: str, rows: int, dim: int) -> tuple[int, float]:
    """(total bytes, bytes per vector) the index will need in memory: codes, ids, centroids."""
    index = new_index(factory, dim)
    per_vector = code_bytes(index) + ID_BYTES
    ivf = faiss.try_extract_index_ivf(index)
    fixed = 0 if ivf is None else ivf.nlist * dim * 4
    if "PQ" in factory:
        fixed += 256 * dim * 4
    return int(rows * per_vector + fixed), float(per_vector)


def fit_index(index: faiss.Index, vectors: np.ndarray, ngpu: int = 0) -> None:
    """Train ``index`` (k-means assignments on all GPUs when there are some)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ngpu and ivf is not None:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    try:
        index.train(vectors)
    finally:
        if ngpu and ivf is not None:
            ivf.clustering_index = None


def mergeable(index: faiss.Index) -> bool:
    """Whether partial copies of ``index`` merge (``merge_from``), as adding in Ray tasks needs."""
    empty = faiss.serialize_index(index)
    try:
        faiss.deserialize_index(empty).merge_from(faiss.deserialize_index(empty), 0)
        return True
    except RuntimeError:
        return False


# ----------------------------------------------------------------------------- search


def gpu_count(gpu: bool | None = None) -> int:
    """GPUs to use: all FAISS sees unless ``gpu`` is False; ``gpu=True`` without one is a
    ``mrl_core.device.DeviceError`` naming the node, the FAISS and torch builds and the driver."""
    if gpu is False:
        return 0
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpu and n == 0:
        from mrl_core.device import faiss_build, gpu_error

        raise gpu_error("FAISS", f"GPU requested but {faiss_build(faiss)} sees no GPU")
    return n


def to_gpus(index: faiss.Index) -> faiss.Index:
    """``index`` cloned onto every GPU, sharded (each GPU holds a slice of the vectors)."""
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    options.useFloat16 = True
    return faiss.index_cpu_to_all_gpus(index, co=options)


class Tier0Index:
    """A tier-0 FAISS index, on the GPUs when asked (sharded) and on CPU otherwise.

    ``search`` is safe to call from several threads. On the CPU nothing is shared between calls:
    each passes its own nprobe (``faiss.SearchParametersIVF``) and sets its own thread count
    (``mrl_core.search.search_threads``: one thread for small batches, all for large ones); a flat
    tier 0 is searched by ``mrl_core.search.exact_search`` over the index's own vectors, at GEMM
    speed at every batch size. The GPU copy sets nprobe on the index, under a lock.
    """

    def __init__(self, index: faiss.Index, gpu: bool | None = None) -> None:
        self.cpu_index = index
        self.index = index
        self.on_gpu = False
        if gpu_count(gpu):
            try:
                self.index, self.on_gpu = to_gpus(index), True
            except RuntimeError as exc:  # an index type faiss-gpu cannot hold
                if gpu:
                    raise
                warnings.warn(
                    f"tier 0 stays on the CPU: faiss cannot move it to the GPUs ({exc})",
                    stacklevel=2,
                )
        ivf = faiss.try_extract_index_ivf(index)
        self.nlist = None if ivf is None else int(ivf.nlist)
        self.default_nprobe = None if ivf is None else int(ivf.nprobe)
        self._nprobe = self.default_nprobe
        self._space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        self._lock = threading.Lock()
        self._params_ok = True  # cleared when the index takes no per-call search parameters
        self._flat = None if self.on_gpu else _flat_parts(index)
        self._scanned = code_bytes(index) * index.ntotal  # bytes one query reads (all lists probed)

    @property
    def ntotal(self) -> int:
        """Vectors held."""
        return int(self.cpu_index.ntotal)

    def search(
        self, queries: np.ndarray, n: int, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) [Q, n] of the n nearest rows; ids are -1 where fewer were found."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = max(1, min(n, GPU_MAX_K if self.on_gpu else n))
        want = nprobe or self.default_nprobe
        if self.on_gpu:
            return self._search_locked(queries, n, want)
        if self._flat is not None:
            vectors, ids = _views(*self._flat)  # views taken per call: the index may grow
            scores, positions = exact_search(queries, vectors, n)
            return scores, np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)
        share = 1.0 if self.nlist is None else min(1.0, int(want) / self.nlist)
        with search_threads(threads_for(len(queries) * self._scanned * share)):
            if self.nlist is None:
                return self.index.search(queries, n)
            if self._params_ok:
                params = faiss.SearchParametersIVF(nprobe=min(int(want), self.nlist))
                try:
                    return self.index.search(queries, n, params=params)
                except RuntimeError:  # an index that takes no search parameters
                    self._params_ok = False
            return self._search_locked(queries, n, want)

    def _search_locked(self, queries: np.ndarray, n: int, want: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Search with nprobe set on the index itself (the GPU copy), one caller at a time."""
        with self._lock:
            if self.nlist is not None and want != self._nprobe:
                probes = min(int(want), self.nlist)
                self._space.set_index_parameter(self.index, "nprobe", probes)
                self._nprobe = want
            return self.index.search(queries, n)

    def tier0(self, nprobe: int | None = None) -> Callable[[int, np.ndarray, int], np.ndarray]:
        """This index as a funnel ``Tier0`` function (ignores the dim argument)."""
        return lambda _dim, queries, n: self.search(queries, n, nprobe)[1]


def flat_vectors(index: faiss.Index) -> tuple[np.ndarray, np.ndarray] | None:
    """(vectors [N, d] float32, ids [N]) of an inner-product ``IDMap,Flat`` index: views of the
    index's own memory, valid until it next changes (never copied); None for other indexes."""
    parts = _flat_parts(index)
    return None if parts is None else _views(*parts)


def _flat_parts(index: faiss.Index) -> tuple[faiss.Index, faiss.Index] | None:
    """(the IDMap, its flat inner-product index) of an ``IDMap,Flat`` index, else None."""
    outer = faiss.downcast_index(index)
    if not isinstance(outer, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return None
    inner = faiss.downcast_index(outer.index)
    if type(inner) not in (faiss.IndexFlatIP, faiss.IndexFlat) or inner.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    return outer, inner


def _views(outer: faiss.Index, inner: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """The vectors and ids ``_flat_parts`` found, as numpy views of the index's memory."""
    rows = int(inner.ntotal)
    if rows == 0:
        return np.zeros((0, inner.d), dtype=np.float32), np.zeros(0, dtype=np.int64)
    vectors = faiss.rev_swig_ptr(inner.get_xb(), rows * inner.d).reshape(rows, inner.d)
    return vectors, faiss.rev_swig_ptr(outer.id_map.data(), rows)


# ----------------------------------------------------------------------------- tuning


def sample_tier0(index: faiss.Index, cal: Calibration) -> faiss.Index:
    """A tier 0 over ``cal``'s rows, given ``index`` over all of the dataset's rows or none:
    ``index`` itself when calibration holds every row, else an emptied copy (the same training)
    with the calibration rows added."""
    if index.ntotal == cal.rows:
        return index
    probe = faiss.deserialize_index(faiss.serialize_index(index))
    probe.reset()
    probe.add_with_ids(np.ascontiguousarray(cal.vectors[index.d], dtype=np.float32), cal.ids)
    return probe


def tune_tier0(
    cal: Calibration, tier0: Tier0Index, dim: int, target: float,
    shortlist_sizes: Sequence[int], label: str = "", bound: float = math.inf,
) -> list[Trial]:
    """Shortlists (and nprobe, for IVF) calibrated against a real, possibly quantised, tier 0.

    For nprobe = 1, 2, 4, ... the cheapest re-rank reaching ``target`` is timed. It stops when a
    larger nprobe is no faster, when the re-rank is already the cheapest candidate, or when tier 0
    alone takes longer than ``bound`` (seconds per query: the best found so far elsewhere).
    """
    cheapest = candidate_schedules(cal.dims, cal.k, shortlist_sizes, (dim,), cal.rows - 1)[0]
    nprobes: list[int | None] = [None]
    if tier0.nlist is not None:
        nprobes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if p <= tier0.nlist]
    queries = cal.queries[dim]
    trials: list[Trial] = []
    best = bound
    for nprobe in nprobes:
        started = time.perf_counter()
        tier0.search(queries, cal.k, nprobe)
        alone = (time.perf_counter() - started) / len(queries)
        tag = label + ("" if nprobe is None else f" nprobe={nprobe}")
        if alone >= best:
            logger.info(f"  {tag}: tier 0 alone is slower than the best funnel so far; stopping")
            break
        search = tier0.tier0(nprobe)
        found = cal.trials(target, shortlist_sizes, (dim,), search)
        for t in found:
            t.schedule = FunnelSchedule(t.schedule.dims, t.schedule.shortlists, nprobe)
            t.tier0 = label
        trials += found
        hits = cheapest_hits(found, target)
        if not hits:
            logger.info(f"  {tag}: best recall@{cal.k} {max(t.recall for t in found):.4f}")
            continue
        hit = hits[dim]
        hit.seconds = cal.seconds(hit.schedule, search)
        logger.info(f"  {tag}: {hit.schedule} reaches recall@{cal.k} {hit.recall:.4f} "
                    f"at {1 / hit.seconds:,.0f} queries/s")
        if hit.seconds >= best and nprobe is not None and best < bound:
            break  # more probes made it slower
        best = min(best, hit.seconds)
        if (hit.schedule.dims, hit.schedule.shortlists) == (cheapest.dims, cheapest.shortlists):
            break
    return trials
