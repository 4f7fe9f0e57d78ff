"""Input shards: find them under any fsspec URL and read one into validated records.

One shard is one file: Parquet, JSONL, plain text (a record a line) or a WebDataset tar.
A shard that cannot be read at all (unreadable, corrupt, truncated, wrong column type) raises
``ShardError`` naming it; a bad record (null, empty, not a string, invalid UTF-8 or lone
surrogates, too large, unparsable) is skipped and reported with its position. Object-store
reads are retried with backoff on transient errors (``objectstore.retrying``).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate

from mrl_core.defaults import MAX_RECORD_BYTES
from mrl_core.objectstore import filesystem, protocol_of, retrying, url_to_fs
from mrl_core.settings import FORMAT_OF_EXTENSION, FORMATS
from mrl_core.webdataset import WebDatasetError, image_field, iter_samples

UTF8_BOM = b"\xef\xbb\xbf"


class ShardError(RuntimeError):
    """A whole shard is unusable: unreadable, corrupt, or missing a required column."""

    def __init__(self, shard: str, reason: str) -> None:
        super().__init__(f"shard {shard}: {reason}")
        self.shard = shard
        self.reason = reason

    def __reduce__(self) -> tuple:  # Ray ships exceptions between processes: keep both fields
        return type(self), (self.shard, self.reason)


@dataclass(frozen=True)
class Shard:
    """One input file: its URI, size, a version tag (etag or mtime) to detect changes, its format,
    and (once a run assigns it from the ledger) the key its rows' ids derive from."""

    uri: str
    size: int
    version: str
    format: str
    key: int | None = None


@dataclass
class ShardRecords:
    """The valid records of a shard (``_pos`` = position in the shard) and the skipped ones."""

    table: pa.Table
    total: int
    skipped: list[tuple[int, str]] = field(default_factory=list)


def format_of(uri: str, declared: str | None = None) -> str:
    """The shard's format: ``declared`` if given, else from the file extension."""
    if declared:
        if declared not in FORMATS:
            raise ValueError(f"unknown input format {declared!r}; use one of {sorted(FORMATS)}")
        return declared
    ext = posixpath.splitext(uri)[1].lower()
    if ext not in FORMAT_OF_EXTENSION:
        raise ValueError(f"cannot tell the format of {uri} from its extension; pass --format")
    return FORMAT_OF_EXTENSION[ext]


def canonical_uri(url: str) -> str:
    """The one name of the object ``url`` points at: an absolute, normalised local path (no
    ``file://``, ``./``, ``//`` or trailing slash; symlinks resolved), or the object store's
    ``protocol://bucket/key``. Two spellings of one file are one shard."""
    if protocol_of(url) in ("file", "local"):
        path = url.split("://", 1)[1] if "://" in url else url
        return os.path.realpath(os.path.expanduser(path))
    fs, path = url_to_fs(url)
    return fs.unstrip_protocol(path.rstrip("/"))


def list_shards(
    url: str, storage_options: Mapping[str, str] | None = None, fmt: str | None = None
) -> list[Shard]:
    """Every shard ``url`` names, sorted, each once under its canonical URI: a file, a directory
    (searched recursively), a glob (``*``, ``?``, ``[...]``, ``**``), or brace patterns of any of
    these (``part-{000..099}.parquet``, ``{train,extra}/*.tar``). A path that exists is taken
    literally even when it holds glob characters.

    Listing is strict: a directory that cannot be listed (permission denied, a stale handle) is
    an error naming it, never a silently shorter input, so that a re-index cannot mistake an
    unlistable directory's shards for removed ones.
    """
    patterns = list(braceexpand(url)) if "{" in url else [url]
    found: dict[str, dict[str, Any]] = {}
    for pattern in patterns:
        fs = filesystem(pattern, storage_options)
        for path, info in _expand(fs, pattern, fmt):
            found.setdefault(_shard_uri(fs, path), info)
    if not found:
        raise FileNotFoundError(f"no input shards found under {url}")
    shards = []
    for uri in sorted(found):
        info = found[uri]
        size = int(info.get("size") or 0)
        tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        shards.append(Shard(uri, size, f"{size}:{tag}", format_of(uri, fmt)))
    return shards


def _shard_uri(fs: Any, path: str) -> str:
    return os.path.realpath(path) if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _expand(fs: Any, pattern: str, fmt: str | None) -> list[tuple[str, dict[str, Any]]]:
    """(path, info) of the files one (brace-free) pattern names."""
    path = fs._strip_protocol(pattern)
    if isinstance(fs, LocalFileSystem):  # ./ and // name the same directory: match what ls returns
        path = os.path.normpath(path)
    literal = retrying(pattern, lambda: fs.exists(path))
    if not literal and any(c in path for c in "*?["):
        regex = re.compile(glob_translate(path))
        root = path[: min(path.find(c) for c in "*?[" if c in path)].rpartition("/")[0] or "/"
        return [(p, i) for p, i in _walk(fs, root) if regex.match(p)]
    if not literal:
        raise FileNotFoundError(f"input {pattern} does not exist")
    info = retrying(pattern, lambda: fs.info(path))
    if info.get("type") != "directory":
        return [(path, info)]
    return [(p, i) for p, i in _walk(fs, path) if fmt or posixpath.splitext(p)[1].lower() in FORMAT_OF_EXTENSION]


def _walk(fs: Any, root: str) -> list[tuple[str, dict[str, Any]]]:
    """Every file under ``root`` with its info; any directory that cannot be listed raises,
    named (``fsspec``'s own ``find``/``glob`` skip such a directory without a word)."""
    files, todo = [], [root]
    while todo:
        directory = todo.pop()
        for entry in retrying(directory, lambda d=directory: fs.ls(d, detail=True)):
            name = entry["name"].rstrip("/")
            if entry.get("type") == "directory":
                if name != directory.rstrip("/"):
                    todo.append(name)
            else:
                files.append((name, entry))
    return files


def read_shard(
    shard: Shard,
    input_column: str,
    keep: Sequence[str] = (),
    storage_options: Mapping[str, str] | None = None,
    modality: str = "text",
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> ShardRecords:
    """Read and validate one shard: columns ``_pos``, ``_input`` and the ``keep`` columns.

    ``keep`` may name the input column (its text is then stored too). A kept column the shard
    does not have at all is a ``ShardError``, never a column of nulls.
    """
    fs = filesystem(shard.uri, storage_options)
    others = [k for k in dict.fromkeys(keep) if k != input_column]

    def read() -> bytes:
        with fs.open(shard.uri, "rb") as f:
            return f.read()

    try:
        if shard.format == "parquet":  # only the columns needed: ranged reads, not the whole file
            table, skipped = retrying(shard.uri, lambda: _parquet(shard.uri, fs, input_column, others))
        else:
            data = retrying(shard.uri, read)
            reader = {"jsonl": _jsonl, "text": _text, "wds": _wds}[shard.format]
            table, skipped = reader(shard.uri, data, input_column, others)
    except (OSError, ValueError) as exc:
        raise ShardError(shard.uri, f"cannot open: {exc}") from exc
    total = table.num_rows + len(skipped)
    missing = [c for c in [input_column, *others] if c not in table.column_names]
    if missing and table.num_rows:
        raise ShardError(shard.uri, f"no column {missing[0]!r} (columns: {', '.join(table.column_names)})")
    if table.num_rows:
        # only the rows a vectorised pre-check cannot clear get the per-record Python check
        suspect = _suspects(table.column(input_column), modality, max_record_bytes)
        if suspect.any():
            values = table.column(input_column).filter(suspect).to_pylist()
            rows = np.flatnonzero(suspect)
            pos = table.column("_pos").to_numpy()
            keep_rows = np.ones(table.num_rows, dtype=bool)
            for i, value in zip(rows, values):
                reason = _record_problem(value, modality, max_record_bytes)
                if reason:
                    skipped.append((int(pos[i]), reason))
                    keep_rows[i] = False
            if not keep_rows.all():
                table = table.filter(pa.array(keep_rows))
    itype = table.schema.field(input_column).type if table.num_rows else None
    if modality == "text" and table.num_rows and (pa.types.is_binary(itype) or pa.types.is_large_binary(itype)):
        text_type = pa.large_string() if pa.types.is_large_binary(itype) else pa.string()
        table = table.set_column(
            table.schema.get_field_index(input_column), input_column, table.column(input_column).cast(text_type)
        )
    table = table.rename_columns(["_input" if n == input_column else n for n in table.column_names])
    if input_column in keep and table.num_rows:
        table = table.append_column(input_column, table.column("_input"))
    skipped.sort()
    return ShardRecords(table.select(["_pos", "_input", *keep]) if table.num_rows else _empty(keep), total, skipped)


def _empty(keep: Sequence[str]) -> pa.Table:
    return pa.table({"_pos": pa.array([], pa.int64()), "_input": pa.array([], pa.string()),
                     **{k: pa.array([], pa.string()) for k in keep}})


def _suspects(column: pa.ChunkedArray, modality: str, max_bytes: int) -> np.ndarray:
    """Boolean mask of the records ``_record_problem`` must look at; the rest are fine.

    A string with a letter, digit, mark, punctuation or symbol in it is not empty (Python's
    ``str.strip`` removes none of those), so only nulls, oversized and possibly blank strings are
    suspects; an encoded image only when null, empty or oversized. Other types: every record.
    """
    ctype = column.type
    if modality == "text" and (pa.types.is_string(ctype) or pa.types.is_large_string(ctype)):
        visible = pc.match_substring_regex(column, r"[\pL\pN\pM\pP\pS]")
        mask = pc.or_kleene(pc.invert(visible), pc.greater(pc.binary_length(column), max_bytes))
    elif modality != "text" and (pa.types.is_binary(ctype) or pa.types.is_large_binary(ctype)):
        size = pc.binary_length(column)
        mask = pc.or_kleene(pc.equal(size, 0), pc.greater(size, max_bytes))
    else:
        return np.ones(len(column), dtype=bool)
    return pc.fill_null(mask, True).to_numpy(zero_copy_only=False)


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
    return table.append_column("_pos", pa.array(np.arange(table.num_rows, dtype=np.int64)))


def _parquet(uri: str, fs: Any, column: str, keep: list[str]) -> tuple[pa.Table, list]:
    """The text and kept columns of a Parquet shard, read with column projection (the footer,
    then only those columns' chunks). I/O errors propagate (retried by the caller); a file that
    is not Parquet, or lacks a column, is a ``ShardError``."""
    with fs.open(uri, "rb") as f:
        io_errors: list[BaseException] = []  # what reading the store raised, as opposed to parsing
        raw_read = f.read

        def read(*args: Any) -> bytes:
            try:
                return raw_read(*args)
            except Exception as exc:
                io_errors.append(exc)
                raise

        f.read = read
        try:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            missing = [c for c in [column, *keep] if c not in names]
            if missing:
                raise ShardError(uri, f"no column {missing[0]!r} (columns: {', '.join(names)})")
            table = pf.read(columns=[column, *keep])
        except ShardError:
            raise
        except Exception as exc:  # pyarrow raises OSError/ArrowInvalid for corrupt files
            if io_errors:
                raise io_errors[0] from exc  # the store's error: retried or reported by the caller
            raise ShardError(uri, f"not a readable Parquet file: {exc}") from exc
    ftype = table.schema.field(column).type
    if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype) or pa.types.is_binary(ftype)
            or pa.types.is_large_binary(ftype)):
        raise ShardError(uri, f"column {column!r} is {ftype}, expected string or binary")
    return _with_positions(_valid_utf8(table, column)), []


def _valid_utf8(table: pa.Table, column: str) -> pa.Table:
    """Parquet does not guarantee valid UTF-8 in string columns: the input column's invalid
    values become binary (the record check then skips them, naming the byte); a kept column's
    invalid bytes are replaced with U+FFFD so the dataset never holds invalid strings."""
    for i, fld in enumerate(table.schema):
        if not (pa.types.is_string(fld.type) or pa.types.is_large_string(fld.type)):
            continue
        col = table.column(i)
        try:
            for chunk in col.chunks:
                chunk.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        raw = col.cast(pa.large_binary() if pa.types.is_large_string(fld.type) else pa.binary())
        if fld.name == column:
            table = table.set_column(i, pa.field(fld.name, raw.type), raw)
        else:
            fixed = [None if v is None else v.decode("utf-8", "replace") for v in raw.to_pylist()]
            table = table.set_column(i, fld, pa.array(fixed, fld.type))
    return table


def _lines(data: bytes) -> list[bytes]:
    if data.startswith(UTF8_BOM):  # a byte-order mark is not part of the first record
        data = data[len(UTF8_BOM):]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _jsonl(uri: str, data: bytes, column: str, keep: list[str]) -> tuple[pa.Table, list]:
    rows, skipped, seen = [], [], set()
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
        value = obj.get(column)
        if value is not None and not isinstance(value, str):
            skipped.append((pos, f"field {column!r} is a JSON {_json_kind(value)}, expected a string"))
            continue
        problem = _unencodable(value)
        if problem:
            skipped.append((pos, problem))
            continue
        rows.append({"_pos": pos, column: value, **{k: obj.get(k) for k in keep}})
        seen.update(k for k in keep if k in obj)
    if rows and not any(column in r and r[column] is not None for r in rows):
        raise ShardError(uri, f"no record has the field {column!r}")
    absent = [k for k in keep if k not in seen]
    if rows and absent:
        raise ShardError(uri, f"no record has the field {absent[0]!r} to keep")
    for k in keep:
        if k != column:
            _uniform_column(rows, k)
    return _rows_to_table(rows, column, keep), skipped


def _json_kind(value: object) -> str:
    return {bool: "boolean", int: "number", float: "number", dict: "object", list: "array"}.get(
        type(value), type(value).__name__)


def _unencodable(value: str | None) -> str | None:
    """Why a string cannot be stored as UTF-8 (JSON ``\\ud800`` escapes decode to lone surrogates)."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"text has a lone surrogate (U+{ord(value[exc.start]):04X}) at character {exc.start}, not valid Unicode"
    return None


def _uniform_column(rows: list[dict], key: str) -> None:
    """Make one kept JSONL field storable: lone surrogates replaced, and when its values mix JSON
    types (or hold objects/arrays) every non-null value becomes its JSON text."""
    kinds = {type(r[key]) for r in rows if r.get(key) is not None}
    stringify = not (kinds <= {str} or kinds <= {int, float} or kinds == {bool})
    for r in rows:
        v = r.get(key)
        if v is None:
            continue
        if stringify and not isinstance(v, str):
            v = json.dumps(v, ensure_ascii=False, sort_keys=True)
        if isinstance(v, str) and _unencodable(v):
            v = v.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        r[key] = v


def _text(uri: str, data: bytes, column: str, keep: list[str]) -> tuple[pa.Table, list]:
    """A record a line. A text file has no other columns: asking to keep one is a shard error."""
    if keep:
        raise ShardError(uri, f"a text shard has no column {keep[0]!r} to keep (only the line itself)")
    rows, skipped = [], []
    for pos, line in enumerate(_lines(data)):
        try:
            rows.append({"_pos": pos, column: line.decode("utf-8"), **dict.fromkeys(keep)})
        except UnicodeDecodeError as exc:
            skipped.append((pos, f"invalid UTF-8 at byte {exc.start}"))
    return _rows_to_table(rows, column, keep), skipped


def _wds(uri: str, data: bytes, column: str, keep: list[str]) -> tuple[pa.Table, list]:
    """WebDataset (``mrl_core.webdataset``): one record per sample key."""
    samples: dict[str, dict[str, bytes | None]] = {}
    try:
        for key, fields in iter_samples(io.BytesIO(data), uri):
            samples.setdefault(key, {}).update(fields)  # a key split over the tar: one record
    except WebDatasetError as exc:
        raise ShardError(uri, exc.reason) from exc
    rows = []
    for pos, (key, fields) in enumerate(samples.items()):
        row = {"_pos": pos, "__key__": key}
        for name in {column, *keep}:
            value = fields.get(name)
            if value is None and name in ("image", "img"):
                ext = image_field(fields)
                value = fields[ext] if ext else None
            row[name] = value
        rows.append(row)
    absent = [k for k in keep if rows and all(r[k] is None for r in rows)]
    if absent:
        raise ShardError(uri, f"no sample has the field {absent[0]!r} to keep")
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


def read_table(
    uri: str,
    columns: Sequence[str],
    max_rows: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> pa.Table:
    """Columns of a Parquet/JSONL/CSV file or directory (local path or fsspec URL) as one
    Arrow table (the first ``max_rows`` rows); errors name the file, and its columns."""
    import pyarrow.dataset as ds

    fs, path = url_to_fs(uri, storage_options)
    name = path.rstrip("/").lower()
    fmt = "parquet"
    if name.endswith((".jsonl", ".json")):
        fmt = "json"
    elif name.endswith(".csv"):
        fmt = "csv"
    try:
        dataset = ds.dataset(path, filesystem=fs, format=fmt)
    except (FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(f"cannot read {uri}: {exc}") from exc
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise ValueError(f"{uri} has no column(s) {missing}; it has {dataset.schema.names}")
    if max_rows:
        return dataset.head(max_rows, columns=list(columns))
    return dataset.to_table(columns=list(columns))
