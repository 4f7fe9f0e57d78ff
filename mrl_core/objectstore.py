"""Small-object I/O on any fsspec URL, with Lance-style storage options understood.

Lance and s3fs name the same S3 settings differently; ``fsspec_options`` maps one to the other so
that a single ``storage_options`` dict serves both the dataset and the files written beside it.

Object-store calls are retried with exponential backoff and jitter (``retrying``) on transient
errors (5xx, throttling, timeouts, dropped connections) beyond what botocore/s3fs retry on their
own; a permanent error (not found, access denied) fails at once, and every error that escapes
names the object. Lance retries its own requests (``client_max_retries``, default 10, within
``client_retry_timeout``, default 180 s); the same keys, and ``timeout``/``connect_timeout``,
configure s3fs here.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mrl_core.defaults import RETRY_ATTEMPTS, RETRY_BASE_SECONDS, RETRY_MAX_SECONDS

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
_S3_DROPPED = {
    "allow_http", "aws_allow_http", "aws_virtual_hosted_style_request", "virtual_hosted_style_request",
    "client_retry_timeout", "download_retry_count", "allow_invalid_certificates", "aws_s3_express",
}
# Lance server-side-encryption option -> S3 request parameter (s3fs ``s3_additional_kwargs``), so
# the files written beside a dataset are encrypted the way its data files are.
_S3_SSE = {
    "aws_server_side_encryption": "ServerSideEncryption",
    "aws_sse_kms_key_id": "SSEKMSKeyId",
    "aws_sse_bucket_key_enabled": "BucketKeyEnabled",
}
# Lance (object_store client) timeout option -> botocore Config field.
_S3_TIMEOUTS = {"timeout": "read_timeout", "request_timeout": "read_timeout", "connect_timeout": "connect_timeout"}

PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
"""Errors that retrying cannot fix: raised at once (with the object's URL in the message)."""

T = TypeVar("T")


def protocol_of(url: str) -> str:
    """The URL's scheme (``s3``, ``gs``, ``memory``...), ``file`` for plain paths."""
    scheme, sep, _ = url.partition("://")
    return scheme if sep else "file"


def fsspec_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """fsspec keyword arguments for ``url`` from Lance-style (or already fsspec-style) options.

    For S3, ``aws_endpoint``/``aws_access_key_id``/``aws_secret_access_key``/``aws_region`` become
    s3fs's ``client_kwargs.endpoint_url``/``key``/``secret``/``client_kwargs.region_name``;
    Lance's ``timeout``/``connect_timeout`` (``"30s"``, ``"500ms"``) and ``client_max_retries``
    become botocore's ``read_timeout``/``connect_timeout`` and retry attempts; ``allow_http`` and
    other Lance-only keys are dropped (s3fs follows the endpoint's scheme). GCS (gcsfs) and Azure
    (adlfs): ``_gcs_options``, ``_azure_options``. Other keys pass through.
    """
    options = dict(storage_options or {})
    protocol = protocol_of(url)
    if protocol in ("gs", "gcs"):
        return _gcs_options(options)
    if protocol in ("az", "abfs", "abfss", "adl"):
        return _azure_options(options)
    if protocol not in ("s3", "s3a"):
        return options
    out: dict[str, Any] = {}
    client_kwargs = dict(options.pop("client_kwargs", {}) or {})
    config_kwargs = dict(options.pop("config_kwargs", {}) or {})
    for key, value in options.items():
        lower = key.lower()
        target = _S3_KEYS.get(lower)
        if lower in _S3_DROPPED:
            continue
        if lower in _S3_SSE:
            extra = out.setdefault("s3_additional_kwargs", {})
            extra[_S3_SSE[lower]] = str(value).lower() == "true" if lower.endswith("enabled") else value
        elif lower in _S3_TIMEOUTS:
            config_kwargs.setdefault(_S3_TIMEOUTS[lower], parse_seconds(value))
        elif lower == "client_max_retries":
            config_kwargs.setdefault("retries", {"max_attempts": int(value) + 1, "mode": "standard"})
        elif target is None:
            out[key] = value
        elif target.startswith("client_kwargs."):
            client_kwargs[target.split(".", 1)[1]] = value
        else:
            out[target] = value
    if client_kwargs:
        out["client_kwargs"] = client_kwargs
    if config_kwargs:
        out["config_kwargs"] = config_kwargs
    return out


# Lance (object_store) Google option -> gcsfs argument.
_GCS_TOKEN_PATHS = {"google_service_account", "service_account", "google_service_account_path",
                    "service_account_path", "google_application_credentials"}
_GCS_TOKEN_KEYS = {"google_service_account_key", "service_account_key"}
_GCS_DROPPED = {"google_bucket", "google_bucket_name", "bucket", "bucket_name", "allow_http",
                "client_max_retries", "client_retry_timeout", "connect_timeout", "download_retry_count"}

# Lance (object_store) Azure option -> adlfs argument.
_AZURE_KEYS = {
    **dict.fromkeys(("azure_storage_account_name", "account_name"), "account_name"),
    **dict.fromkeys(("azure_storage_account_key", "azure_storage_access_key", "azure_storage_master_key",
                     "access_key", "account_key", "master_key"), "account_key"),
    **dict.fromkeys(("azure_storage_sas_key", "azure_storage_sas_token", "sas_key", "sas_token"), "sas_token"),
    **dict.fromkeys(("azure_storage_client_id", "azure_client_id", "client_id"), "client_id"),
    **dict.fromkeys(("azure_storage_client_secret", "azure_client_secret", "client_secret"), "client_secret"),
    **dict.fromkeys(("azure_storage_tenant_id", "azure_storage_authority_id", "azure_tenant_id",
                     "azure_authority_id", "tenant_id", "authority_id"), "tenant_id"),
}
_AZURE_ENDPOINTS = {"azure_storage_endpoint", "azure_endpoint", "endpoint"}
_AZURE_DROPPED = {"allow_http", "azure_storage_use_emulator", "object_store_use_emulator", "use_emulator",
                  "client_max_retries", "client_retry_timeout", "download_retry_count", "azure_container_name",
                  "container_name"}


def _gcs_options(options: dict[str, Any]) -> dict[str, Any]:
    """gcsfs arguments from Lance's Google names: a service-account file or key becomes ``token``
    (a path, or the parsed JSON key), ``google_skip_signature`` ``token="anon"``, ``timeout``
    ``requests_timeout`` (seconds); the bucket name and Lance-only keys are dropped."""
    import json

    out: dict[str, Any] = {}
    for key, value in options.items():
        lower = key.lower()
        if lower in _GCS_DROPPED:
            continue
        if lower in _GCS_TOKEN_PATHS:
            out["token"] = value
        elif lower in _GCS_TOKEN_KEYS:
            out["token"] = json.loads(value) if isinstance(value, str) else value
        elif lower in ("google_skip_signature", "skip_signature"):
            if str(value).lower() == "true":
                out["token"] = "anon"
        elif lower in ("timeout", "request_timeout"):
            out["requests_timeout"] = parse_seconds(value)
        else:
            out[key] = value
    return out


def _azure_options(options: dict[str, Any]) -> dict[str, Any]:
    """adlfs arguments from Lance's Azure names: account name and key, SAS token, service principal
    (client id, secret, tenant); an https endpoint becomes ``account_host``, an http one (Azurite)
    a ``connection_string``; ``azure_skip_signature`` ``anon``; timeouts the Azure SDK's
    ``read_timeout``/``connection_timeout`` (seconds); Lance-only keys are dropped."""
    out: dict[str, Any] = {}
    endpoint = None
    for key, value in options.items():
        lower = key.lower()
        if lower in _AZURE_DROPPED:
            continue
        if lower in _AZURE_KEYS:
            out[_AZURE_KEYS[lower]] = value
        elif lower in _AZURE_ENDPOINTS:
            endpoint = str(value).rstrip("/")
        elif lower in ("azure_skip_signature", "skip_signature"):
            out["anon"] = str(value).lower() == "true"
        elif lower in ("timeout", "request_timeout"):
            out["read_timeout"] = parse_seconds(value)
        elif lower == "connect_timeout":
            out["connection_timeout"] = parse_seconds(value)
        else:
            out[key] = value
    if endpoint and endpoint.startswith("https://"):
        out["account_host"] = endpoint[len("https://"):]
    elif endpoint:
        out["connection_string"] = (
            f"DefaultEndpointsProtocol={endpoint.split('://')[0]};AccountName={out.get('account_name', '')};"
            f"AccountKey={out.pop('account_key', '')};BlobEndpoint={endpoint};"
        )
    return out


def parse_seconds(value: Any) -> float:
    """A duration as seconds: a number, or a string such as ``"30s"``, ``"500ms"``, ``"2m"``."""
    if isinstance(value, (int, float)):
        return float(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (use e.g. '30s' or '500ms')")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[match.group(2)]
    return float(match.group(1)) * scale


def is_transient(exc: BaseException) -> bool:
    """Whether retrying may fix ``exc``: I/O errors other than not-found, denied and the like."""
    if isinstance(exc, PERMANENT_ERRORS):
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    # errors from the HTTP stack that s3fs passes through untranslated
    return type(exc).__module__.split(".")[0] in ("aiohttp", "botocore", "aiobotocore", "urllib3")


def _named(exc: BaseException, what: str, note: str = "") -> BaseException:
    """``exc`` re-created with ``what`` (the object's URL) leading its message, type kept."""
    message = f"{what}: {note}{exc}" if str(exc) else f"{what}: {note}{type(exc).__name__}"
    try:
        return type(exc)(message)
    except Exception:  # noqa: BLE001 — a type that takes other arguments
        return OSError(message)


def retrying(
    what: str, fn: Callable[[], T], attempts: int | None = None,
    base_delay: float = RETRY_BASE_SECONDS, max_delay: float = RETRY_MAX_SECONDS,
) -> T:
    """``fn()``, retried with exponential backoff and jitter on transient errors.

    ``what`` (the object's URL) leads the message of any error that escapes: a permanent one at
    once, a transient one after the last attempt.
    """
    attempts = attempts or RETRY_ATTEMPTS
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 — classified below, re-raised named
            if not is_transient(exc):
                if what in str(exc):
                    raise
                raise _named(exc, what) from exc
            if attempt == attempts - 1:
                raise _named(exc, what, f"failed after {attempts} attempts: ") from exc
            delay = min(max_delay, base_delay * 2**attempt)
            time.sleep(delay * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")


def _attempts(fs: fsspec.AbstractFileSystem) -> int:
    """Local files are not retried: their errors do not go away by waiting."""
    return 1 if isinstance(fs, LocalFileSystem) else RETRY_ATTEMPTS


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
    """The whole object at ``url`` (transient errors retried; errors name ``url``)."""
    fs, path = url_to_fs(url, storage_options)
    return retrying(url, lambda: fs.cat_file(path), _attempts(fs))


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether an object (or directory) exists at ``url``."""
    fs, path = url_to_fs(url, storage_options)
    fs.invalidate_cache(path)
    return retrying(url, lambda: fs.exists(path), _attempts(fs))


def write_bytes(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write (or replace) ``url`` with ``data``, all or nothing: one PUT (object stores;
    idempotent, so retried on transient errors) or a temporary file renamed into place (local).
    A crash never leaves a partial file, and a reader sees the old bytes or the new, never a mix."""
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        _write_local_atomic(fs, path, lambda f: f.write(data))
        return
    retrying(url, lambda: fs.pipe_file(path, data))


def create_new(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Create ``url`` holding ``data`` only if nothing is there yet: True when this call made it,
    False when it was there already (another writer's).

    One exclusive create: ``O_EXCL`` locally, a conditional PUT (``If-None-Match: *``) on S3 and
    stores that support it, so of two writers racing for one name exactly one wins. A retried
    create whose first attempt succeeded unseen finds its own bytes there, and counts as made.
    """
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)

    def create() -> None:
        with fs.open(path, "xb") as f:
            f.write(data)

    try:
        retrying(url, create, _attempts(fs))
        return True
    except FileExistsError:
        return read_bytes(url, storage_options) == data


def put_file(local_path: str, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Upload (or copy) the local file ``local_path`` to ``url``, streaming; all or nothing, as
    ``write_bytes`` (a multipart upload only appears when completed)."""
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        def copy(f) -> None:
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 24)

        _write_local_atomic(fs, path, copy)
        return
    retrying(url, lambda: fs.put_file(local_path, path))


def _write_local_atomic(fs: LocalFileSystem, path: str, write: Callable[[Any], Any]) -> None:
    """Write through ``write(file)`` to a temporary file beside ``path``, flush it to disk, then
    rename it over ``path`` (atomic on POSIX): readers see the old file or the new, never a part."""
    parent = fs._parent(path)
    fs.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            write(f)
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
        entries = retrying(url, lambda: fs.ls(path, detail=False), _attempts(fs))
    except FileNotFoundError:
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def remove(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete ``url`` and everything under it."""
    fs, path = url_to_fs(url, storage_options)
    fs.rm(path, recursive=True)


_USERINFO = re.compile(r"(?<=://)\S*@")  # greedy: up to the last "@", whatever the password holds


def redact_url(url: str) -> str:
    """``url`` without any ``user:password@`` part."""
    return _USERINFO.sub("***@", str(url))


def redact(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` safe to print or log: every value hidden but endpoint, region and allow_http
    (an endpoint's ``user:password@`` hidden too)."""
    visible = ("endpoint", "region", "allow_http")
    return {
        k: (redact_url(v) if any(s in k.lower() for s in visible) else "***")
        for k, v in (options or {}).items()
    }
