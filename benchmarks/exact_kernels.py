"""Exact top-k and re-rank kernels side by side, by batch size and thread count.

    python benchmarks/exact_kernels.py                       # 840,000 x 256 random rows
    python benchmarks/exact_kernels.py --rows 60000 --batches 1,10,100,1024

Exact inner-product top-k over a float32 and a float16 matrix, each way this project could run
it: FAISS's flat index as it comes (its BLAS threshold decides), FAISS with the BLAS threshold
set to 1 (always BLAS), NumPy matmul + argpartition, and ``mrl_core.search.exact_search`` (torch
GEMM + top-k per block). Then the re-rank step: gathering n candidate rows per query from a
float16 matrix and scoring them. Seconds per call, median of ``--repeats``; how
``mrl_core.search`` chose its kernels and thread counts (docs/funnel.md, "Speed").
"""

from __future__ import annotations

import argparse

import faiss
import hardware  # this directory's
import numpy as np
import torch
from timing import median_seconds  # this directory's

from mrl_core.funnel import take_rows
from mrl_core.search import FAISS_BLAS_THRESHOLD, exact_search


def numpy_top_k(q: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k by one NumPy matmul and argpartition (unordered within the k)."""
    s = q @ x.T
    return np.argpartition(-s, k, axis=1)[:, :k]


def with_threshold(value: int, fn):
    """``fn()`` with FAISS's BLAS threshold at ``value`` (the previous one restored after)."""
    before = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = value
    try:
        return fn()
    finally:
        faiss.cvar.distance_compute_blas_threshold = before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=840_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batches", default="1,10,1024")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--shortlist", type=int, default=1000, help="candidates per query re-ranked")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    x32 = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    x32 /= np.linalg.norm(x32, axis=1, keepdims=True)
    x16 = x32.astype(np.float16)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x32)
    default_threshold = FAISS_BLAS_THRESHOLD
    print(f"machine: {hardware.describe()}; faiss {faiss.__version__} (BLAS threshold {default_threshold}), "
          f"torch {torch.__version__}, numpy {np.__version__}")
    print(f"{args.rows:,} x {args.dim} rows, k={args.k}; median of {args.repeats}; ms per call (queries/s)")
    for threads in (int(t) for t in args.threads.split(",")):
        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(threads)
        for batch in (int(b) for b in args.batches.split(",")):
            q = np.ascontiguousarray(x32[rng.choice(args.rows, batch)] + 0.1, dtype=np.float32)
            rows = {}

            def faiss_blas(q=q):
                return with_threshold(1, lambda: flat.search(q, args.k))

            def faiss_default(q=q):
                return with_threshold(default_threshold, lambda: flat.search(q, args.k))

            rows["faiss flat (default)"] = faiss_default
            rows["faiss flat (BLAS threshold 1)"] = faiss_blas
            if batch < 1024:  # at 1,024 queries it takes seconds per call (an argpartition of every score)
                rows["numpy matmul + argpartition, f32"] = lambda q=q: numpy_top_k(q, x32, args.k)
            rows["exact_search, f32"] = lambda q=q: exact_search(q, x32, args.k)
            rows["exact_search, f16"] = lambda q=q: exact_search(q, x16, args.k)
            cand = rng.integers(0, args.rows, (batch, args.shortlist))
            qs = q / np.linalg.norm(q, axis=1, keepdims=True)

            def rerank(cand=cand, qs=qs):
                vecs = take_rows(x16, cand.reshape(-1), scratch=True).reshape(len(cand), args.shortlist, -1)
                return np.einsum("qnd,qd->qn", vecs, qs)

            rows[f"re-rank {args.shortlist} rows/query from f16 (take_rows + einsum)"] = rerank
            for name, fn in rows.items():
                repeats = args.repeats if batch * args.rows < 1e9 else max(1, args.repeats // 2)
                s = median_seconds(fn, repeats)
                print(f"threads {threads} batch {batch:>5}  {name:<62} {1e3 * s:>9.2f} ms  "
                      f"({batch / s:>10,.0f} q/s)", flush=True)


if __name__ == "__main__":
    main()
