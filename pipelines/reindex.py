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
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import lance

from mrl_core import objectstore
from mrl_core.dataset import prepare_output, prepare_settings, verify_output_location
from mrl_core.defaults import GROWTH_FACTOR, MAX_REMOVE_FRACTION, MIN_RECALL, TARGET_RECALL
from mrl_core.index_store import (
    IndexDamagedError,
    IndexNotFoundError,
    default_index_uri,
    index_is_intact,
    prune_versions,
    read_manifest,
)
from mrl_core.index_update import sync_version_tags, update_index
from mrl_core.lease import Lease, LeaseHeldError, acquire_lease
from mrl_core.ledger_store import read_ledger, record
from mrl_core.settings import EmbedSettings
from mrl_core.sources import Shard, canonical_uri, list_shards
from mrl_core.storage import (
    delete_shards,
    open_dataset,
    rebase_shards,
    rename_shards,
    rows_signature,
    try_open,
)
from pipelines.cli import HelpFormatter, configure_logging, error_line, key_value
from pipelines.embed import (
    EmbedConfig,
    EmbedError,
    add_settings_arguments,
    run_embed,
    settings_from_args,
)

logger = logging.getLogger(__name__)


@dataclass
class ReindexConfig:
    """Options of one re-index run (the CLI's flags)."""

    input: str
    dataset: str
    index_uri: str | None = None
    settings: Mapping[str, Any] | EmbedSettings | None = None  # asked for; the rest: the dataset's
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
    max_remove_fraction: float = MAX_REMOVE_FRACTION
    allow_mass_remove: bool = False
    rebase: tuple[str, str] | None = None  # (old input root, new input root): a moved input


class ReindexRefused(RuntimeError):
    """The run would remove committed rows it cannot prove gone, or more of them than allowed."""


@dataclass
class ReindexSummary:
    """What one run did."""

    shards_new: list[str] = field(default_factory=list)
    shards_changed: list[str] = field(default_factory=list)
    shards_removed: list[str] = field(default_factory=list)
    rows_embedded: int = 0
    rows_replaced: int = 0
    rows_removed: int = 0
    rows_renamed: int = 0
    index_action: str = "none"
    index_reason: str = ""
    index_version: str | None = None
    recall: float | None = None
    shards_failed: dict[str, str] = field(default_factory=dict)
    rows_added_to_index: int = 0
    rows_removed_from_index: int = 0
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
            f"  rows: {self.rows_embedded:,} embedded (replacing {self.rows_replaced:,}), "
            f"{self.rows_removed:,} removed" + (f", {self.rows_renamed:,} renamed" if self.rows_renamed else ""),
            f"  index: {self.index_action} ({self.index_reason}) -> {self.index_version}{recall}",
            *(["  compacted the dataset"] if self.compacted else []),
            *([f"  pruned index versions {', '.join(self.pruned_index_versions)}"]
              if self.pruned_index_versions else []),
            *(f"  FAILED (left as it was) {reason}" for reason in self.shards_failed.values()),
        ]))


def _index_is_current(dataset: lance.LanceDataset | None, index_uri: str,
                      storage_options: Mapping[str, str]) -> bool:
    """Whether the current index version is intact (manifest readable, tier-0 file present at its
    recorded size) and describes the dataset's rows."""
    if dataset is None:
        return False
    try:
        return index_is_intact(index_uri, storage_options) and (
            read_manifest(index_uri, None, storage_options).rows_signature == rows_signature(dataset))
    except (IndexNotFoundError, IndexDamagedError):
        return False


@dataclass
class _Plan:
    """What a pass would do: shards by fate, from the listing and the ledger."""

    shards: list[Shard]
    new: list[str]
    changed: list[str]
    removed: list[str]


def _plan(cfg: ReindexConfig, dataset: lance.LanceDataset | None, fmt: str | None) -> _Plan:
    shards = list_shards(cfg.input, cfg.storage_options, fmt)  # strict: an unlistable directory raises
    ledger = read_ledger(dataset) if dataset is not None else {}
    present = {s.uri for s in shards}
    return _Plan(
        shards,
        new=[s.uri for s in shards if s.uri not in ledger],
        changed=[s.uri for s in shards if s.uri in ledger and ledger[s.uri].get("version") != s.version],
        removed=[] if cfg.keep_removed else sorted(u for u in ledger if u not in present),
    )


def run_reindex(cfg: ReindexConfig) -> ReindexSummary:
    """One scheduled pass (see the module docstring). A pass with nothing to do returns before
    taking the writer lease or starting Ray; every other pass holds the lease throughout."""
    start = time.perf_counter()
    opts = cfg.storage_options
    index_uri = cfg.index_uri or default_index_uri(cfg.dataset)
    verify_output_location(cfg.dataset, opts)
    dataset = try_open(cfg.dataset, opts)
    if dataset is not None and cfg.rebase is None:
        settings = prepare_settings(cfg.dataset, cfg.settings, opts)
        quick = _plan(cfg, dataset, settings.format)
        if not (quick.new or quick.changed or quick.removed) and _index_is_current(dataset, index_uri, opts):
            return ReindexSummary(seconds=time.perf_counter() - start)
    with acquire_lease(cfg.dataset, opts) as lease:
        summary = _reindex(cfg, index_uri, lease)
    summary.seconds = time.perf_counter() - start
    return summary


def _reindex(cfg: ReindexConfig, index_uri: str, lease: Lease) -> ReindexSummary:
    summary = ReindexSummary()
    opts = cfg.storage_options
    output = prepare_output(cfg.dataset, cfg.settings, opts)  # refuses other settings, before any write
    dataset = output.dataset
    if dataset is not None:
        summary.rows_renamed = _canonical_names(cfg)
        dataset = open_dataset(cfg.dataset, opts)
    plan = _plan(cfg, dataset, output.settings.format)
    summary.shards_new, summary.shards_changed, summary.shards_removed = plan.new, plan.changed, plan.removed
    if plan.removed:
        _verify_removals(cfg, dataset, plan.removed)

    if plan.new or plan.changed:
        embedded = run_embed(EmbedConfig(
            input=cfg.input, output=cfg.dataset, settings=cfg.settings, storage_options=opts,
            commit_every=cfg.commit_every, on_error=cfg.on_error, progress=cfg.progress, replace_changed=True,
        ), output, lease)
        summary.rows_embedded, summary.rows_replaced = embedded.rows_written, embedded.rows_replaced
        summary.shards_failed = embedded.shards_failed  # --on-error skip: reported, left as they were
    if plan.removed:
        lease.check()
        dataset = open_dataset(cfg.dataset, opts)
        summary.rows_removed = delete_shards(dataset, plan.removed)  # a crash here: removed again next run
        record(dataset, dict.fromkeys(plan.removed), opts)

    changed = bool(plan.new or plan.changed or plan.removed or summary.rows_renamed)
    if cfg.compact and changed:
        open_dataset(cfg.dataset, opts).optimize.compact_files()
        summary.compacted = True
    dataset = open_dataset(cfg.dataset, opts)
    if changed or not _index_is_current(dataset, index_uri, opts):
        update = update_index(
            cfg.dataset, index_uri=index_uri, storage_options=opts, growth_factor=cfg.growth_factor,
            min_recall=cfg.min_recall, target_recall=cfg.target_recall, factory=cfg.factory,
        )
        summary.index_action, summary.index_reason = update.action, update.reason
        summary.index_version, summary.recall = update.manifest.version, update.recall
        summary.rows_added_to_index, summary.rows_removed_from_index = update.added, update.removed
    if summary.index_action != "none" or cfg.retain_dataset_versions is not None:
        summary.pruned_index_versions = prune_versions(index_uri, cfg.keep_index_versions, opts)
        sync_version_tags(cfg.dataset, index_uri, opts)
        if cfg.retain_dataset_versions is not None:
            open_dataset(cfg.dataset, opts).cleanup_old_versions(older_than=cfg.retain_dataset_versions)
    return summary


def _canonical_names(cfg: ReindexConfig) -> int:
    """Rows renamed: ``--rebase OLD NEW`` applied, and ledger names an older version wrote in another
    spelling of the same file (``file://``, ``./``, a relative path) moved to the canonical one."""
    renamed, opts = 0, cfg.storage_options
    if cfg.rebase is not None:
        old, new = (canonical_uri(root) for root in cfg.rebase)
        renamed += rebase_shards(open_dataset(cfg.dataset, opts), old, new)
        logger.info(f"rebased {renamed:,} rows from {old} to {new}")
    ledger = read_ledger(open_dataset(cfg.dataset, opts))
    spelled = {u: canonical_uri(u) for u in ledger
               if canonical_uri(u) != u and objectstore.exists(canonical_uri(u), opts)}
    if spelled:
        renamed += rename_shards(open_dataset(cfg.dataset, opts), spelled)
        logger.info(f"renamed {len(spelled)} shard(s) to their canonical URIs (e.g. {next(iter(spelled.values()))})")
    return renamed


def _verify_removals(cfg: ReindexConfig, dataset: lance.LanceDataset, removed: list[str]) -> None:
    """A shard is removed only when it is known to be gone, and never more than the allowed share."""
    still_there = [u for u in removed if objectstore.exists(u, cfg.storage_options)]
    if still_there:
        raise ReindexRefused(
            f"{len(still_there)} committed shard(s) exist but were not listed under {cfg.input} "
            f"(e.g. {still_there[0]}): refusing to remove their rows. Is --input the same as for earlier runs? "
            f"A moved input takes --rebase OLD NEW."
        )
    ledger = read_ledger(dataset)
    rows = sum(int(ledger[u].get("rows", 0)) for u in removed)
    total = dataset.count_rows()
    if total and rows / total > cfg.max_remove_fraction and not cfg.allow_mass_remove:
        raise ReindexRefused(
            f"this run would remove {rows:,} of {total:,} rows ({rows / total:.0%}, {len(removed)} shard(s) "
            f"gone from {cfg.input}), more than --max-remove-fraction {cfg.max_remove_fraction:g}: refusing. "
            f"If the input really lost them, re-run with --allow-mass-remove."
        )


def build_parser() -> argparse.ArgumentParser:
    """The CLI."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--input", required=True, help="fsspec URL, directory or glob of the input shards")
    p.add_argument("--dataset", required=True, help="the Lance dataset the shards are embedded into")
    p.add_argument("--index-uri", help="where the index versions live (default: <dataset>.indexes)")
    add_settings_arguments(p)
    p.add_argument("--storage-option", type=key_value, action="append", default=[],
                   metavar="KEY=VALUE", help="object-store option, Lance's names (repeatable)")
    p.add_argument("--keep-removed", action="store_true", help="keep the rows of shards that disappeared")
    p.add_argument("--max-remove-fraction", type=float, default=MAX_REMOVE_FRACTION,
                   help="refuse a run that would remove more than this share of the rows (shards gone)")
    p.add_argument("--allow-mass-remove", action="store_true",
                   help="remove the rows of gone shards even beyond --max-remove-fraction")
    p.add_argument("--rebase", nargs=2, metavar=("OLD", "NEW"),
                   help="the input root moved from OLD to NEW: committed shards keep their rows and ids")
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
    """CLI entry point: 0 on success (including nothing to do), 1 on error, 2 when shards failed
    under ``--on-error skip`` (the rest of the pass was done)."""
    args = build_parser().parse_args(argv)
    configure_logging(verbose=args.verbose, quiet=args.no_progress)
    cfg = ReindexConfig(
        input=args.input, dataset=args.dataset, index_uri=args.index_uri,
        settings=settings_from_args(args), storage_options=dict(args.storage_option),
        keep_removed=args.keep_removed, max_remove_fraction=args.max_remove_fraction,
        allow_mass_remove=args.allow_mass_remove, rebase=tuple(args.rebase) if args.rebase else None,
        growth_factor=args.growth_factor, min_recall=args.min_recall, target_recall=args.target_recall,
        factory=args.factory, compact=args.compact, keep_index_versions=args.keep_index_versions,
        retain_dataset_versions=timedelta(hours=args.retain_dataset_versions)
        if args.retain_dataset_versions is not None else None,
        commit_every=args.commit_every, on_error=args.on_error, progress=not args.no_progress,
    )
    try:
        summary = run_reindex(cfg)
    except (EmbedError, ValueError, OSError, ReindexRefused, LeaseHeldError) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 1
    summary.print()
    return 2 if summary.shards_failed else 0


if __name__ == "__main__":
    sys.exit(main())
