"""Keep a published tier-0 index in step with its dataset without rebuilding it every time.

``update_index`` loads the current index version and reconciles it with the dataset itself, not
with what some run remembers: ``dataset_changes`` compares the dataset version the index was
built on with the latest one, fragment by fragment, so every row deleted or rewritten since
(a replaced shard, a removed one, a compaction, a run that failed half-way) leaves the index and
every row added or rewritten since enters it. Then it checks recall@k on a sample of the
corpus's own rows against exact search and publishes a new version. It retrains from scratch
(``build_index``) when there is no index yet, the current one is damaged or its dataset version
is gone, the encoder changed, the corpus grew past ``growth_factor`` times the rows the index was
trained on, or the measured recall fell below ``min_recall``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import faiss
import lance
import numpy as np

from mrl_core.defaults import CALIBRATION_ROWS, GROWTH_FACTOR, MIN_RECALL, RECALL_QUERIES, K
from mrl_core.index import CalibrationOptions, build_index, measure_recall
from mrl_core.index_store import (
    IndexDamagedError,
    IndexManifest,
    IndexNotFoundError,
    default_index_uri,
    list_versions,
    load_index,
    publish,
    read_manifest,
)
from mrl_core.storage import (
    column_to_numpy,
    embedding_dims,
    open_dataset,
    read_info,
    rows_signature,
)

logger = logging.getLogger(__name__)

TAG_PREFIX = "index-"


@dataclasses.dataclass
class IndexUpdate:
    """What ``update_index`` did: ``action`` is "added", "retrained" or "built"."""

    manifest: IndexManifest
    action: str
    reason: str
    added: int = 0
    removed: int = 0
    recall: float | None = None


@dataclasses.dataclass
class DatasetChanges:
    """Rows to take out of an index (``removed`` ids) and fragments whose rows to put in
    (``added``: fragment ids of the newer version), between two versions of a dataset."""

    removed: np.ndarray
    added: list[int]


def dataset_changes(old: lance.LanceDataset, new: lance.LanceDataset) -> DatasetChanges:
    """What changed in the rows from dataset version ``old`` to ``new``, fragment by fragment.

    A fragment only in ``old`` lost all its rows; one only in ``new`` brings all of its own; one in
    both with other data files was rewritten (all out, all in); one in both with another deletion
    file lost the rows deleted since. Only id columns are read.
    """
    before = {f.fragment_id: f for f in old.get_fragments()}
    after = {f.fragment_id: f for f in new.get_fragments()}
    removed: list[np.ndarray] = []
    added: list[int] = []
    for fid, fragment in before.items():
        now = after.get(fid)
        if now is None or _files(now) != _files(fragment):
            removed.append(_ids(fragment))
            if now is not None:
                added.append(fid)
        elif _deletions(now) != _deletions(fragment):
            removed.append(np.setdiff1d(_ids(fragment), _ids(now)))
    added += sorted(fid for fid in after if fid not in before)
    ids = np.concatenate(removed) if removed else np.empty(0, dtype=np.int64)
    return DatasetChanges(ids.astype(np.int64), added)


def _files(fragment: lance.LanceFragment) -> list[str]:
    return sorted(f.path for f in fragment.metadata.files)


def _deletions(fragment: lance.LanceFragment) -> str:
    return json.dumps(fragment.metadata.to_json().get("deletion_file"), sort_keys=True)


def _ids(fragment: lance.LanceFragment) -> np.ndarray:
    return fragment.to_table(columns=["id"])["id"].to_numpy().astype(np.int64)


def update_index(
    dataset_uri: str,
    *,
    index_uri: str | None = None,
    storage_options: Mapping[str, str] | None = None,
    growth_factor: float = GROWTH_FACTOR,
    min_recall: float = MIN_RECALL,
    recall_queries: int = RECALL_QUERIES,
    seed: int = 0,
    **build_kwargs: Any,
) -> IndexUpdate:
    """Publish an index version for the dataset's latest version (see the module docstring).

    ``build_kwargs`` go to ``build_index`` when it rebuilds. The manifest's ``build_seconds``
    counts from the start of this call.
    """
    started = time.time()
    index_uri = index_uri or default_index_uri(dataset_uri)
    ds = open_dataset(dataset_uri, storage_options)
    info = read_info(ds)
    rows = ds.count_rows()

    def rebuild(action: str, reason: str) -> IndexUpdate:
        logger.info(f"building a new tier-0 index: {reason}")
        manifest = build_index(dataset_uri, index_uri=index_uri, storage_options=storage_options,
                               seed=seed, **build_kwargs)
        return IndexUpdate(manifest, action, reason, recall=manifest.schedule_recall)

    try:
        index, manifest = load_index(index_uri, None, storage_options)
    except IndexDamagedError as exc:
        return rebuild("retrained", f"the current index version is damaged ({exc})")
    except IndexNotFoundError:
        return rebuild("built", "no index yet")
    trained_rows = int(manifest.params.get("trained_at_rows", manifest.rows))
    if manifest.encoder_fingerprint != info.fingerprint:
        return rebuild("retrained", "the dataset's encoder changed")
    if rows > growth_factor * trained_rows:
        return rebuild("retrained", f"the corpus grew from {trained_rows:,} to {rows:,} rows "
                                    f"(> {growth_factor:g}x since training)")

    try:
        built_on = open_dataset(dataset_uri, storage_options, version=manifest.dataset_version)
    except (ValueError, OSError):
        return rebuild("retrained", f"dataset version {manifest.dataset_version}, which the index was built on, "
                                    f"is gone: its changes since cannot be told")
    changes = dataset_changes(built_on, ds)
    removed_ids = changes.removed
    if len(removed_ids):
        index.remove_ids(faiss.IDSelectorBatch(removed_ids))
    added = _add_fragments(index, ds, manifest, changes.added)
    if index.ntotal != rows:
        return rebuild("retrained",
                       f"the index would hold {index.ntotal:,} vectors for {rows:,} rows")

    schedule = manifest.funnel_schedule()
    k = manifest.calibration.get("k", K)
    recall = None
    if schedule is not None and schedule.dims[-1] == max(embedding_dims(ds.schema)) and rows > k:
        check = CalibrationOptions(
            k=k, calibration_queries=recall_queries,
            calibration_rows=build_kwargs.get("calibration_rows", CALIBRATION_ROWS),
        )
        recall = measure_recall(ds, index, schedule, check, seed=seed, gpu=False).recall
        logger.info(f"recall@{k} of {schedule} after the update: {recall:.4f} "
                    f"(retrain below {min_recall})")
        if recall < min_recall:
            return rebuild("retrained", f"recall@{k} fell to {recall:.4f} < {min_recall}")

    updated = dataclasses.replace(
        manifest, version="", dataset_version=int(ds.version), rows_signature=rows_signature(ds),
        rows=int(index.ntotal),
        schedule_recall=recall if recall is not None else manifest.schedule_recall,
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        params={**manifest.params, "trained_at_rows": trained_rows,
                "incremental_from": manifest.version, "added": added,
                "removed": int(len(removed_ids))},
        build_seconds=round(time.time() - started, 2),
    )
    updated = publish(index_uri, index, updated, storage_options)
    logger.info(f"published {updated.version}: +{added:,} rows, -{len(removed_ids):,} rows, "
                f"no retraining")
    return IndexUpdate(updated, "added", "incremental", added, int(len(removed_ids)), recall)


def _add_fragments(index: faiss.Index, ds: lance.LanceDataset, manifest: IndexManifest,
                   fragments: Sequence[int]) -> int:
    """Add the live rows of ``fragments`` to ``index`` (tier 0 of ``manifest``); return how many."""
    added = 0
    for fid in fragments:
        table = ds.get_fragment(fid).to_table(columns=["id", manifest.column])
        if table.num_rows:
            vectors = column_to_numpy(table[manifest.column], manifest.dim)
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                               table["id"].to_numpy().astype(np.int64))
            added += table.num_rows
    return added


def sync_version_tags(dataset_uri: str, index_uri: str | None = None,
                      storage_options: Mapping[str, str] | None = None) -> dict[str, int]:
    """Tag the dataset version each retained index version was built on (``index-vNNNNNN``) and
    drop the tags of index versions that are gone, so version cleanup never removes a dataset
    version that a published index still points at. Returns {tag: dataset version}."""
    index_uri = index_uri or default_index_uri(dataset_uri)
    ds = open_dataset(dataset_uri, storage_options)
    wanted = {}
    for version in list_versions(index_uri, storage_options):
        try:
            manifest = read_manifest(index_uri, version, storage_options)
        except (IndexNotFoundError, ValueError):
            continue  # a version directory still being written, or from a newer writer
        wanted[TAG_PREFIX + version] = manifest.dataset_version
    existing = {name: meta["version"] for name, meta in ds.tags.list().items()
                if name.startswith(TAG_PREFIX)}
    for name in existing.keys() - wanted.keys():
        ds.tags.delete(name)
    for name, version in wanted.items():
        if name not in existing:
            ds.tags.create(name, version)
    return wanted
