"""The artifact store of tier-0 indexes: immutable version directories and a ``CURRENT`` pointer.

Artifacts live beside the dataset (any fsspec URL), one immutable directory per version::

    <dataset>.indexes/CURRENT            the current version's name, replaced atomically
    <dataset>.indexes/v000001/tier0.faiss
    <dataset>.indexes/v000001/manifest.json

A reader reads ``CURRENT`` once, then only that immutable directory, so it never sees a mix of
two versions. One writer at a time per index URI. Building an index is ``mrl_core.index``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from mrl_core import objectstore
from mrl_core.funnel import FunnelSchedule

FORMAT = 1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
TIER0_FILE = "tier0.faiss"
_VERSION_RE = re.compile(r"^v\d{6}$")


class IndexNotFoundError(FileNotFoundError):
    """No index has been published for a dataset (run ``pipelines/index.py``)."""


class IndexMismatchError(RuntimeError):
    """An index built for another dataset version or another encoder than the dataset holds."""


@dataclass
class IndexManifest:
    """What one index version holds and how it was built (``manifest.json``)."""

    version: str
    dataset_uri: str
    dataset_version: int
    rows_signature: str
    rows: int
    column: str
    dim: int
    full_dim: int
    stored_dims: list[int]
    metric: str
    factory: str
    params: dict[str, Any]
    build_seconds: float
    built_at: str
    bytes_per_vector: float
    index_bytes: int
    encoder: str
    encoder_fingerprint: str
    schedule: dict[str, Any] | None = None
    schedule_recall: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    tier0_file: str = TIER0_FILE
    tier0_sha256: str = ""
    faiss_version: str = faiss.__version__
    format: int = FORMAT

    def funnel_schedule(self) -> FunnelSchedule | None:
        """The calibrated schedule written at build time."""
        return None if self.schedule is None else FunnelSchedule.from_dict(self.schedule)

    def to_json(self) -> str:
        """The manifest as indented JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IndexManifest:
        """Parse ``to_json``'s output (unknown keys from newer writers are ignored)."""
        raw = json.loads(text)
        if raw.get("format", FORMAT) > FORMAT:
            raise ValueError(
                f"index manifest format {raw['format']} is newer than this code ({FORMAT})"
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


def default_index_uri(dataset_uri: str) -> str:
    """Where a dataset's indexes live unless told: ``<dataset_uri>.indexes`` (a sibling)."""
    return dataset_uri.rstrip("/") + ".indexes"


def _verify_version(version: str) -> str:
    """``version`` itself when it names a version directory (``vNNNNNN``), else a ValueError."""
    if not _VERSION_RE.match(version):
        raise ValueError(f"not an index version: {version!r}")
    return version


def read_current(index_uri: str, storage_options: Mapping[str, str] | None = None) -> str:
    """The current version's name, from ``CURRENT``."""
    url = objectstore.join(index_uri, CURRENT)
    try:
        name = objectstore.read_bytes(url, storage_options).decode().strip()
    except FileNotFoundError as exc:
        raise IndexNotFoundError(
            f"no index at {index_uri} (no {CURRENT} file); build one with: "
            f"python pipelines/index.py --dataset <dataset uri>"
        ) from exc
    if not _VERSION_RE.match(name):
        raise ValueError(f"{url} names {name!r}, not an index version (vNNNNNN)")
    return name


def list_versions(index_uri: str, storage_options: Mapping[str, str] | None = None) -> list[str]:
    """Index versions present under ``index_uri``, oldest first."""
    names = objectstore.list_names(index_uri, storage_options)
    return [n for n in names if _VERSION_RE.match(n)]


def read_manifest(
    index_uri: str, version: str | None = None, storage_options: Mapping[str, str] | None = None
) -> IndexManifest:
    """The manifest of ``version`` (default: the current one)."""
    version = version or read_current(index_uri, storage_options)
    url = objectstore.join(index_uri, version, MANIFEST)
    try:
        return IndexManifest.from_json(objectstore.read_bytes(url, storage_options).decode())
    except FileNotFoundError as exc:
        raise IndexNotFoundError(f"index version {version} has no manifest at {url}") from exc


def load_index(
    index_uri: str, version: str | None = None, storage_options: Mapping[str, str] | None = None
) -> tuple[faiss.Index, IndexManifest]:
    """(CPU FAISS index, manifest) of ``version`` (default: ``CURRENT``), checksum verified."""
    manifest = read_manifest(index_uri, version, storage_options)
    url = objectstore.join(index_uri, manifest.version, manifest.tier0_file)
    data = objectstore.read_bytes(url, storage_options)
    if manifest.tier0_sha256 and hashlib.sha256(data).hexdigest() != manifest.tier0_sha256:
        raise ValueError(f"{url} does not match its manifest's checksum: a partial or foreign file")
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), manifest


def set_current(
    index_uri: str, version: str, storage_options: Mapping[str, str] | None = None
) -> None:
    """Point ``CURRENT`` at ``version`` atomically (readers see the old or the new name)."""
    data = (_verify_version(version) + "\n").encode()
    objectstore.write_bytes(objectstore.join(index_uri, CURRENT), data, storage_options)


def _write_tier0(index: faiss.Index, manifest: IndexManifest, url: str, storage_options) -> None:
    """Upload ``index`` to ``url``, filling in the manifest's checksum and sizes."""
    with tempfile.TemporaryDirectory(prefix="mrl-index-") as tmp:
        local = os.path.join(tmp, manifest.tier0_file)
        faiss.write_index(index, local)
        digest = hashlib.sha256()
        with open(local, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        manifest.tier0_sha256 = digest.hexdigest()
        manifest.index_bytes = os.path.getsize(local)
        manifest.bytes_per_vector = round(manifest.index_bytes / max(manifest.rows, 1), 2)
        objectstore.put_file(local, url, storage_options)


def publish(
    index_uri: str,
    index: faiss.Index,
    manifest: IndexManifest,
    storage_options: Mapping[str, str] | None = None,
    make_current: bool = True,
) -> IndexManifest:
    """Write ``index`` and its manifest as the next version directory, then swap ``CURRENT``.

    Fills in the manifest's version, size and checksum. One writer at a time per index URI.
    """
    existing = list_versions(index_uri, storage_options)
    manifest.version = f"v{int(existing[-1][1:]) + 1 if existing else 1:06d}"
    target = objectstore.join(index_uri, manifest.version)
    _write_tier0(index, manifest, objectstore.join(target, manifest.tier0_file), storage_options)
    manifest_url = objectstore.join(target, MANIFEST)
    objectstore.write_bytes(manifest_url, manifest.to_json().encode(), storage_options)
    if make_current:
        set_current(index_uri, manifest.version, storage_options)
    return manifest


def prune_versions(
    index_uri: str, keep: int, storage_options: Mapping[str, str] | None = None
) -> list[str]:
    """Delete all but the newest ``keep`` versions (never the current one); return those deleted.

    A reader that read ``CURRENT`` just before an older version became unreferenced may still be
    loading it: keep at least 2.
    """
    if keep < 1:
        raise ValueError("keep must be >= 1")
    current = read_current(index_uri, storage_options)
    doomed = [v for v in list_versions(index_uri, storage_options)[:-keep] if v != current]
    for v in doomed:
        objectstore.remove(objectstore.join(index_uri, v), storage_options)
    return doomed
