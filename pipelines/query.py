"""Search an MRL Lance dataset by text with its funnel index and print the results.

    python pipelines/query.py "parse json fast" --dataset data/docstrings.lance --k 10
    python pipelines/query.py "http client" "orm" --dataset s3://bucket/pypi.lance \\
        --storage-option aws_region=us-east-1 --columns name,summary --exact
    python pipelines/query.py "read a csv file" --dataset data/docstrings.lance --where "text LIKE '%pandas%'"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipelines.cli import HelpFormatter, configure_logging, error_line, key_value

DEFAULT_HIDDEN = ("id", "shard")


def build_parser() -> argparse.ArgumentParser:
    """The CLI."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("queries", nargs="+", help="query texts (encoded with the dataset's own encoder)")
    p.add_argument("--dataset", required=True, help="Lance dataset URI")
    p.add_argument("--k", type=int, default=10, help="results per query")
    p.add_argument("--funnel", default="auto",
                   help="'auto' (the index's calibrated schedule), 'paper', or e.g. '64:1000,128:200,256'")
    p.add_argument("--exact", action="store_true", help="brute-force full-dim search (the reference) instead")
    p.add_argument("--where", metavar="SQL",
                   help="Lance SQL filter, e.g. \"section = 'python'\": the best k among the rows it matches")
    p.add_argument("--columns", help="comma-separated dataset columns to show "
                   "(default: every column but id, shard and the embeddings)")
    p.add_argument("--index-uri", help="where the index lives (default: <dataset>.indexes)")
    p.add_argument("--storage-option", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="object-store option for the dataset and the index (repeatable)")
    p.add_argument("--allow-stale-index", action="store_true",
                   help="search an index built for other rows than the dataset holds now")
    p.add_argument("--max-width", type=int, default=80, help="truncate shown text columns to this many characters")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    p.add_argument("--verbose", action="store_true", help="show other libraries' logs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    from mrl_core.corpus import Corpus  # imported here so that --help is instant
    from mrl_core.storage import EMB_PREFIX

    try:
        corpus = Corpus.open(
            args.dataset, dict(args.storage_option), index_uri=args.index_uri,
            allow_stale_index=args.allow_stale_index, require_index=not args.exact,
        )
        if args.columns is None:
            columns = [c for c in corpus.dataset.schema.names
                       if c not in DEFAULT_HIDDEN and not c.startswith(EMB_PREFIX)]
        else:
            columns = [c.strip() for c in args.columns.split(",") if c.strip()]
        table = corpus.search(args.queries, k=args.k, funnel=args.funnel, columns=columns, exact=args.exact,
                              where=args.where)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 1
    frame = table.to_pandas()
    if args.format == "csv":
        frame.to_csv(sys.stdout, index=False)
        return 0
    if args.format == "json":
        print(frame.to_json(orient="records", lines=True))
        return 0
    for name in frame.columns:
        if frame[name].dtype == object:
            frame[name] = frame[name].map(lambda v: _clip(v, args.max_width))
    for q, text in enumerate(args.queries):
        print(f"query {q}: {_clip(text, args.max_width)}")
    print(frame.to_string(index=False))
    return 0


def _clip(value: object, width: int) -> object:
    if isinstance(value, str) and len(value) > width:
        return value[: width - 1] + "…"
    return value


if __name__ == "__main__":
    sys.exit(main())
