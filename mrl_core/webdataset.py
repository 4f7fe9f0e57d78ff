"""WebDataset tar shards: the one parser that serving (``sources``) and training read them with.

A sample is the members sharing a key, the member name up to its first dot (``a/b.jpg`` and
``a/b.cls`` are sample ``a/b`` with fields ``jpg`` and ``cls``). Members are read one at a time,
so a shard streams. A tar that stops without its end-of-archive zero blocks is refused:
tarfile itself ends quietly there, which would pass a truncated shard off as a short one.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

from mrl_core.objectstore import url_to_fs

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
"""Image fields, in the order a sample's image is picked from."""

Sample = tuple[str, dict[str, bytes | None]]


class WebDatasetError(ValueError):
    """A shard that cannot be read to its end: corrupt or truncated. ``reason`` omits the shard."""

    def __init__(self, shard: str, reason: str) -> None:
        super().__init__(f"{shard}: {reason}")
        self.shard = shard
        self.reason = reason

    def __reduce__(self) -> tuple:
        return type(self), (self.shard, self.reason)


def split_key(name: str) -> tuple[str, str]:
    """(sample key, field) of a member name: ``dir/k.seg.PNG`` -> (``dir/k``, ``seg.png``)."""
    key, _, ext = posixpath.basename(name).partition(".")
    return posixpath.join(posixpath.dirname(name), key), ext.lower()


def image_field(fields: Mapping[str, Any]) -> str | None:
    """The sample's image field: the first of ``IMAGE_EXTENSIONS`` it has, else None."""
    return next((e for e in IMAGE_EXTENSIONS if e in fields), None)


def iter_samples(
    fileobj: IO[bytes], shard: str, read: Callable[[str], bool] | None = None
) -> Iterator[Sample]:
    """(key, {field: bytes}) per sample of a (seekable) tar file object, in archive order.

    ``read(field)`` says which members' bytes to read (default: all); the others map to None
    and their data is skipped. Raises ``WebDatasetError`` naming ``shard`` when the archive is
    corrupt or truncated (after yielding the samples before the damage).
    """
    try:
        with tarfile.open(fileobj=fileobj, mode="r:*") as tar:
            key, fields, count = None, {}, 0
            for member in tar:
                if not member.isfile():
                    continue
                name, ext = split_key(member.name)
                if name != key:
                    if key is not None:
                        count += 1
                        yield key, fields
                    key, fields = name, {}
                wanted = read is None or read(ext)
                fields[ext] = tar.extractfile(member).read() if wanted else None
            if key is not None:
                count += 1
                yield key, fields
            _check_end(tar, shard, count)
    except (tarfile.TarError, EOFError, OSError) as exc:
        reason = f"not a readable tar file (truncated or corrupt?): {exc}"
        raise WebDatasetError(shard, reason) from exc


def stream_samples(
    url: str, read: Callable[[str], bool] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[Sample]:
    """``iter_samples`` of the shard at ``url`` (local path or fsspec URL), read as it goes."""
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        yield from iter_samples(f, url, read)


def _check_end(tar: tarfile.TarFile, shard: str, samples: int) -> None:
    """A complete archive ends with a zero block where tarfile stopped; without it the tail
    (whole samples, or half a header) is missing."""
    tar.fileobj.seek(tar.offset)
    end = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(end) < tarfile.BLOCKSIZE or any(end):
        raise WebDatasetError(shard, f"truncated tar file: it ends after {samples} sample(s) "
                                     "without the end-of-archive marker")
