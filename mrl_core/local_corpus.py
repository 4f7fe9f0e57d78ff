"""A corpus any machine has: the docstrings of its installed Python packages and standard library.

Files are parsed with ``ast``, never imported, so gathering runs no third-party code.
"""

from __future__ import annotations

import ast
import multiprocessing
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mrl_core.progress import Progress

MIN_DOC_CHARS = 20


def default_roots() -> list[Path]:
    """The standard library and the site-packages directories of this interpreter."""
    paths = sysconfig.get_paths()
    roots = {Path(paths["stdlib"]), Path(paths["purelib"]), Path(paths["platlib"])}
    return sorted(r for r in roots if r.is_dir())


def iter_docstrings(files: Iterable[Path]) -> Iterator[dict[str, str]]:
    """{"text", "source", "object"} for each module, class and function docstring in ``files``."""
    for file in files:
        try:
            tree = ast.parse(file.read_bytes(), filename=str(file))
        except (SyntaxError, ValueError, OSError, RecursionError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOC_CHARS:
                name = getattr(node, "name", "<module>")
                yield {"text": doc, "source": str(file), "object": name}


def _context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _docstrings_of(files: list[Path]) -> list[dict[str, str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old sources
        return list(iter_docstrings(files))


def write_docstring_shards(
    out_dir: str | Path,
    roots: Iterable[Path] | None = None,
    shard_rows: int = 20_000,
    max_docs: int | None = None,
) -> list[Path]:
    """Write the docstrings under ``roots`` as Parquet shards (text, source, object) in ``out_dir``.

    Existing shards are reused, so a second call is free. Returns the shard paths.
    """
    out_dir = Path(out_dir)
    done = out_dir / "_SUCCESS"
    if done.exists():
        return sorted(out_dir.glob("*.parquet"))
    out_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(p for root in (roots or default_roots()) for p in root.rglob("*.py"))
    seen: set[str] = set()
    shards, rows = [], []

    def flush() -> None:
        path = out_dir / f"docstrings-{len(shards):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        shards.append(path)
        rows.clear()

    chunks = [files[i : i + 200] for i in range(0, len(files), 200)]
    progress = Progress(len(chunks), "gather docstrings", unit="file groups")
    # forkserver/spawn, not fork: this process may have Lance, Ray or a tokeniser's threads loaded
    with ProcessPoolExecutor(max_workers=os.cpu_count(), mp_context=_context()) as pool:
        for finished, records in enumerate(pool.map(_docstrings_of, chunks), 1):
            before = len(seen)
            for record in records:
                if record["text"] in seen or (max_docs and len(seen) >= max_docs):
                    continue
                seen.add(record["text"])
                rows.append(record)
                if len(rows) >= shard_rows:
                    flush()
            progress.update(len(seen) - before, finished)  # distinct docstrings, as the shards hold
    if rows:
        flush()
    progress.close()
    done.write_text(f"{len(seen):,} docstrings from {len(files):,} files, python {sys.version.split()[0]}\n")
    return shards
