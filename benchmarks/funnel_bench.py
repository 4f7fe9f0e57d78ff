"""Funnel retrieval side by side with its peers at batch 1, 10 and 1024, one run, one machine.

    python benchmarks/funnel_bench.py                       # PyPI summaries, default encoder, CPU
    python benchmarks/funnel_bench.py --adaptor /tmp/mrl_bench/pypi-adaptor/adaptor
    python benchmarks/funnel_bench.py --gpu --synthetic-rows 10000000 --skip-lancedb --skip-autofaiss

Embeds the corpus (cached under --work-dir), writes the Lance dataset the embed pipeline would
write (emb_16 ... emb_256, float16), builds the calibrated tier-0 index with ``build_index``'s
defaults, then times each method at each batch size (the median over calls of seconds per query)
on held-out queries: bare FAISS flat at its best setting, ``Corpus`` exact, the funnel
(``funnel="auto"``) and its own steps done bare, the funnel on an adaptor-trained embedding with a
64-dim tier 0, LanceDB IVF_PQ with refine_factor, and the FAISS indexes autofaiss picks within
the funnel's memory, refined from the same float16 vectors (``benchmarks/peers.py``). Peers with
a knob are swept to the cheapest setting reaching recall@10 0.99, or their best recall. Recall@k
is measured against exact full-dim search counting ties, every method's ids re-scored the same
way. Writes a recall-vs-queries/s plot and the results as JSON under --report-dir.

Needs the ``bench`` extra (matplotlib) and, for the autofaiss peers, autofaiss without its pins
(it pins numpy<2 and pandas<3; only its choice of factory is used):
``pip install --no-deps autofaiss==2.18.0 embedding-reader==1.8.1 fire termcolor``. The adaptor:
``python pipelines/train.py adaptor --embeddings /tmp/mrl_bench/corpus-embeddings-<fingerprint>.npy
--epochs 12 --cosine --lr 3e-3 --temperature 0.05 --loss-weights 0.1,0.25,4,1,0
--out /tmp/mrl_bench/pypi-adaptor --local`` (the corpus's embeddings, held-out queries removed,
are written by the first run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import faiss
import hardware  # this directory's
import lance
import numpy as np
import peers  # this directory's
import pyarrow as pa
import pyarrow.parquet as pq

from mrl_core.calibration import method_at
from mrl_core.corpus import Corpus, result_matrix
from mrl_core.encoders import DEFAULT_ENCODER, get_encoder
from mrl_core.funnel import take_rows
from mrl_core.index import build_index, human_bytes
from mrl_core.index_store import default_index_uri, read_manifest
from mrl_core.nesting import l2_normalize
from mrl_core.search import exact_search, recall_at_k_with_ties, search_threads, threads_for
from mrl_core.settings import EmbedSettings
from mrl_core.storage import (
    INFO_KEY,
    DatasetInfo,
    derive_ids,
    embedding_arrays,
    make_schema,
    read_info,
)
from mrl_core.tier0 import gpu_count, to_gpus

DIMS = (16, 32, 64, 128, 256)
EXTRA_SCHEDULES = ("paper", "64:200,256", "64:1000,256", "128:200,256")


def add_corpus_args(p: argparse.ArgumentParser) -> None:
    """The corpus, encoder and held-out queries (shared with tier0_sweep.py)."""
    p.add_argument("--data", default="/work/shared/data/pypi_summaries.parquet",
                   help="Parquet file with the texts to embed")
    p.add_argument("--text-column", default="summary", help="column holding the texts")
    p.add_argument("--work-dir", default="/tmp/mrl_bench", help="where embeddings, datasets and indexes go")
    p.add_argument("--encoder", default=DEFAULT_ENCODER, help="encoder spec")
    p.add_argument("--queries", type=int, default=2000, help="held-out rows used as queries")
    p.add_argument("--max-rows", type=int, default=0, help="only the first N rows of --data (0: all; smoke tests)")
    p.add_argument("--k", type=int, default=10, help="k of recall@k")


def held_out(rows: int, queries: int) -> np.ndarray:
    """Boolean mask of the corpus rows: all but ``queries`` held-out rows (a fixed draw)."""
    held = np.random.default_rng(0).choice(rows, size=queries, replace=False)
    mask = np.ones(rows, dtype=bool)
    mask[held] = False
    return mask


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_corpus_args(p)
    p.add_argument("--keep", default="name,summary", help="pass-through columns written to the dataset")
    p.add_argument("--target-recall", type=float, default=0.99, help="calibration target of the funnel")
    p.add_argument("--batches", default="1,10,1024", help="batch sizes every method is timed at")
    p.add_argument("--single-queries", type=int, default=200, help="queries timed one call each at batch 1")
    p.add_argument("--small-queries", type=int, default=500, help="queries timed at other batches below 1024")
    p.add_argument("--repeats", type=int, default=2, help="passes over the timed queries (medians are reported)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the indexes even if current ones exist")
    p.add_argument("--adaptor", help="a trained adaptor directory (pipelines/train.py adaptor): its embedding "
                                     "is indexed with a 64-dim tier 0 and searched as one more method")
    p.add_argument("--adaptor-tier0-dim", type=int, default=64, help="tier-0 dim of the adaptor's index")
    p.add_argument("--skip-lancedb", action="store_true", help="skip the LanceDB IVF_PQ peer")
    p.add_argument("--lancedb-partitions", type=int, default=1024, help="LanceDB IVF partitions")
    p.add_argument("--lancedb-sub-vectors", type=int, default=32, help="LanceDB PQ sub-vectors (bytes/vector)")
    p.add_argument("--lancedb-settings", default="20:10,50:10,50:20,100:20,100:40,200:40,400:80",
                   help="nprobes:refine_factor settings tried in turn until one reaches the target")
    p.add_argument("--skip-autofaiss", action="store_true", help="skip the autofaiss peers")
    p.add_argument("--autofaiss-settings", default="16:1,16:10,64:10,64:20,128:20,256:40,512:40",
                   help="nprobe:refine settings (refine: candidates per result re-ranked) tried in turn")
    p.add_argument("--cache-gib", type=float, default=4.0,
                   help="memory for re-rank tiers (beyond it they are fetched from Lance by id)")
    p.add_argument("--report-dir", default=str(Path(__file__).parent / "reports"), help="where the plot and JSON go")
    p.add_argument("--gpu", action="store_true", help="build and search tier 0 and exact flat on all GPUs (faiss-gpu)")
    p.add_argument("--synthetic-rows", type=int, default=0,
                   help="instead of the real corpus alone, tile its embeddings with noise up to this many rows")
    return p.parse_args()


def embed_corpus(args: argparse.Namespace, work: Path) -> tuple[pa.Table, np.ndarray, str]:
    """The input table and its float32 embeddings (cached on disk by encoder fingerprint)."""
    table = pq.read_table(args.data)
    if getattr(args, "max_rows", 0):
        table = table.slice(0, args.max_rows)
    encoder = get_encoder(args.encoder)
    cache = work / f"embeddings-{encoder.fingerprint}-{table.num_rows}.npy"
    if cache.exists():
        return table, np.load(cache), encoder.fingerprint
    texts = [t or "" for t in table[args.text_column].to_pylist()]
    started = time.perf_counter()
    emb = np.empty((len(texts), encoder.dim), dtype=np.float32)
    for i in range(0, len(texts), 100_000):
        emb[i : i + 100_000] = encoder.encode(texts[i : i + 100_000])
    print(f"embedded {len(texts):,} texts with {args.encoder} in {time.perf_counter() - started:.1f} s")
    np.save(cache, emb)
    return table, emb, encoder.fingerprint


def synthetic(emb: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    """``rows`` vectors: the real ones tiled, each copy jittered per coordinate (keeps nesting)."""
    rng = np.random.default_rng(seed)
    std = emb.std(axis=0, keepdims=True)
    out = np.empty((rows, emb.shape[1]), dtype=np.float32)
    for start in range(0, rows, len(emb)):
        n = min(len(emb), rows - start)
        out[start : start + n] = emb[:n] + 0.3 * std * rng.standard_normal((n, emb.shape[1]), dtype=np.float32)
    return out


def write_dataset(uri: str, table: pa.Table, emb: np.ndarray, keep: list[str], info: DatasetInfo) -> lance.LanceDataset:
    """The dataset the embed pipeline writes, reused when already there with the same rows."""
    if os.path.exists(uri):
        ds = lance.dataset(uri)
        if ds.count_rows() == len(emb) and read_info(ds).fingerprint == info.fingerprint:
            return ds
        shutil.rmtree(uri)
        shutil.rmtree(default_index_uri(uri), ignore_errors=True)
    fields = [table.schema.field(c) for c in keep]
    schema = make_schema(DIMS, "float16", fields)
    shard = "pypi_summaries.parquet"

    def batches():
        for start in range(0, len(emb), 131_072):
            stop = min(start + 131_072, len(emb))
            cols = {
                "id": pa.array(derive_ids(1, np.arange(start, stop))),
                "shard": pa.array([shard] * (stop - start)),
                **{c: table[c].slice(start, stop - start).combine_chunks() for c in keep},
                **embedding_arrays(emb[start:stop], DIMS),
            }
            yield pa.RecordBatch.from_pydict(cols, schema=schema)

    started = time.perf_counter()
    ds = lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), uri, max_rows_per_file=131_072)
    ds.update_config({INFO_KEY: info.to_json()})
    print(f"wrote {uri}: {len(emb):,} rows in {time.perf_counter() - started:.1f} s")
    return lance.dataset(uri)


def prepare(args: argparse.Namespace, work: Path, encoder_spec: str, name: str,
            tier0_dim: int | None = None) -> tuple[Corpus, np.ndarray, float | None]:
    """The corpus embedded with ``encoder_spec`` (held-out queries removed) as a Lance dataset with
    a calibrated index (built unless a current one fits), opened; its held-out queries; build seconds."""
    keep = [c for c in args.keep.split(",") if c]
    spec = argparse.Namespace(data=args.data, text_column=args.text_column, encoder=encoder_spec,
                              max_rows=args.max_rows)
    table, emb, fingerprint = embed_corpus(spec, work)
    mask = held_out(len(emb), args.queries)
    queries = emb[~mask]
    corpus_table, corpus_emb = table.filter(pa.array(mask)), emb[mask]
    training = work / f"corpus-embeddings-{fingerprint}.npy"  # the adaptor trains on these: no held-out row
    if not training.exists() and not args.max_rows:
        np.save(training, corpus_emb)
    if args.synthetic_rows:
        corpus_emb = synthetic(corpus_emb, args.synthetic_rows)
        reps = -(-args.synthetic_rows // corpus_table.num_rows)
        corpus_table = pa.concat_tables([corpus_table] * reps).slice(0, args.synthetic_rows)
        name = f"{name}-synthetic-{args.synthetic_rows}"
    del emb
    encoder = get_encoder(encoder_spec)
    settings = EmbedSettings(encoder=encoder_spec, dims=DIMS, keep=tuple(keep))
    info = DatasetInfo(settings, fingerprint, encoder.dim, tuple(encoder.nesting.dims))
    uri = str(work / f"{name}{f'-{args.max_rows}' if args.max_rows else ''}.lance")
    ds = write_dataset(uri, corpus_table, corpus_emb, keep, info)
    index_uri = default_index_uri(uri)
    try:
        manifest = read_manifest(index_uri)
        fresh = (manifest.rows == ds.count_rows() and not args.rebuild and manifest.auto_search
                 and manifest.calibration.get("target") == args.target_recall
                 and (tier0_dim is None or manifest.dim == tier0_dim))
    except FileNotFoundError:
        fresh = False
    build_seconds = None
    if not fresh:
        started = time.perf_counter()
        build_index(uri, target_recall=args.target_recall, k=args.k, gpu=True if args.gpu else None,
                    tier0_dim=tier0_dim)
        build_seconds = time.perf_counter() - started
    corpus = Corpus.open(uri, gpu=True if args.gpu else None, cache_bytes=int(args.cache_gib * (1 << 30)))
    corpus.warm()
    corpus._tier(corpus.full_dim)  # exact search's tier, cached as funnel="auto" and exact=True use it
    return corpus, queries, build_seconds


def corpus_search(corpus: Corpus, k: int, **options) -> peers.Search:
    """``Corpus.search`` on query vectors, timed as it is (its result table); ``.ids`` gives ids [B, k]."""
    def search(q: np.ndarray):
        return corpus.search(q, k=k, **options)

    search.ids = lambda q: result_matrix(search(q), "id", len(q), k, fill=-1)
    return search


def bare_funnel(corpus: Corpus, k: int, threads: int) -> peers.Search:
    """The funnel's own steps without ``Corpus``: the FAISS search of the same tier-0 index (its
    calibrated nprobe, on ``threads`` threads), then a NumPy gather and re-rank of the candidates."""
    schedule = corpus.schedule
    steps = schedule.steps(k)
    index = corpus.index.cpu_index
    params = None
    if faiss.try_extract_index_ivf(index) is not None:
        params = faiss.SearchParametersIVF(nprobe=schedule.nprobe or corpus.index.default_nprobe)
    tiers = {d: corpus._tier(d) for d, _ in steps[1:]}
    corpus._positions(np.zeros(0, dtype=np.int64))
    idmap = corpus._idmap

    def search(q: np.ndarray) -> np.ndarray:
        with search_threads(threads):
            d0, n0 = steps[0]
            ids = index.search(l2_normalize(q[:, :d0]), n0, params=params)[1]
            for dim, keep in steps[1:]:
                rows = tiers[dim][idmap.positions(ids)].astype(np.float32)
                scores = np.einsum("qnd,qd->qn", rows, l2_normalize(q[:, :dim]))
                scores[ids < 0] = -np.inf
                if keep < scores.shape[1]:
                    part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
                    ids, scores = np.take_along_axis(ids, part, 1), np.take_along_axis(scores, part, 1)
                ids = np.take_along_axis(ids, np.argsort(-scores, axis=1, kind="stable"), 1)
            return ids

    return search


def bare_exact(corpus: Corpus, k: int) -> peers.Search:
    """``Corpus``'s exact search without ``Corpus``: ``exact_search`` over the same cached full-dim tier."""
    tier = corpus._tier(corpus.full_dim)
    corpus._positions(np.zeros(0, dtype=np.int64))
    ids = corpus._ids
    return lambda q: ids[exact_search(l2_normalize(q), tier, k)[1]]


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    report = Path(args.report_dir)
    batches = [int(b) for b in args.batches.split(",")]
    started_load = hardware.load()
    corpus, queries, build_seconds = prepare(args, work, args.encoder, "pypi")
    manifest, rows, k, full = corpus.manifest, corpus.rows, args.k, corpus.full_dim

    # the exact reference and bare FAISS flat: full-dim float32 copies of the stored float16 vectors
    stored = corpus._tier(full)
    ids = corpus._ids
    full_vectors = stored.astype(np.float32)
    q_full = l2_normalize(queries.astype(np.float32))
    flat = faiss.IndexFlatIP(full)
    flat.add(full_vectors)
    exact_scores = np.concatenate([flat.search(q_full[i : i + 1024], k)[0] for i in range(0, len(q_full), 1024)])
    nq = len(q_full)

    def recall(found_ids: np.ndarray) -> float:
        """Recall@k (ties counted) of ids found for the first len(found_ids) queries, re-scored at the full dim."""
        n = len(found_ids)
        pos = corpus._idmap.positions(found_ids.reshape(-1))
        vecs = take_rows(full_vectors, pos).reshape(n, -1, full)
        return recall_at_k_with_ties(np.einsum("qkd,qd->qk", vecs, q_full[:n]), exact_scores[:n], k)

    def recall_of(search: peers.Search, batch: int = 1024) -> float:
        return recall(peers.in_batches(getattr(search, "ids", search), q_full, batch))

    def limit(batch: int) -> int:
        return args.single_queries if batch == 1 else args.small_queries if batch < 1024 else nq

    results: list[dict] = []

    def measure(name: str, search: peers.Search, memory: int, note: str = "", settings: dict | None = None,
                recall_by_batch: dict | None = None) -> dict:
        """Time ``search`` at every batch size; recall from a pass in batches of 1024 unless given."""
        row = {"method": name, "memory": memory, "note": note, "settings": settings or {}, "qps": {}, "recall": {}}
        r = recall_of(search) if recall_by_batch is None else None
        for b in batches:
            row["qps"][b] = 1 / peers.seconds_per_query(search, q_full, b, limit(b), args.repeats)
            row["recall"][b] = r if recall_by_batch is None else recall_by_batch[b]
        results.append(row)
        print(f"{name}: recall@{k} {row['recall']}, queries/s " +
              ", ".join(f"batch {b}: {q:,.0f}" for b, q in row["qps"].items()), flush=True)
        return row

    # 1. bare FAISS flat, its best setting at each batch size (threads, BLAS threshold)
    if args.gpu and gpu_count(True):
        gpu_flat = to_gpus(flat)
        settings = {"GPU": lambda q: gpu_flat.search(q, k)[1]}
    else:
        settings = {label: peers.flat_search(flat, k, t, blas) for label, t, blas in peers.flat_settings()}
    flat_row = {"method": "bare FAISS flat, full dim (float32)", "memory": rows * full * 4, "note": "",
                "settings": {}, "qps": {}, "recall": {}}
    for b in batches:
        label, _, seconds = peers.best_setting(settings, q_full, b, limit(b))
        flat_row["qps"][b], flat_row["recall"][b], flat_row["settings"][b] = 1 / seconds, 1.0, label
    results.append(flat_row)
    print(f"bare FAISS flat: {flat_row['qps']} ({flat_row['settings']})", flush=True)

    # 2. Corpus exact and its own step done bare
    exact_memory = stored.nbytes
    measure("Corpus exact (exact=True)", corpus_search(corpus, k, exact=True), exact_memory, "float16 tier")
    measure("  bare: exact_search over the same tier", bare_exact(corpus, k), exact_memory, "no Corpus")

    # 3. the funnel, funnel="auto", and its own steps done bare
    schedule = corpus.schedule
    cache = sum(t.nbytes for d, t in corpus._tiers.items() if d in schedule.dims[1:])
    funnel_memory = manifest.index_bytes + cache
    auto_recall = {b: recall_of(corpus_search(corpus, k), b) if b < 1024 else None for b in batches}
    auto_recall = {b: r if r is not None else recall_of(corpus_search(corpus, k)) for b, r in auto_recall.items()}
    methods = {b: method_at(manifest.auto_search, b) for b in batches}
    measure(f"funnel auto = {schedule} ({manifest.factory})", corpus_search(corpus, k), funnel_memory,
            "tier 0 + re-rank tiers", {b: m for b, m in methods.items()}, auto_recall)
    measure(f"funnel {schedule}", corpus_search(corpus, k, funnel=str(schedule)), funnel_memory, "always the funnel")
    threads = {b: threads_for(b * rows * schedule.dims[0] / 16) for b in batches}
    bare = {t: bare_funnel(corpus, k, t) for t in sorted(set(threads.values()) | {1, faiss.omp_get_max_threads()})}
    bare_row = {"method": "  bare: FAISS tier 0 + NumPy re-rank", "memory": funnel_memory, "note": "no Corpus",
                "settings": {}, "qps": {}, "recall": {}}
    r = recall_of(bare[1])
    for b in batches:
        label, _, seconds = peers.best_setting({f"{t} threads": s for t, s in bare.items()}, q_full, b, limit(b))
        bare_row["qps"][b], bare_row["recall"][b], bare_row["settings"][b] = 1 / seconds, r, label
    results.append(bare_row)
    print(f"bare funnel steps: {bare_row['qps']} ({bare_row['settings']})", flush=True)
    del bare

    # 4. the adaptor embedding with a 64-dim tier 0
    adaptor_info = None
    if args.adaptor:
        spec = f"adaptor:{args.adaptor}"
        a_corpus, a_queries, a_build = prepare(args, work, spec, "pypi-adaptor", args.adaptor_tier0_dim)
        a_manifest, a_schedule = a_corpus.manifest, a_corpus.schedule
        a_cache = sum(t.nbytes for d, t in a_corpus._tiers.items() if d in a_schedule.dims[1:])
        a_full = l2_normalize(a_queries.astype(np.float32))
        a_search = corpus_search(a_corpus, k)

        def via_adaptor(q: np.ndarray, a_full=a_full):  # the same held-out rows, adaptor-embedded
            return a_search(a_full[_rows_of(q, q_full)])

        via_adaptor.ids = lambda q, a_full=a_full: a_search.ids(a_full[_rows_of(q, q_full)])

        measure(f"funnel auto, adaptor embedding = {a_schedule} ({a_manifest.factory})", via_adaptor,
                a_manifest.index_bytes + a_cache, f"tier 0 at {a_schedule.dims[0]} dims")
        adaptor_info = {"schedule": str(a_schedule), "factory": a_manifest.factory,
                        "calibration_recall": a_manifest.schedule_recall, "built_seconds": a_build,
                        "search_seconds": a_manifest.search_seconds, "auto_search": a_manifest.auto_search}
        del a_corpus

    # 5. LanceDB IVF_PQ + refine_factor: the cheapest setting reaching the target, else the best recall
    if not args.skip_lancedb:
        tbl = peers.lancedb_table(work, "pypi", ids, full_vectors, args.lancedb_partitions, args.lancedb_sub_vectors)
        tried = peers.sweep([(f"nprobes={n} refine_factor={r}", peers.lancedb_search(tbl, k, int(n), int(r)))
                             for n, r in (x.split(":") for x in args.lancedb_settings.split(","))],
                            recall_of, args.target_recall, q_full, 1024, nq)
        label, search = _chosen(tried, args.target_recall)
        row = measure(f"LanceDB IVF_PQ{args.lancedb_partitions},PQ{args.lancedb_sub_vectors} {label}", search,
                      rows * args.lancedb_sub_vectors, "PQ codes; + full vectors on disk for refine")
        _add_sweep(row, tried)

    # 6. the FAISS indexes autofaiss picks within the same memory, refined from the float16 tier
    autofaiss_info = []
    if not args.skip_autofaiss:
        budgets = ((rows * full * 4 // 8, "the tier-0 budget, 1/8 of full-dim float32"),
                   (funnel_memory, "the funnel's memory, tier 0 + re-rank tiers"))
        for budget, why in budgets:
            index, infos = peers.autofaiss_index(work, full_vectors, budget)
            key = infos["index_key"]
            print(f"autofaiss within {human_bytes(budget)} ({why}) picks {key}", flush=True)
            tried = peers.sweep(
                [(f"nprobe={n} refine={r}", peers.refined(peers.autofaiss_search(index, int(n)), stored, ids, k,
                                                           int(r)))
                 for n, r in (x.split(":") for x in args.autofaiss_settings.split(","))],
                recall_of, args.target_recall, q_full, 1024, nq)
            label, search = _chosen(tried, args.target_recall)
            row = measure(f"autofaiss {key} {label}", search, len(faiss.serialize_index(index)) + stored.nbytes,
                          f"picked within {human_bytes(budget)} ({why}); + float16 tier for refine")
            _add_sweep(row, tried)
            autofaiss_info.append({"budget": budget, "why": why, "infos": infos})
            del index

    # the report
    machine = hardware.describe()
    print()
    print(f"machine: {machine}; faiss {faiss.__version__}, lance {lance.__version__} (load at start: {started_load})")
    print(f"corpus: {rows:,} rows x {full} dims ({args.encoder}); {nq:,} held-out queries; medians over calls")
    print(f"index: {manifest.version} {manifest.factory} on {manifest.column}, calibrated schedule {schedule} "
          f"(calibration recall@{k} {manifest.schedule_recall:.4f})"
          + (f", built in {build_seconds:.0f} s" if build_seconds else "")
          + f"; calibration timed {manifest.search_seconds}; funnel='auto' runs {manifest.auto_search}")
    print()
    flat_qps = flat_row["qps"]
    head = f"{'method':<66} {'recall@' + str(k):>9} " + " ".join(f"{'q/s b=' + str(b):>10} {'x':>5}" for b in batches)
    print(head + f" {'memory':>10}")
    for row in results:
        r = row["recall"][batches[-1]]
        cells = " ".join(f"{row['qps'][b]:>10,.0f} {row['qps'][b] / flat_qps[b]:>5.1f}" for b in batches)
        print(f"{row['method']:<66} {r:>9.4f} {cells} {human_bytes(row['memory']):>10} {row['note']}")
    by_name = {row["method"]: row for row in results}
    auto = next(r for r in results if r["method"].startswith("funnel auto"))
    exact_row = by_name["Corpus exact (exact=True)"]
    goals = {
        "funnel auto recall@10 >= 0.99": min(auto["recall"].values()) >= 0.99,
        "funnel auto >= 10x bare FAISS flat at batch 1": auto["qps"].get(1, 0) >= 10 * flat_qps.get(1, np.inf),
        "funnel auto >= 4x bare FAISS flat at batch 1024": auto["qps"].get(1024, 0) >= 4 * flat_qps.get(1024, np.inf),
        "funnel auto never slower than Corpus exact": all(auto["qps"][b] >= exact_row["qps"][b] for b in batches),
        "Corpus overhead <= 1.25x its bare steps (funnel, exact)": all(
            by_name["  bare: FAISS tier 0 + NumPy re-rank"]["qps"][b] <= 1.25 * by_name[f"funnel {schedule}"]["qps"][b]
            and by_name["  bare: exact_search over the same tier"]["qps"][b] <= 1.25 * exact_row["qps"][b]
            for b in batches),
    }
    print("goals: " + "; ".join(f"{g}: {'met' if ok else 'NOT met'}" for g, ok in goals.items()))
    print()
    print(markdown(results, batches, k))
    report.mkdir(parents=True, exist_ok=True)
    out = {"machine": machine, "load_at_start": started_load, "load_at_end": hardware.load(),
           "corpus_rows": rows, "queries": nq, "batches": batches, "schedule": str(schedule),
           "factory": manifest.factory, "search_seconds": manifest.search_seconds,
           "auto_search": manifest.auto_search, "adaptor": adaptor_info, "autofaiss": autofaiss_info,
           "results": results, "goals": goals}
    (report / "funnel_bench.json").write_text(json.dumps(out, indent=1, default=str))
    plot(results, batches, k, report / "funnel_bench.png")
    print(f"wrote {report / 'funnel_bench.json'} and {report / 'funnel_bench.png'}")


def _rows_of(q: np.ndarray, all_queries: np.ndarray) -> np.ndarray:
    """Positions in ``all_queries`` of the rows of ``q`` (a slice of it, as the timing sends)."""
    start = int(np.flatnonzero((all_queries == q[0]).all(axis=1))[0])
    return np.arange(start, start + len(q))


def _chosen(tried: list, target: float) -> tuple[str, peers.Search]:
    """(label, search) of the fastest swept setting reaching ``target``, else of the best recall."""
    good = [t for t in tried if t[2] >= target]
    label, search, _, _ = min(good, key=lambda t: t[3]) if good else max(tried, key=lambda t: t[2])
    return label, search


def _add_sweep(row: dict, tried: list) -> dict:
    """Record a swept peer's settings (label, recall, queries/s at batch 1024) in its row."""
    row["sweep"] = [(label, r, 1 / s) for label, _, r, s in tried]
    return row


def markdown(results: list[dict], batches: list[int], k: int) -> str:
    """The results as a Markdown table (docs/funnel.md's): queries/s and x bare FAISS flat per batch."""
    flat = results[0]["qps"]
    head = (f"| method | recall@{k} | " + " | ".join(f"batch {b}: q/s (x flat)" for b in batches)
            + " | memory |\n|---|---|" + "---|" * len(batches) + "---|")
    lines = [head]
    for row in results:
        r = row["recall"]
        recall = (f"{r[batches[-1]]:.4f}" if len({round(v, 4) for v in r.values()}) == 1
                  else " / ".join(f"{r[b]:.4f}" for b in batches))
        cells = " | ".join(f"{row['qps'][b]:,.0f} ({row['qps'][b] / flat[b]:.1f})" for b in batches)
        name = row["method"].strip() if not row["method"].startswith("  ") else "&nbsp;&nbsp;" + row["method"].strip()
        lines.append(f"| {name} | {recall} | {cells} | {human_bytes(row['memory'])} |")
    return "\n".join(lines)


def plot(results: list[dict], batches: list[int], k: int, path: Path) -> None:
    """Recall@k against queries/s, one panel per batch size, swept settings as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 5), sharey=True)
    for ax, b in zip(np.atleast_1d(axes), batches):
        for row in results:
            if row["method"].startswith("  "):
                continue
            ax.scatter(row["qps"][b], row["recall"][b], s=40)
            ax.annotate(row["method"].split(" = ")[0].split(" (")[0][:34], (row["qps"][b], row["recall"][b]),
                        fontsize=7, xytext=(4, 2), textcoords="offset points")
            if b == 1024 and row.get("sweep"):
                ax.plot([s[2] for s in row["sweep"]], [s[1] for s in row["sweep"]], ":", lw=1)
        ax.set_xscale("log")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("queries/s (median over calls)")
        ax.axhline(0.99, color="grey", lw=0.5)
    np.atleast_1d(axes)[0].set_ylabel(f"recall@{k} (ties counted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
