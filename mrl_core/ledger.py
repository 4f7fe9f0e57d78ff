"""Exactly-once commits of embedded shards into a Lance dataset.

Workers write uncommitted Lance fragments, each holding rows of one shard, and report which
record positions they hold. The driver feeds those reports to a ``CommitLog``, which

* drops a report that repeats positions already accepted (a retried task's second output),
* knows a shard is complete once every record position is written or skipped, and
* commits complete shards only: one Lance commit that adds their fragments and, where the
  dataset already holds rows of those shards (a changed shard re-embedded, or rows a crashed run
  committed without their ledger entry), deletes those rows in the same commit (an ``Update``);
  then the ledger entries (rows, skipped records, source version, the key its ids derive from)
  of the shards it completed, in one more commit (``ledger_store.record``).

A shard's rows therefore change in one atomic step, from exactly the old rows to exactly the new
ones, never neither and never both. A crash between the data commit and the ledger commit leaves
a shard whose ledger entry is missing or stale: the next run embeds it again and replaces it.
A failed shard's fragments are never committed.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lance
import numpy as np
from lance.fragment import FragmentMetadata

from mrl_core.ledger_store import record
from mrl_core.storage import sql_string_list


def encode_positions(positions: np.ndarray) -> str:
    """Record positions as compact base64 (int32 little-endian)."""
    return base64.b64encode(np.asarray(positions, dtype="<i4").tobytes()).decode()


def decode_positions(text: str) -> np.ndarray:
    """Inverse of ``encode_positions``."""
    return np.frombuffer(base64.b64decode(text), dtype="<i4")


@dataclass
class ShardProgress:
    """What has been accepted of one shard so far, and its fragments waiting for the commit."""

    total: int
    version: str = ""
    seen: np.ndarray = field(default=None)  # type: ignore[assignment]
    written: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    error: str | None = None
    fragments: list[FragmentMetadata] = field(default_factory=list)
    reported: bool = False  # handed to a commit already

    def __post_init__(self) -> None:
        if self.seen is None:
            self.seen = np.zeros(self.total, dtype=bool)

    @property
    def done(self) -> bool:
        """Every record is written or skipped (or the whole shard failed)."""
        return self.error is not None or int(self.seen.sum()) == self.total


@dataclass
class CommitLog:
    """Accepts write reports, detects duplicates, and commits complete shards with their ledger
    entries. ``keys``: each shard's id key (recorded in its entry); ``existing``: {shard: ids of
    the fragments that hold rows of it now}, for shards whose old rows each commit replaces."""

    uri: str
    storage_options: dict[str, str] | None = None
    guard: Callable[[], None] | None = None  # called before every commit (the writer lease's check)
    keys: dict[str, int] = field(default_factory=dict)
    existing: dict[str, set[int]] = field(default_factory=dict)
    shards: dict[str, ShardProgress] = field(default_factory=dict)
    completed: list[str] = field(default_factory=list)
    duplicates_dropped: int = 0
    rows_committed: int = 0
    rows_replaced: int = 0
    commits: int = 0

    def expect(self, shard: str, total: int, version: str = "") -> ShardProgress:
        """Register a shard of ``total`` records (idempotent)."""
        if shard not in self.shards:
            self.shards[shard] = ShardProgress(total=total, version=version)
        return self.shards[shard]

    def accept(self, report: dict[str, Any]) -> bool:
        """Take one write report; False (and nothing kept) when it repeats accepted positions.

        A report is ``{"shards": {uri: {"total", "version", "positions", "skipped", "error",
        "fragments": [fragment json...]}}}`` as produced by the embed pipeline's write stage.
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
            parsed[uri] = (progress, all_pos, positions, skipped, info)
        for uri, (progress, all_pos, positions, skipped, info) in parsed.items():
            progress.seen[all_pos] = True
            progress.written += len(positions)
            progress.skipped.extend(skipped)
            progress.error = progress.error or info.get("error")
            progress.fragments.extend(FragmentMetadata.from_json(json.dumps(f)) for f in info.get("fragments", []))
            if progress.done and not progress.reported:
                progress.reported = True
                self.completed.append(uri)
        return True

    def commit(self) -> int:
        """Commit the shards completed since the last commit (see the module docstring); rows
        committed. Failed shards are dropped with their fragments."""
        done = [u for u in self.completed if self.shards[u].error is None]
        self.completed = []
        if not done:
            return 0
        if self.guard is not None:
            self.guard()
        fragments = [f for u in done for f in self.shards[u].fragments]
        rows = sum(f.num_rows for f in fragments)
        ds = lance.dataset(self.uri, storage_options=self.storage_options)
        replaced = {u: self.existing.pop(u) for u in done if self.existing.get(u)}
        if replaced:
            ds = self._replace(ds, replaced, fragments)
        elif fragments:  # appends commute, so any recent read version will do
            ds = lance.LanceDataset.commit(ds, lance.LanceOperation.Append(fragments), read_version=ds.version,
                                           storage_options=self.storage_options)
        entries = {u: self._entry(u) for u in done}
        record(ds, entries, self.storage_options)
        for u in done:
            self.shards[u].fragments = []
        self.rows_committed += rows
        self.commits += 1
        return rows

    def _replace(self, ds: lance.LanceDataset, replaced: dict[str, set[int]],
                 fragments: list[FragmentMetadata]) -> lance.LanceDataset:
        """One ``Update`` commit: the rows of ``replaced`` shards deleted, ``fragments`` added."""
        predicate = f"shard IN ({sql_string_list(replaced)})"
        removed, updated = [], []
        for fid in sorted(set().union(*replaced.values())):
            fragment = ds.get_fragment(fid)
            if fragment is None:
                continue
            self.rows_replaced += fragment.count_rows(predicate)
            after = fragment.delete(predicate)
            if after is None:
                removed.append(fid)
            else:
                updated.append(after)
        op = lance.LanceOperation.Update(removed_fragment_ids=removed, updated_fragments=updated,
                                         new_fragments=fragments)
        return lance.LanceDataset.commit(ds, op, read_version=ds.version, storage_options=self.storage_options)

    def _entry(self, uri: str) -> dict[str, Any]:
        p = self.shards[uri]
        return {"rows": p.written, "skipped": len(p.skipped), "version": p.version,
                "key": self.keys.get(uri), "committed_at": time.time()}

    @property
    def completed_count(self) -> int:
        """Shards completed since the last commit."""
        return len(self.completed)


def locate_rows(ds: lance.LanceDataset, shards: list[str], batch: int = 512) -> dict[str, set[int]]:
    """{shard: ids of the fragments holding rows of it} for those of ``shards`` with rows in ``ds``
    (one scan of the shard column)."""
    found: dict[str, set[int]] = {}
    for lo in range(0, len(shards), batch):
        chunk = shards[lo : lo + batch]
        table = ds.to_table(columns=["shard"], filter=f"shard IN ({sql_string_list(chunk)})", with_row_address=True)
        addresses = table["_rowaddr"].to_numpy() >> np.uint64(32)
        for shard, fragment in zip(table["shard"].to_pylist(), addresses.tolist()):
            found.setdefault(shard, set()).add(int(fragment))
    return found
