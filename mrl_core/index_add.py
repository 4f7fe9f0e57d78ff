"""Step 3 of an index build: adding every row's vector to a trained tier 0 under its id, in this
process (``add_local``) or in Ray tasks over groups of fragments (``group_fragments``,
``add_with_ray``), as autofaiss and lance-ray build index parts."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import faiss
import lance
import numpy as np
import pyarrow as pa

from mrl_core.progress import Progress
from mrl_core.storage import column_to_numpy, emb_column, open_dataset

logger = logging.getLogger(__name__)

__all__ = ["add_fragments", "add_local", "add_with_ray", "group_fragments"]


def _check_ids(ids: np.ndarray) -> np.ndarray:
    """``ids`` as contiguous int64, refused when one is -1."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if (ids == -1).any():
        raise ValueError(
            "id -1 is reserved (FAISS marks missing results with it); rows must not use it"
        )
    return ids


def _add_table(index: faiss.Index, ids: pa.Array, column: pa.Array, dim: int) -> None:
    """Add one batch of rows (their ids and ``emb_<dim>`` column) to ``index``."""
    vectors = np.ascontiguousarray(column_to_numpy(column, dim), dtype=np.float32)
    index.add_with_ids(vectors, _check_ids(ids.to_numpy()))


def add_local(index: faiss.Index, ds: lance.LanceDataset, dim: int) -> None:
    """Add every row's ``emb_<dim>`` prefix to ``index`` under its id, in this process."""
    progress = Progress(ds.count_rows(), "index add", unit="rows")
    for batch in ds.to_batches(columns=["id", emb_column(dim)], batch_size=1 << 16):
        _add_table(index, batch.column(0), batch.column(1), dim)
        progress.update(batch.num_rows, progress.done + batch.num_rows)
    progress.close()


def group_fragments(sizes: Sequence[tuple[int, int]], groups: int) -> list[list[int]]:
    """Fragment ids, in order, cut into about ``groups`` runs of similar row counts.

    ``sizes``: (fragment id, rows) per fragment. A run is closed once it holds its share of the
    rows (total / groups), so every run but the last holds at least that share. One Ray task
    adds one run.
    """
    share = sum(n for _, n in sizes) / max(1, groups)
    out: list[list[int]] = [[]]
    filled = 0
    for fragment_id, n in sizes:
        if out[-1] and filled >= share:
            out.append([])
            filled = 0
        out[-1].append(fragment_id)
        filled += n
    return out


def add_fragments(
    uri: str, version: int, storage_options: Mapping[str, str] | None,
    fragment_ids: Sequence[int], dim: int, empty: np.ndarray,
) -> np.ndarray:
    """A Ray task's work: the trained empty index plus these fragments' rows, serialised."""
    faiss.omp_set_num_threads(1)
    ds = open_dataset(uri, storage_options, version=version)
    index = faiss.deserialize_index(empty)
    for fid in fragment_ids:
        table = ds.get_fragment(fid).to_table(columns=["id", emb_column(dim)])
        if table.num_rows:
            _add_table(index, table["id"], table[emb_column(dim)], dim)
    return faiss.serialize_index(index)


def add_with_ray(
    index: faiss.Index, ds: lance.LanceDataset, dim: int,
    storage_options: Mapping[str, str] | None = None,
) -> None:
    """Add every row in Ray tasks (two per CPU at most), one per ``group_fragments`` run, each
    filling a copy of the empty ``index``; the partial indexes are merged into it as they end."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    sizes = [(f.fragment_id, f.count_rows()) for f in ds.get_fragments()]
    tasks = max(1, min(len(sizes), 2 * int(ray.cluster_resources().get("CPU", 1))))
    groups = group_fragments(sizes, tasks)
    logger.info(f"adding vectors from {len(sizes)} fragments in {len(groups)} Ray tasks")
    empty = ray.put(faiss.serialize_index(index))
    remote = ray.remote(num_cpus=1)(add_fragments)
    pending = [remote.remote(ds.uri, ds.version, storage_options, g, dim, empty) for g in groups]
    progress = Progress(len(groups), "index add", unit="tasks")
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        part = faiss.deserialize_index(ray.get(done[0]))
        progress.update(int(part.ntotal), len(groups) - len(pending))
        index.merge_from(part, 0)
    progress.close()
