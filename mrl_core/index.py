"""Building the tier-0 FAISS index of a Lance dataset, as public steps ``build_index`` composes.

1. choose: ``mrl_core.tier0.choose_factory`` (``candidate_factories``), by corpus size and memory;
2. train: ``train_index``, an empty index trained on a sample of the rows (``TrainedTier0``);
3. add: ``add_vectors``, every row added under its id, in this process or in Ray tasks over
   groups of fragments (``mrl_core.index_add``);
4. calibrate: ``calibrate``, the fastest funnel schedule reaching the target (a flat tier-0 stage,
   then the real tier 0 tuned by ``mrl_core.tier0.tune_tier0``); ``measure_recall`` measures a
   given schedule (the same way on a sample: ``mrl_core.tier0.sample_tier0``);
5. publish: ``new_manifest`` describes the build; ``mrl_core.index_store.publish`` writes it.

FAISS ids are the rows' ``id``s; the metric is inner product on normalised prefixes. Where the
artifacts live and how readers load them: ``mrl_core.index_store``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any

import faiss
import lance
import numpy as np
import pyarrow as pa

from mrl_core import objectstore
from mrl_core.calibration import Calibration, Trial, cheapest_hits, faster_methods, pick
from mrl_core.defaults import (
    CALIBRATION_QUERIES,
    CALIBRATION_ROWS,
    SHORTLISTS,
    TARGET_RECALL,
    TIER0_CANDIDATES,
    K,
)
from mrl_core.funnel import FunnelSchedule, paper_schedule
from mrl_core.index_add import add_local, add_with_ray
from mrl_core.index_store import IndexManifest, default_index_uri, publish
from mrl_core.storage import (
    DatasetInfo,
    column_to_numpy,
    emb_column,
    embedding_dims,
    open_dataset,
    read_info,
    rows_signature,
)
from mrl_core.tier0 import (
    ID_BYTES,
    Tier0Index,
    candidate_factories,
    choose_factory,
    code_bytes,
    estimate_index_bytes,
    fit_index,
    gpu_count,
    is_exact,
    mergeable,
    new_index,
    sample_tier0,
    tune_tier0,
)

logger = logging.getLogger(__name__)

RAY_MIN_ROWS = 262_144
"""From this many rows (over several fragments) vectors are added in Ray tasks by default."""
TRAIN_ROWS_PER_LIST = 40
"""Rows sampled per IVF list (per PQ centroid: 256) to train tier 0, by default ..."""
TRAIN_MIN_ROWS = 65_536
"""... and at least this many (or every row)."""
METRICS = ("cosine", "dot", "ip", "inner_product")


@dataclass(frozen=True)
class CalibrationOptions:
    """How the funnel is calibrated (``funnel="auto"``) or a fixed schedule's recall measured."""

    target_recall: float = TARGET_RECALL
    k: int = K
    calibration_queries: int = CALIBRATION_QUERIES
    calibration_rows: int = CALIBRATION_ROWS
    shortlist_sizes: Sequence[int] = SHORTLISTS
    tier0_candidates: int = TIER0_CANDIDATES
    tier0_dim: int | None = None


@dataclass(frozen=True)
class BuildOptions:
    """How tier 0 is built: factory, memory budget, training sample, Ray, GPUs and seed."""

    factory: str | None = None
    max_bytes_per_vector: float | None = None
    train_rows: int | None = None
    use_ray: bool | None = None
    gpu: bool | None = None
    seed: int = 0

    def budget(self, dims: Sequence[int]) -> float:
        """Tier-0 bytes per row: ``max_bytes_per_vector``, else 1/8 of the full dim in float32."""
        if self.max_bytes_per_vector is not None:
            return self.max_bytes_per_vector
        return max(dims) * 4 / 8


@dataclass
class TrainedTier0:
    """An empty tier-0 index trained for ``emb_<dim>``, serialised: each use gets its own copy."""

    factory: str
    dim: int
    data: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)

    def index(self) -> faiss.Index:
        """A fresh copy of the empty, trained index."""
        return faiss.deserialize_index(self.data)


@dataclass
class Calibrated:
    """A funnel schedule and what calibration (or a recall measurement) found for it."""

    schedule: FunnelSchedule
    recall: float | None = None
    trials: list[Trial] = field(default_factory=list)
    required: float | None = None
    queries: int = 0
    rows: int = 0
    tier0: TrainedTier0 | None = None
    """The tier 0 the schedule was tuned with (``calibrate``), to be built as it is."""
    search_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    """Seconds per query of the schedule and of exact search by batch size (``Calibration.speed``)."""

    def record(self, options: CalibrationOptions) -> dict[str, Any]:
        """The manifest's ``calibration`` entry."""
        out: dict[str, Any] = {"target": options.target_recall, "k": options.k,
                               "trials": [t.to_dict() for t in self.trials]}
        if self.required is not None:
            out["required"] = round(self.required, 5)
        if self.queries:
            out.update(queries=self.queries, rows=self.rows)
        return out


# ----------------------------------------------------------------------------- helpers


def human_bytes(n: float) -> str:
    """``n`` bytes as a short human string (KiB/MiB/GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ----------------------------------------------------------------------------- reading Lance


def sample_positions(rows: int, n: int, seed: int) -> np.ndarray:
    """``n`` distinct row positions in ``[0, rows)``, sorted (all rows when n >= rows)."""
    if n >= rows:
        return np.arange(rows, dtype=np.int64)
    picked = np.random.default_rng(seed).choice(rows, size=n, replace=False)
    return np.sort(picked).astype(np.int64)


def read_rows(
    ds: lance.LanceDataset, dims: Sequence[int], positions: np.ndarray | None, chunk: int = 1 << 16
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(ids, {dim: vectors}) of the rows at ``positions`` (all rows if None), stored dtype kept."""
    columns = ["id", *(emb_column(d) for d in dims)]
    if positions is None:
        table = ds.to_table(columns=columns)
    elif len(positions):
        parts = [positions[i : i + chunk] for i in range(0, len(positions), chunk)]
        table = pa.concat_tables([ds.take(part, columns=columns) for part in parts])
    else:
        table = ds.schema.empty_table().select(columns)
    return table["id"].to_numpy(), {d: column_to_numpy(table[emb_column(d)], d) for d in dims}


def calibration_data(
    ds: lance.LanceDataset, dims: Sequence[int], k: int, queries: int, max_rows: int, seed: int
) -> tuple[Calibration, int]:
    """A ``Calibration`` over the dataset's rows (a sample of ``max_rows`` when larger), queried
    by ``queries`` of its own rows, each left out of its own results; and the rows it holds.

    The queries are the rows' stored prefixes (normalised on their own, as a query's are).
    """
    rows = ds.count_rows()
    positions = None if rows <= max_rows else sample_positions(rows, max_rows, seed)
    ids, vectors = read_rows(ds, dims, positions)
    rng = np.random.default_rng(seed + 1)
    picked = np.sort(rng.choice(len(ids), size=min(queries, len(ids)), replace=False))
    query_vecs = {d: vectors[d][picked].astype(np.float32) for d in dims}
    return Calibration(vectors, ids, query_vecs, k, query_ids=ids[picked]), len(ids)


# ----------------------------------------------------------------------------- 2. train


def train_index(
    ds: lance.LanceDataset, factory: str, dim: int, *,
    train_rows: int | None = None, seed: int = 0, ngpu: int = 0,
) -> TrainedTier0:
    """An empty ``factory`` index over ``emb_<dim>``, trained on a sample of the dataset's rows."""
    index = new_index(factory, dim)
    params: dict[str, Any] = {"gpus": ngpu}
    if not index.is_trained:
        rows = ds.count_rows()
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            params["nlist"] = int(ivf.nlist)
        lists = ivf.nlist if ivf is not None else 256
        n_train = train_rows or min(rows, max(TRAIN_ROWS_PER_LIST * lists, TRAIN_MIN_ROWS))
        _, sample = read_rows(ds, [dim], sample_positions(rows, n_train, seed + 2))
        started = time.time()
        fit_index(index, np.ascontiguousarray(sample[dim], dtype=np.float32), ngpu)
        params.update(train_rows=len(sample[dim]), train_seconds=round(time.time() - started, 2))
        logger.info(f"  trained {factory!r} on {len(sample[dim]):,} sampled rows"
                    f"{f' on {ngpu} GPU(s)' if ngpu else ''} in {params['train_seconds']} s")
    return TrainedTier0(factory, dim, faiss.serialize_index(index), params)


# ----------------------------------------------------------------------------- 3. add


def add_vectors(
    trained: TrainedTier0, ds: lance.LanceDataset, *, use_ray: bool | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> tuple[faiss.Index, dict[str, Any]]:
    """``trained``'s tier 0 holding every row, and the add's manifest params.

    In Ray tasks when ``use_ray`` (default: from ``RAY_MIN_ROWS`` rows in several fragments) and
    the index type merges, else in this process.
    """
    rows, full = ds.count_rows(), max(embedding_dims(ds.schema))
    estimate, per_vector = estimate_index_bytes(trained.factory, rows, trained.dim)
    logger.info(f"building tier 0 {trained.factory!r} over {emb_column(trained.dim)}: {rows:,} "
                f"vectors x {per_vector:.0f} bytes = about {human_bytes(estimate)} of memory "
                f"(full-dim float32: {human_bytes(rows * full * 4)})")
    index = trained.index()
    ray = use_ray if use_ray is not None else rows >= RAY_MIN_ROWS and len(ds.get_fragments()) > 1
    if ray and not mergeable(index):
        logger.info(f"factory {trained.factory!r} cannot merge partial indexes; "
                    f"adding on this process instead")
        ray = False
    started = time.time()
    if ray:
        add_with_ray(index, ds, trained.dim, storage_options)
    else:
        add_local(index, ds, trained.dim)
    if index.ntotal != rows:
        raise RuntimeError(f"index holds {index.ntotal} vectors, the dataset {rows} rows")
    return index, {"add_seconds": round(time.time() - started, 2), "ray": bool(ray)}


# ----------------------------------------------------------------------------- 4. calibrate


def required_recall(target: float, queries: int, k: int) -> float:
    """``target`` plus one standard error of a recall@k measured over ``queries`` queries, so that
    a schedule reaching it still meets ``target`` on queries calibration has not seen."""
    return min(1.0, target + math.sqrt(target * (1 - target) / (queries * k)))


def measure_recall(
    ds: lance.LanceDataset, index: faiss.Index, schedule: FunnelSchedule,
    calibration: CalibrationOptions | None = None, *, seed: int = 0, gpu: bool | None = None,
) -> Calibrated:
    """Recall@k (ties counted) of ``schedule`` with ``index`` (all rows of ``ds``) as tier 0,
    measured on ``calibration_queries`` of the rows over at most ``calibration_rows`` of them."""
    c = calibration or CalibrationOptions()
    dims = embedding_dims(ds.schema)
    cal, cal_rows = calibration_data(
        ds, dims, c.k, c.calibration_queries, c.calibration_rows, seed
    )
    tier0 = Tier0Index(sample_tier0(index, cal), gpu).tier0(schedule.nprobe)
    recall = cal.recall(schedule, tier0)
    return Calibrated(schedule, recall, queries=len(cal.exact_scores), rows=cal_rows)


def _flat_hits(trials: list[Trial], required: float, candidates: int, full: int) -> list[Trial]:
    """The flat-stage trials whose tier-0 dims get a real tier 0: the cheapest reaching
    ``required`` at each of the ``candidates`` smallest dims (the full dim only when no other
    dim reaches it), else the best trial."""
    hits = list(cheapest_hits(trials, required).values())
    if len(hits) > 1 and hits[-1].schedule.dims[0] == full:
        hits = hits[:-1]  # a tier 0 at the full dim is no funnel: only when nothing else reaches
    return hits[: max(1, candidates)] or [pick(trials, required)]


def _try_tier0(
    cal: Calibration, hit: Trial, trained: TrainedTier0, required: float,
    shortlist_sizes: Sequence[int], bound: float, gpu: bool | None,
) -> list[Trial]:
    """Trials of ``trained`` built over the calibration rows: ``hit`` timed as it is when the
    tier 0 is exact, else shortlists and nprobe re-tuned against it."""
    tier0 = Tier0Index(sample_tier0(trained.index(), cal), gpu)
    if not is_exact(trained.factory):
        label = trained.factory
        return tune_tier0(cal, tier0, trained.dim, required, shortlist_sizes, label, bound)
    hit.seconds = cal.seconds(hit.schedule, tier0.tier0())
    hit.tier0 = trained.factory
    logger.info(f"  {trained.factory} {hit.schedule}: {1 / hit.seconds:,.0f} queries/s")
    return [hit]


def calibrate(
    ds: lance.LanceDataset, calibration: CalibrationOptions | None = None,
    options: BuildOptions | None = None,
) -> Calibrated:
    """The fastest funnel schedule reaching the target: flat tier-0 stage, then real tier 0s.

    ``calibration_queries`` of the corpus's rows are searched (each left out of its own results).
    With a flat tier 0, each tier-0 dim's cheapest shortlists whose recall@k (ties counted)
    against exact full-dim search reaches the target (plus one standard error) are found; for the
    ``tier0_candidates`` smallest such dims each candidate factory is trained, built over the
    calibration rows, its shortlists (and nprobe) re-tuned and the funnel timed; the fastest wins.
    """
    c, options = calibration or CalibrationOptions(), options or BuildOptions()
    if c.calibration_queries < 1:
        raise ValueError("funnel='auto' needs calibration queries (>= 1)")
    dims, rows, ngpu = embedding_dims(ds.schema), ds.count_rows(), gpu_count(options.gpu)
    cal, cal_rows = calibration_data(
        ds, dims, c.k, c.calibration_queries, c.calibration_rows, options.seed
    )
    required = required_recall(c.target_recall, len(cal.exact_scores), c.k)
    logger.info(f"calibrating the funnel: {len(cal.exact_scores):,} of the corpus's rows as "
                f"queries over {cal_rows:,} rows, target recall@{c.k} {c.target_recall} "
                f"(calibrated to {required:.4f}) against exact {max(dims)}-dim search, "
                f"ties counted")
    flat = cal.trials(required, c.shortlist_sizes, (c.tier0_dim,) if c.tier0_dim else None)
    for t in flat:
        logger.info(f"  flat tier 0 {t.schedule}: recall@{c.k} {t.recall:.4f}")
    trials = list(flat)  # everything tried, for the manifest
    eligible: list[Trial] = []  # trials measured with the tier 0 that would be built
    trained: dict[tuple[int, str], TrainedTier0] = {}
    for hit in _flat_hits(flat, required, c.tier0_candidates, max(dims)):
        d0 = hit.schedule.dims[0]
        factories = candidate_factories(rows, d0, options.budget(dims))
        for factory in [options.factory] if options.factory else factories:
            estimate, per_vector = estimate_index_bytes(factory, rows, d0)
            logger.info(f"tier 0 {factory!r} at {d0} dims: about {human_bytes(estimate)} "
                        f"({per_vector:.0f} bytes/vector)")
            trained[(d0, factory)] = train_index(
                ds, factory, d0, train_rows=options.train_rows, seed=options.seed, ngpu=ngpu
            )
            bound = min((t.seconds for t in eligible if t.seconds and t.recall >= required),
                        default=math.inf)
            found = _try_tier0(cal, hit, trained[(d0, factory)], required, c.shortlist_sizes,
                                bound, options.gpu)
            trials += [t for t in found if t is not hit]
            eligible += found
    chosen = pick(eligible, required)
    tier0 = trained.get((chosen.schedule.dims[0], chosen.tier0))
    return Calibrated(chosen.schedule, chosen.recall, trials, required, len(cal.exact_scores),
                      cal_rows, tier0, _search_speed(cal, chosen.schedule, tier0, options.gpu))


def _search_speed(
    cal: Calibration, schedule: FunnelSchedule, trained: TrainedTier0 | None, gpu: bool | None
) -> dict[str, dict[str, float]]:
    """Seconds per query of ``schedule`` (over ``trained`` built on the calibration rows) and of
    exact search, at each of calibration's batch sizes; logged, with what ``funnel="auto"`` will run."""
    tier0 = None if trained is None else Tier0Index(sample_tier0(trained.index(), cal), gpu).tier0(schedule.nprobe)
    speed = cal.speed(schedule, tier0)
    methods = faster_methods(speed)
    for batch, s in speed.items():
        logger.info(f"  batch {batch}: funnel {1 / s['funnel']:,.0f} queries/s, exact "
                    f"{1 / s['exact']:,.0f} queries/s: funnel='auto' runs {methods[batch]}")
    return speed


# ----------------------------------------------------------------------------- 5. publish


def new_manifest(
    dataset_uri: str, ds: lance.LanceDataset, index: faiss.Index, factory: str,
    params: Mapping[str, Any], chosen: Calibrated, calibration: CalibrationOptions,
) -> IndexManifest:
    """The manifest of ``index`` built over ``ds`` (``publish`` fills in version and sizes)."""
    info, dims = read_info(ds), embedding_dims(ds.schema)
    dim = chosen.schedule.dims[0]
    return IndexManifest(
        version="", dataset_uri=dataset_uri, dataset_version=int(ds.version),
        rows_signature=rows_signature(ds), rows=int(index.ntotal), column=emb_column(dim),
        dim=dim, full_dim=max(dims), stored_dims=dims, metric=info.metric, factory=factory,
        params={**params, "code_bytes_per_vector": code_bytes(index) + ID_BYTES},
        build_seconds=0.0, built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        bytes_per_vector=0.0, index_bytes=0, encoder=info.encoder,
        encoder_fingerprint=info.fingerprint, schedule=chosen.schedule.to_dict(),
        schedule_recall=chosen.recall, calibration=chosen.record(calibration),
        search_seconds=chosen.search_seconds, auto_search=faster_methods(chosen.search_seconds),
    )


# ----------------------------------------------------------------------------- the whole build


def _verify_dataset(ds: lance.LanceDataset, uri: str) -> tuple[DatasetInfo, list[int], int]:
    """(encoder info, stored dims, rows) of a dataset tier 0 can be built over, else ValueError."""
    info, dims, rows = read_info(ds), embedding_dims(ds.schema), ds.count_rows()
    if info.metric not in METRICS:
        raise ValueError(f"dataset metric {info.metric!r} is not supported (cosine or dot product)")
    if rows == 0:
        raise ValueError(f"dataset {uri} has no rows to index")
    if not dims:
        raise ValueError(f"dataset {uri} has no emb_<dim> columns")
    return info, dims, rows


def _verify_calibration(c: CalibrationOptions, dims: Sequence[int], rows: int) -> None:
    """ValueError unless ``c`` fits a dataset of ``rows`` rows storing ``dims``."""
    if not 0 < c.target_recall <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {c.target_recall}")
    if c.tier0_dim is not None and c.tier0_dim not in dims:
        raise ValueError(f"tier-0 dim {c.tier0_dim} is not a stored dim {list(dims)}")
    if c.k < 1:
        raise ValueError(f"k must be >= 1, got {c.k}")


def fit_to_rows(c: CalibrationOptions, rows: int) -> CalibrationOptions:
    """``c`` for a corpus of ``rows`` rows: calibration leaves each query's own row out, so k is
    capped at ``rows - 1``; a single row has nothing to calibrate against (no queries)."""
    if rows <= 1:
        return replace(c, k=1, calibration_queries=0)
    if c.k > rows - 1:
        logger.info(f"k={c.k} capped at {rows - 1}: the corpus has {rows} rows")
        return replace(c, k=rows - 1)
    return c


def fixed_schedule(funnel: str | FunnelSchedule, dims: Sequence[int]) -> FunnelSchedule:
    """The schedule ``funnel`` names ("paper", a schedule string or a ``FunnelSchedule``)."""
    if isinstance(funnel, FunnelSchedule):
        schedule = funnel
    elif funnel == "paper":
        schedule = paper_schedule(dims)
    elif isinstance(funnel, str):
        schedule = FunnelSchedule.parse(funnel)
    else:
        raise ValueError(f"funnel must be 'auto', 'paper' or a FunnelSchedule, got {funnel!r}")
    missing = [d for d in schedule.dims if d not in dims]
    if missing:
        raise ValueError(f"schedule {schedule} uses dims {missing} that the dataset does not "
                         f"store ({list(dims)})")
    return schedule


def _with_knobs(
    options: BuildOptions | None, calibration: CalibrationOptions | None, knobs: Mapping[str, Any]
) -> tuple[BuildOptions, CalibrationOptions]:
    """``options`` and ``calibration`` (defaults for None) with keyword knobs set by field name."""
    build = {f.name for f in fields(BuildOptions)}
    cal = {f.name for f in fields(CalibrationOptions)}
    unknown = sorted(set(knobs) - build - cal)
    if unknown:
        raise TypeError(f"build_index() got unexpected keyword argument(s): {', '.join(unknown)}")
    return (replace(options or BuildOptions(), **{k: v for k, v in knobs.items() if k in build}),
            replace(calibration or CalibrationOptions(),
                    **{k: v for k, v in knobs.items() if k in cal}))


def build_index(
    dataset_uri: str,
    *,
    index_uri: str | None = None,
    storage_options: Mapping[str, str] | None = None,
    funnel: str | FunnelSchedule = "auto",
    make_current: bool = True,
    options: BuildOptions | None = None,
    calibration: CalibrationOptions | None = None,
    **knobs: Any,
) -> IndexManifest:
    """Build, calibrate and publish the tier-0 index of the Lance dataset at ``dataset_uri``.

    ``funnel="auto"``: ``calibrate``; the schedule found and its tier 0 are built. ``"paper"``
    or a ``FunnelSchedule`` (or its string, e.g. ``"64:1000,128:200,256"``) fix the schedule
    (its recall is still measured, ``measure_recall``, unless ``calibration_queries=0``).
    ``knobs``: any field of ``BuildOptions`` or ``CalibrationOptions`` by name (``factory=``,
    ``target_recall=``, ``use_ray=``...), applied over ``options`` and ``calibration``.
    """
    started = time.time()
    options, calibration = _with_knobs(options, calibration, knobs)
    ds = open_dataset(dataset_uri, storage_options)
    info, dims, rows = _verify_dataset(ds, dataset_uri)
    _verify_calibration(calibration, dims, rows)
    calibration = fit_to_rows(calibration, rows)
    if rows == 1:  # nothing to calibrate against: one exact full-dim step
        funnel = FunnelSchedule((max(dims),), ())
    ngpu = gpu_count(options.gpu)
    logger.info(f"dataset {dataset_uri}: version {ds.version}, {rows:,} rows, stored dims {dims}, "
                f"encoder {info.encoder}")
    if funnel == "auto":  # noqa: SIM108
        chosen = calibrate(ds, calibration, options)
    else:
        chosen = Calibrated(fixed_schedule(funnel, dims))
    dim = chosen.schedule.dims[0]
    trained = chosen.tier0 or train_index(
        ds, options.factory or choose_factory(rows, dim, options.budget(dims)), dim,
        train_rows=options.train_rows, seed=options.seed, ngpu=ngpu,
    )
    index, params = add_vectors(trained, ds, use_ray=options.use_ray,
                                storage_options=storage_options)
    measure = calibration.calibration_queries > 0 and chosen.schedule.dims[-1] == max(dims)
    if chosen.recall is None and measure:
        chosen = measure_recall(ds, index, chosen.schedule, calibration, seed=options.seed,
                                gpu=options.gpu)
    if chosen.recall is not None:
        logger.info(f"funnel schedule {chosen.schedule}: recall@{calibration.k} "
                    f"{chosen.recall:.4f} against exact {max(dims)}-dim search")
    manifest = new_manifest(dataset_uri, ds, index, trained.factory, {**trained.params, **params},
                            chosen, calibration)
    manifest.build_seconds = round(time.time() - started, 2)
    index_uri = index_uri or default_index_uri(dataset_uri)
    manifest = publish(index_uri, index, manifest, storage_options, make_current)
    logger.info(f"published {objectstore.join(index_uri, manifest.version)} "
                f"({human_bytes(manifest.index_bytes)}, {manifest.bytes_per_vector} bytes/vector)"
                f"{' and made it current' if make_current else ''}")
    return manifest
