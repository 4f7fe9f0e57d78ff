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
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lance
import pyarrow as pa
import ray

from mrl_core.dataset import (
    IdCollisionError,
    Output,
    check_id_collisions,
    create,
    prepare_output,
    verify_output_location,
)
from mrl_core.defaults import ENCODER, FRAGMENT_ROWS, MAX_RECORD_BYTES
from mrl_core.device import DEVICES, DeviceError, check_device
from mrl_core.lease import Lease, LeaseHeldError, LeaseLostError, acquire_lease
from mrl_core.ledger import CommitLog, locate_rows
from mrl_core.ledger_store import read_ledger
from mrl_core.objectstore import redact
from mrl_core.progress import Progress
from mrl_core.settings import DTYPES, FLAGS, FORMATS, EmbedSettings, parse_option_value
from mrl_core.sources import Shard, list_shards
from mrl_core.storage import assign_shard_keys, open_dataset
from pipelines.cli import HelpFormatter, configure_logging, error_line, key_value, start_ray
from pipelines.embed_plan import PlanConfig, build_plan, shard_ids
from pipelines.gpu_check import check_gpu_slot
from pipelines.layout import Layout, cluster_layout

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
    rows_replaced: int = 0
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
        if self.rows_replaced:
            lines.append(f"  replaced {self.rows_replaced:,} earlier rows of re-embedded shards (changed, or "
                         f"left by an interrupted run) in the same commits")
        print("\n".join(lines), file=file)


@dataclass
class EmbedConfig:
    """One embed run: input and output, the dataset's settings, and how to run (the CLI's flags)."""

    input: str
    output: str
    settings: Mapping[str, Any] | EmbedSettings | None = None  # asked for; the rest: the dataset's
    storage_options: dict[str, str] = field(default_factory=dict, repr=False)  # may hold credentials
    input_storage_options: dict[str, str] | None = field(default=None, repr=False)
    commit_every: int = 8
    on_error: str = "fail"
    actors: int | None = None
    gpus_per_actor: float | None = None
    device: str = "auto"
    batch_rows: int = 4096
    max_shards: int | None = None
    progress: bool = True
    replace_changed: bool = False  # re-embed committed shards whose source changed (the re-index does)


def _resources(cfg: EmbedConfig) -> Layout:
    """The job's layout from the cluster's GPU capacity (``pipelines.layout``): one encoder actor
    per GPU it has or can get, else one CPU task per CPU; ``--actors``/``--gpus-per-actor``
    override. With GPU actors and ``--device`` auto/cuda, one GPU slot is checked first."""
    check_device(cfg.device)
    layout = cluster_layout(cfg.actors, cfg.gpus_per_actor)
    if layout.gpus_per_actor is None and cfg.device == "cuda":
        raise EmbedError("--device cuda, but the cluster has no GPU and no GPU node type to start; "
                         "pass --device auto or cpu, or --gpus-per-actor to ask for GPUs anyway")
    if layout.gpus_per_actor and cfg.device != "cpu":
        try:
            found = check_gpu_slot(layout.gpus_per_actor, cfg.device, what="the encoder")
        except DeviceError as exc:
            raise EmbedError(str(exc)) from exc
        logging.getLogger(__name__).info(f"GPU check: {found}")
    return layout


def _chunk_rows(cfg: EmbedConfig, modality: str) -> int:
    """Records per chunk: read, tokenised and written together (one Lance fragment each).

    Text goes in chunks of at least ``FRAGMENT_ROWS``: the tokeniser's batch encoding needs
    big batches to keep every core busy, and big fragments keep the dataset quick to open.
    """
    return max(cfg.batch_rows, FRAGMENT_ROWS) if modality == "text" else cfg.batch_rows


def run_embed(cfg: EmbedConfig, output: Output | None = None, lease: Lease | None = None) -> EmbedSummary:
    """Embed every shard under ``cfg.input`` not yet committed to ``cfg.output``.

    Holds the dataset's writer lease while it runs (``lease``: one the caller, the re-index, holds
    already). ``output``: the output already prepared (``prepare_output``) by a caller that needed
    its settings first; by default it is prepared here, refusing conflicting settings before
    anything is written."""
    if cfg.on_error not in ("fail", "skip"):
        raise ValueError(f"--on-error must be 'fail' or 'skip', got {cfg.on_error!r}")
    if cfg.commit_every < 1:
        raise ValueError(f"--commit-every must be >= 1, got {cfg.commit_every}")
    verify_output_location(cfg.output, cfg.storage_options)
    if lease is not None:
        return _run_embed(cfg, output, lease)
    with acquire_lease(cfg.output, cfg.storage_options) as held:
        return _run_embed(cfg, output, held)


def _run_embed(cfg: EmbedConfig, output: Output | None, lease: Lease) -> EmbedSummary:
    start = time.perf_counter()
    summary = EmbedSummary(output=cfg.output)
    in_opts = cfg.input_storage_options if cfg.input_storage_options is not None else cfg.storage_options
    cfg.input_storage_options = in_opts
    if output is None:
        output = prepare_output(cfg.output, cfg.settings, cfg.storage_options)  # refusals here
    elif output.dataset is not None:  # the caller may have written since: its latest version
        output.dataset = open_dataset(cfg.output, cfg.storage_options)
    settings = output.settings
    shards = list_shards(cfg.input, in_opts, settings.format)
    summary.shards_total = len(shards)
    ledger = read_ledger(output.dataset) if output.dataset is not None else {}
    todo = [s for s in shards if s.uri not in ledger
            or (cfg.replace_changed and ledger[s.uri].get("version") != s.version)]
    summary.shards_skipped_committed = len(shards) - len(todo)
    if cfg.max_shards is not None:
        todo = todo[: cfg.max_shards]
    if todo and settings.id_column:
        todo = _refuse_id_collisions(output, todo, cfg, summary)
    if todo:  # the layout and its device check come before anything is written
        _init_ray()
        ray.data.DataContext.get_current().enable_progress_bars = False
        layout = _resources(cfg)
        summary.encode_actors, summary.gpus = layout.actors, layout.gpus
    ds = create(output, todo or shards, in_opts, cfg.storage_options)
    keys = assign_shard_keys(ledger, [s.uri for s in todo])
    todo = [replace(s, key=keys[s.uri]) for s in todo]
    if not todo:
        summary.seconds = time.perf_counter() - start
        return summary

    modality, schema = output.info.modality, output.schema
    plan_cfg = PlanConfig(
        output=cfg.output, settings=settings, modality=modality, on_error=cfg.on_error,
        storage_options=tuple(cfg.storage_options.items()),
        input_storage_options=tuple(in_opts.items()), chunk_rows=_chunk_rows(cfg, modality),
        keep_schema=pa.schema([schema.field(k) for k in settings.keep]),
    )
    existing = locate_rows(ds, [s.uri for s in todo]) if ds.count_rows() else {}
    log = CommitLog(cfg.output, cfg.storage_options or None, guard=lease.check, keys=keys, existing=existing)
    progress = Progress(len(todo), "embed", enabled=cfg.progress)
    plan = build_plan(todo, plan_cfg, schema, layout, cfg.batch_rows,
                      preprocessor=getattr(output.encoder, "preprocessor", None), device=cfg.device)
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
        summary.rows_replaced = log.rows_replaced
        summary.commits = log.commits
        summary.duplicate_outputs_dropped = log.duplicates_dropped
        summary.shards_done = sum(1 for p in log.shards.values() if p.done and p.error is None)
        summary.shards_failed.update({u: p.error for u, p in log.shards.items() if p.error})
    _record_skips(cfg, summary)
    return summary


class EmbedError(RuntimeError):
    """The job stopped; the message names the shard (and row) at fault."""


def _refuse_id_collisions(output: Output, todo: list[Shard], cfg: EmbedConfig,
                          summary: EmbedSummary) -> list[Shard]:
    """Check ``--id-column`` ids across the new shards and the committed rows before anything is
    written: a repeated id stops the job naming both shards (``--on-error skip``: the later shard
    is reported failed and left out). Shards that cannot be read are left to the plan."""
    _init_ray()
    reader = ray.remote(num_cpus=1)(shard_ids)
    settings, opts = output.settings, cfg.input_storage_options
    found = ray.get([reader.remote(s, settings, output.info.modality, opts) for s in todo])
    ids = {s.uri: v for s, v in zip(todo, found) if v is not None}
    while True:
        try:
            check_id_collisions(output.dataset, ids)
            return [s for s in todo if s.uri not in summary.shards_failed]
        except IdCollisionError as exc:
            if cfg.on_error == "fail":
                raise EmbedError(str(exc)) from exc
            summary.shards_failed[exc.shard] = str(exc)
            ids.pop(exc.shard)


def _init_ray() -> None:
    start_ray(log_to_driver=False, include_dashboard=False, configure_logging=False)


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


def encoder_option(text: str) -> tuple[str, Any]:
    """An argparse ``type`` for ``--encoder-option KEY=VALUE``: the value as JSON when it parses
    (``max_length=256``, ``normalize=true``), else as text (``pooling=cls``)."""
    key, value = key_value(text)
    return key, parse_option_value(value)


def add_settings_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``EmbedSettings``: what shapes the dataset's rows (embed and re-index)."""
    g = p.add_argument_group(
        "dataset settings",
        "How rows are made. A new dataset records them; every later run (embed.py appending, "
        "reindex.py) takes them from the dataset, so they apply only when the dataset is created: "
        "give one again only to check it (a different value is refused before anything is written).",
    )
    g.add_argument("--encoder", help=f"encoder spec: wordllama-256, static:/dir, hf:/dir, mrl-resnet50:/ckpt.pt, "
                   f"adaptor:/dir (new dataset: {ENCODER})")
    g.add_argument("--encoder-option", type=encoder_option, action="append", metavar="KEY=VALUE",
                   help="keyword option of the encoder's loader, e.g. pooling=cls or max_length=256 "
                   "(repeatable; recorded with the dataset and part of its fingerprint)")
    g.add_argument("--dims", type=parse_dims, help="comma-separated dims to store as emb_<d> columns "
                   "(new dataset: the encoder's trained nesting dims; the full dim is always stored)")
    g.add_argument("--dtype", choices=DTYPES, help="stored vector type (new dataset: float16)")
    g.add_argument("--text-column", help="column (Parquet/JSONL) or WebDataset extension holding the "
                   "text or image bytes (new dataset: text)")
    g.add_argument("--keep", type=parse_names, help="comma-separated columns copied into the dataset "
                   "(may name the text column)")
    g.add_argument("--id-column", help="use this int64 column as the row id instead of one derived "
                   "from the shard and row position")
    g.add_argument("--format", choices=FORMATS, help="input format (default: from each file's extension)")
    g.add_argument("--max-record-bytes", type=int,
                   help=f"records larger than this are skipped and reported (new dataset: {MAX_RECORD_BYTES})")


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings ``add_settings_arguments``' flags ask for: only the flags given, so that
    everything left out comes from the dataset (or the defaults, for a new one)."""
    given = {name: getattr(args, name) for name in FLAGS if name != "encoder_options"}
    if args.encoder_option:
        given["encoder_options"] = dict(args.encoder_option)
    return {name: value for name, value in given.items() if value is not None}


def build_parser() -> argparse.ArgumentParser:
    """The CLI."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
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
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the encoder actors run the model: auto (the GPU each holds; a GPU "
                   "torch cannot use stops the job before anything is written), cuda, or cpu (on "
                   "purpose, inside the actors the layout asks for)")
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
        args.text_column = args.text_column or "text"
    if not args.output:
        parser.error("--output is required when --input is given")
    options = dict(args.storage_option)
    in_options = args.input_storage_option
    cfg = EmbedConfig(
        input=args.input, output=args.output, settings=settings_from_args(args),
        storage_options=options, input_storage_options=None if in_options is None else dict(in_options),
        commit_every=args.commit_every, on_error=args.on_error, actors=args.actors,
        gpus_per_actor=args.gpus_per_actor, device=args.device, batch_rows=args.batch_rows,
        max_shards=args.max_shards, progress=not args.no_progress,
    )
    if args.ray_address or os.environ.get("RAY_ADDRESS"):
        start_ray(address=args.ray_address or os.environ["RAY_ADDRESS"], log_to_driver=False,
                  configure_logging=False)
    print(f"embedding {cfg.input} -> {cfg.output}"
          + (f" (storage options {redact(options)})" if options else ""), flush=True)
    try:
        summary = run_embed(cfg)
    except (EmbedError, ValueError, OSError, LeaseHeldError, LeaseLostError) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        print("committed shards are intact; fix the input and re-run to resume.", file=sys.stderr)
        return 1
    summary.print()
    print("\nsearch it:")
    print(f"  python pipelines/index.py --dataset {cfg.output}")
    print(f"  python pipelines/query.py \"how do I parse a date\" --dataset {cfg.output} --k 10")
    return 0 if not summary.shards_failed else 2


if __name__ == "__main__":
    sys.exit(main())
