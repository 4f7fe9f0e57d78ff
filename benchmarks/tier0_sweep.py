"""Sweep tier-0 FAISS indexes over one prefix: funnel recall@k and tier-0 queries/s.

    python benchmarks/tier0_sweep.py                                  # the defaults below
    python benchmarks/tier0_sweep.py --factories "IVF2048,Flat;HNSW8_PQ32" --metric l2

Uses the corpus and held-out queries of benchmarks/funnel_bench.py (same split, same cached
embeddings under --work-dir). For each factory (trained on a 65,536-row sample of the prefix)
and each search setting (nprobe for IVF, efSearch for HNSW) and shortlist, it times the tier-0
search alone, re-ranks the shortlist exactly at the full dim and reports recall@k against exact
full-dim search, counting ties. This is how docs/funnel.md's tier-0 comparisons were measured.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import funnel_bench  # this directory's: the same corpus, held-out split and embedding cache
import numpy as np

from mrl_core.nesting import l2_normalize
from mrl_core.search import recall_at_k_with_ties


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    funnel_bench.add_corpus_args(p)
    p.add_argument("--dim", type=int, default=128, help="the prefix tier 0 indexes")
    p.add_argument("--factories", default="IDMap,PQ64x4fs;IDMap,PQ32x4fs;IVF2048,Flat;HNSW8_PQ32",
                   help="';'-separated FAISS factory strings")
    p.add_argument("--metric", choices=("ip", "l2"), default="ip",
                   help="index metric (l2 on unit vectors ranks as ip does)")
    p.add_argument("--shortlists", default="200,500,1000,2000", help="tier-0 shortlist sizes")
    p.add_argument("--nprobes", default="8,32,128", help="IVF nprobe values")
    p.add_argument("--efs", default="128,512", help="HNSW efSearch values")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting (the best is reported)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    bench_args = argparse.Namespace(data=args.data, text_column=args.text_column, encoder=args.encoder,
                                    max_rows=args.max_rows)
    _, emb, _ = funnel_bench.embed_corpus(bench_args, Path(args.work_dir))
    mask = funnel_bench.held_out(len(emb), args.queries)
    # the corpus as stored (float16 prefixes), the queries as encoded
    full = l2_normalize(emb[mask].astype(np.float16).astype(np.float32))
    queries = l2_normalize(emb[~mask].astype(np.float32))
    del emb
    flat = faiss.IndexFlatIP(full.shape[1])
    flat.add(full)
    best = float("inf")
    for _ in range(args.repeats):
        started = time.perf_counter()
        exact_scores, _ = flat.search(queries, args.k)
        best = min(best, time.perf_counter() - started)
    exact_qps = len(queries) / best
    del flat
    print(f"{len(full):,} rows x {full.shape[1]} dims, {len(queries):,} queries; exact flat {exact_qps:,.0f} queries/s")

    def funnel_recall(ids: np.ndarray) -> float:
        """Recall@k of the shortlists ``ids`` re-ranked exactly at the full dim."""
        top = np.empty((len(ids), args.k), dtype=np.float32)
        for i in range(0, len(ids), 64):  # 64 queries at a time: the gathered rows stay small
            block = ids[i : i + 64]
            scores = np.einsum("qnd,qd->qn", full[np.maximum(block, 0)], queries[i : i + 64])
            scores[block < 0] = -np.inf
            top[i : i + 64] = -np.sort(-scores, axis=1)[:, : args.k]
        return recall_at_k_with_ties(top, exact_scores, args.k)

    d = args.dim
    corpus_d, queries_d = l2_normalize(full[:, :d]), l2_normalize(queries[:, :d])
    sample = corpus_d[np.random.default_rng(1).choice(len(corpus_d), 65_536, replace=False)]
    metric = faiss.METRIC_L2 if args.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    shortlists = [int(s) for s in args.shortlists.split(",")]
    print(f"{'factory':<28} {'setting':<14} {'shortlist':>9} {'recall@' + str(args.k):>9} "
          f"{'tier 0 q/s':>10} {'x exact':>8}")
    for factory in (f for f in args.factories.split(";") if f):
        index = faiss.index_factory(d, factory, metric)
        started = time.perf_counter()
        index.train(sample)
        if isinstance(index, faiss.IndexIDMap):  # ids are row positions either way
            index.add_with_ids(corpus_d, np.arange(len(corpus_d), dtype=np.int64))
        else:
            index.add(corpus_d)
        built = time.perf_counter() - started
        ivf = faiss.try_extract_index_ivf(index)
        hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
        if ivf is not None:
            settings = [("nprobe", int(v)) for v in args.nprobes.split(",")]
        elif hnsw is not None:
            settings = [("efSearch", int(v)) for v in args.efs.split(",")]
        else:
            settings = [("", None)]
        print(f"{factory}: built in {built:.0f} s, {faiss.serialize_index(index).nbytes / len(corpus_d):.0f} bytes/row")
        for name, value in settings:
            if name == "nprobe":
                ivf.nprobe = value
            elif name == "efSearch":
                hnsw.efSearch = value
            for n in shortlists:
                best = float("inf")
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    _, ids = index.search(queries_d, n)
                    best = min(best, time.perf_counter() - started)
                qps = len(queries) / best
                setting = f"{name}={value}" if name else "-"
                print(f"{factory:<28} {setting:<14} {n:>9,} {funnel_recall(ids):>9.4f} {qps:>10,.0f} "
                      f"{qps / exact_qps:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
