"""Input shards: find them under any fsspec URL and read one into validated records.

One shard is one file: Parquet, JSONL, plain text (a record a line) or a WebDataset tar.
A shard that cannot be read at all raises ``ShardError`` naming it; a bad record (null,
empty, invalid UTF-8, too large, unparsable) is skipped and reported with its position.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from mrl_core.objectstore import filesystem

FORMATS = {
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".txt": "text",
    ".text": "text",
    ".tar": "wds",
}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
DEFAULT_MAX_RECORD_BYTES = 1 << 20


class ShardError(RuntimeError):
    """A whole shard is unusable: unreadable, corrupt, or missing a required column."""

    def __init__(self, shard: str, reason: str) -> None:
        super().__init__(f"shard {shard}: {reason}")
        self.shard = shard
        self.reason = reason


@dataclass(frozen=True)
class Shard:
    """One input file: its URI, size and a version tag (etag or mtime) to detect changes."""

    uri: str
    size: int
    version: str
    format: str


@dataclass
class ShardRecords:
    """The valid records of a shard (``_pos`` = position in the shard) and the skipped ones."""

    table: pa.Table
    total: int
    skipped: list[tuple[int, str]] = field(default_factory=list)


def format_of(uri: str, declared: str | None = None) -> str:
    """The shard's format: ``declared`` if given, else from the file extension."""
    if declared:
        if declared not in set(FORMATS.values()):
            raise ValueError(f"unknown input format {declared!r}; use one of {sorted(set(FORMATS.values()))}")
        return declared
    ext = posixpath.splitext(uri)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"cannot tell the format of {uri} from its extension; pass --format")
    return FORMATS[ext]


def list_shards(
    url: str, storage_options: Mapping[str, str] | None = None, fmt: str | None = None
) -> list[Shard]:
    """Every shard under ``url`` (a file, a directory searched recursively, or a glob), sorted."""
    fs = filesystem(url, storage_options)
    if any(c in url for c in "*?["):
        paths = fs.glob(url)
    elif fs.isdir(url):
        paths = [p for p in fs.find(url) if fmt or posixpath.splitext(p)[1].lower() in FORMATS]
    elif fs.exists(url):
        paths = [url]
    else:
        raise FileNotFoundError(f"input {url} does not exist")
    shards = []
    for path in sorted(paths):
        info = fs.info(path)
        if info.get("type") == "directory":
            continue
        size = int(info.get("size") or 0)
        tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        uri = fs.unstrip_protocol(path) if "://" in url else path
        shards.append(Shard(uri, size, f"{size}:{tag}", format_of(path, fmt)))
    if not shards:
        raise FileNotFoundError(f"no input shards found under {url}")
    return shards


def read_shard(
    shard: Shard,
    input_column: str,
    keep: Sequence[str] = (),
    storage_options: Mapping[str, str] | None = None,
    modality: str = "text",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> ShardRecords:
    """Read and validate one shard: columns ``_pos``, ``_input`` and the ``keep`` columns."""
    fs = filesystem(shard.uri, storage_options)
    try:
        with fs.open(shard.uri, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as exc:
        raise ShardError(shard.uri, f"cannot open: {exc}") from exc
    reader = {"parquet": _parquet, "jsonl": _jsonl, "text": _text, "wds": _wds}[shard.format]
    table, skipped = reader(shard.uri, data, input_column, list(keep))
    total = table.num_rows + len(skipped)
    missing = [c for c in [input_column, *keep] if c not in table.column_names]
    if missing and table.num_rows:
        raise ShardError(shard.uri, f"no column {missing[0]!r} (columns: {', '.join(table.column_names)})")
    values = table.column(input_column).to_pylist() if table.num_rows else []
    good, pos = [], table.column("_pos").to_pylist() if table.num_rows else []
    for i, value in enumerate(values):
        reason = _record_problem(value, modality, max_record_bytes)
        if reason:
            skipped.append((pos[i], reason))
        else:
            good.append(i)
    table = table.take(pa.array(good, pa.int64())) if len(good) != table.num_rows else table
    if modality == "text" and table.num_rows and pa.types.is_binary(table.schema.field(input_column).type):
        table = table.set_column(
            table.schema.get_field_index(input_column), input_column, table.column(input_column).cast(pa.string())
        )
    table = table.rename_columns(["_input" if n == input_column else n for n in table.column_names])
    skipped.sort()
    return ShardRecords(table.select(["_pos", "_input", *keep]) if table.num_rows else _empty(keep), total, skipped)


def _empty(keep: Sequence[str]) -> pa.Table:
    return pa.table({"_pos": pa.array([], pa.int64()), "_input": pa.array([], pa.string()),
                     **{k: pa.array([], pa.string()) for k in keep}})


def _record_problem(value: object, modality: str, max_bytes: int) -> str | None:
    """Why a record cannot be embedded, or None when it can."""
    if value is None:
        return f"null {'text' if modality == 'text' else 'image'}"
    if modality == "text":
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"invalid UTF-8 at byte {exc.start}"
        if not isinstance(value, str):
            return f"text is {type(value).__name__}, expected a string"
        size = len(value.encode("utf-8", "surrogatepass"))
        if not value.strip():
            return "empty text"
    else:
        if not isinstance(value, bytes):
            return f"image is {type(value).__name__}, expected encoded bytes"
        size = len(value)
        if not size:
            return "empty image"
    if size > max_bytes:
        return f"record is {size} bytes, over the {max_bytes}-byte limit (--max-record-bytes)"
    return None


def _with_positions(table: pa.Table) -> pa.Table:
    return table.append_column("_pos", pa.array(range(table.num_rows), pa.int64()))


def _parquet(uri: str, data: bytes, column: str, keep: list[str]) -> tuple[pa.Table, list]:
    try:
        pf = pq.ParquetFile(io.BytesIO(data))
        names = pf.schema_arrow.names
        missing = [c for c in [column, *keep] if c not in names]
        if missing:
            raise ShardError(uri, f"no column {missing[0]!r} (columns: {', '.join(names)})")
        table = pf.read(columns=[column, *keep])
    except ShardError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        raise ShardError(uri, f"not a readable Parquet file: {exc}") from exc
    ftype = table.schema.field(column).type
    if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype) or pa.types.is_binary(ftype)
            or pa.types.is_large_binary(ftype)):
        raise ShardError(uri, f"column {column!r} is {ftype}, expected string or binary")
    return _with_positions(table), []


def _lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _jsonl(uri: str, data: bytes, column: str, keep: list[str]) -> tuple[pa.Table, list]:
    rows, skipped = [], []
    for pos, line in enumerate(_lines(data)):
        try:
            obj = json.loads(line)
        except UnicodeDecodeError as exc:
            skipped.append((pos, f"invalid UTF-8 at byte {exc.start}"))
            continue
        except ValueError as exc:
            skipped.append((pos, f"invalid JSON: {exc}"))
            continue
        if not isinstance(obj, dict):
            skipped.append((pos, f"line is a JSON {type(obj).__name__}, expected an object"))
            continue
        rows.append({"_pos": pos, column: obj.get(column), **{k: obj.get(k) for k in keep}})
    if rows and not any(column in r and r[column] is not None for r in rows):
        raise ShardError(uri, f"no record has the field {column!r}")
    return _rows_to_table(rows, column, keep), skipped


def _text(uri: str, data: bytes, column: str, keep: list[str]) -> tuple[pa.Table, list]:
    """A record a line; kept columns are null (a text file has none)."""
    rows, skipped = [], []
    for pos, line in enumerate(_lines(data)):
        try:
            rows.append({"_pos": pos, column: line.decode("utf-8"), **dict.fromkeys(keep)})
        except UnicodeDecodeError as exc:
            skipped.append((pos, f"invalid UTF-8 at byte {exc.start}"))
    return _rows_to_table(rows, column, keep), skipped


def _wds(uri: str, data: bytes, column: str, keep: list[str]) -> tuple[pa.Table, list]:
    """WebDataset: members grouped by key (the name up to the first dot), one record per key."""
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = posixpath.basename(member.name)
                key, _, ext = base.partition(".")
                key = posixpath.join(posixpath.dirname(member.name), key)
                samples.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardError(uri, f"not a readable tar file (truncated or corrupt?): {exc}") from exc
    rows = []
    for pos, (key, fields) in enumerate(samples.items()):
        row = {"_pos": pos, "__key__": key}
        for name in {column, *keep}:
            value = fields.get(name)
            if value is None and name in ("image", "img"):
                value = next((fields[e] for e in IMAGE_EXTENSIONS if e in fields), None)
            row[name] = value
        rows.append(row)
    table = pa.Table.from_pylist(rows) if rows else _empty([])
    for name in {column, *keep}:
        if name in table.column_names and name not in (column,) and pa.types.is_binary(table.schema.field(name).type):
            table = table.set_column(table.schema.get_field_index(name), name,
                                     pa.array([_maybe_text(v) for v in table.column(name).to_pylist()]))
    return table, []


def _maybe_text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _rows_to_table(rows: list[dict], column: str, keep: list[str]) -> pa.Table:
    if not rows:
        return _empty(keep).rename_columns(["_pos", column, *keep])
    return pa.Table.from_pylist(rows)
