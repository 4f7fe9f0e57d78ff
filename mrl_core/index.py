"""Tier-0 FAISS index over one stored prefix of a Lance dataset: build, calibrate, publish, load.

Artifacts live beside the dataset (any fsspec URL), one immutable directory per version::

    <dataset>.indexes/CURRENT            the current version's name, replaced atomically
    <dataset>.indexes/v000001/tier0.faiss
    <dataset>.indexes/v000001/manifest.json

A reader reads ``CURRENT`` once, then only that immutable directory, so it never sees a mix of
two versions. FAISS ids are the rows' ``id``s; the metric is inner product on normalised prefixes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import faiss
import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mrl_core import objectstore
from mrl_core.funnel import (
    DEFAULT_SHORTLISTS,
    Calibration,
    FunnelSchedule,
    Trial,
    candidate_schedules,
    cheapest_hits,
    paper_schedule,
    pick,
)
from mrl_core.storage import emb_column, embedding_dims, open_dataset, read_info

FORMAT = 1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
TIER0_FILE = "tier0.faiss"
FLAT_MAX_ROWS = 200_000
"""Below this many rows tier 0 is a flat (exact) index."""
PQ_MIN_ROWS = 10_000_000
"""From this many rows tier 0 is IVF-PQ."""
ID_BYTES = 8
_VERSION_RE = re.compile(r"^v\d{6}$")

Log = Callable[[str], None]


class IndexNotFoundError(FileNotFoundError):
    """No index has been published for a dataset (run ``pipelines/index.py``)."""


class IndexMismatchError(RuntimeError):
    """An index built for another dataset version or another encoder than the dataset holds."""


@dataclass
class IndexManifest:
    """What one index version holds and how it was built (``manifest.json``)."""

    version: str
    dataset_uri: str
    dataset_version: int
    rows_signature: str
    rows: int
    column: str
    dim: int
    full_dim: int
    stored_dims: list[int]
    metric: str
    factory: str
    params: dict[str, Any]
    build_seconds: float
    built_at: str
    bytes_per_vector: float
    index_bytes: int
    encoder: str
    encoder_fingerprint: str
    schedule: dict[str, Any] | None = None
    schedule_recall: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    tier0_file: str = TIER0_FILE
    tier0_sha256: str = ""
    faiss_version: str = faiss.__version__
    format: int = FORMAT

    def funnel_schedule(self) -> FunnelSchedule | None:
        """The calibrated schedule written at build time."""
        return None if self.schedule is None else FunnelSchedule.from_dict(self.schedule)

    def to_json(self) -> str:
        """The manifest as indented JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IndexManifest:
        """Parse ``to_json``'s output (unknown keys from newer writers are ignored)."""
        raw = json.loads(text)
        if raw.get("format", FORMAT) > FORMAT:
            raise ValueError(f"index manifest format {raw['format']} is newer than this code ({FORMAT})")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


# ----------------------------------------------------------------------------- factory choice


def default_index_uri(dataset_uri: str) -> str:
    """Where a dataset's indexes live unless told: ``<dataset_uri>.indexes`` (a sibling)."""
    return dataset_uri.rstrip("/") + ".indexes"


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


def candidate_factories(rows: int, dim: int, max_bytes_per_vector: float | None = None) -> list[str]:
    """Tier-0 factories calibration builds and times for ``rows`` x ``dim`` (the last is the default).

    Between ``FLAT_MAX_ROWS`` and ``PQ_MIN_ROWS`` a flat fast-scan PQ (4-bit codes, every row
    scanned) is tried before IVF: on corpora whose neighbours spread over many IVF lists (the
    PyPI summaries need a quarter of them probed) a compressed full scan is the faster way to 0.99.
    """
    if rows < FLAT_MAX_ROWS:
        return ["IDMap,Flat"]
    budget = max_bytes_per_vector if max_bytes_per_vector else float("inf")
    nlist = nlist_for(rows)
    if rows < PQ_MIN_ROWS:
        out = []
        m = dim // 2
        if m >= 1 and dim % m == 0 and m / 2 + ID_BYTES <= budget:
            out.append(f"IDMap,PQ{m}x4fs")
        for codec, code in (("Flat", 4 * dim), ("SQ8", dim), ("SQ4", dim / 2)):
            if code + ID_BYTES <= budget:
                return [*out, f"IVF{nlist},{codec}"]
    m = max((m for m in (dim // 2, dim // 4, dim // 8, dim // 16) if m >= 1 and dim % m == 0 and m + ID_BYTES <= budget), default=None)
    if m is None:
        m = max(1, dim // 16)
    return [f"IVF{nlist},PQ{m}"]


def new_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index from ``factory``, wrapped in an IDMap when it cannot take ids."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"bad FAISS factory string {factory!r} for {dim} dims: {exc}") from exc
    if faiss.try_extract_index_ivf(index) is None and not isinstance(
        faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)
    ):
        index = faiss.IndexIDMap(index)
    return index


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


def human_bytes(n: float) -> str:
    """``n`` bytes as a short human string (KiB/MiB/GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ----------------------------------------------------------------------------- GPU and search


def gpu_count(gpu: bool | None = None) -> int:
    """GPUs to use: all FAISS sees unless ``gpu`` is False; ``gpu=True`` without one is an error."""
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpu and n == 0:
        raise RuntimeError("GPU requested but FAISS sees no GPU (install faiss-gpu on a CUDA machine)")
    return 0 if gpu is False else n


def to_gpus(index: faiss.Index) -> faiss.Index:
    """``index`` cloned onto every GPU, sharded (each GPU holds a slice of the vectors)."""
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    options.useFloat16 = True
    return faiss.index_cpu_to_all_gpus(index, co=options)


class Tier0Index:
    """A tier-0 FAISS index, on the GPUs when asked (sharded) and on CPU otherwise.

    ``search`` is safe to call from several threads (nprobe is set and used under one lock).
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
                warnings.warn(f"tier 0 stays on the CPU: faiss cannot move it to the GPUs ({exc})", stacklevel=2)
        ivf = faiss.try_extract_index_ivf(index)
        self.nlist = None if ivf is None else int(ivf.nlist)
        self.default_nprobe = None if ivf is None else int(ivf.nprobe)
        self._nprobe = self.default_nprobe
        self._space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        self._lock = threading.Lock()

    @property
    def ntotal(self) -> int:
        """Vectors held."""
        return int(self.cpu_index.ntotal)

    def search(self, queries: np.ndarray, n: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) [Q, n] of the n nearest rows; ids are -1 where fewer were found."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = max(1, min(n, 2048 if self.on_gpu else n))
        with self._lock:
            want = nprobe or self.default_nprobe
            if self.nlist is not None and want != self._nprobe:
                self._space.set_index_parameter(self.index, "nprobe", min(int(want), self.nlist))
                self._nprobe = want
            return self.index.search(queries, n)

    def tier0(self, nprobe: int | None = None) -> Callable[[int, np.ndarray, int], np.ndarray]:
        """This index as a funnel ``Tier0`` function (ignores the dim argument)."""
        return lambda _dim, queries, n: self.search(queries, n, nprobe)[1]


# ----------------------------------------------------------------------------- reading Lance


def column_to_numpy(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A ``fixed_size_list`` column as [N, dim] numpy in its stored float type (float16 stays)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).reshape(-1, dim)


def rows_signature(ds: lance.LanceDataset) -> str:
    """A hash of which rows a dataset version holds (fragments, their row counts and deletions).

    Two versions with the same signature hold the same rows (a config update does not change it),
    so an index built on one serves the other.
    """
    parts = sorted(
        (m.id, m.physical_rows, json.dumps(m.to_json().get("deletion_file"), sort_keys=True))
        for m in (f.metadata for f in ds.get_fragments())
    )
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def sample_positions(rows: int, n: int, seed: int) -> np.ndarray:
    """``n`` distinct row positions in ``[0, rows)``, sorted (all rows when n >= rows)."""
    if n >= rows:
        return np.arange(rows, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False)).astype(np.int64)


def read_rows(ds: lance.LanceDataset, dims: Sequence[int], positions: np.ndarray | None, chunk: int = 1 << 16):
    """(ids, {dim: vectors}) of the rows at ``positions`` (all rows if None), stored dtype kept."""
    columns = ["id", *(emb_column(d) for d in dims)]
    if positions is None:
        table = ds.to_table(columns=columns)
    else:
        table = pa.concat_tables(
            [ds.take(positions[i : i + chunk], columns=columns) for i in range(0, len(positions), chunk)]
        ) if len(positions) else ds.schema.empty_table().select(columns)
    return table["id"].to_numpy(), {d: column_to_numpy(table[emb_column(d)], d) for d in dims}


def calibration_data(
    ds: lance.LanceDataset, dims: Sequence[int], k: int, queries: int, max_rows: int, seed: int
) -> tuple[Calibration, int]:
    """A ``Calibration`` over the dataset's rows (a sample of ``max_rows`` when larger), queried by
    ``queries`` of its own rows, each left out of its own results. Returns it and the rows used.

    The queries are the rows' stored prefixes (normalised on their own, as a query's are).
    """
    rows = ds.count_rows()
    positions = None if rows <= max_rows else sample_positions(rows, max_rows, seed)
    ids, vectors = read_rows(ds, dims, positions)
    picked = np.sort(np.random.default_rng(seed + 1).choice(len(ids), size=min(queries, len(ids)), replace=False))
    query_vecs = {d: vectors[d][picked].astype(np.float32) for d in dims}
    return Calibration(vectors, ids, query_vecs, k, query_ids=ids[picked]), len(ids)


# ----------------------------------------------------------------------------- artifacts


def read_current(index_uri: str, storage_options: Mapping[str, str] | None = None) -> str:
    """The current version's name, from ``CURRENT``."""
    url = objectstore.join(index_uri, CURRENT)
    try:
        name = objectstore.read_bytes(url, storage_options).decode().strip()
    except FileNotFoundError as exc:
        raise IndexNotFoundError(
            f"no index at {index_uri} (no {CURRENT} file); build one with: "
            f"python pipelines/index.py --dataset <dataset uri>"
        ) from exc
    if not _VERSION_RE.match(name):
        raise ValueError(f"{url} names {name!r}, not an index version (vNNNNNN)")
    return name


def list_versions(index_uri: str, storage_options: Mapping[str, str] | None = None) -> list[str]:
    """Index versions present under ``index_uri``, oldest first."""
    return [n for n in objectstore.list_names(index_uri, storage_options) if _VERSION_RE.match(n)]


def read_manifest(index_uri: str, version: str | None = None, storage_options: Mapping[str, str] | None = None) -> IndexManifest:
    """The manifest of ``version`` (default: the current one)."""
    version = version or read_current(index_uri, storage_options)
    url = objectstore.join(index_uri, version, MANIFEST)
    try:
        return IndexManifest.from_json(objectstore.read_bytes(url, storage_options).decode())
    except FileNotFoundError as exc:
        raise IndexNotFoundError(f"index version {version} has no manifest at {url}") from exc


def load_index(
    index_uri: str, version: str | None = None, storage_options: Mapping[str, str] | None = None
) -> tuple[faiss.Index, IndexManifest]:
    """(CPU FAISS index, manifest) of ``version`` (default: read ``CURRENT`` once), checksum verified."""
    manifest = read_manifest(index_uri, version, storage_options)
    url = objectstore.join(index_uri, manifest.version, manifest.tier0_file)
    data = objectstore.read_bytes(url, storage_options)
    if manifest.tier0_sha256 and hashlib.sha256(data).hexdigest() != manifest.tier0_sha256:
        raise ValueError(f"{url} does not match its manifest's checksum: a partial or foreign file")
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), manifest


def set_current(index_uri: str, version: str, storage_options: Mapping[str, str] | None = None) -> None:
    """Point ``CURRENT`` at ``version`` atomically (readers see the old or the new name)."""
    if not _VERSION_RE.match(version):
        raise ValueError(f"not an index version: {version!r}")
    objectstore.replace_atomic(objectstore.join(index_uri, CURRENT), (version + "\n").encode(), storage_options)


def publish(
    index_uri: str, index: faiss.Index, manifest: IndexManifest,
    storage_options: Mapping[str, str] | None = None, make_current: bool = True,
) -> IndexManifest:
    """Write ``index`` and its manifest as the next version directory, then swap ``CURRENT``.

    Fills in the manifest's version, size and checksum. One writer at a time per index URI.
    """
    existing = list_versions(index_uri, storage_options)
    manifest.version = f"v{int(existing[-1][1:]) + 1 if existing else 1:06d}"
    target = objectstore.join(index_uri, manifest.version)
    with tempfile.TemporaryDirectory(prefix="mrl-index-") as tmp:
        local = os.path.join(tmp, manifest.tier0_file)
        faiss.write_index(index, local)
        digest = hashlib.sha256()
        with open(local, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        manifest.tier0_sha256 = digest.hexdigest()
        manifest.index_bytes = os.path.getsize(local)
        manifest.bytes_per_vector = round(manifest.index_bytes / max(manifest.rows, 1), 2)
        objectstore.put_file(local, objectstore.join(target, manifest.tier0_file), storage_options)
    objectstore.write_bytes(objectstore.join(target, MANIFEST), manifest.to_json().encode(), storage_options)
    if make_current:
        set_current(index_uri, manifest.version, storage_options)
    return manifest


def prune_versions(index_uri: str, keep: int, storage_options: Mapping[str, str] | None = None) -> list[str]:
    """Delete all but the newest ``keep`` versions (never the current one); return those deleted.

    A reader that read ``CURRENT`` just before an older version became unreferenced may still be
    loading it: keep at least 2.
    """
    if keep < 1:
        raise ValueError("keep must be >= 1")
    current = read_current(index_uri, storage_options)
    doomed = [v for v in list_versions(index_uri, storage_options)[:-keep] if v != current]
    for v in doomed:
        objectstore.remove(objectstore.join(index_uri, v), storage_options)
    return doomed


# ----------------------------------------------------------------------------- building


def _train(index: faiss.Index, vectors: np.ndarray, ngpu: int) -> None:
    """Train ``index`` (k-means assignments on all GPUs when there are some)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ngpu and ivf is not None:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    try:
        index.train(vectors)
    finally:
        if ngpu and ivf is not None:
            ivf.clustering_index = None


def _check_ids(ids: np.ndarray) -> np.ndarray:
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if (ids == -1).any():
        raise ValueError("id -1 is reserved (FAISS marks missing results with it); rows must not use it")
    return ids


def add_fragments(
    uri: str, version: int, storage_options: Mapping[str, str] | None, fragment_ids: Sequence[int],
    dim: int, empty: np.ndarray,
) -> np.ndarray:
    """A Ray task's work: the trained empty index plus these fragments' rows, serialised."""
    faiss.omp_set_num_threads(1)
    ds = open_dataset(uri, storage_options, version=version)
    index = faiss.deserialize_index(empty)
    for fid in fragment_ids:
        table = ds.get_fragment(fid).to_table(columns=["id", emb_column(dim)])
        if table.num_rows:
            vectors = np.ascontiguousarray(column_to_numpy(table[emb_column(dim)], dim), dtype=np.float32)
            index.add_with_ids(vectors, _check_ids(table["id"].to_numpy()))
    return faiss.serialize_index(index)


def _mergeable(index: faiss.Index) -> bool:
    empty = faiss.serialize_index(index)
    try:
        faiss.deserialize_index(empty).merge_from(faiss.deserialize_index(empty), 0)
        return True
    except RuntimeError:
        return False


def _add_local(index: faiss.Index, ds: lance.LanceDataset, dim: int) -> None:
    for batch in ds.to_batches(columns=["id", emb_column(dim)], batch_size=1 << 16):
        vectors = np.ascontiguousarray(column_to_numpy(batch.column(1), dim), dtype=np.float32)
        index.add_with_ids(vectors, _check_ids(batch.column(0).to_numpy()))


def _add_ray(index: faiss.Index, ds: lance.LanceDataset, dim: int, storage_options, log: Log) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    frags = [(f.fragment_id, f.count_rows()) for f in ds.get_fragments()]
    tasks = max(1, min(len(frags), 2 * int(ray.cluster_resources().get("CPU", 1))))
    per_task = sum(n for _, n in frags) / tasks
    groups: list[list[int]] = [[]]
    filled = 0
    for fid, n in frags:
        if groups[-1] and filled >= per_task:
            groups.append([])
            filled = 0
        groups[-1].append(fid)
        filled += n
    log(f"adding vectors from {len(frags)} fragments in {len(groups)} Ray tasks")
    empty = ray.put(faiss.serialize_index(index))
    remote = ray.remote(num_cpus=1)(add_fragments)
    pending = [remote.remote(ds.uri, ds.version, storage_options, g, dim, empty) for g in groups]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        index.merge_from(faiss.deserialize_index(ray.get(done[0])), 0)


def is_exact(factory: str) -> bool:
    """Whether ``factory`` builds an exact (flat, unquantised) index."""
    return factory.replace("IDMap2,", "").replace("IDMap,", "") == "Flat"


def trained_index(
    ds: lance.LanceDataset, factory: str, dim: int, train_rows: int | None, seed: int, ngpu: int, log: Log
) -> tuple[faiss.Index, dict[str, Any]]:
    """An empty ``factory`` index over ``emb_<dim>``, trained on a sample of the dataset's rows."""
    index = new_index(factory, dim)
    params: dict[str, Any] = {}
    if index.is_trained:
        return index, params
    rows = ds.count_rows()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        params["nlist"] = int(ivf.nlist)
    n_train = train_rows or min(rows, max(40 * (ivf.nlist if ivf is not None else 256), 65_536))
    _, sample = read_rows(ds, [dim], sample_positions(rows, n_train, seed + 2))
    started = time.time()
    _train(index, np.ascontiguousarray(sample[dim], dtype=np.float32), ngpu)
    params.update(train_rows=len(sample[dim]), train_seconds=round(time.time() - started, 2))
    log(f"  trained {factory!r} on {len(sample[dim]):,} sampled rows{f' on {ngpu} GPU(s)' if ngpu else ''} "
        f"in {params['train_seconds']} s")
    return index, params


def tune_tier0(
    cal: Calibration, tier0: Tier0Index, dim: int, target: float, shortlist_sizes: Sequence[int], log: Log,
    label: str = "", bound: float = math.inf,
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
            log(f"  {tag}: tier 0 alone is slower than the best funnel so far; stopping")
            break
        search = tier0.tier0(nprobe)
        found = cal.trials(target, shortlist_sizes, (dim,), search)
        for t in found:
            t.schedule = FunnelSchedule(t.schedule.dims, t.schedule.shortlists, nprobe)
            t.tier0 = label
        trials += found
        hits = cheapest_hits(found, target)
        if not hits:
            log(f"  {tag}: best recall@{cal.k} {max(t.recall for t in found):.4f}")
            continue
        hit = hits[dim]
        hit.seconds = cal.seconds(hit.schedule, search)
        log(f"  {tag}: {hit.schedule} reaches recall@{cal.k} {hit.recall:.4f} at {1 / hit.seconds:,.0f} queries/s")
        if hit.seconds >= best and nprobe is not None and best < bound:
            break  # more probes made it slower
        best = min(best, hit.seconds)
        if (hit.schedule.dims, hit.schedule.shortlists) == (cheapest.dims, cheapest.shortlists):
            break
    return trials


def build_index(
    dataset_uri: str,
    *,
    index_uri: str | None = None,
    storage_options: Mapping[str, str] | None = None,
    factory: str | None = None,
    funnel: str | FunnelSchedule = "auto",
    tier0_dim: int | None = None,
    target_recall: float = 0.99,
    k: int = 10,
    calibration_queries: int = 1000,
    calibration_rows: int = 2_000_000,
    shortlist_sizes: Sequence[int] = DEFAULT_SHORTLISTS,
    tier0_candidates: int = 2,
    max_bytes_per_vector: float | None = None,
    train_rows: int | None = None,
    use_ray: bool | None = None,
    gpu: bool | None = None,
    seed: int = 0,
    make_current: bool = True,
    log: Log | None = print,
) -> IndexManifest:
    """Build, calibrate and publish the tier-0 index of the Lance dataset at ``dataset_uri``.

    ``funnel="auto"``: ``calibration_queries`` of the corpus's own rows (each left out of its own
    results) are searched. With a flat tier 0, each tier-0 dim's cheapest shortlists whose recall@k
    (ties counted) against exact full-dim search reaches ``target_recall`` are found; for the
    ``tier0_candidates`` smallest such dims the real tier 0 is built over the calibration rows,
    its shortlists (and nprobe) re-calibrated and the funnel timed; the fastest wins and goes into
    the manifest with its recall. ``"paper"`` or a ``FunnelSchedule`` (or its string, e.g.
    ``"64:1000,256"``) fix the schedule (its recall is still measured). ``factory`` overrides
    ``candidate_factories`` (each of which calibration builds over the calibration rows and
    times); ``max_bytes_per_vector`` (default: 1/8 of the full dim in float32) bounds tier-0
    memory. ``use_ray``: add vectors in Ray tasks over fragments (default: from 262,144 rows,
    when there are several fragments).
    """
    log = log or (lambda _msg: None)
    started = time.time()
    index_uri = index_uri or default_index_uri(dataset_uri)
    ds = open_dataset(dataset_uri, storage_options)
    info = read_info(ds)
    dims = embedding_dims(ds.schema)
    rows = ds.count_rows()
    if info.metric not in ("cosine", "dot", "ip", "inner_product"):
        raise ValueError(f"dataset metric {info.metric!r} is not supported (cosine or dot product)")
    if rows == 0:
        raise ValueError(f"dataset {dataset_uri} has no rows to index")
    if not dims:
        raise ValueError(f"dataset {dataset_uri} has no emb_<dim> columns")
    if not 0 < target_recall <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    if tier0_dim is not None and tier0_dim not in dims:
        raise ValueError(f"tier-0 dim {tier0_dim} is not a stored dim {dims}")
    if k > rows:
        raise ValueError(f"k={k} is larger than the corpus ({rows} rows)")
    budget = max_bytes_per_vector if max_bytes_per_vector is not None else max(dims) * 4 / 8
    ngpu = gpu_count(gpu)
    log(f"dataset {dataset_uri}: version {ds.version}, {rows:,} rows, stored dims {dims}, encoder {info.encoder}")

    cal: Calibration | None = None
    cal_rows = 0
    trials: list[Trial] = []  # everything tried, for the manifest
    eligible: list[Trial] = []  # trials measured with the tier 0 that would be built
    trained: dict[tuple[int, str], tuple[np.ndarray, dict[str, Any]]] = {}
    recall: float | None = None
    if isinstance(funnel, str) and funnel == "auto":
        if calibration_queries < 1:
            raise ValueError("funnel='auto' needs calibration queries (>= 1)")
        cal, cal_rows = calibration_data(ds, dims, k, calibration_queries, calibration_rows, seed)
        # aim one standard error of the recall estimate above the target, so that the schedule
        # still meets it on queries calibration has not seen
        required = min(1.0, target_recall + math.sqrt(target_recall * (1 - target_recall) / (len(cal.exact_scores) * k)))
        log(f"calibrating the funnel: {len(cal.exact_scores):,} of the corpus's rows as queries over "
            f"{cal_rows:,} rows, target recall@{k} {target_recall} (calibrated to {required:.4f}) against "
            f"exact {max(dims)}-dim search, ties counted")
        stage1 = cal.trials(required, shortlist_sizes, (tier0_dim,) if tier0_dim else None)
        for t in stage1:
            log(f"  flat tier 0 {t.schedule}: recall@{k} {t.recall:.4f}")
        trials += stage1
        hits = list(cheapest_hits(stage1, required).values())
        if len(hits) > 1 and hits[-1].schedule.dims[0] == max(dims):
            hits = hits[:-1]  # a tier 0 at the full dim is no funnel: only when nothing else reaches
        hits = hits[: max(1, tier0_candidates)] or [pick(stage1, required)]
        for hit in hits:
            d0 = hit.schedule.dims[0]
            for chosen_factory in [factory] if factory else candidate_factories(rows, d0, budget):
                estimate, per_vector = estimate_index_bytes(chosen_factory, rows, d0)
                log(f"tier 0 {chosen_factory!r} at {d0} dims: about {human_bytes(estimate)} "
                    f"({per_vector:.0f} bytes/vector)")
                index, params = trained_index(ds, chosen_factory, d0, train_rows, seed, ngpu, log)
                trained[(d0, chosen_factory)] = (faiss.serialize_index(index), params)
                index.add_with_ids(np.ascontiguousarray(cal.vectors[d0], dtype=np.float32), cal.ids)
                tier0 = Tier0Index(index, gpu)
                if is_exact(chosen_factory):
                    hit.seconds = cal.seconds(hit.schedule, tier0.tier0())
                    hit.tier0 = chosen_factory
                    log(f"  {chosen_factory} {hit.schedule}: {1 / hit.seconds:,.0f} queries/s")
                    eligible.append(hit)
                    continue
                bound = min((t.seconds for t in eligible if t.seconds and t.recall >= required), default=math.inf)
                tuned = tune_tier0(cal, tier0, d0, required, shortlist_sizes, log, chosen_factory, bound)
                trials += tuned
                eligible += tuned
        chosen = pick(eligible, required)
        calibration_required = required
        schedule, recall = chosen.schedule, chosen.recall
    elif isinstance(funnel, FunnelSchedule):
        schedule = funnel
    elif funnel == "paper":
        schedule = paper_schedule(dims)
    elif isinstance(funnel, str):
        schedule = FunnelSchedule.parse(funnel)
    else:
        raise ValueError(f"funnel must be 'auto', 'paper' or a FunnelSchedule, got {funnel!r}")
    missing = [d for d in schedule.dims if d not in dims]
    if missing:
        raise ValueError(f"schedule {schedule} uses dims {missing} that the dataset does not store ({dims})")

    dim = schedule.dims[0]
    if funnel == "auto" and (dim, chosen.tier0) in trained:
        factory = chosen.tier0
        empty, params = trained[(dim, factory)]
        index = faiss.deserialize_index(empty)
    else:
        factory = factory or choose_factory(rows, dim, budget)
        index, params = trained_index(ds, factory, dim, train_rows, seed, ngpu, log)
    estimate, per_vector = estimate_index_bytes(factory, rows, dim)
    log(f"building tier 0 {factory!r} over {emb_column(dim)}: {rows:,} vectors x {per_vector:.0f} bytes = about "
        f"{human_bytes(estimate)} of memory (full-dim float32: {human_bytes(rows * max(dims) * 4)})")
    params["gpus"] = ngpu
    ray_ok = use_ray if use_ray is not None else (rows >= 262_144 and len(ds.get_fragments()) > 1)
    if ray_ok and not _mergeable(index):
        log(f"factory {factory!r} cannot merge partial indexes; adding on this process instead")
        ray_ok = False
    t_add = time.time()
    if ray_ok:
        _add_ray(index, ds, dim, storage_options, log)
    else:
        _add_local(index, ds, dim)
    params.update(add_seconds=round(time.time() - t_add, 2), ray=bool(ray_ok))
    if index.ntotal != rows:
        raise RuntimeError(f"index holds {index.ntotal} vectors, the dataset {rows} rows")

    if funnel != "auto" and calibration_queries > 0 and schedule.dims[-1] == max(dims):
        cal, cal_rows = calibration_data(ds, dims, k, calibration_queries, calibration_rows, seed)
        cal_index = index
        if cal_rows < rows:  # calibrating on a sample: search a tier 0 over the same sample
            cal_index = faiss.deserialize_index(faiss.serialize_index(index))
            cal_index.reset()
            cal_index.add_with_ids(np.ascontiguousarray(cal.vectors[dim], dtype=np.float32), cal.ids)
        recall = cal.recall(schedule, Tier0Index(cal_index, gpu).tier0(schedule.nprobe))
    if recall is not None:
        log(f"funnel schedule {schedule}: recall@{k} {recall:.4f} against exact {max(dims)}-dim search")
    calibration: dict[str, Any] = {"target": target_recall, "k": k, "trials": [t.to_dict() for t in trials]}
    if funnel == "auto":
        calibration["required"] = round(calibration_required, 5)
    if cal is not None:
        calibration.update(queries=len(cal.exact_scores), rows=cal_rows)

    manifest = IndexManifest(
        version="", dataset_uri=dataset_uri, dataset_version=int(ds.version), rows_signature=rows_signature(ds),
        rows=int(index.ntotal), column=emb_column(dim), dim=dim, full_dim=max(dims), stored_dims=dims,
        metric=info.metric, factory=factory, params=params, build_seconds=0.0,
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), bytes_per_vector=0.0,
        index_bytes=0, encoder=info.encoder, encoder_fingerprint=info.fingerprint,
        schedule=schedule.to_dict(), schedule_recall=recall, calibration=calibration,
    )
    manifest.params["code_bytes_per_vector"] = code_bytes(index) + ID_BYTES
    manifest.build_seconds = round(time.time() - started, 2)
    manifest = publish(index_uri, index, manifest, storage_options, make_current)
    log(f"published {objectstore.join(index_uri, manifest.version)} ({human_bytes(manifest.index_bytes)}, "
        f"{manifest.bytes_per_vector} bytes/vector){' and made it current' if make_current else ''}")
    return manifest
