"""Exactly-once commits of embedded shards into a Lance dataset.

Workers write uncommitted Lance fragments and report, per shard, which record positions each
fragment holds. The driver feeds those reports to a ``CommitLog``, which

* drops a fragment that repeats positions already accepted (a retried task's second output),
* knows a shard is complete once every record position is written or skipped, and
* commits: one Lance ``Append`` of the accepted fragments, then the ledger entries
  (``mrl.shard/<uri>``) of the shards completed by it.

Rows of a shard whose ledger entry is missing (a crash between the two commits, or a shard
still in flight) are deleted before that shard is embedded again, so a re-run never loses
or duplicates a row.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

import lance
import numpy as np
from lance.fragment import FragmentMetadata

from mrl_core.storage import delete_shards, ledger_updates, read_ledger


def encode_positions(positions: np.ndarray) -> str:
    """Record positions as compact base64 (int32 little-endian)."""
    return base64.b64encode(np.asarray(positions, dtype="<i4").tobytes()).decode()


def decode_positions(text: str) -> np.ndarray:
    """Inverse of ``encode_positions``."""
    return np.frombuffer(base64.b64decode(text), dtype="<i4")


@dataclass
class ShardProgress:
    """What has been accepted of one shard so far."""

    total: int
    version: str = ""
    seen: np.ndarray = field(default=None)  # type: ignore[assignment]
    written: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    error: str | None = None

    def __post_init__(self) -> None:
        if self.seen is None:
            self.seen = np.zeros(self.total, dtype=bool)

    @property
    def done(self) -> bool:
        """Every record is written or skipped (or the whole shard failed)."""
        return self.error is not None or int(self.seen.sum()) == self.total


@dataclass
class CommitLog:
    """Accepts write reports, detects duplicates, and commits fragments + ledger entries."""

    uri: str
    storage_options: dict[str, str] | None = None
    shards: dict[str, ShardProgress] = field(default_factory=dict)
    pending: list[FragmentMetadata] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    duplicates_dropped: int = 0
    rows_committed: int = 0
    commits: int = 0

    def expect(self, shard: str, total: int, version: str = "") -> ShardProgress:
        """Register a shard of ``total`` records (idempotent)."""
        if shard not in self.shards:
            self.shards[shard] = ShardProgress(total=total, version=version)
        return self.shards[shard]

    def accept(self, report: dict[str, Any]) -> bool:
        """Take one write report; False (and nothing kept) when it repeats accepted positions.

        A report is ``{"fragments": [fragment json...], "shards": {uri: {"total", "version",
        "positions", "skipped", "error"}}}`` as produced by the embed pipeline's write stage.
        """
        parsed = {}
        for uri, info in report["shards"].items():
            progress = self.expect(uri, int(info["total"]), info.get("version", ""))
            positions = decode_positions(info.get("positions", ""))
            skipped = [(int(p), r) for p, r in info.get("skipped", [])]
            all_pos = np.concatenate([positions, np.array([p for p, _ in skipped], dtype=np.int64)])
            if len(all_pos) and (all_pos.max() >= progress.total or progress.seen[all_pos].any()):
                self.duplicates_dropped += 1
                return False
            parsed[uri] = (progress, all_pos, positions, skipped, info.get("error"))
        for uri, (progress, all_pos, positions, skipped, error) in parsed.items():
            was_done = progress.done
            progress.seen[all_pos] = True
            progress.written += len(positions)
            progress.skipped.extend(skipped)
            progress.error = progress.error or error
            if progress.done and not was_done:
                self.completed.append(uri)
        self.pending.extend(FragmentMetadata.from_json(json.dumps(f)) for f in report["fragments"])
        return True

    def commit(self) -> int:
        """Append the pending fragments, then record the shards they completed; rows committed."""
        if not self.pending and not self.completed:
            return 0
        rows = sum(f.num_rows for f in self.pending)
        ds = lance.dataset(self.uri, storage_options=self.storage_options)
        if self.pending:  # appends commute, so any recent read version will do
            ds = lance.LanceDataset.commit(
                ds, lance.LanceOperation.Append(self.pending), read_version=ds.version,
                storage_options=self.storage_options,
            )
        entries = {}
        for uri in self.completed:
            p = self.shards[uri]
            if p.error is None:
                entries[uri] = {
                    "rows": p.written,
                    "skipped": len(p.skipped),
                    "version": p.version,
                    "committed_at": time.time(),
                }
        if entries:
            ds.update_config(ledger_updates(entries))
        self.pending, self.completed = [], []
        self.rows_committed += rows
        self.commits += 1
        return rows

    @property
    def completed_count(self) -> int:
        """Shards completed since the last commit."""
        return len(self.completed)


def clear_uncommitted(ds: lance.LanceDataset, shards: list[str]) -> int:
    """Delete rows of shards that have no ledger entry (left by a crashed run); rows deleted."""
    ledger = read_ledger(ds)
    return delete_shards(ds, [s for s in shards if s not in ledger])
