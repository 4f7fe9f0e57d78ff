"""Rows/s of the embed pipeline against the bare encoder on the same texts, in one run.

    python benchmarks/embed_bench.py                       # CPU, wordllama-256, the PyPI summaries
    python benchmarks/embed_bench.py --rows 200000 --shards 16
    python benchmarks/embed_bench.py --device cuda         # GPU machine: the staged layout
    python benchmarks/embed_bench.py --device cuda --bert-base --rows 200000

Figures, side by side (the pipeline's goals are ratios to the in-process ceilings):

* wordllama's own ``WordLlamaInference.embed`` (built from the wheel's files; its ``load()``
  downloads), default encoder only;
* tokenise only: the encoder's tokeniser over all cores (HF tokenizers' batch encoding, big
  batches) down to flat token ids, no pooling;
* encoder only: the device half (``embed_features``) on already tokenised batches;
* bare ceiling: tokenise + encode per batch in this process, no Ray, no I/O;
* the whole pipeline: ``run_embed`` from Parquet shards to a fresh Lance dataset, Ray already
  started (a second run into another fresh dataset shows it with warm worker processes).

The in-process ceilings run before and after the pipeline; the table gives both and the ratios
use their mean, since shared machines drift. Shards are written to a temporary folder first,
untimed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata, resources
from pathlib import Path

import hardware  # this directory's
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "pypi_summaries.parquet"
BATCH = 1 << 16  # rows per tokeniser/encoder batch in the in-process figures


def versions() -> str:
    """Versions of the libraries that set the figures."""
    names = ["ray", "pylance", "pyarrow", "tokenizers", "torch", "numpy", "wordllama", "transformers"]
    found = []
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return f"python {platform.python_version()}, " + ", ".join(found)


def read_texts(path: Path, column: str, rows: int | None) -> pa.Table:
    """The corpus (optionally its first ``rows`` rows)."""
    table = pq.read_table(path)
    if column not in table.column_names:
        raise SystemExit(f"{path} has no column {column!r} (columns: {', '.join(table.column_names)})")
    return table.slice(0, rows) if rows else table


def write_shards(table: pa.Table, n: int, folder: Path) -> Path:
    """``table`` split into ``n`` Parquet shards of consecutive rows under ``folder/in``."""
    out = folder / "in"
    out.mkdir(parents=True)
    per = -(-table.num_rows // n)
    for i in range(n):
        part = table.slice(i * per, per)
        if part.num_rows:
            pq.write_table(part, out / f"part-{i:05d}.parquet")
    return out


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and all its descendants (Ray's raylet, GCS and
    workers when this process started Ray), reaped children included; from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    parent, used = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        used[pid] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += used.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / ticks


def rate(fn: Callable[[], int]) -> tuple[float, float, float]:
    """(rows/s, seconds, CPU us per row) of ``fn``, which returns the rows it did; CPU time is
    this process's (every thread)."""
    cpu, start = time.process_time(), time.perf_counter()
    n = fn()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return n / seconds, seconds, cpu / max(n, 1) * 1e6


def wordllama_embed(texts: list[str]) -> int:
    """wordllama's own inference over ``texts`` (its default batch size), from the wheel's files."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer
    from wordllama.inference import WordLlamaInference

    package = resources.files("wordllama")
    table = load_file(str(package / "weights" / "l2_supercat_256.safetensors"))["embedding.weight"]
    tokenizer = Tokenizer.from_file(str(package / "tokenizers" / "l2_supercat_tokenizer_config.json"))
    model = WordLlamaInference(table, tokenizer)
    out = model.embed(texts)
    return len(out)


def tokenise_only(encoder, texts: list[str]) -> int:
    """The encoder's CPU half (tokenise to flat ids) over big batches, all cores."""
    n = 0
    for lo in range(0, len(texts), BATCH):
        n += len(encoder.preprocess(texts[lo : lo + BATCH])["lengths"])
    return n


def encoder_only(encoder, features: list[dict]) -> int:
    """The device half on pre-tokenised batches."""
    n = 0
    for f in features:
        n += len(encoder.embed_features(f))
    _sync()
    return n


def bare(encoder, texts: list[str]) -> int:
    """Tokenise + encode, batch by batch, in this process: no Ray, no I/O."""
    n = 0
    for lo in range(0, len(texts), BATCH):
        n += len(encoder.embed_features(encoder.preprocess(texts[lo : lo + BATCH])))
    _sync()
    return n


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_bert_base(folder: Path, texts: list[str]) -> Path:
    """A randomly initialised BERT-base (12 x 768) checkpoint with a WordPiece tokenizer
    trained here on ``texts`` with the ``tokenizers`` library (nothing downloaded)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    out = folder / "bert-base-random"
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts[:200_000], trainers.WordPieceTrainer(vocab_size=30522, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    transformers.BertTokenizerFast(tokenizer_object=tok, model_max_length=512).save_pretrained(out)
    config = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(out, safe_serialization=True)
    return out


def init_ray(device: str) -> float:
    """A fresh local Ray with every CPU (and the GPUs for ``cuda``); seconds it took."""
    import ray

    start = time.perf_counter()
    gpus = 0
    if device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
    ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    return time.perf_counter() - start


def run_pipeline(shards: Path, output: Path, args: argparse.Namespace,
                 column: str) -> tuple[float, float, float, object]:
    """(rows/s, seconds, CPU us per row, summary) of ``run_embed`` over ``shards`` into a fresh
    dataset; CPU time is this process's and every Ray process's it started."""
    from mrl_core.settings import EmbedSettings
    from pipelines.embed import EmbedConfig, run_embed

    settings = EmbedSettings(encoder=args.encoder_spec, text_column=column,
                             keep=tuple(k for k in args.keep.split(",") if k))
    cfg = EmbedConfig(input=str(shards), output=str(output), settings=settings, progress=False,
                      batch_rows=args.batch_rows, actors=args.actors)
    cpu, start = tree_cpu_seconds(), time.perf_counter()
    summary = run_embed(cfg)
    seconds, cpu = time.perf_counter() - start, tree_cpu_seconds() - cpu
    n = max(summary.rows_written, 1)
    return summary.rows_written / seconds, seconds, cpu / n * 1e6, summary


def build_parser() -> argparse.ArgumentParser:
    """The CLI."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Parquet corpus")
    p.add_argument("--column", default="summary", help="text column")
    p.add_argument("--keep", default="name", help="columns the pipeline copies into the dataset")
    p.add_argument("--rows", type=int, help="use the first ROWS rows only")
    p.add_argument("--shards", type=int, default=32, help="split the corpus into this many Parquet shards")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--encoder", default="wordllama-256", help="encoder spec (wordllama-256, hf:/dir, static:/dir)")
    p.add_argument("--bert-base", action="store_true",
                   help="a randomly initialised BERT-base-sized model (made here, offline) as the encoder")
    p.add_argument("--batch-rows", type=int, default=4096, help="the pipeline's --batch-rows")
    p.add_argument("--actors", type=int, help="the pipeline's --actors")
    p.add_argument("--pipeline-runs", type=int, default=2,
                   help="pipeline runs, each into a fresh dataset (later runs reuse warm worker processes)")
    p.add_argument("--wordllama-rows", type=int, help="rows for wordllama's own embed (default: all)")
    p.add_argument("--tmp", type=Path, help="folder for shards and outputs (default: a new temporary folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run every figure and print the table."""
    args = build_parser().parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"machine: {hardware.describe()}")
    print(versions(), flush=True)

    table = read_texts(args.data, args.column, args.rows)
    texts = [t for t in table.column(args.column).to_pylist() if isinstance(t, str) and t.strip()]
    print(f"corpus: {args.data} ({table.num_rows:,} rows, {len(texts):,} non-empty texts), "
          f"{args.shards} shards", flush=True)
    work = Path(args.tmp or tempfile.mkdtemp(prefix="embed_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    shards = write_shards(table, args.shards, work)

    args.encoder_spec = args.encoder
    if args.bert_base:
        print("making a random BERT-base checkpoint ...", flush=True)
        args.encoder_spec = f"hf:{make_bert_base(work, texts)}"
    from mrl_core.encoders import get_encoder

    encoder = get_encoder(args.encoder_spec, device=args.device)
    print(f"encoder: {args.encoder_spec} on {args.device} (dim {encoder.dim})", flush=True)
    is_wordllama = args.encoder_spec.startswith("wordllama-")

    rows: list[tuple[str, float, float, str]] = []  # (figure, rows/s, CPU us/row, notes)
    if is_wordllama and args.device == "cpu":
        subset = texts[: args.wordllama_rows] if args.wordllama_rows else texts
        r, s, c = rate(lambda: wordllama_embed(subset))
        rows.append(("wordllama WordLlamaInference.embed", r, c, f"{len(subset):,} texts, {s:.1f}s"))
        print(f"  wordllama embed: {r:,.0f} rows/s", flush=True)

    tok_runs, bare_runs = [], []

    def ceilings(tag: str) -> None:
        r, _, c = rate(lambda: tokenise_only(encoder, texts))
        tok_runs.append((r, c))
        print(f"  tokenise only ({tag}): {r:,.0f} rows/s, {c:.1f} CPU us/row", flush=True)
        r, _, c = rate(lambda: bare(encoder, texts))
        bare_runs.append((r, c))
        print(f"  bare ceiling ({tag}): {r:,.0f} rows/s, {c:.1f} CPU us/row", flush=True)

    ceilings("before")
    features = [encoder.preprocess(texts[lo : lo + BATCH]) for lo in range(0, len(texts), BATCH)]
    enc_rate, _, enc_cpu = rate(lambda: encoder_only(encoder, features))
    features.clear()
    print(f"  encoder only: {enc_rate:,.0f} rows/s", flush=True)

    init_s = init_ray(args.device)
    pipes = []
    for i in range(args.pipeline_runs):
        r, s, c, summary = run_pipeline(shards, work / f"out{i}.lance", args, args.column)
        if summary.rows_written != len(texts):
            print(f"  WARNING: the pipeline wrote {summary.rows_written:,} rows, expected {len(texts):,}")
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in summary.stage_seconds.items())
        pipes.append((r, s, c, stages))
        print(f"  pipeline run {i + 1}: {r:,.0f} rows/s, {c:.1f} CPU us/row ({s:.1f}s; stage time summed "
              f"over workers: {stages})", flush=True)
    ceilings("after")
    import lance

    fragments = len(lance.dataset(str(work / "out0.lance")).get_fragments())

    def spread(runs: list[tuple[float, float]]) -> str:
        return " / ".join(f"{r:,.0f}" for r, _ in runs) + " rows/s (before / after)"

    tok_mean, tok_cpu = (float(np.mean(x)) for x in zip(*tok_runs))
    bare_mean, bare_cpu = (float(np.mean(x)) for x in zip(*bare_runs))
    rows.append(("tokenise only (all cores)", tok_mean, tok_cpu, spread(tok_runs)))
    rows.append(("encoder only (pre-tokenised)", enc_rate, enc_cpu, f"{args.device}"))
    rows.append(("bare ceiling (tokenise + encode)", bare_mean, bare_cpu, spread(bare_runs)))
    for i, (r, s, c, _) in enumerate(pipes):
        label = "pipeline (Parquet -> Lance)" if i == 0 else f"pipeline, run {i + 1} (warm workers)"
        rows.append((label, r, c, f"{s:.1f}s" + (f", {fragments} fragments" if i == 0 else "")))

    print(f"\nload average at end: {hardware.load()}; Ray start {init_s:.1f}s (not counted)")
    print("CPU us/row: CPU time of this process (all threads); for the pipeline, of every Ray process too")
    print(f"\n{'figure':<40} {'rows/s':>10} {'x bare':>7} {'CPU us/row':>11}  notes")
    for label, r, c, note in rows:
        print(f"{label:<40} {r:>10,.0f} {r / bare_mean:>7.2f} {c:>11.1f}  {note}")
    pipe, pipe_cpu = pipes[0][0], pipes[0][2]
    print(f"\npipeline / bare ceiling:     {pipe / bare_mean:.2f} (goal on CPU >= 0.50)")
    print(f"pipeline / tokenise only:    {pipe / tok_mean:.2f} (goal on GPU with the default encoder >= 0.50)")
    print(f"pipeline / encoder only:     {pipe / enc_rate:.2f} (goal on GPU with a transformer >= 0.90)")
    if rows[0][0].startswith("wordllama"):
        print(f"pipeline / wordllama embed:  {pipe / rows[0][1]:.2f}")
    if len(pipes) > 1:
        print(f"warm pipeline / bare:        {pipes[-1][0] / bare_mean:.2f}")
    print(f"CPU per row, bare / pipeline: {bare_cpu / pipe_cpu:.2f} (1.0: the pipeline costs no CPU beyond "
          f"the bare encoder's)")
    print(f"\nstage time summed over workers (run 1): {pipes[0][3]}")
    print(f"outputs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
