"""The scheduled re-index: embed only what changed under the input, update the index, swap it in.

    python pipelines/reindex.py --input 's3://bucket/corpus/*.parquet' --dataset s3://bucket/emb.lance

Idempotent: run it on a schedule. It finds shards that are new or changed (size, etag or mtime)
since the last run, embeds only those (replacing the rows of changed shards), removes the rows
of shards that disappeared (unless --keep-removed), then adds only the new rows to the tier-0
index, or retrains it when the corpus grew past --growth-factor or recall fell below
--min-recall, and swaps ``CURRENT`` atomically. A query running meanwhile sees the old or the
new index version, each with the dataset version it was built on. Exits 0 when there was
nothing to do.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from mrl_core.defaults import GROWTH_FACTOR, MIN_RECALL, TARGET_RECALL
from mrl_core.index_store import (
    IndexNotFoundError,
    default_index_uri,
    prune_versions,
    read_manifest,
)
from mrl_core.index_update import ids_of_shards, sync_version_tags, update_index
from mrl_core.settings import EmbedSettings
from mrl_core.sources import list_shards
from mrl_core.storage import delete_shards, ledger_updates, read_ledger, rows_signature, try_open
from pipelines.cli import configure_logging, key_value
from pipelines.embed import (
    EmbedConfig,
    EmbedError,
    add_settings_arguments,
    run_embed,
    settings_from_args,
)


@dataclass
class ReindexConfig:
    """Options of one re-index run (the CLI's flags)."""

    input: str
    dataset: str
    index_uri: str | None = None
    settings: EmbedSettings = field(default_factory=EmbedSettings)
    storage_options: dict[str, str] = field(default_factory=dict, repr=False)  # may hold credentials
    keep_removed: bool = False
    growth_factor: float = GROWTH_FACTOR
    min_recall: float = MIN_RECALL
    target_recall: float = TARGET_RECALL
    factory: str | None = None
    compact: bool = False
    keep_index_versions: int = 3
    retain_dataset_versions: timedelta | None = None
    commit_every: int = 8
    on_error: str = "fail"
    progress: bool = True


@dataclass
class ReindexSummary:
    """What one run did."""

    shards_new: list[str] = field(default_factory=list)
    shards_changed: list[str] = field(default_factory=list)
    shards_removed: list[str] = field(default_factory=list)
    rows_embedded: int = 0
    rows_removed: int = 0
    index_action: str = "none"
    index_reason: str = ""
    index_version: str | None = None
    recall: float | None = None
    compacted: bool = False
    pruned_index_versions: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def nothing_to_do(self) -> bool:
        """No shard changed and the index was already current."""
        return self.index_action == "none" and not (self.shards_new or self.shards_changed or self.shards_removed)

    def print(self) -> None:
        """Human-readable report."""
        if self.nothing_to_do:
            print(f"nothing to do: no new, changed or removed shards; the index is current ({self.seconds:.1f}s)")
            return
        recall = "" if self.recall is None else f", recall@10 {self.recall:.4f}"
        print("\n".join([
            f"re-index done in {self.seconds:.1f}s",
            f"  shards: {len(self.shards_new)} added, {len(self.shards_changed)} changed, "
            f"{len(self.shards_removed)} removed",
            f"  rows: {self.rows_embedded:,} embedded, {self.rows_removed:,} removed",
            f"  index: {self.index_action} ({self.index_reason}) -> {self.index_version}{recall}",
            *(["  compacted the dataset"] if self.compacted else []),
            *([f"  pruned index versions {', '.join(self.pruned_index_versions)}"]
              if self.pruned_index_versions else []),
        ]))


def _index_is_current(dataset_uri: str, index_uri: str, storage_options: dict[str, str]) -> bool:
    ds = try_open(dataset_uri, storage_options)
    if ds is None:
        return False
    try:
        return read_manifest(index_uri, None, storage_options).rows_signature == rows_signature(ds)
    except IndexNotFoundError:
        return False


def run_reindex(cfg: ReindexConfig) -> ReindexSummary:
    """One scheduled pass (see the module docstring)."""
    start = time.perf_counter()
    summary = ReindexSummary()
    opts = cfg.storage_options
    index_uri = cfg.index_uri or default_index_uri(cfg.dataset)
    shards = list_shards(cfg.input, opts, cfg.settings.format)
    present = {s.uri for s in shards}
    ds = try_open(cfg.dataset, opts)
    ledger = read_ledger(ds) if ds is not None else {}
    summary.shards_new = [s.uri for s in shards if s.uri not in ledger]
    summary.shards_changed = [s.uri for s in shards if s.uri in ledger and ledger[s.uri].get("version") != s.version]
    summary.shards_removed = [] if cfg.keep_removed else sorted(u for u in ledger if u not in present)

    stale = summary.shards_changed + summary.shards_removed
    removed_ids = ids_of_shards(ds, stale) if ds is not None and stale else None
    if stale:
        # rows first, then the ledger entries: a crash in between leaves shards that a re-run
        # sees as changed (or removed) again, never rows without a ledger entry that survive
        summary.rows_removed = delete_shards(ds, stale)
        ds.update_config(ledger_updates(dict.fromkeys(stale)))

    if summary.shards_new or summary.shards_changed:
        embedded = run_embed(EmbedConfig(
            input=cfg.input, output=cfg.dataset, settings=cfg.settings, storage_options=opts,
            commit_every=cfg.commit_every, on_error=cfg.on_error, progress=cfg.progress,
        ))
        summary.rows_embedded = embedded.rows_written
        if embedded.shards_failed:
            raise EmbedError(f"{len(embedded.shards_failed)} shard(s) failed: "
                             + "; ".join(embedded.shards_failed.values()))

    if cfg.compact and (stale or summary.shards_new):
        ds = try_open(cfg.dataset, opts)
        ds.optimize.compact_files()
        summary.compacted = True

    if stale or summary.shards_new or not _index_is_current(cfg.dataset, index_uri, opts):
        added = summary.shards_new + summary.shards_changed
        update = update_index(
            cfg.dataset, removed_ids=removed_ids if removed_ids is not None else [], added_shards=added,
            index_uri=index_uri, storage_options=opts, growth_factor=cfg.growth_factor,
            min_recall=cfg.min_recall, target_recall=cfg.target_recall, factory=cfg.factory,
        )
        summary.index_action, summary.index_reason = update.action, update.reason
        summary.index_version, summary.recall = update.manifest.version, update.recall
    if summary.index_action != "none" or cfg.retain_dataset_versions is not None:
        summary.pruned_index_versions = prune_versions(index_uri, cfg.keep_index_versions, opts)
        sync_version_tags(cfg.dataset, index_uri, opts)
        if cfg.retain_dataset_versions is not None:
            try_open(cfg.dataset, opts).cleanup_old_versions(older_than=cfg.retain_dataset_versions)
    summary.seconds = time.perf_counter() - start
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The CLI."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="fsspec URL, directory or glob of the input shards")
    p.add_argument("--dataset", required=True, help="the Lance dataset the shards are embedded into")
    p.add_argument("--index-uri", help="where the index versions live (default: <dataset>.indexes)")
    add_settings_arguments(p)
    p.add_argument("--storage-option", type=key_value, action="append", default=[],
                   metavar="KEY=VALUE", help="object-store option, Lance's names (repeatable)")
    p.add_argument("--keep-removed", action="store_true", help="keep the rows of shards that disappeared")
    p.add_argument("--growth-factor", type=float, default=GROWTH_FACTOR,
                   help="retrain tier 0 when the corpus exceeds this multiple of the rows it was trained on")
    p.add_argument("--min-recall", type=float, default=MIN_RECALL,
                   help="retrain when recall@10 (ties counted) on a sample against exact search falls below this")
    p.add_argument("--target-recall", type=float, default=TARGET_RECALL,
                   help="calibration target when (re)training")
    p.add_argument("--factory", help="FAISS factory string for a rebuilt tier 0 (default: by corpus size)")
    p.add_argument("--compact", action="store_true", help="compact the Lance dataset's files")
    p.add_argument("--keep-index-versions", type=int, default=3, help="index versions to keep (>= 2 advised)")
    p.add_argument("--retain-dataset-versions", type=float, metavar="HOURS",
                   help="remove dataset versions older than this many hours (those an index uses are tagged and kept)")
    p.add_argument("--commit-every", type=int, default=8, help="commit after this many embedded shards")
    p.add_argument("--on-error", default="fail", choices=["fail", "skip"], help="what an unreadable shard does")
    p.add_argument("--no-progress", action="store_true", help="quiet")
    p.add_argument("--verbose", action="store_true", help="show Ray's and other libraries' logs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 on success (including nothing to do), 1 on error."""
    args = build_parser().parse_args(argv)
    configure_logging(verbose=args.verbose, quiet=args.no_progress)
    cfg = ReindexConfig(
        input=args.input, dataset=args.dataset, index_uri=args.index_uri,
        settings=settings_from_args(args), storage_options=dict(args.storage_option),
        keep_removed=args.keep_removed,
        growth_factor=args.growth_factor, min_recall=args.min_recall, target_recall=args.target_recall,
        factory=args.factory, compact=args.compact, keep_index_versions=args.keep_index_versions,
        retain_dataset_versions=timedelta(hours=args.retain_dataset_versions)
        if args.retain_dataset_versions is not None else None,
        commit_every=args.commit_every, on_error=args.on_error, progress=not args.no_progress,
    )
    try:
        summary = run_reindex(cfg)
    except (EmbedError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
