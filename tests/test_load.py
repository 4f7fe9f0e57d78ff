"""Queries under load while the index is rebuilt and swapped: zero errors (a small run of
``benchmarks/load_bench.py``; the benchmark itself reports the figures in RELIABILITY.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import faiss

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    """benchmarks/load_bench.py as a module, its directory importable as when it runs as a script."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("load_bench", REPO / "benchmarks" / "load_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_concurrent_queries_see_no_errors_across_index_swaps(tmp_path):
    bench = load_bench()
    args = bench.build_parser().parse_args([
        "--mode", "rebuild", "--rows", "6000", "--rounds", "2", "--round-rows", "1000", "--threads", "8",
        "--baseline-seconds", "1", "--calibration-queries", "50", "--query-pool", "200"])
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        uri, queries, rounds = bench.rebuild_setup(args, tmp_path)
        result = bench.run_load(uri, queries, rounds, threads=8, k=10, baseline_seconds=1.0,
                                config=vars(args))
    finally:
        faiss.omp_set_num_threads(threads)
    assert result.errors == []
    idle, busy = (p.summary() for p in result.phases)
    assert idle["queries"] > 0 and busy["queries"] > 0 and busy["errors"] == 0
    assert busy["p99_ms"] >= busy["p50_ms"] > 0
    assert result.versions_served == ["v000001", "v000002", "v000003"], "every swap was served under load"
    assert (result.rows_before, result.rows_after) == (6000, 8000)
    assert result.to_json()["phases"][1]["qps"] > 0
