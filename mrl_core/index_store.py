"""The artifact store of tier-0 indexes: immutable version directories and a ``CURRENT`` pointer.

Artifacts live beside the dataset (any fsspec URL), one immutable directory per version::

    <dataset>.indexes/CURRENT            the current version's name, replaced atomically
    <dataset>.indexes/v000001/CLAIM      created exclusively first: this version is taken
    <dataset>.indexes/v000001/tier0.faiss
    <dataset>.indexes/v000001/manifest.json

A reader reads ``CURRENT`` once, then only that immutable directory, so it never sees a mix of
two versions. Writers claim a version number with an exclusive create, so concurrent builds
never share or overwrite one. Building an index is ``mrl_core.index``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import uuid
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
CLAIM = "CLAIM"
"""Created first, exclusively, in each version directory: whoever creates it owns the version."""
TIER0_FILE = "tier0.faiss"
_VERSION_RE = re.compile(r"^v\d{6}$")


class IndexNotFoundError(FileNotFoundError):
    """No index has been published for a dataset (run ``pipelines/index.py``)."""


class IndexDamagedError(ValueError):
    """An index version whose files are missing, truncated, unverifiable or point elsewhere: the
    message names the file and the command that rebuilds it."""


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
    search_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    """Seconds per query calibration timed for the calibrated funnel and for exact full-dim search,
    by batch size: ``{"1": {"funnel": 0.0004, "exact": 0.003}, "1000": {...}}`` (empty: not timed)."""
    auto_search: dict[str, str] = field(default_factory=dict)
    """What ``funnel="auto"`` runs at each timed batch size, the faster: ``{"1": "funnel", "1000":
    "exact"}``; other sizes follow the nearest (``mrl_core.calibration.method_at``). Empty (manifests
    written before it was timed, fixed schedules): always the funnel."""
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


def _rebuild_hint(index_uri: str) -> str:
    dataset = index_uri[: -len(".indexes")] if index_uri.endswith(".indexes") else "<dataset uri>"
    return f"rebuild it: python pipelines/index.py --dataset {dataset}"


def read_current(index_uri: str, storage_options: Mapping[str, str] | None = None) -> str:
    """The current version's name, from ``CURRENT``."""
    url = objectstore.join(index_uri, CURRENT)
    try:
        name = objectstore.read_bytes(url, storage_options).decode(errors="replace").strip()
    except FileNotFoundError as exc:
        raise IndexNotFoundError(
            f"no index at {index_uri} (no {CURRENT} file); build one with: "
            f"python pipelines/index.py --dataset <dataset uri>"
        ) from exc
    if not _VERSION_RE.match(name):
        raise IndexDamagedError(f"{url} names {name[:40]!r}, not an index version (vNNNNNN): the index is "
                                f"damaged; {_rebuild_hint(index_uri)}")
    return name


def list_versions(index_uri: str, storage_options: Mapping[str, str] | None = None) -> list[str]:
    """Index versions present under ``index_uri``, oldest first."""
    names = objectstore.list_names(index_uri, storage_options)
    return [n for n in names if _VERSION_RE.match(n)]


def read_manifest(
    index_uri: str, version: str | None = None, storage_options: Mapping[str, str] | None = None
) -> IndexManifest:
    """The manifest of ``version`` (default: the current one)."""
    current = version is None
    version = version or read_current(index_uri, storage_options)
    url = objectstore.join(index_uri, version, MANIFEST)
    try:
        manifest = IndexManifest.from_json(objectstore.read_bytes(url, storage_options).decode())
    except FileNotFoundError as exc:
        named = f"{CURRENT} names {version}, but it" if current else f"index version {version}"
        raise IndexDamagedError(f"{named} has no manifest ({url} is missing): the index is damaged; "
                                f"{_rebuild_hint(index_uri)}") from exc
    except (ValueError, TypeError, KeyError) as exc:  # truncated or foreign JSON
        raise IndexDamagedError(f"cannot read the index manifest {url} ({type(exc).__name__}: {exc}): "
                                f"the index is damaged; {_rebuild_hint(index_uri)}") from exc
    _verify_manifest(manifest, url, index_uri)
    return manifest


def _verify_manifest(manifest: IndexManifest, url: str, index_uri: str) -> None:
    """A manifest names a tier-0 file inside its own version directory, with a checksum."""
    name = manifest.tier0_file
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise IndexDamagedError(f"{url} names the tier-0 file {name!r}, which is not a file of its own version "
                                f"directory: refusing it; {_rebuild_hint(index_uri)}")
    if not re.fullmatch(r"[0-9a-f]{64}", manifest.tier0_sha256 or ""):
        raise IndexDamagedError(f"{url} records no valid checksum of {name}: refusing an unverifiable index; "
                                f"{_rebuild_hint(index_uri)}")


def index_is_intact(index_uri: str, storage_options: Mapping[str, str] | None = None) -> bool:
    """Whether the current version looks complete without reading the index itself: its manifest
    reads and is valid, and its tier-0 file exists at the recorded size. Raises
    ``IndexNotFoundError`` when there is no index at all."""
    try:
        manifest = read_manifest(index_uri, None, storage_options)
        url = objectstore.join(index_uri, manifest.version, manifest.tier0_file)
        fs, path = objectstore.url_to_fs(url, storage_options)
        return int(fs.size(path)) == manifest.index_bytes
    except (IndexDamagedError, FileNotFoundError):
        return False


def load_index(
    index_uri: str, version: str | None = None, storage_options: Mapping[str, str] | None = None
) -> tuple[faiss.Index, IndexManifest]:
    """(CPU FAISS index, manifest) of ``version`` (default: ``CURRENT``), checksum verified."""
    manifest = read_manifest(index_uri, version, storage_options)
    url = objectstore.join(index_uri, manifest.version, manifest.tier0_file)
    try:
        data = objectstore.read_bytes(url, storage_options)
    except FileNotFoundError as exc:
        raise IndexDamagedError(f"the tier-0 file {url} of index {manifest.version} is missing: the index is "
                                f"damaged; {_rebuild_hint(index_uri)}") from exc
    if hashlib.sha256(data).hexdigest() != manifest.tier0_sha256:
        raise IndexDamagedError(f"{url} does not match its manifest's checksum (a partial or foreign file): "
                                f"the index is damaged; {_rebuild_hint(index_uri)}")
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

    Fills in the manifest's version, size and checksum. The version number is claimed first
    (``claim_version``: an exclusive create), so of concurrent builds each gets its own version
    and none overwrites another's files.
    """
    manifest.version = claim_version(index_uri, storage_options)
    target = objectstore.join(index_uri, manifest.version)
    _write_tier0(index, manifest, objectstore.join(target, manifest.tier0_file), storage_options)
    manifest_url = objectstore.join(target, MANIFEST)
    objectstore.write_bytes(manifest_url, manifest.to_json().encode(), storage_options)
    if make_current and not _newer_is_current(index_uri, manifest.version, storage_options):
        set_current(index_uri, manifest.version, storage_options)
    return manifest


def _newer_is_current(index_uri: str, version: str, storage_options: Mapping[str, str] | None) -> bool:
    """Whether a concurrent build already made a later, intact version current (then it stays)."""
    try:
        current = read_current(index_uri, storage_options)
        return current > version and read_manifest(index_uri, current, storage_options) is not None
    except (IndexNotFoundError, ValueError):
        return False


def claim_version(index_uri: str, storage_options: Mapping[str, str] | None = None,
                  attempts: int = 100) -> str:
    """The next version name, claimed for this writer: ``vNNNNNN/CLAIM`` created exclusively
    (``objectstore.create_new``). A writer that loses the race moves on to the number after."""
    existing = list_versions(index_uri, storage_options)
    number = int(existing[-1][1:]) + 1 if existing else 1
    token = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}\n".encode()
    for _ in range(attempts):
        version = f"v{number:06d}"
        if objectstore.create_new(objectstore.join(index_uri, version, CLAIM), token, storage_options):
            return version
        number += 1
    raise RuntimeError(f"could not claim an index version under {index_uri} after {attempts} tries")


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
