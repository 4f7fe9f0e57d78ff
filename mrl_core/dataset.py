"""The dataset an embed run writes to: its settings resolved against what it records, its schema,
and the checks that must pass before a row is written.

``prepare_output`` is the one place a run learns how rows must look: a new dataset takes the
run's settings (over the defaults) and the kept columns' types from the first input shard that
has them; an existing one imposes its own settings (a conflicting flag is refused), its schema
and its encoder fingerprint. ``check_id_collisions`` refuses user ids that repeat across shards.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mrl_core import objectstore
from mrl_core.encoders import Encoder, get_encoder
from mrl_core.nesting import NestingSpec
from mrl_core.objectstore import filesystem, retrying
from mrl_core.settings import EmbedSettings, resolve_settings
from mrl_core.sources import Shard
from mrl_core.storage import (
    INFO_KEY,
    PIPELINE_VERSION,
    DatasetInfo,
    StorageError,
    encoder_fingerprint,
    kept_types,
    make_schema,
    read_info,
    try_open,
)

logger = logging.getLogger(__name__)


class IdCollisionError(StorageError):
    """Two rows of different shards would get the same id; ``shard`` is the new shard to blame."""

    def __init__(self, message: str, shard: str) -> None:
        super().__init__(message)
        self.shard = shard

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.shard)


@dataclass
class Output:
    """An embed run's output: the dataset (None until created), how its rows are made, its schema."""

    uri: str
    dataset: lance.LanceDataset | None
    info: DatasetInfo
    schema: pa.Schema | None
    encoder: Encoder
    upgrade: bool = False  # a dataset whose mrl.info predates recorded settings: rewrite it

    @property
    def settings(self) -> EmbedSettings:
        """The settings every row of this run is written with (dims resolved)."""
        return self.info.settings


def verify_output_location(uri: str, storage_options: Mapping[str, str] | None = None) -> None:
    """Refuse an output that exists and is not a Lance dataset (a directory of the user's files):
    a dataset written there would sit among them, and a clean-up could take them along."""
    if try_open(uri, storage_options) is not None:
        return
    names = objectstore.list_names(uri, storage_options)
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise StorageError(f"{uri} already holds files that are not a Lance dataset ({shown}); refusing to "
                           f"write a dataset into it: give --output a new path")


def prepare_settings(uri: str, given: Mapping[str, Any] | EmbedSettings | None,
                     storage_options: Mapping[str, str] | None = None) -> EmbedSettings:
    """The settings a run on ``uri`` would use (``resolve_settings``), without loading the encoder:
    a cheap look before deciding whether there is anything to do."""
    ds = try_open(uri, storage_options)
    recorded = read_info(ds) if ds is not None else None
    return resolve_settings(given, recorded.settings if recorded else None, uri,
                            recorded.full_dim if recorded else None, recorded.unknown if recorded else ())


def prepare_output(
    uri: str, given: Mapping[str, Any] | EmbedSettings | None,
    storage_options: Mapping[str, str] | None = None,
) -> Output:
    """Resolve a run's settings against the dataset at ``uri`` and load its encoder on the CPU.

    Refuses, before anything is written: a setting that conflicts with the dataset's
    (``SettingsConflictError``), a setting a dataset from before recorded settings needs once
    (``SettingsMissingError``), and an encoder whose weights or options differ from those that
    embedded the dataset (``StorageError``). The schema of a new dataset is made by ``create``.
    """
    ds = try_open(uri, storage_options)
    recorded = read_info(ds) if ds is not None else None
    settings = resolve_settings(
        given, recorded.settings if recorded else None, uri,
        recorded.full_dim if recorded else None, recorded.unknown if recorded else (),
    )
    encoder = get_encoder(settings.encoder, device="cpu", **settings.encoder_options)
    fingerprint = encoder_fingerprint(encoder.fingerprint, settings.encoder_options)
    if recorded is not None:
        if int(recorded.pipeline_version) > int(PIPELINE_VERSION):
            raise StorageError(
                f"dataset {uri} was written by a newer mrl-embed (pipeline version {recorded.pipeline_version}; "
                f"this one writes version {PIPELINE_VERSION}): upgrade mrl-embed to write to it"
            )
        if fingerprint != recorded.fingerprint:
            raise StorageError(
                f"dataset {uri} was embedded by {recorded.encoder!r} with fingerprint {recorded.fingerprint}; "
                f"the encoder {settings.encoder!r} loaded here has fingerprint {fingerprint}: its weights "
                f"or options differ. Install the same weights, or write to a new dataset."
            )
        info = replace(recorded, settings=settings, unknown=(), pipeline_version=PIPELINE_VERSION)
        return Output(uri, ds, info, ds.schema, encoder, upgrade=bool(recorded.unknown) or _old(recorded))
    dims = NestingSpec.for_model(encoder.dim, settings.dims).dims if settings.dims else encoder.nesting.dims
    info = DatasetInfo(
        settings=settings.with_(dims=tuple(dims)), fingerprint=fingerprint, full_dim=encoder.dim,
        trained_dims=tuple(encoder.nesting.dims), modality=encoder.modality,
    )
    return Output(uri, None, info, None, encoder)


def _old(info: DatasetInfo) -> bool:
    return info.pipeline_version != PIPELINE_VERSION


def create(output: Output, shards: Sequence[Shard], input_options: Mapping[str, str] | None,
           storage_options: Mapping[str, str] | None = None) -> lance.LanceDataset:
    """The output dataset, created empty (kept columns typed from the input) when it is new, its
    ``mrl.info`` rewritten when it predates recorded settings. Call after every check passed."""
    if output.dataset is not None:
        if output.upgrade:
            output.dataset.update_config({INFO_KEY: output.info.to_json()})
            logger.info(f"recorded the settings of {output.uri} in its mrl.info (written by an older version)")
        return output.dataset
    settings = output.settings
    fields = kept_fields(shards, settings.keep, input_options)
    schema = make_schema(settings.dims, settings.dtype, fields)
    output.info = replace(output.info, kept_types=kept_types(schema, settings.keep))
    opts = dict(storage_options or {})
    ds = lance.write_dataset(pa.Table.from_pylist([], schema=schema), output.uri, schema=schema,
                             storage_options=opts)
    ds.update_config({INFO_KEY: output.info.to_json()})
    output.dataset, output.schema = ds, schema
    return ds


def kept_fields(shards: Sequence[Shard], keep: Sequence[str],
                storage_options: Mapping[str, str] | None = None) -> list[pa.Field]:
    """The kept columns' Arrow fields for a new dataset: from the first Parquet shard that can be
    read and has them all (a shard that cannot, fails later as a shard error naming itself);
    strings for JSONL, text and WebDataset input."""
    if not keep:
        return []
    first_problem = None
    for shard in shards:
        if shard.format != "parquet":
            return [pa.field(k, pa.string()) for k in keep]
        try:
            schema = retrying(shard.uri, lambda shard=shard: _parquet_schema(shard.uri, storage_options))
        except (OSError, ValueError, pa.ArrowException) as exc:
            first_problem = first_problem or f"shard {shard.uri}: not a readable Parquet file ({exc})"
            continue
        missing = [k for k in keep if k not in schema.names]
        if missing:
            first_problem = first_problem or (
                f"shard {shard.uri}: no column {missing[0]!r} to keep (columns: {', '.join(schema.names)})")
            continue
        return [schema.field(k) for k in keep]
    raise ValueError(f"no input shard has every kept column {list(keep)}; the first problem: {first_problem}")


def _parquet_schema(uri: str, storage_options: Mapping[str, str] | None) -> pa.Schema:
    with filesystem(uri, storage_options).open(uri, "rb") as f:
        return pq.read_schema(f)


def check_id_collisions(
    ds: lance.LanceDataset | None, new: Mapping[str, np.ndarray], replacing: Sequence[str] = ()
) -> None:
    """Raise ``IdCollisionError`` naming both shards when an id of one new shard repeats in
    another new shard, or in a committed row of a shard other than itself (a shard being
    re-embedded replaces its own rows, so its old ids do not count).

    ``new``: {shard URI: its ids}. Committed ids are read a batch at a time (the id and shard
    columns only), so memory stays bounded by the new ids.
    """
    shards = list(new)
    if not shards:
        return
    ids = np.concatenate([np.asarray(new[s], dtype=np.int64) for s in shards])
    owner = np.repeat(np.arange(len(shards)), [len(new[s]) for s in shards])
    order = np.argsort(ids, kind="stable")
    ids, owner = ids[order], owner[order]
    same = np.flatnonzero((ids[1:] == ids[:-1]) & (owner[1:] != owner[:-1]))
    if len(same):
        i = same[0]
        first, second = sorted((owner[i], owner[i + 1]))
        raise IdCollisionError(
            f"id {ids[i]} is in shard {shards[first]} and in shard {shards[second]}: ids of "
            f"--id-column must be unique across shards; nothing was written", shards[second],
        )
    if ds is None or not len(ids):
        return
    own = set(new) | set(replacing)
    for batch in ds.to_batches(columns=["id", "shard"], batch_size=1 << 16):
        found = np.asarray(batch.column(0)).astype(np.int64)
        at = np.searchsorted(ids, found)
        hit = np.flatnonzero((at < len(ids)) & (ids[np.minimum(at, len(ids) - 1)] == found))
        for j in hit:
            committed = batch.column(1)[int(j)].as_py()
            if committed in own:
                continue  # a row of a shard this run (re-)embeds: it is replaced
            shard = shards[owner[at[j]]]
            raise IdCollisionError(
                f"id {found[j]} of shard {shard} is already the id of a row of shard {committed} in "
                f"{ds.uri}: ids of --id-column must be unique across shards; nothing was written", shard,
            )
