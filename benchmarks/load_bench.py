"""Query load while the corpus is re-indexed: N threads call ``Corpus.search`` without pause,
first on an idle system, then while re-index rounds embed new shards, update the index and swap
``CURRENT``. Reports queries/s, p50/p90/p99 latency and errors for both phases.

    python benchmarks/load_bench.py                        # 100k PyPI summaries, 32 threads
    python benchmarks/load_bench.py --threads 64 --rows 200000 --rounds 4
    python benchmarks/load_bench.py --mode rebuild         # synthetic vectors, no encoder or Ray

``--mode reindex`` (default) embeds real texts (``--data``, else this machine's docstrings) with
``pipelines/reindex.py``; each round adds a shard of ``--round-rows`` texts and runs a re-index
pass. ``--mode rebuild`` writes synthetic nested vectors and, each round, appends rows and
rebuilds the index from scratch. Serving follows the pattern a real server uses: a refresher
thread polls ``CURRENT`` and opens each new index version with the dataset version it was built
on, warmed, then swaps it in; queries in flight keep the version they started on.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import hardware  # this directory's
import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mrl_core.corpus import Corpus
from mrl_core.index import build_index
from mrl_core.index_store import IndexMismatchError, default_index_uri, load_index, read_current
from mrl_core.nesting import l2_normalize
from mrl_core.settings import EmbedSettings
from mrl_core.storage import (
    INFO_KEY,
    DatasetInfo,
    derive_ids,
    embedding_arrays,
    legacy_shard_key,
    make_schema,
    open_dataset,
    read_info,
)
from mrl_core.tier0 import Tier0Index

DEFAULT_DATA = "/work/shared/data/pypi_summaries.parquet"
DIMS = (16, 32, 64, 128, 256)


@dataclass
class PhaseStats:
    """Latencies (seconds) and errors of the queries started in one phase."""

    name: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """queries, qps, p50/p90/p99/max latency (ms), errors."""
        lat = np.array(self.latencies) * 1000 if self.latencies else np.zeros(1)
        return {
            "phase": self.name, "queries": len(self.latencies), "seconds": round(self.seconds, 2),
            "qps": round(len(self.latencies) / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p90_ms": round(float(np.percentile(lat, 90)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "max_ms": round(float(lat.max()), 2),
            "errors": len(self.errors),
        }


@dataclass
class LoadResult:
    """What ``run_load`` measured."""

    phases: list[PhaseStats]
    versions_served: list[str]
    rounds: list[dict[str, Any]]
    rows_before: int
    rows_after: int
    config: dict[str, Any]

    @property
    def errors(self) -> list[str]:
        """Every query error of every phase."""
        return [e for p in self.phases for e in p.errors]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"phases": [p.summary() for p in self.phases], "versions_served": self.versions_served,
                "rounds": self.rounds, "rows_before": self.rows_before, "rows_after": self.rows_after,
                "config": self.config, "machine": machine(), "first_errors": self.errors[:5]}


def machine() -> str:
    """One line describing where the numbers come from."""
    return (f"{hardware.describe()}, python {platform.python_version()}, faiss {faiss.__version__}, "
            f"lance {lance.__version__}")


# ----------------------------------------------------------------------------- serving


def open_version(uri: str, version: str) -> Corpus:
    """The corpus as index ``version`` sees it: that index with the dataset version it was built
    on (not the newest, which a re-index may already have moved past), warmed."""
    try:
        corpus = Corpus.open(uri, index_version=version)
        if corpus.manifest is not None and corpus.manifest.dataset_version == corpus.dataset.version:
            corpus.warm()
            return corpus
    except IndexMismatchError:
        pass
    index, manifest = load_index(default_index_uri(uri), version)
    dataset = open_dataset(uri, version=manifest.dataset_version)
    corpus = Corpus(dataset, read_info(dataset), Tier0Index(index), manifest)
    corpus.warm()
    return corpus


class Server:
    """Holds the corpus queries use; a refresher thread swaps in each new index version."""

    def __init__(self, uri: str, poll_seconds: float = 0.2) -> None:
        self.uri = uri
        self.poll_seconds = poll_seconds
        version = read_current(default_index_uri(uri))
        self.corpus = open_version(uri, version)
        self.versions = [version]
        self.refresh_errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="refresher", daemon=True)

    def start(self) -> Server:
        """Start polling ``CURRENT``."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        self._thread.join()

    def _refresh(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                version = read_current(default_index_uri(self.uri))
                if version != self.versions[-1]:
                    self.corpus = open_version(self.uri, version)  # one reference swap: atomic
                    self.versions.append(version)
            except Exception as exc:  # noqa: BLE001 — counted and reported, the old corpus keeps serving
                self.refresh_errors.append(f"refresh: {exc!r}")


# ----------------------------------------------------------------------------- load


def query_loop(server: Server, queries: np.ndarray, k: int, batch: int, phase: list[PhaseStats],
               stop: threading.Event, seed: int) -> None:
    """One client: search without pause until ``stop``; each query counts in the phase it began in."""
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        stats = phase[0]
        q = queries[rng.integers(0, len(queries), size=batch)]
        start = time.perf_counter()
        try:
            table = server.corpus.search(q, k=k)
            if table.num_rows != batch * k:
                raise AssertionError(f"{table.num_rows} results for {batch} queries at k={k}")
            scores = table["score"].to_numpy()
            if not np.isfinite(scores).all():
                raise AssertionError("non-finite scores")
            stats.latencies.append(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 — every error is a finding
            stats.errors.append(repr(exc))


def run_load(
    uri: str, queries: np.ndarray, rounds: Any, threads: int = 32, k: int = 10, batch: int = 1,
    baseline_seconds: float = 10.0, config: dict[str, Any] | None = None,
) -> LoadResult:
    """Query ``uri`` from ``threads`` threads: ``baseline_seconds`` idle, then while ``rounds()``
    (a callable running the re-index rounds, returning their records) runs."""
    server = Server(uri).start()
    rows_before = server.corpus.rows
    manifest = server.corpus.manifest
    config = {**(config or {}), "index": f"{manifest.factory} on {manifest.column}, funnel {server.corpus.schedule}"}
    idle, busy = PhaseStats("idle"), PhaseStats("during re-index")
    phase = [idle]
    stop = threading.Event()
    clients = [threading.Thread(target=query_loop, args=(server, queries, k, batch, phase, stop, i), daemon=True)
               for i in range(threads)]
    start = time.perf_counter()
    for t in clients:
        t.start()
    time.sleep(baseline_seconds)
    phase[0] = busy
    idle.seconds = time.perf_counter() - start
    start = time.perf_counter()
    try:
        records = rounds()
        time.sleep(2 * server.poll_seconds + 0.5)  # let the last swap happen under load
    finally:
        busy.seconds = time.perf_counter() - start
        stop.set()
        for t in clients:
            t.join()
        server.stop()
    busy.errors += server.refresh_errors
    return LoadResult([idle, busy], server.versions, records, rows_before, server.corpus.rows, config)


# ----------------------------------------------------------------------------- data


def read_texts(path: str | None, column: str, n: int, work: Path) -> list[str]:
    """``n`` distinct non-empty texts: from ``path`` (Parquet) if it exists, else docstrings."""
    if path and Path(path).exists():
        table = pq.read_table(path, columns=[column])
        texts = [t for t in dict.fromkeys(table[column].to_pylist()) if t and t.strip()]
    else:
        from mrl_core.local_corpus import write_docstring_shards

        print(f"{path} not found: gathering this machine's docstrings instead", flush=True)
        shards = write_docstring_shards(work / "docstrings", max_docs=n)
        texts = [t for s in shards for t in pq.read_table(s, columns=["text"])["text"].to_pylist()]
    if len(texts) < n:
        raise SystemExit(f"only {len(texts):,} texts available, {n:,} needed")
    order = np.random.default_rng(0).permutation(len(texts))[:n]
    return [texts[i] for i in order]


def write_shard(path: Path, texts: list[str]) -> None:
    """One input shard of texts."""
    pq.write_table(pa.table({"text": texts}), path)


def reindex_setup(args: argparse.Namespace, work: Path) -> tuple[str, np.ndarray, Any]:
    """Real texts embedded by the re-index pipeline; rounds add a shard and re-index."""
    from mrl_core.encoders import get_encoder
    from pipelines.reindex import ReindexConfig, run_reindex

    total = args.rows + args.rounds * args.round_rows + args.query_pool
    texts = read_texts(args.data, args.text_column, total, work)
    corpus, extra, held_out = (texts[: args.rows], texts[args.rows: total - args.query_pool],
                               texts[total - args.query_pool:])
    src = work / "input"
    src.mkdir(parents=True, exist_ok=True)
    per_shard = max(1, args.rows // 8)
    for i in range(0, args.rows, per_shard):
        write_shard(src / f"base-{i // per_shard:03d}.parquet", corpus[i: i + per_shard])
    uri = str(work / "corpus.lance")
    cfg = ReindexConfig(input=str(src), dataset=uri, progress=False,
                        settings=EmbedSettings(encoder=args.encoder))
    started = time.perf_counter()
    run_reindex(cfg)
    print(f"initial embed + index of {args.rows:,} texts: {time.perf_counter() - started:.1f}s", flush=True)
    queries = get_encoder(args.encoder).encode(held_out)

    def rounds() -> list[dict[str, Any]]:
        out = []
        for r in range(args.rounds):
            write_shard(src / f"new-{r:03d}.parquet", extra[r * args.round_rows: (r + 1) * args.round_rows])
            t = time.perf_counter()
            summary = run_reindex(cfg)
            out.append({"round": r, "seconds": round(time.perf_counter() - t, 2),
                        "rows_embedded": summary.rows_embedded,
                        "index": summary.index_action, "version": summary.index_version})
            print(f"  round {r}: +{summary.rows_embedded:,} rows, index {summary.index_action} -> "
                  f"{summary.index_version} in {out[-1]['seconds']}s", flush=True)
        return out

    return uri, queries, rounds


def nested_vectors(n: int, dim: int, seed: int, clusters: int = 256) -> np.ndarray:
    """Clustered vectors whose leading dims carry most of the variance, as an MRL model's do."""
    rng = np.random.default_rng(seed)
    decay = (1.0 + np.arange(dim)) ** -0.5
    centers = np.random.default_rng(12345).normal(size=(clusters, dim)) * decay
    points = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim)) * decay
    return points.astype(np.float32)


def append_vectors(uri: str, vectors: np.ndarray, shard: str, create: bool) -> None:
    """Rows as the embed pipeline writes them (ids, shard, emb_<d>, the dataset info)."""
    schema = make_schema(DIMS, "float16")
    table = pa.table({"id": pa.array(derive_ids(legacy_shard_key(shard), np.arange(len(vectors))), pa.int64()),
                      "shard": pa.array([shard] * len(vectors)), **embedding_arrays(vectors, DIMS)}, schema=schema)
    ds = lance.write_dataset(table, uri, mode="create" if create else "append", max_rows_per_file=1 << 16)
    if create:
        info = DatasetInfo(EmbedSettings(encoder="synthetic", dims=DIMS), "synthetic", DIMS[-1], DIMS)
        ds.update_config({INFO_KEY: info.to_json()})


def rebuild_setup(args: argparse.Namespace, work: Path) -> tuple[str, np.ndarray, Any]:
    """Synthetic vectors; rounds append rows and rebuild the index from scratch."""
    uri = str(work / "synthetic.lance")
    append_vectors(uri, nested_vectors(args.rows, DIMS[-1], 0), "base", create=True)
    build = {"calibration_queries": args.calibration_queries}
    started = time.perf_counter()
    build_index(uri, **build)
    print(f"initial index of {args.rows:,} synthetic rows: {time.perf_counter() - started:.1f}s", flush=True)
    queries = l2_normalize(nested_vectors(args.query_pool, DIMS[-1], 99))

    def rounds() -> list[dict[str, Any]]:
        out = []
        for r in range(args.rounds):
            t = time.perf_counter()
            append_vectors(uri, nested_vectors(args.round_rows, DIMS[-1], r + 1), f"round-{r}", create=False)
            manifest = build_index(uri, **build)
            out.append({"round": r, "seconds": round(time.perf_counter() - t, 2), "rows_embedded": args.round_rows,
                        "index": "rebuilt", "version": manifest.version})
            print(f"  round {r}: +{args.round_rows:,} rows, index rebuilt -> {manifest.version} "
                  f"in {out[-1]['seconds']}s", flush=True)
        return out

    return uri, queries, rounds


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The CLI."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=("reindex", "rebuild"), default="reindex",
                   help="reindex: real texts through pipelines/reindex.py; rebuild: synthetic vectors, full rebuilds")
    p.add_argument("--threads", type=int, default=32, help="concurrent query threads")
    p.add_argument("--rows", type=int, default=100_000, help="rows in the corpus before the re-index rounds")
    p.add_argument("--rounds", type=int, default=3, help="re-index rounds run under load")
    p.add_argument("--round-rows", type=int, default=5_000, help="rows added by each round")
    p.add_argument("--k", type=int, default=10, help="results per query")
    p.add_argument("--batch", type=int, default=1, help="query vectors per search call")
    p.add_argument("--baseline-seconds", type=float, default=15.0, help="idle phase before the rounds start")
    p.add_argument("--query-pool", type=int, default=1_000, help="distinct held-out query vectors")
    p.add_argument("--data", default=DEFAULT_DATA, help="Parquet file of texts (reindex mode)")
    p.add_argument("--text-column", default="summary", help="its text column")
    p.add_argument("--encoder", default="wordllama-256", help="encoder spec (reindex mode)")
    p.add_argument("--calibration-queries", type=int, default=300, help="calibration queries per build (rebuild mode)")
    p.add_argument("--omp-threads", type=int, default=1,
                   help="FAISS/OpenMP threads per search call (1: concurrency comes from the query threads)")
    p.add_argument("--work-dir", help="where the dataset is written (default: a temporary directory, removed)")
    p.add_argument("--json", help="also write the results as JSON here")
    return p


def print_result(result: LoadResult) -> None:
    """The results table."""
    cfg = result.config
    print(f"\nload benchmark ({cfg.get('mode')}): {cfg.get('threads')} threads, k={cfg.get('k')}, "
          f"batch {cfg.get('batch')}, {result.rows_before:,} -> {result.rows_after:,} rows; index {cfg.get('index')}")
    print(f"machine: {machine()}")
    print(f"{'phase':<16}{'queries':>9}{'qps':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}")
    rows = [p.summary() for p in result.phases]
    for s in rows:
        print(f"{s['phase']:<16}{s['queries']:>9,}{s['qps']:>9.1f}{s['p50_ms']:>9.2f}{s['p90_ms']:>9.2f}"
              f"{s['p99_ms']:>9.2f}{s['max_ms']:>9.1f}{s['errors']:>8}")
    if rows[0]["qps"] and rows[1]["qps"]:
        print(f"during/idle: qps x{rows[1]['qps'] / rows[0]['qps']:.2f}, "
              f"p50 x{rows[1]['p50_ms'] / rows[0]['p50_ms']:.2f}, "
              f"p99 x{rows[1]['p99_ms'] / rows[0]['p99_ms']:.2f}")
    print(f"index versions served: {' -> '.join(result.versions_served)} ({len(result.versions_served) - 1} swap(s) "
          f"under load); rounds: {', '.join(str(r['seconds']) + 's' for r in result.rounds)}")
    for e in result.errors[:5]:
        print(f"  error: {e}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 when no query failed."""
    args = build_parser().parse_args(argv)
    faiss.omp_set_num_threads(args.omp_threads)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="load-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        setup = reindex_setup if args.mode == "reindex" else rebuild_setup
        uri, queries, rounds = setup(args, work)
        config = {k: v for k, v in vars(args).items() if k not in ("json", "work_dir")}
        result = run_load(uri, queries, rounds, args.threads, args.k, args.batch, args.baseline_seconds, config)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print_result(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2))
    return 0 if not result.errors else 1


if __name__ == "__main__":
    raise SystemExit(main())

