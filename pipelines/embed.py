"""Embed sharded data into a multi-resolution Lance dataset with an MRL encoder on Ray.

    python pipelines/embed.py                      # the built-in demo corpus, local Ray
    python pipelines/embed.py --input 's3://bucket/corpus/*.parquet' --output s3://bucket/emb.lance \\
        --encoder hf:/models/x --text-column text --keep url,title --dims 16,64,256,768

Resumable and exactly-once: committed shards are recorded in the dataset and skipped on a
re-run; a crash loses at most the work since the last commit and never duplicates a row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from mrl_core.defaults import ENCODER, FRAGMENT_ROWS, MAX_RECORD_BYTES
from mrl_core.encoders import get_encoder
from mrl_core.ledger import CommitLog, clear_uncommitted
from mrl_core.nesting import NestingSpec
from mrl_core.objectstore import redact
from mrl_core.progress import Progress
from mrl_core.settings import DTYPES, FORMATS, EmbedSettings
from mrl_core.sources import Shard, list_shards
from mrl_core.storage import (
    INFO_KEY,
    DatasetInfo,
    make_schema,
    read_info,
    read_ledger,
    try_open,
)
from pipelines.cli import configure_logging, key_value
from pipelines.embed_plan import PlanConfig, build_plan

DEFAULT_DATA_DIR = Path("data")


@dataclass
class EmbedSummary:
    """What a run did; printed at the end and returned to callers."""

    output: str
    shards_total: int = 0
    shards_skipped_committed: int = 0
    shards_done: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)
    rows_written: int = 0
    records_skipped: int = 0
    skipped_examples: list[tuple[str, int, str]] = field(default_factory=list)
    rows_deleted_uncommitted: int = 0
    duplicate_outputs_dropped: int = 0
    commits: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    encode_actors: int = 0
    gpus: float = 0.0

    def print(self, file: Any = sys.stdout) -> None:
        """Human-readable summary."""
        rate = self.rows_written / self.seconds if self.seconds else 0.0
        lines = [
            f"embedded {self.rows_written:,} rows from {self.shards_done} shard(s) in {self.seconds:.1f}s "
            f"({rate:,.0f} rows/s) into {self.output}",
            f"  shards: {self.shards_total} found, {self.shards_skipped_committed} already committed, "
            f"{self.shards_done} done, {len(self.shards_failed)} failed; {self.commits} commit(s)",
            f"  records skipped: {self.records_skipped:,}",
        ]
        if self.stage_seconds:
            stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items())
            lines.append(f"  stage time (summed over workers): {stages}")
        if self.gpus:
            lines.append(f"  {self.encode_actors} encoder actor(s) on {self.gpus:g} GPU(s)")
        for shard, pos, reason in self.skipped_examples[:20]:
            lines.append(f"  skipped {shard} row {pos}: {reason}")
        if self.records_skipped > 20:
            lines.append(f"  ... and {self.records_skipped - 20} more (see dataset config 'mrl.skipped')")
        for shard, reason in self.shards_failed.items():
            lines.append(f"  FAILED {reason}" if shard in reason else f"  FAILED {shard}: {reason}")
        if self.rows_deleted_uncommitted:
            lines.append(f"  removed {self.rows_deleted_uncommitted} rows left by an interrupted run")
        print("\n".join(lines), file=file)


@dataclass
class EmbedConfig:
    """One embed run: input and output, the dataset's settings, and how to run (the CLI's flags)."""

    input: str
    output: str
    settings: EmbedSettings = field(default_factory=EmbedSettings)
    storage_options: dict[str, str] = field(default_factory=dict, repr=False)  # may hold credentials
    input_storage_options: dict[str, str] | None = field(default=None, repr=False)
    commit_every: int = 8
    on_error: str = "fail"
    actors: int | None = None
    gpus_per_actor: float | None = None
    batch_rows: int = 4096
    max_shards: int | None = None
    progress: bool = True


def _dataset_info(settings: EmbedSettings) -> tuple[DatasetInfo, Any]:
    encoder = get_encoder(settings.encoder, device="cpu", **settings.encoder_options)
    nesting = NestingSpec.for_model(encoder.dim, settings.dims) if settings.dims else encoder.nesting
    info = DatasetInfo(
        encoder=settings.encoder, fingerprint=encoder.fingerprint, full_dim=encoder.dim,
        dims=tuple(nesting.dims), trained_dims=tuple(encoder.nesting.dims), dtype=settings.dtype,
        modality=encoder.modality,
    )
    return info, encoder


def _passthrough_fields(shard: Shard, cfg: EmbedConfig) -> list[pa.Field]:
    """Types of the kept columns, read off the first shard (strings for JSONL/text/tar)."""
    keep = cfg.settings.keep
    if not keep:
        return []
    if shard.format == "parquet":
        from mrl_core.objectstore import filesystem

        with filesystem(shard.uri, cfg.input_storage_options).open(shard.uri, "rb") as f:
            schema = pq.read_schema(f)
        missing = [k for k in keep if k not in schema.names]
        if missing:
            raise ValueError(f"shard {shard.uri}: no column {missing[0]!r} to keep "
                             f"(columns: {', '.join(schema.names)})")
        return [schema.field(k) for k in keep]
    return [pa.field(k, pa.string()) for k in keep]


def open_or_create(cfg: EmbedConfig, info: DatasetInfo, schema: pa.Schema) -> lance.LanceDataset:
    """The output dataset, created empty with ``info`` when new; refuses another encoder."""
    ds = try_open(cfg.output, cfg.storage_options)
    if ds is None:
        empty = pa.Table.from_pylist([], schema=schema)
        ds = lance.write_dataset(empty, cfg.output, schema=schema, storage_options=cfg.storage_options)
        ds.update_config({INFO_KEY: info.to_json()})
        return ds
    read_info(ds).check_compatible(info, cfg.output)
    missing = [n for n in schema.names if n not in ds.schema.names]
    if missing:
        raise ValueError(f"dataset {cfg.output} has no column(s) {missing}; keep the same --keep columns")
    return ds


def _resources(cfg: EmbedConfig) -> tuple[int, float | None]:
    """(encoder actors, GPUs per actor): one actor per GPU by default. Without GPUs (and no
    ``gpus_per_actor``) there are no actors: (concurrent CPU tasks, None), one task per CPU."""
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    per_actor = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus else None)
    if cfg.actors:
        return cfg.actors, per_actor
    if per_actor:
        return max(1, int(gpus / per_actor)), per_actor
    if per_actor is None:
        return max(1, int(resources.get("CPU", 1))), None
    return 1, per_actor


def _chunk_rows(cfg: EmbedConfig, modality: str) -> int:
    """Records per chunk: read, tokenised and written together (one Lance fragment each).

    Text goes in chunks of at least ``FRAGMENT_ROWS``: the tokeniser's batch encoding needs
    big batches to keep every core busy, and big fragments keep the dataset quick to open.
    """
    return max(cfg.batch_rows, FRAGMENT_ROWS) if modality == "text" else cfg.batch_rows


def run_embed(cfg: EmbedConfig) -> EmbedSummary:
    """Embed every shard under ``cfg.input`` not yet committed to ``cfg.output``."""
    if cfg.on_error not in ("fail", "skip"):
        raise ValueError(f"--on-error must be 'fail' or 'skip', got {cfg.on_error!r}")
    if cfg.commit_every < 1:
        raise ValueError(f"--commit-every must be >= 1, got {cfg.commit_every}")
    start = time.perf_counter()
    summary = EmbedSummary(output=cfg.output)
    in_opts = cfg.input_storage_options if cfg.input_storage_options is not None else cfg.storage_options
    cfg.input_storage_options = in_opts
    shards = list_shards(cfg.input, in_opts, cfg.settings.format)
    summary.shards_total = len(shards)
    info, encoder = _dataset_info(cfg.settings)
    settings = cfg.settings.with_(dims=info.dims)
    schema = make_schema(info.dims, settings.dtype, _passthrough_fields(shards[0], cfg))
    ds = open_or_create(cfg, info, schema)
    ledger = read_ledger(ds)
    todo = [s for s in shards if s.uri not in ledger]
    if cfg.max_shards is not None:
        todo = todo[: cfg.max_shards]
    summary.shards_skipped_committed = len(shards) - len([s for s in shards if s.uri not in ledger])
    summary.rows_deleted_uncommitted = clear_uncommitted(ds, [s.uri for s in todo])
    if not todo:
        summary.seconds = time.perf_counter() - start
        return summary

    if not ray.is_initialized():
        ray.init(log_to_driver=False, include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    actors, gpus_per_actor = _resources(cfg)
    summary.encode_actors, summary.gpus = actors, actors * (gpus_per_actor or 0.0)
    plan_cfg = PlanConfig(
        output=cfg.output, settings=settings, modality=info.modality, on_error=cfg.on_error,
        storage_options=tuple(cfg.storage_options.items()),
        input_storage_options=tuple(in_opts.items()), chunk_rows=_chunk_rows(cfg, info.modality),
        keep_schema=pa.schema([schema.field(k) for k in settings.keep]),
    )
    log = CommitLog(cfg.output, cfg.storage_options or None)
    progress = Progress(len(todo), "embed", enabled=cfg.progress)
    plan = build_plan(todo, plan_cfg, schema, actors, gpus_per_actor, cfg.batch_rows,
                      preprocessor=getattr(encoder, "preprocessor", None))
    stage_seconds = {"read": 0.0, "preprocess": 0.0, "encode": 0.0, "write": 0.0}
    try:
        for row in plan.iter_rows():
            report = json.loads(row["report"])
            if not log.accept(report):
                continue
            for key, stage in (("_t_read", "read"), ("_t_pre", "preprocess"), ("_t_enc", "encode"),
                               ("_t_write", "write")):
                stage_seconds[stage] += row[key]
            _collect(report, summary)
            progress.update(rows=int(row["rows"]), done=len(_done(log)))
            if log.completed_count >= cfg.commit_every:
                log.commit()
        log.commit()
    except Exception as exc:  # noqa: BLE001 — report the shard the worker named, keep commits
        _commit_complete_only(log)
        raise EmbedError(_root_message(exc)) from exc
    finally:
        progress.close()
        summary.seconds = time.perf_counter() - start
        summary.stage_seconds = stage_seconds
        summary.rows_written = log.rows_committed
        summary.commits = log.commits
        summary.duplicate_outputs_dropped = log.duplicates_dropped
        summary.shards_done = sum(1 for p in log.shards.values() if p.done and p.error is None)
        summary.shards_failed.update({u: p.error for u, p in log.shards.items() if p.error})
    _record_skips(cfg, summary)
    return summary


class EmbedError(RuntimeError):
    """The job stopped; the message names the shard (and row) at fault."""


def _done(log: CommitLog) -> list[str]:
    return [u for u, p in log.shards.items() if p.done]


def _commit_complete_only(log: CommitLog) -> None:
    """On failure, still commit what was fully written: every committed shard stays intact."""
    with contextlib.suppress(Exception):  # the original error is the one worth raising
        log.commit()


def _root_message(exc: BaseException) -> str:
    """The innermost message of a Ray task error (it names the shard)."""
    text = str(exc)
    for marker in ("ShardError: ", "ValueError: ", "RuntimeError: "):
        if marker in text:
            return text.split(marker)[-1].strip().splitlines()[0]
    errors = re.findall(r"^(?:[\w.]+\.)?([A-Z]\w+): (.+)$", text, re.M)
    if errors:
        name, message = errors[-1]
        return f"{name}: {message}"
    return text.strip().splitlines()[-1] if text.strip() else repr(exc)


def _collect(report: dict, summary: EmbedSummary) -> None:
    for uri, entry in report["shards"].items():
        for pos, reason in entry.get("skipped", []):
            summary.records_skipped += 1
            if len(summary.skipped_examples) < 1000:
                summary.skipped_examples.append((uri, int(pos), reason))


def _record_skips(cfg: EmbedConfig, summary: EmbedSummary) -> None:
    """Keep the skipped records and failed shards of this run in the dataset's config."""
    if not summary.skipped_examples and not summary.shards_failed:
        return
    ds = lance.dataset(cfg.output, storage_options=cfg.storage_options)
    payload = {
        "at": time.time(),
        "records_skipped": summary.records_skipped,
        "examples": summary.skipped_examples[:1000],
        "failed_shards": summary.shards_failed,
    }
    ds.update_config({"mrl.skipped": json.dumps(payload)})


def default_corpus(data_dir: Path = DEFAULT_DATA_DIR) -> str:
    """Gather this machine's docstrings as Parquet shards (once) and return their folder."""
    from mrl_core.local_corpus import write_docstring_shards

    out = data_dir / "docstrings"
    print(f"gathering the docstrings of this machine's Python packages into {out} ...", flush=True)
    shards = write_docstring_shards(out)
    print(f"  {len(shards)} shard(s): {(out / '_SUCCESS').read_text().strip()}", flush=True)
    return str(out)


def parse_dims(text: str) -> tuple[int, ...]:
    """``"64,128,256"`` as a tuple of ints (an argparse ``type``)."""
    try:
        return tuple(int(d) for d in text.split(",") if d.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def parse_names(text: str) -> tuple[str, ...]:
    """``"url,title"`` as a tuple of column names (an argparse ``type``)."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_settings_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``EmbedSettings``: what shapes the dataset's rows (embed and re-index)."""
    g = p.add_argument_group("dataset settings", "what shapes the rows (recorded in the dataset)")
    g.add_argument("--encoder", default=ENCODER, help="encoder spec: wordllama-256, static:/dir, "
                   "hf:/dir, mrl-resnet50:/ckpt.pt, adaptor:/dir")
    g.add_argument("--dims", type=parse_dims, default=(), help="comma-separated dims to store as "
                   "emb_<d> columns (default: the encoder's trained nesting dims; the full dim is "
                   "always stored)")
    g.add_argument("--dtype", default="float16", choices=DTYPES, help="stored vector type")
    g.add_argument("--text-column", default="text", help="column (Parquet/JSONL) or WebDataset "
                   "extension holding the text or image bytes")
    g.add_argument("--keep", type=parse_names, default=(),
                   help="comma-separated columns copied into the dataset")
    g.add_argument("--id-column", help="use this int64 column as the row id instead of one "
                   "derived from the shard URI and row position")
    g.add_argument("--format", choices=FORMATS, help="input format (default: from each file's "
                   "extension)")
    g.add_argument("--max-record-bytes", type=int, default=MAX_RECORD_BYTES,
                   help="records larger than this are skipped and reported")


def settings_from_args(args: argparse.Namespace) -> EmbedSettings:
    """The ``EmbedSettings`` that ``add_settings_arguments``' flags describe."""
    return EmbedSettings(
        encoder=args.encoder, dims=args.dims, dtype=args.dtype, text_column=args.text_column,
        keep=args.keep, id_column=args.id_column, format=args.format,
        max_record_bytes=args.max_record_bytes,
    )


def build_parser() -> argparse.ArgumentParser:
    """The CLI."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Storage options use Lance's names (aws_endpoint, aws_region, aws_access_key_id, "
        "allow_http, ...) and also configure fsspec for reading the input; credentials may "
        "also come from the environment (AWS_*), which is preferred.",
    )
    p.add_argument("--input", help="fsspec URL, directory or glob of input shards (one file = one "
                   "shard); omitted: a corpus of this machine's Python docstrings")
    p.add_argument("--output", help="Lance dataset URI to create or append to "
                   f"(default with no --input: {DEFAULT_DATA_DIR}/docstrings.lance)")
    add_settings_arguments(p)
    p.add_argument("--storage-option", type=key_value, action="append", default=[],
                   metavar="KEY=VALUE", help="object-store option for input and output (repeatable)")
    p.add_argument("--input-storage-option", type=key_value, action="append", default=None,
                   metavar="KEY=VALUE",
                   help="object-store option for the input only, if it differs (repeatable)")
    p.add_argument("--commit-every", type=int, default=8,
                   help="commit after this many completed shards")
    p.add_argument("--on-error", default="fail", choices=["fail", "skip"],
                   help="an unreadable shard stops the job (fail) or is reported and left out "
                   "(skip); bad records are always skipped and counted")
    p.add_argument("--actors", type=int, help="encoder actors (default: one per GPU); without "
                   "GPUs, concurrent CPU tasks that each read, tokenise, encode and write a shard "
                   "(default: one per CPU)")
    p.add_argument("--gpus-per-actor", type=float, help="GPUs per encoder actor, fractional "
                   "allowed (default 1 when GPUs exist; 0 runs the GPU layout, separate encoder "
                   "actors, on the CPU)")
    p.add_argument("--batch-rows", type=int, default=4096,
                   help="rows per batch to the encoder actors; device calls inside are sized by "
                   "tokens/pixels. Text is read, tokenised and written in chunks of at least "
                   f"{FRAGMENT_ROWS:,} rows")
    p.add_argument("--max-shards", type=int, help="embed at most this many new shards in this run")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument("--verbose", action="store_true", help="show Ray's and other libraries' logs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(verbose=args.verbose, quiet=args.no_progress)
    if args.input is None:
        args.input = default_corpus()
        args.output = args.output or str(DEFAULT_DATA_DIR / "docstrings.lance")
        args.keep = args.keep or ("source", "object")
    if not args.output:
        parser.error("--output is required when --input is given")
    options = dict(args.storage_option)
    in_options = args.input_storage_option
    cfg = EmbedConfig(
        input=args.input, output=args.output, settings=settings_from_args(args),
        storage_options=options, input_storage_options=None if in_options is None else dict(in_options),
        commit_every=args.commit_every, on_error=args.on_error, actors=args.actors,
        gpus_per_actor=args.gpus_per_actor, batch_rows=args.batch_rows,
        max_shards=args.max_shards, progress=not args.no_progress,
    )
    if args.ray_address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=args.ray_address or os.environ["RAY_ADDRESS"], log_to_driver=False)
    print(f"embedding {cfg.input} -> {cfg.output} with {cfg.settings.encoder}"
          + (f" (storage options {redact(options)})" if options else ""), flush=True)
    try:
        summary = run_embed(cfg)
    except (EmbedError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("committed shards are intact; fix the input and re-run to resume.", file=sys.stderr)
        return 1
    summary.print()
    print("\nsearch it:")
    print(f"  python pipelines/index.py --dataset {cfg.output}")
    print(f"  python pipelines/query.py \"how do I parse a date\" --dataset {cfg.output} --k 10")
    return 0 if not summary.shards_failed else 2


if __name__ == "__main__":
    sys.exit(main())
