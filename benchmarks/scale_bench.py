"""The whole product at N rows on this machine: embed, index, open, search, re-index; time and memory.

    python benchmarks/scale_bench.py --rows 100000
    python benchmarks/scale_bench.py --rows 10000000 --work-dir /data/scale   # ~9 GB of float16 columns

1. **Corpus** (untimed, reused when present): N distinct real-text rows as Parquet shards of
   ``--shard-rows``: the distinct PyPI summaries (``../shared/data/pypi_summaries.parquet``),
   then the standard library's docstrings, then pairs of them ("a | b", in a fixed order), every
   text checked distinct. ``--queries`` summaries are held out of the corpus as the queries.
2. **Embed**: ``pipelines/embed.py`` with the default encoder (a subprocess; its time, its peak
   memory summed over its process tree, Ray's workers included, and the CPU-seconds per row).
3. **Index**: ``pipelines/index.py`` (the default build: factory chosen by size, calibrated to
   recall@10 >= 0.99); the add step's seconds per row come from the manifest (``params.add_seconds``).
4. **Open + search**, in a fresh process each, with ``cache_bytes=0`` (re-rank tiers read from
   Lance) and with the default cache: ``Corpus.open`` time, single-query searches (funnel and exact)
   and batches of 1024, recall@10 of the funnel against exact search over the full dim (ties
   counted), and the process's peak memory beside the index's bytes.
5. **Re-index**: 1% more rows as new shards, then ``pipelines/reindex.py`` (embed the new shards,
   update the index).

Prints a table and one JSON line (``--report`` also writes it). Run it alone: the figures are
time on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import hardware  # this directory's
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "pypi_summaries.parquet"
SEPARATOR = " | "


# ----------------------------------------------------------------------------- the corpus


def base_texts(data: Path) -> list[str]:
    """Distinct real texts, in a fixed order: PyPI summaries, then standard-library docstrings."""
    import sysconfig

    from mrl_core.local_corpus import write_docstring_shards

    seen: dict[str, None] = {}
    for text in pq.read_table(data, columns=["summary"])["summary"].to_pylist():
        if text and text.strip() and len(text) > 3:
            seen.setdefault(text.strip(), None)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / "mrl_scale_stdlib_docstrings"
    for shard in write_docstring_shards(cache, roots=[stdlib]):
        for text in pq.read_table(shard, columns=["text"])["text"].to_pylist():
            seen.setdefault(text.strip(), None)
    return list(seen)


def texts(base: list[str], start: int, count: int) -> list[str]:
    """Texts ``start`` .. ``start + count`` of the endless distinct sequence over ``base``: the base
    texts, then pairs (a, a + 1 + t) for t = 0, 1, ... (every pair once, so every text is new)."""
    n = len(base)
    out = []
    for j in range(start, start + count):
        if j < n:
            out.append(base[j])
        else:
            t, a = divmod(j - n, n)
            out.append(base[a] + SEPARATOR + base[(a + 1 + t) % n])
    return out


def write_corpus(work: Path, rows: int, shard_rows: int, queries: int, data: Path) -> tuple[Path, Path, list[str]]:
    """(shard folder, query file, base texts): the corpus of ``rows`` rows, written unless present."""
    shards, query_file = work / "in", work / "queries.parquet"
    base = base_texts(data)
    held, base = base[:queries], base[queries:]
    if (shards / "_DONE").exists():
        return shards, query_file, base
    shards.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": held}), query_file)
    digests: set[bytes] = set()
    for i, lo in enumerate(range(0, rows, shard_rows)):
        part = texts(base, lo, min(shard_rows, rows - lo))
        for text in part:
            digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
            if digest in digests:
                raise SystemExit(f"row {text[:60]!r} repeats: the corpus would not be distinct")
            digests.add(digest)
        pq.write_table(pa.table({"text": part}), shards / f"part-{i:06d}.parquet")
    (shards / "_DONE").write_text(f"{rows} rows\n")
    return shards, query_file, base


# ----------------------------------------------------------------------------- measuring a step


class PeakMemory:
    """The peak of the summed RSS of a process and its descendants, sampled every ``every`` s."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_step(name: str, argv: list[str], log: Path) -> dict:
    """Run ``argv`` (a fresh process), timing it and sampling its tree's memory; its output to ``log``."""
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a cluster of its own, never a shared one
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        peak = PeakMemory(proc.pid)
        code = proc.wait()
    seconds, memory = time.perf_counter() - start, peak.stop()
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); its output: {log}\n{log.read_text()[-3000:]}")
    return {"seconds": seconds, "peak_bytes": memory}


# ----------------------------------------------------------------------------- search (a child process)


def search_figures(dataset: str, query_file: str, cache_bytes: int | None, k: int = 10) -> dict:
    """Open the corpus and time its searches; run in a fresh process by ``--search``."""
    from mrl_core import Corpus
    from mrl_core.corpus import result_matrix
    from mrl_core.search import recall_at_k_with_ties

    queries = pq.read_table(query_file)["text"].to_pylist()
    start = time.perf_counter()
    corpus = Corpus.open(dataset, **({} if cache_bytes is None else {"cache_bytes": cache_bytes}))
    opened = time.perf_counter() - start
    vectors = corpus.encode(queries).astype(np.float32)

    def per_query(fn, n: int) -> float:
        start = time.perf_counter()
        for q in vectors[:n]:
            fn(q[None])
        return n / (time.perf_counter() - start)

    def batch(fn, size: int = 1024) -> float:
        q = np.resize(vectors, (size, vectors.shape[1]))
        start = time.perf_counter()
        fn(q)
        return size / (time.perf_counter() - start)

    def funnel(q):
        return corpus.search(q, k=k, funnel=corpus.schedule)

    def exact(q):
        return corpus.search(q, k=k, exact=True)

    funnel(vectors[:1])  # first-touch costs (lazy loads) are not a query's
    singles = min(len(vectors), 200)
    figures = {
        "open_s": opened,
        "funnel_single_qps": per_query(funnel, singles),
        "exact_single_qps": per_query(exact, min(singles, 20)),
        "funnel_batch_qps": batch(funnel),
        "exact_batch_qps": batch(exact),
    }
    # the funnel's scores are full-dim cosines (its last stage), so ties count as hits
    found, truth = funnel(vectors), exact(vectors)
    figures["recall@10"] = recall_at_k_with_ties(result_matrix(found, "score", len(vectors), k),
                                                 result_matrix(truth, "score", len(vectors), k), k)
    figures["index_bytes"] = corpus.manifest.index_bytes if corpus.manifest else 0
    figures["schedule"] = str(corpus.schedule)
    return figures


# ----------------------------------------------------------------------------- the whole run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, required=False, default=100_000)
    p.add_argument("--shard-rows", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=1000, help="held-out queries (recall over all, 200 timed singly)")
    p.add_argument("--work-dir", help="where corpus and dataset go (default /tmp/mrl_scale/<rows>)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--report", type=Path, help="also write the JSON line here")
    p.add_argument("--search", nargs=3, metavar=("DATASET", "QUERIES", "CACHE_BYTES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.search:
        dataset, queries, cache = args.search
        print("FIGURES " + json.dumps(search_figures(dataset, queries, None if cache == "default" else int(cache))))
        return 0

    work = Path(args.work_dir or f"/tmp/mrl_scale/{args.rows}")
    work.mkdir(parents=True, exist_ok=True)
    print(hardware.describe(), flush=True)
    shards, query_file, base = write_corpus(work, args.rows, args.shard_rows, args.queries, args.data)
    dataset = str(work / "corpus.lance")
    if Path(dataset).exists():
        raise SystemExit(f"{dataset} exists: measure on a fresh dataset (delete it, keep the corpus)")
    py = sys.executable
    result: dict = {"rows": args.rows, "shards": len(list(shards.glob("*.parquet"))), "machine": hardware.describe()}

    def step(name: str, argv: list[str]) -> dict:
        print(f"{name} ...", flush=True)
        figures = run_step(name, argv, work / f"{name}.log")
        result[name] = figures
        print(f"  {figures['seconds']:.1f}s, peak {figures['peak_bytes'] / 2**30:.2f} GiB", flush=True)
        return figures

    step("embed", [py, "pipelines/embed.py", "--input", str(shards), "--output", dataset, "--no-progress"])
    step("index", [py, "pipelines/index.py", "--dataset", dataset])
    manifest = _manifest(dataset)
    result["index"].update({"factory": manifest["factory"], "index_bytes": manifest["index_bytes"],
                            "add_seconds": manifest["params"].get("add_seconds"),
                            "train_seconds": manifest["params"].get("train_seconds")})
    for cache in ("0", "default"):
        name = f"search_cache_{cache}"
        figures = step(name, [py, __file__, "--search", dataset, str(query_file), cache])
        line = next(x for x in (work / f"{name}.log").read_text().splitlines() if x.startswith("FIGURES "))
        figures.update(json.loads(line[len("FIGURES "):]))
    extra = max(1, args.rows // 100)
    pq.write_table(pa.table({"text": texts(base, args.rows, extra)}), shards / "part-added.parquet")
    step("reindex", [py, "pipelines/reindex.py", "--input", str(shards), "--dataset", dataset, "--no-progress"])
    (shards / "part-added.parquet").unlink()  # the corpus stays N rows for the next run
    print_table(result)
    line = json.dumps(result)
    print(line)
    if args.report:
        args.report.write_text(line + "\n")
    return 0


def _manifest(dataset: str) -> dict:
    from mrl_core.index_store import default_index_uri, read_manifest

    return json.loads(read_manifest(default_index_uri(dataset)).to_json())


def print_table(r: dict) -> None:
    rows = r["rows"]
    gib = 2**30
    print(f"\n{rows:,} rows, {r['shards']} shards")
    e, i = r["embed"], r["index"]
    print(f"  embed     {e['seconds']:8.1f}s  {rows / e['seconds']:9,.0f} rows/s  "
          f"{e['seconds'] / rows * 1e6:7.1f} us/row  peak {e['peak_bytes'] / gib:.2f} GiB")
    add = i.get("add_seconds")
    print(f"  index     {i['seconds']:8.1f}s  {i['factory']}, {i['index_bytes'] / 2**20:,.1f} MiB"
          + (f", add {add:.1f}s = {add / rows * 1e6:.2f} us/row" if add else "")
          + f"  peak {i['peak_bytes'] / gib:.2f} GiB")
    for cache in ("0", "default"):
        s = r[f"search_cache_{cache}"]
        print(f"  search (cache {cache:>7}): open {s['open_s']:.2f}s; single funnel {s['funnel_single_qps']:,.1f} q/s, "
              f"exact {s['exact_single_qps']:,.1f} q/s; batch 1024 funnel {s['funnel_batch_qps']:,.0f} q/s, "
              f"exact {s['exact_batch_qps']:,.0f} q/s; recall@10 {s['recall@10']:.4f}; "
              f"peak {s['peak_bytes'] / gib:.2f} GiB (index {s['index_bytes'] / gib:.2f} GiB)")
    x = r["reindex"]
    print(f"  re-index +1%: {x['seconds']:.1f}s, peak {x['peak_bytes'] / gib:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())
