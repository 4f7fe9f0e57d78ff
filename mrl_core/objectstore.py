"""Small-object I/O on any fsspec URL, with Lance-style storage options understood.

Lance and s3fs name the same S3 settings differently; ``fsspec_options`` maps one to the other so
that a single ``storage_options`` dict serves both the dataset and the files written beside it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

# Lance (object_store) option -> s3fs argument; "client_kwargs." keys go into client_kwargs.
_S3_KEYS = {
    "aws_access_key_id": "key",
    "access_key_id": "key",
    "aws_secret_access_key": "secret",
    "secret_access_key": "secret",
    "aws_session_token": "token",
    "session_token": "token",
    "aws_endpoint": "client_kwargs.endpoint_url",
    "aws_endpoint_url": "client_kwargs.endpoint_url",
    "endpoint": "client_kwargs.endpoint_url",
    "endpoint_url": "client_kwargs.endpoint_url",
    "aws_region": "client_kwargs.region_name",
    "region": "client_kwargs.region_name",
}
_S3_DROPPED = {"allow_http", "aws_allow_http", "aws_virtual_hosted_style_request", "virtual_hosted_style_request"}


def protocol_of(url: str) -> str:
    """The URL's scheme (``s3``, ``gs``, ``memory``...), ``file`` for plain paths."""
    scheme, sep, _ = url.partition("://")
    return scheme if sep else "file"


def fsspec_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """fsspec keyword arguments for ``url`` from Lance-style (or already fsspec-style) options.

    For S3, ``aws_endpoint``/``aws_access_key_id``/``aws_secret_access_key``/``aws_region`` become
    s3fs's ``client_kwargs.endpoint_url``/``key``/``secret``/``client_kwargs.region_name``;
    ``allow_http`` is dropped (s3fs follows the endpoint's scheme). Other keys pass through.
    """
    options = dict(storage_options or {})
    if protocol_of(url) not in ("s3", "s3a"):
        return options
    out: dict[str, Any] = {}
    client_kwargs = dict(options.pop("client_kwargs", {}) or {})
    for key, value in options.items():
        target = _S3_KEYS.get(key.lower())
        if key.lower() in _S3_DROPPED:
            continue
        if target is None:
            out[key] = value
        elif target.startswith("client_kwargs."):
            client_kwargs[target.split(".", 1)[1]] = value
        else:
            out[target] = value
    if client_kwargs:
        out["client_kwargs"] = client_kwargs
    return out


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem serving ``url`` (Lance-style options mapped, see ``fsspec_options``)."""
    return url_to_fs(url, storage_options)[0]


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path within it) for ``url``."""
    return fsspec.core.url_to_fs(url, **fsspec_options(url, storage_options))


def join(url: str, *parts: str) -> str:
    """``url`` with path parts appended, separated by ``/``."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The whole object at ``url``."""
    fs, path = url_to_fs(url, storage_options)
    return fs.cat_file(path)


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether an object (or directory) exists at ``url``."""
    fs, path = url_to_fs(url, storage_options)
    fs.invalidate_cache(path)
    return fs.exists(path)


def write_bytes(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` to ``url`` in one PUT (object stores) or one file write (local)."""
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, data)


def put_file(local_path: str, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Upload (or copy) the local file ``local_path`` to ``url``, streaming."""
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)
    fs.put_file(local_path, path)


def replace_atomic(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Replace the object at ``url`` so that a reader sees the old or the new bytes, never a mix.

    Local files: write a temporary file beside it, then ``os.replace`` (an atomic rename). Object
    stores: a single PUT of a small object is atomic already.
    """
    fs, path = url_to_fs(url, storage_options)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    parent = fs._parent(path)
    fs.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_names(url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Names (last path component) of the entries directly under ``url``; [] when it is absent."""
    fs, path = url_to_fs(url, storage_options)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def remove(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete ``url`` and everything under it."""
    fs, path = url_to_fs(url, storage_options)
    fs.rm(path, recursive=True)


def redact(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` safe to print or log: every value hidden but endpoint, region and allow_http."""
    visible = ("endpoint", "region", "allow_http")
    return {k: (v if any(s in k.lower() for s in visible) else "***") for k, v in (options or {}).items()}
