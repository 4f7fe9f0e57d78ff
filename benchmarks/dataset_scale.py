"""How the dataset's bookkeeping scales: the shard ledger at 10^3-10^5 shards, fragments at 10^7 rows.

    python benchmarks/dataset_scale.py                       # ledger 1e3,1e4,1e5; fragments at 1e7 rows
    python benchmarks/dataset_scale.py --entries 1000 --rows 100000   # a quick look

1. **Ledger.** The same entries stored two ways, side by side: one dataset config key per shard
   (pipeline versions 1-2) and the ledger files of ``mrl_core.ledger_store`` (pipeline 3). For each:
   the latest manifest's size (Lance rewrites it with every version, so it is paid per commit and
   kept per version), ``lance.dataset`` open time, reading the whole ledger, and recording one
   more entry (one commit).
2. **Fragments.** ``--rows`` rows (id + a 64-dim float16 column, as the smallest stored prefix)
   written as 65,536-row fragments (what the embed writers make of large shards) and as
   1,048,576-row fragments (what ``compact_files`` and Ray's ``write_lance`` make): manifest size,
   open time, a full scan of the vector column, and a take of 1,000 random rows.

Medians of ``--repeats`` runs; one JSON line per figure group at the end. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import hardware  # this directory's
import lance
import numpy as np
import pyarrow as pa
from timing import median_seconds  # this directory's

from mrl_core.ledger_store import LEGACY_PREFIX, read_ledger, record


def latest_manifest(uri: str) -> int:
    manifests = sorted(Path(uri, "_versions").glob("*.manifest"), key=lambda p: p.stat().st_mtime_ns)
    return manifests[-1].stat().st_size


def entry(i: int) -> dict:
    """A ledger entry as the embed job records it (an S3 ETag as the source version)."""
    return {"rows": 10_000, "skipped": 0, "version": f'"{i:032x}"', "key": i + 1, "committed_at": 1.8e9 + i}


def ledger_case(root: Path, n: int, layout: str, repeats: int) -> dict:
    uri = str(root / f"ledger-{layout}-{n}.lance")
    ds = lance.write_dataset(pa.table({"id": pa.array([0], pa.int64())}), uri)
    entries = {f"s3://bucket/corpus/part-{i:07d}.parquet": entry(i) for i in range(n)}
    start = time.perf_counter()
    if layout == "config keys":
        ds.update_config({LEGACY_PREFIX + u: json.dumps(e, sort_keys=True) for u, e in entries.items()})
    else:
        record(ds, entries)
    write_all = time.perf_counter() - start
    extra = iter(range(n, n + 10 * repeats))

    def one_more() -> None:
        i = next(extra)
        d = lance.dataset(uri)
        if layout == "config keys":
            d.update_config({f"{LEGACY_PREFIX}s3://bucket/corpus/more-{i}.parquet": json.dumps(entry(i))})
        else:
            record(d, {f"s3://bucket/corpus/more-{i}.parquet": entry(i)})

    commit = median_seconds(one_more, repeats, warmup=False)
    assert len(read_ledger(lance.dataset(uri))) == n + repeats
    return {
        "ledger": layout, "entries": n, "manifest_bytes": latest_manifest(uri),
        "open_s": median_seconds(lambda: lance.dataset(uri), repeats, warmup=False),
        "read_ledger_s": median_seconds(lambda: read_ledger(lance.dataset(uri)), repeats, warmup=False),
        "record_one_s": commit, "record_all_s": write_all,
    }


def fragment_case(root: Path, rows: int, fragment_rows: int, repeats: int, seed: int = 0) -> dict:
    uri = str(root / f"fragments-{fragment_rows}.lance")
    rng = np.random.default_rng(seed)
    schema = pa.schema([("id", pa.int64()), ("emb_64", pa.list_(pa.float16(), 64))])

    def batches():
        for lo in range(0, rows, 1 << 20):
            n = min(1 << 20, rows - lo)
            values = rng.standard_normal((n, 64), dtype=np.float32).astype(np.float16).ravel()
            yield pa.record_batch([pa.array(np.arange(lo, lo + n)), pa.FixedSizeListArray.from_arrays(values, 64)],
                                  schema=schema)

    start = time.perf_counter()
    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), uri, max_rows_per_file=fragment_rows,
                        max_rows_per_group=min(fragment_rows, 65_536))
    write_s = time.perf_counter() - start
    ds = lance.dataset(uri)
    picks = np.sort(np.random.default_rng(seed + 1).choice(rows, 1000, replace=False))

    def scan() -> None:
        for _ in lance.dataset(uri).to_batches(columns=["emb_64"], batch_size=1 << 16):
            pass

    return {
        "fragment_rows": fragment_rows, "rows": rows, "fragments": len(ds.get_fragments()),
        "manifest_bytes": latest_manifest(uri), "write_s": write_s,
        "open_s": median_seconds(lambda: lance.dataset(uri), repeats, warmup=False),
        "count_rows_s": median_seconds(lambda: lance.dataset(uri).count_rows(), repeats, warmup=False),
        "scan_emb_64_s": median_seconds(scan, max(1, repeats // 2), warmup=False),
        "take_1000_s": median_seconds(lambda: ds.take(picks, columns=["id", "emb_64"]), repeats, warmup=False),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", default="1000,10000,100000", help="ledger sizes, comma-separated")
    p.add_argument("--rows", type=int, default=10_000_000, help="rows of the fragment comparison (0: skip it)")
    p.add_argument("--fragment-rows", default="65536,1048576", help="fragment sizes to compare")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", help="where to write the datasets (default: a temporary directory)")
    args = p.parse_args(argv)
    print(hardware.describe())
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"\n{'ledger':>12} {'entries':>8} {'manifest':>11} {'open':>8} {'read ledger':>12} "
              f"{'record one':>11} {'record all':>11}")
        for n in (int(x) for x in args.entries.split(",")):
            for layout in ("config keys", "files"):
                r = ledger_case(root, n, layout, args.repeats)
                results.append(r)
                print(f"{layout:>12} {n:>8,} {r['manifest_bytes'] / 2**20:>9.2f}MB {r['open_s'] * 1e3:>6.1f}ms "
                      f"{r['read_ledger_s'] * 1e3:>10.1f}ms {r['record_one_s'] * 1e3:>9.1f}ms "
                      f"{r['record_all_s']:>10.2f}s", flush=True)
        if args.rows:
            print(f"\n{'fragment rows':>13} {'fragments':>9} {'manifest':>10} {'open':>8} {'count':>8} "
                  f"{'scan emb_64':>11} {'take 1000':>10} {'write':>7}")
            for size in (int(x) for x in args.fragment_rows.split(",")):
                r = fragment_case(root, args.rows, size, args.repeats)
                results.append(r)
                print(f"{size:>13,} {r['fragments']:>9,} {r['manifest_bytes'] / 1024:>8.1f}KB "
                      f"{r['open_s'] * 1e3:>6.1f}ms {r['count_rows_s'] * 1e3:>6.1f}ms {r['scan_emb_64_s']:>10.2f}s "
                      f"{r['take_1000_s'] * 1e3:>8.1f}ms {r['write_s']:>6.1f}s", flush=True)
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
