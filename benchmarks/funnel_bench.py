"""Funnel retrieval against exact full-dim FAISS and LanceDB IVF_PQ (+ refine), one run, one machine.

    python benchmarks/funnel_bench.py                       # PyPI summaries, default encoder, CPU
    python benchmarks/funnel_bench.py --gpu --synthetic-rows 10000000 --skip-lancedb

Embeds the corpus (cached under --work-dir), writes the Lance dataset the embed pipeline would
write (emb_16 ... emb_256, float16), builds the calibrated tier-0 index with ``build_index``'s
defaults, then times batched search of held-out queries. Recall@k is measured against exact
full-dim search counting ties (a returned row is a hit when its full-dim score reaches the k-th
exact score), with every method's results re-scored the same way.
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
import pyarrow as pa
import pyarrow.parquet as pq

from mrl_core.corpus import Corpus, result_matrix
from mrl_core.encoders import DEFAULT_ENCODER, get_encoder
from mrl_core.funnel import IdMap, take_rows
from mrl_core.index import build_index, human_bytes
from mrl_core.index_store import default_index_uri, read_manifest
from mrl_core.nesting import l2_normalize
from mrl_core.search import recall_at_k_with_ties
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
    p.add_argument("--batch", type=int, default=1024, help="queries per search batch, every method")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per method (best is reported)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the index even if one is current")
    p.add_argument("--extra-schedules", default=";".join(EXTRA_SCHEDULES),
                   help="';'-separated schedules also measured (their tier 0 is a flat scan when not indexed)")
    p.add_argument("--skip-lancedb", action="store_true", help="skip the LanceDB IVF_PQ peer")
    p.add_argument("--lancedb-partitions", type=int, default=1024, help="LanceDB IVF partitions")
    p.add_argument("--lancedb-sub-vectors", type=int, default=32, help="LanceDB PQ sub-vectors (bytes/vector)")
    p.add_argument("--lancedb-nprobes", default="20,50,100", help="nprobes swept")
    p.add_argument("--lancedb-refine", default="5,10,20,40", help="refine factors swept")
    p.add_argument("--cache-gib", type=float, default=4.0,
                   help="memory for re-rank tiers (beyond it they are fetched from Lance by id)")
    p.add_argument("--gpu", action="store_true", help="build and search tier 0 and exact flat on all GPUs (faiss-gpu)")
    p.add_argument("--synthetic-rows", type=int, default=0,
                   help="instead of the real corpus alone, tile its embeddings with noise up to this many rows")
    return p.parse_args()


def embed_corpus(args: argparse.Namespace, work: Path) -> tuple[pa.Table, np.ndarray, str]:
    """The input table and its float32 embeddings (cached on disk by encoder fingerprint)."""
    table = pq.read_table(args.data)
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


def timed(fn, repeats: int) -> tuple[object, float]:
    """(result, best wall seconds) of ``fn()`` over ``repeats`` runs."""
    best, out = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return out, best


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    keep = [c for c in args.keep.split(",") if c]
    table, emb, fingerprint = embed_corpus(args, work)

    mask = held_out(len(emb), args.queries)
    queries = emb[~mask]
    corpus_table, corpus_emb = table.filter(pa.array(mask)), emb[mask]
    name = "pypi"
    if args.synthetic_rows:
        corpus_emb = synthetic(corpus_emb, args.synthetic_rows)
        reps = -(-args.synthetic_rows // corpus_table.num_rows)
        corpus_table = pa.concat_tables([corpus_table] * reps).slice(0, args.synthetic_rows)
        name = f"synthetic-{args.synthetic_rows}"
    del emb
    encoder = get_encoder(args.encoder)
    settings = EmbedSettings(encoder=args.encoder, dims=DIMS, keep=tuple(keep))
    info = DatasetInfo(settings, fingerprint, encoder.dim, tuple(encoder.nesting.dims))
    uri = str(work / f"{name}.lance")
    ds = write_dataset(uri, corpus_table, corpus_emb, keep, info)
    rows = ds.count_rows()
    full = max(DIMS)

    index_uri = default_index_uri(uri)
    build_seconds = None
    try:
        manifest = read_manifest(index_uri)
        fresh = manifest.rows == rows and not args.rebuild and manifest.calibration.get("target") == args.target_recall
    except FileNotFoundError:
        fresh = False
    if not fresh:
        started = time.perf_counter()
        manifest = build_index(uri, target_recall=args.target_recall, k=args.k, gpu=True if args.gpu else None)
        build_seconds = time.perf_counter() - started

    # the exact reference and the exact flat peer: full-dim float32 copies of the stored float16 vectors
    stored = ds.to_table(columns=["id", f"emb_{full}"])
    ids = stored["id"].to_numpy()
    full_vectors = stored[f"emb_{full}"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, full)
    idmap = IdMap(ids)
    q_full = l2_normalize(queries.astype(np.float32))
    flat = faiss.IndexFlatIP(full)
    flat.add(full_vectors.astype(np.float32))
    flat_search = to_gpus(flat) if args.gpu and gpu_count(True) else flat

    def exact_batches():
        parts = [flat_search.search(q_full[i : i + args.batch], args.k) for i in range(0, len(q_full), args.batch)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    flat_search.search(q_full[:16], args.k)  # warm-up
    (exact_scores, _), exact_seconds = timed(exact_batches, args.repeats)
    nq = len(q_full)

    def rescored(found_ids: np.ndarray) -> np.ndarray:
        """Full-dim scores of returned ids (NaN for none), computed one way for every method."""
        pos = idmap.positions(found_ids.reshape(-1))
        vecs = take_rows(full_vectors, pos).reshape(nq, -1, full)
        return np.einsum("qkd,qd->qk", vecs, q_full)

    results = [("exact flat FAISS, full dim (float32)", 1.0, nq / exact_seconds, rows * full * 4, "")]

    corpus = Corpus.open(uri, gpu=True if args.gpu else None, cache_bytes=int(args.cache_gib * (1 << 30)))
    corpus.warm()
    schedules = [None, *[s for s in args.extra_schedules.split(";") if s]]
    funnel_recall = None
    for spec in schedules:
        schedule = corpus.schedule_for(spec)
        corpus.warm(spec)
        run = lambda spec=spec: corpus.search(queries, k=args.k, funnel=spec, batch_size=args.batch)  # noqa: E731
        run_small = corpus.search(queries[:16], k=args.k, funnel=spec)
        del run_small
        found, seconds = timed(run, args.repeats)
        found_ids = result_matrix(found, "id", nq, args.k, fill=-1).astype(np.int64)
        r = recall_at_k_with_ties(rescored(found_ids), exact_scores, args.k)
        indexed = schedule.dims[0] == manifest.dim
        label = f"funnel {'auto' if spec is None else spec} = {schedule}" + ("" if indexed else " (flat tier 0)")
        memory = manifest.index_bytes if indexed else rows * schedule.dims[0] * 2
        results.append((label, r, nq / seconds, memory, "tier 0" if indexed else "tier-0 column"))
        if spec is None:
            funnel_recall, funnel_qps = r, nq / seconds
            if indexed:  # where the time goes: the tier-0 search alone, without the re-rank
                d0, n0 = schedule.steps(args.k)[0]
                q0 = l2_normalize(np.ascontiguousarray(queries[:, :d0], dtype=np.float32))
                def tier0_alone(q0=q0, n0=n0, nprobe=schedule.nprobe):
                    return [corpus.index.search(q0[i : i + args.batch], n0, nprobe) for i in range(0, nq, args.batch)]

                _, alone = timed(tier0_alone, args.repeats)
                results.append((f"  of which tier 0 alone ({manifest.factory}, top {n0})", None, nq / alone,
                                manifest.index_bytes, "no re-rank"))

    if not args.skip_lancedb:
        results += lancedb_peer(args, work, name, ids, full_vectors, q_full, exact_scores, rescored, funnel_recall)

    cache_bytes = sum(t.nbytes for t in corpus._tiers.values())
    print()
    print(f"machine: {hardware.describe()}{'; faiss sees ' + str(gpu_count(None)) + ' GPU(s)' if args.gpu else ''}; "
          f"faiss {faiss.__version__}, lance {lance.__version__}")
    print(f"corpus: {name}, {rows:,} rows x {full} dims ({args.encoder}); {nq:,} held-out queries; "
          f"batches of {args.batch}; best of {args.repeats} runs")
    print(f"index: {manifest.version} {manifest.factory} on {manifest.column}, calibrated schedule "
          f"{manifest.funnel_schedule()} (calibration recall@{args.k} {manifest.schedule_recall:.4f})"
          + (f", built in {build_seconds:.0f} s" if build_seconds else ""))
    print()
    print(f"{'method':<58} {'recall@' + str(args.k):>9} {'queries/s':>10} {'x exact':>8} {'memory':>10}")
    exact_qps = results[0][2]
    for label, r, qps, mem, note in results:
        mem_s = human_bytes(mem) if mem else "-"
        r_s = "-" if r is None else f"{r:.4f}"
        print(f"{label:<58} {r_s:>9} {qps:>10,.0f} {qps / exact_qps:>8.1f} {mem_s:>10} {note}")
    print()
    full_bytes = rows * full * 4
    print(f"tier-0 memory: {human_bytes(manifest.index_bytes)} = 1/{full_bytes / manifest.index_bytes:.1f} of "
          f"full-dim float32 ({human_bytes(full_bytes)}); codes+id {manifest.params.get('code_bytes_per_vector')} "
          f"bytes/vector; re-rank tiers cached in memory: {human_bytes(cache_bytes)} "
          f"(float16; without the cache they are fetched from Lance by id)")
    goals = {
        "funnel recall@10 >= 0.99": funnel_recall >= 0.99,
        "funnel >= 10x exact flat queries/s": funnel_qps >= 10 * exact_qps,
        "tier-0 memory <= 1/8 full-dim float32": manifest.index_bytes <= full_bytes / 8,
    }
    print("goals: " + "; ".join(f"{g}: {'met' if ok else 'NOT met'}" for g, ok in goals.items()))
    (work / f"results-{name}.json").write_text(json.dumps({"results": results, "goals": goals}, indent=1, default=str))


def lancedb_peer(args, work, name, ids, full_vectors, q_full, exact_scores, rescored, funnel_recall):
    """LanceDB IVF_PQ (cosine) with refine_factor on the same full-dim vectors; swept, best listed."""
    import lancedb
    from lancedb.index import IvfPq

    db = lancedb.connect(str(work / "lancedb"))
    table_name = f"{name}_{len(ids)}"
    if table_name in db.list_tables().tables:
        tbl = db.open_table(table_name)
        built = None
    else:
        flat = pa.array(full_vectors.astype(np.float32).reshape(-1))
        data = pa.table({"id": pa.array(ids), "vector": pa.FixedSizeListArray.from_arrays(flat, full_vectors.shape[1])})
        tbl = db.create_table(table_name, data)
        started = time.perf_counter()
        tbl.create_index("vector", config=IvfPq(  # lancedb 0.40: the column comes first
            distance_type="dot", num_partitions=args.lancedb_partitions, num_sub_vectors=args.lancedb_sub_vectors))
        built = time.perf_counter() - started
        print(f"LanceDB IVF_PQ{args.lancedb_partitions},PQ{args.lancedb_sub_vectors} built in {built:.0f} s")
    nq = len(q_full)
    out = []
    for nprobes in (int(x) for x in args.lancedb_nprobes.split(",")):
        for refine in (int(x) for x in args.lancedb_refine.split(",")):
            def run(nprobes=nprobes, refine=refine):
                parts = []
                for i in range(0, nq, args.batch):
                    res = (tbl.search(list(q_full[i : i + args.batch]), vector_column_name="vector")
                           .distance_type("dot").nprobes(nprobes).refine_factor(refine)
                           .limit(args.k).select(["id", "_distance"]).to_arrow())
                    parts.append((i, res))
                return parts

            run_small = (tbl.search(list(q_full[:4]), vector_column_name="vector")
                         .limit(args.k).select(["id", "_distance"]).to_arrow())
            del run_small
            parts, seconds = timed(run, 1)
            found = np.full((nq, args.k), -1, dtype=np.int64)
            for start, res in parts:
                qi = res["query_index"].to_numpy() + start
                rank = np.zeros(len(qi), dtype=np.int64)
                for j in range(1, len(qi)):  # results come grouped by query, best first
                    rank[j] = rank[j - 1] + 1 if qi[j] == qi[j - 1] else 0
                keep = rank < args.k
                found[qi[keep], rank[keep]] = res["id"].to_numpy()[keep]
            r = recall_at_k_with_ties(rescored(found), exact_scores, args.k)
            out.append((f"LanceDB IVF_PQ nprobes={nprobes} refine_factor={refine}", r, nq / seconds,
                        len(ids) * args.lancedb_sub_vectors, "PQ codes"))
            print(f"  {out[-1][0]}: recall@{args.k} {r:.4f}, {nq / seconds:,.0f} queries/s")
    matched = [o for o in out if funnel_recall is not None and o[1] >= funnel_recall]
    best = max(matched, key=lambda o: o[2]) if matched else max(out, key=lambda o: o[1])
    tag = "fastest at >= funnel recall" if matched else "best recall (none matched the funnel's)"
    return [(f"{best[0]} ({tag})", *best[1:])]


if __name__ == "__main__":
    main()
