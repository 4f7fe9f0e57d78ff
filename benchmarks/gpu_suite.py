"""Every GPU check of the project in one command on one GPU machine, as one table (and JSON).

    python benchmarks/gpu_suite.py              # on an H100/H200 machine: about 5 minutes, at most 8
    python benchmarks/gpu_suite.py --dry-run    # every check on the CPU at tiny sizes (the test suite runs it)

The checks, each figure beside its bare ceiling (measured in the same run, on the same data):

1. ``pytest -m gpu``: the GPU tests of the test suite (passed / skipped / failed);
2. the embed pipeline on CUDA with the default encoder (``wordllama-256``), Parquet shards to a
   fresh Lance dataset: rows/s / the tokeniser's rate over all cores (goal >= 0.5);
3. the same with a BERT-base-sized ``hf:`` model built here from a config: rows/s / the bare
   model's forward rate (``embed_features``) on the same batches (goal >= 0.9);
4. tier 0 and the funnel on the GPU over 10^7 synthetic unit vectors stored at 64/128/256 dims:
   the IVF tier 0's build time (train + add) beside building faiss-gpu's exact flat index, and
   the fastest funnel schedule reaching recall@10 >= 0.99 (ties counted): its queries/s / exact
   flat search over the full dim on faiss-gpu (goal >= 10x);
5. training with the Matryoshka classification loss on the GPU (BERT-base-sized encoder, nested
   heads): steps/s and samples/s beside the same model with one plain full-dim head.

The texts are synthetic (words of the default encoder's vocabulary; ``--data`` takes a Parquet
corpus instead), so the suite needs nothing from outside the repository. ``--dry-run`` declares
one GPU to Ray and runs the model with ``--device cpu`` in the GPU actors, as the CPU tests of the
GPU layout do. The table goes to stdout, the JSON to ``benchmarks/reports/gpu_suite.json``
(``gpu_suite_dry_run.json`` for a dry run; ``--report`` elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import embed_bench  # this directory's (it puts the repository on sys.path)
import hardware  # this directory's
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
REPORTS = REPO / "benchmarks" / "reports"
DIMS = (64, 128, 256)


@dataclass(frozen=True)
class Sizes:
    """How big each check runs."""

    texts: int = 1_000_000
    shards: int = 32
    bert_texts: int = 200_000
    bert: tuple[int, int, int] = (12, 768, 12)  # layers, hidden, heads: BERT-base
    rows: int = 10_000_000
    queries: int = 10_000
    train_steps: int = 100
    train_batch: int = 64
    train_tokens: int = 128
    pipeline_runs: int = 2


FULL = Sizes()
DRY = Sizes(texts=1_000, shards=2, bert_texts=200, bert=(2, 64, 2), rows=20_000, queries=200, train_steps=3,
            train_batch=8, train_tokens=16, pipeline_runs=1)


@dataclass
class Figure:
    """One row of the table: a figure, the bare ceiling it is held against, and the goal."""

    check: str
    figure: str
    value: float
    unit: str
    ceiling: float | None = None
    ceiling_name: str = ""
    goal: float | None = None  # the least acceptable value / ceiling (or value, without a ceiling)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """value / ceiling."""
        return self.value / self.ceiling if self.ceiling else None

    @property
    def ok(self) -> bool | None:
        """Whether the goal is met (None: no goal)."""
        if self.goal is None:
            return None
        measured = self.ratio if self.ceiling else self.value
        return measured is not None and measured >= self.goal

    def to_dict(self) -> dict:
        """The JSON form."""
        return {**asdict(self), "ratio": self.ratio, "ok": self.ok}


@dataclass
class Run:
    """What one suite run found."""

    machine: dict
    figures: list[Figure] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- machine


def machine(device: str) -> dict:
    """Machine, driver, torch, FAISS: what the figures were measured on."""
    import faiss

    from mrl_core.device import driver_version, faiss_build, torch_build

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return {"machine": hardware.describe(), "driver": driver_version() or "none", "torch": torch_build(),
            "faiss": f"{faiss_build(faiss)}, sees {gpus} GPU(s)", "device": device,
            "python": sys.version.split()[0], "versions": embed_bench.versions()}


# ----------------------------------------------------------------------------- data


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` texts of 6-30 words drawn from the default encoder's vocabulary."""
    from mrl_core.encoders import get_encoder

    vocab = get_encoder("wordllama-256", device="cpu").preprocessor.tokenizer.get_vocab()
    words = np.array(sorted(w.lstrip("▁Ġ") for w in vocab if re.fullmatch(r"[▁Ġ]?[a-z]{3,12}", w)))
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, 31, n)
    picks = rng.integers(0, len(words), int(lengths.sum()))
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [" ".join(words[picks[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]


def corpus(path: Path | None, n: int, column: str) -> list[str]:
    """The first ``n`` texts of the Parquet corpus at ``path``, or ``n`` synthetic ones."""
    if path is None:
        return synthetic_texts(n)
    texts = pq.read_table(path, columns=[column]).column(column).to_pylist()
    return [t for t in texts if isinstance(t, str) and t.strip()][:n]


def make_bert(folder: Path, texts: list[str], layers: int, hidden: int, heads: int) -> Path:
    """A randomly initialised BERT (``layers`` x ``hidden``) with a WordPiece tokenizer trained here on
    ``texts``: a local ``hf:`` checkpoint, nothing downloaded."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    out = folder / f"bert-{layers}x{hidden}"
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = 30522 if hidden >= 768 else 2000
    tok.train_from_iterator(texts[:200_000], trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    transformers.BertTokenizerFast(tokenizer_object=tok, model_max_length=512).save_pretrained(out)
    config = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * hidden,
                                     max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(out, safe_serialization=True)
    return out


# ----------------------------------------------------------------------------- 1. pytest -m gpu


def check_pytest(dry: bool) -> list[Figure]:
    """``pytest -m gpu`` over the test modules that have GPU tests."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text())
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", proc.stdout)}
    passed, failed = counts.get("passed", 0), counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    if proc.returncode not in (0, 5):
        tail = proc.stdout.strip().splitlines()[-3:]
        failed = max(failed, 1)
        note = " | ".join(tail)
    else:
        note = f"{passed} passed, {counts.get('skipped', 0)} skipped, {failed} failed in {len(files)} files"
    goal = None if dry else float(max(passed + failed, 1))  # every GPU test passes on a GPU machine
    return [Figure("pytest -m gpu", "GPU tests passed", float(passed), "tests", goal=goal, note=note)]


# ----------------------------------------------------------------------------- 2-3. the embed pipeline


def init_ray(dry: bool) -> None:
    """A fresh local Ray: every CPU and the machine's GPUs (a dry run declares one GPU)."""
    import ray
    import torch

    gpus = 1 if dry else torch.cuda.device_count()
    ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False,
             log_to_driver=False, configure_logging=False)


def pipeline(shards: Path, out: Path, spec: str, device: str, batch_rows: int) -> tuple[float, object]:
    """(rows/s, summary) of ``run_embed`` over ``shards`` into the fresh dataset ``out``."""
    from mrl_core.settings import EmbedSettings
    from pipelines.embed import EmbedConfig, run_embed

    cfg = EmbedConfig(input=str(shards), output=str(out), settings=EmbedSettings(encoder=spec),
                      device="cpu" if device == "cpu" else "auto", batch_rows=batch_rows, progress=False)
    start = time.perf_counter()
    summary = run_embed(cfg)
    return summary.rows_written / (time.perf_counter() - start), summary


def _pipeline_figures(check: str, texts: list[str], spec: str, work: Path, size: Sizes, device: str,
                      ceiling: float, ceiling_name: str, goal: float, batch_rows: int) -> list[Figure]:
    shards = embed_bench.write_shards(pa.table({"text": texts}), size.shards, work)
    figures = []
    for i in range(size.pipeline_runs):
        rate, summary = pipeline(shards, work / f"out{i}.lance", spec, device, batch_rows)
        where = f"{summary.encode_actors} actor(s), {summary.gpus:g} GPU(s)"
        warm = i > 0 or size.pipeline_runs == 1
        label = "pipeline, Parquet -> Lance" + (" (warm workers)" if i else "")
        note = where + ("" if summary.rows_written == len(texts) else f"; WROTE {summary.rows_written} ROWS")
        figures.append(Figure(check, label, rate, "rows/s", ceiling, ceiling_name, goal if warm else None, note))
    return figures


def check_embed_default(texts: list[str], work: Path, size: Sizes, device: str) -> list[Figure]:
    """Check 2: the default encoder, pipeline against the all-core tokeniser."""
    from mrl_core.encoders import get_encoder

    encoder = get_encoder("wordllama-256", device=device)
    tokenise, _, _ = embed_bench.rate(lambda: embed_bench.tokenise_only(encoder, texts))
    bare, _, _ = embed_bench.rate(lambda: embed_bench.bare(encoder, texts))
    check = "embed, wordllama-256"
    figures = [Figure(check, "bare: tokenise + encode in-process", bare, "rows/s", tokenise, "tokenise, all cores",
                      note=f"{len(texts):,} texts")]
    work.mkdir(parents=True)
    figures += _pipeline_figures(check, texts, "wordllama-256", work, size, device, tokenise, "tokenise, all cores",
                                 0.5, 4096)
    return figures


def check_embed_bert(texts: list[str], work: Path, size: Sizes, device: str) -> list[Figure]:
    """Check 3: a BERT-base-sized ``hf:`` model, pipeline against the bare forward rate."""
    from mrl_core.encoders import get_encoder

    work.mkdir(parents=True)
    model = make_bert(work, texts, *size.bert)
    spec = f"hf:{model}"
    encoder = get_encoder(spec, device=device)
    batches = [encoder.preprocess(texts[lo:lo + 4096]) for lo in range(0, len(texts), 4096)]
    forward, _, _ = embed_bench.rate(lambda: embed_bench.encoder_only(encoder, batches))
    layers, hidden, _ = size.bert
    check = f"embed, BERT {layers}x{hidden} (hf:)"
    figures = [Figure(check, "bare forward (embed_features), same batches", forward, "rows/s",
                      note=f"{len(texts):,} texts, random weights")]
    return figures + _pipeline_figures(check, texts, spec, work, size, device, forward, "bare forward", 0.9, 4096)


# ----------------------------------------------------------------------------- 4. tier 0 and the funnel


def synthetic_vectors(n: int, device: str, seed: int = 0) -> dict[int, np.ndarray]:
    """``n`` unit vectors stored as MRL models store them: float16 prefixes at 64/128/256 dims, each
    normalised on its own; clustered, with energy falling off along the dims as MRL training leaves it."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    full = DIMS[-1]
    centers = torch.randn(max(16, n // 1000), full, generator=gen, device=device)
    decay = (torch.arange(full, device=device, dtype=torch.float32) + 1) ** -0.5
    out = {d: np.empty((n, d), dtype=np.float16) for d in DIMS}
    for lo in range(0, n, 1 << 20):
        m = min(1 << 20, n - lo)
        pick = torch.randint(0, len(centers), (m,), generator=gen, device=device)
        x = (centers[pick] + 0.6 * torch.randn(m, full, generator=gen, device=device)) * decay
        for d in DIMS:
            out[d][lo:lo + m] = torch.nn.functional.normalize(x[:, :d], dim=1).half().cpu().numpy()
    return out


def _exact_flat(vectors: np.ndarray, gpu: bool):
    """faiss's exact inner-product index over ``vectors`` (float16 on the GPUs), added in chunks."""
    import faiss

    dim = vectors.shape[1]
    if gpu:
        config = faiss.GpuIndexFlatConfig()
        config.useFloat16 = True
        index = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), dim, config)
    else:
        index = faiss.IndexFlatIP(dim)
    for lo in range(0, len(vectors), 1 << 20):
        index.add(np.ascontiguousarray(vectors[lo:lo + (1 << 20)], dtype=np.float32))
    return index


def check_tier0(size: Sizes, device: str) -> list[Figure]:
    """Check 4: tier 0 built on the GPU, the funnel against exact flat search over the full dim."""
    import faiss

    from mrl_core.funnel import FunnelSchedule, funnel_search, take_rows
    from mrl_core.search import recall_at_k_with_ties, scores_of
    from mrl_core.tier0 import Tier0Index, fit_index, new_index, nlist_for

    gpu, k, full, d0 = device == "cuda", 10, DIMS[-1], DIMS[0]
    vectors = synthetic_vectors(size.rows, device)
    rng = np.random.default_rng(1)
    picked = rng.choice(size.rows, size.queries, replace=False)
    noisy = vectors[full][picked].astype(np.float32) + rng.normal(0, 0.02, (size.queries, full)).astype(np.float32)
    queries = {d: noisy[:, :d] / np.linalg.norm(noisy[:, :d], axis=1, keepdims=True) for d in DIMS}

    start = time.perf_counter()
    exact = _exact_flat(vectors[full], gpu)
    flat_build = time.perf_counter() - start
    start = time.perf_counter()
    exact_scores, _ = exact.search(queries[full], k)
    exact_qps = size.queries / (time.perf_counter() - start)
    del exact

    nlist = nlist_for(size.rows)
    factory = f"IVF{nlist},Flat"
    start = time.perf_counter()
    index = new_index(factory, d0)
    sample = vectors[d0][rng.choice(size.rows, min(size.rows, 40 * nlist), replace=False)]
    fit_index(index, np.ascontiguousarray(sample, dtype=np.float32), ngpu=faiss.get_num_gpus() if gpu else 0)
    tier0 = Tier0Index(index, gpu=gpu)
    ids = np.arange(size.rows, dtype=np.int64)
    for lo in range(0, size.rows, 1 << 20):
        tier0.index.add_with_ids(np.ascontiguousarray(vectors[d0][lo:lo + (1 << 20)], dtype=np.float32),
                                 ids[lo:lo + (1 << 20)])
    build = time.perf_counter() - start

    def fetch(dim: int, keys: np.ndarray) -> np.ndarray:
        return take_rows(vectors[dim], keys, scratch=True)

    best, tried = None, []
    for nprobe in (8, 16, 32, 64, 128, 256):
        if nprobe > nlist:
            break
        for shortlist in (50, 100, 200, 400, 800):
            schedule = FunnelSchedule((d0, full), (shortlist,), nprobe)
            start = time.perf_counter()
            _, keys = funnel_search(schedule, queries, k, tier0.tier0(nprobe), fetch)
            qps = size.queries / (time.perf_counter() - start)
            found = scores_of(queries[full], _Rows(vectors[full]), keys)
            recall = recall_at_k_with_ties(found, exact_scores, k, tol=2e-3)
            tried.append((str(schedule), nprobe, recall, qps))
            if recall >= 0.99:
                if best is None or qps > best[3]:
                    best = (schedule, nprobe, recall, qps)
                break  # a longer shortlist at this nprobe is only slower
    schedule, nprobe, recall, qps = best or max(tried, key=lambda t: t[2])
    check = f"tier 0 + funnel, {size.rows:,} x {full}"
    sweep = f"{len(tried)} schedules tried; tier 0 {factory} at {d0} dims, nprobe {nprobe}"
    return [
        Figure(check, f"tier-0 build ({factory} on {d0} dims: train + add)", build, "s", flat_build,
               "exact flat build (full dim)", note=f"{'GPU' if gpu else 'CPU'}"),
        Figure(check, f"funnel recall@{k} (ties counted), {schedule}", recall, "", goal=0.99, note=sweep),
        Figure(check, f"funnel queries/s, {schedule}", qps, "queries/s", exact_qps,
               f"exact flat, {full} dims{' (faiss-gpu)' if gpu else ''}", 10.0,
               f"{size.queries:,} queries, k={k}" + ("" if recall >= 0.99 else "; recall below 0.99")),
    ]


class _Rows:
    """Rows of a float16 array read as float32 on indexing (the corpus is too big to convert whole)."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = vectors

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        return self.vectors[positions].astype(np.float32)


# ----------------------------------------------------------------------------- 5. training


def check_training(model_dir: Path, size: Sizes, device: str) -> list[Figure]:
    """Check 5: training steps/s with the Matryoshka classification loss (nested heads at 8..full)
    against the same encoder with one plain full-dim head."""
    import torch
    import transformers

    from mrl_core.layers import NestedLinear
    from mrl_core.losses import MatryoshkaClassificationLoss
    from mrl_core.nesting import NestingSpec

    torch.manual_seed(0)
    dev = torch.device(device)
    classes, batch, tokens = 1000, size.train_batch, size.train_tokens
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def rate(nested: bool) -> float:
        encoder = transformers.BertModel.from_pretrained(model_dir, add_pooling_layer=False).to(dev).train()
        full = encoder.config.hidden_size
        spec = NestingSpec.for_model(full)
        head = (NestedLinear(spec, classes) if nested else torch.nn.Linear(full, classes)).to(dev)
        loss_fn = MatryoshkaClassificationLoss(len(spec.dims)).to(dev)
        params = list(encoder.parameters()) + list(head.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        vocab = encoder.config.vocab_size
        ids = torch.randint(0, vocab, (batch, tokens), device=dev)
        labels = torch.randint(0, classes, (batch,), device=dev)

        def step() -> None:
            with amp:
                z = encoder(input_ids=ids).last_hidden_state.mean(dim=1)
                out = head(z.float())
                loss = loss_fn(out, labels) if nested else torch.nn.functional.cross_entropy(out, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step()  # warm-up (allocations, kernels)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(size.train_steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        return size.train_steps / (time.perf_counter() - start)

    plain, nested = rate(False), rate(True)
    check = f"training, BERT {size.bert[0]}x{size.bert[1]} + Matryoshka loss"
    note = f"batch {batch} x {tokens} tokens, {classes} classes{', bf16' if device == 'cuda' else ''}"
    return [
        Figure(check, "steps/s, nested heads (MRL)", nested, "steps/s", plain, "one plain full-dim head", note=note),
        Figure(check, "samples/s, nested heads (MRL)", nested * batch, "samples/s", plain * batch,
               "one plain full-dim head"),
    ]


# ----------------------------------------------------------------------------- the table


def _fmt(x: float | None) -> str:
    if x is None:
        return ""
    if math.isinf(x):
        return "inf"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def table(run: Run) -> str:
    """The run as one table, the machine first."""
    m = run.machine
    lines = [f"machine: {m['machine']}", f"driver:  {m['driver']}", f"torch:   {m['torch']}",
             f"faiss:   {m['faiss']}", f"device:  {m['device']}; {m['versions']}", ""]
    head = f"{'check':<34} {'figure':<56} {'value':>11} {'unit':<9} {'ceiling':>11}  {'ratio':>6}  {'goal':>6}  ok"
    lines += [head, "-" * len(head)]
    for f in run.figures:
        goal = "" if f.goal is None else f">={f.goal:g}"
        ok = "" if f.ok is None else ("yes" if f.ok else "NO")
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}"
        lines.append(f"{f.check[:34]:<34} {f.figure[:56]:<56} {_fmt(f.value):>11} {f.unit:<9} "
                     f"{_fmt(f.ceiling):>11}  {ratio:>6}  {goal:>6}  {ok}")
        detail = "; ".join(x for x in (f"ceiling: {f.ceiling_name}" if f.ceiling_name else "", f.note) if x)
        if detail:
            lines.append(f"{'':<34}   {detail}")
    for name, error in run.errors.items():
        lines.append(f"{name}: FAILED: {error}")
    lines.append("")
    lines.append("seconds per check: " + ", ".join(f"{k} {v:.0f}" for k, v in run.seconds.items()))
    if m["device"] == "cpu":
        lines.append("dry run: tiny sizes on the CPU, start-up dominates; its ratios say nothing about the goals")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The CLI."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every check on the CPU at tiny sizes")
    p.add_argument("--data", type=Path, help="Parquet corpus for the embed checks (default: synthetic texts)")
    p.add_argument("--column", default="text", help="the text column of --data")
    p.add_argument("--report", type=Path, help="JSON report path (default: benchmarks/reports/gpu_suite*.json)")
    p.add_argument("--skip", default="", help="comma-separated checks to skip: pytest,embed,bert,tier0,train")
    p.add_argument("--tmp", type=Path, help="work folder (default: a new temporary folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run every check, print the table, write the JSON; exit 1 if a check failed to run."""
    args = build_parser().parse_args(argv)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no usable CUDA GPU here (torch.cuda.is_available() is False); --dry-run runs on the CPU")
    size = DRY if args.dry_run else FULL
    skip = {s for s in args.skip.split(",") if s}
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), flush=True)
    run = Run(machine(device))
    work = Path(args.tmp or tempfile.mkdtemp(prefix="gpu_suite_"))
    texts = corpus(args.data, max(size.texts, size.bert_texts), args.column)
    bert_dir: list[Path] = []

    def bert_check() -> list[Figure]:
        figures = check_embed_bert(texts[: size.bert_texts], work / "bert", size, device)
        bert_dir.append(next((work / "bert").glob("bert-*")))
        return figures

    checks = [
        ("pytest", lambda: check_pytest(args.dry_run)),
        ("embed", lambda: check_embed_default(texts[: size.texts], work / "embed", size, device)),
        ("bert", bert_check),
        ("tier0", lambda: check_tier0(size, device)),
        ("train", lambda: check_training(bert_dir[0] if bert_dir else make_bert(work, texts, *size.bert),
                                         size, device)),
    ]
    ray_started = False
    for name, check in checks:
        if name in skip:
            continue
        if name in ("embed", "bert") and not ray_started:
            init_ray(args.dry_run)
            ray_started = True
        start = time.perf_counter()
        try:
            figures = check()
        except Exception as exc:  # noqa: BLE001 — one failing check must not hide the others' figures
            run.errors[name] = f"{type(exc).__name__}: {exc}"
            figures = []
        run.seconds[name] = time.perf_counter() - start
        run.figures += figures
        print(f"  {name}: {run.seconds[name]:.0f} s", flush=True)
    text = table(run)
    print("\n" + text)
    report = args.report or REPORTS / ("gpu_suite_dry_run.json" if args.dry_run else "gpu_suite.json")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"machine": run.machine, "figures": [f.to_dict() for f in run.figures],
                                  "seconds": run.seconds, "errors": run.errors, "table": text}, indent=2,
                                 default=str) + "\n")
    print(f"\nreport: {report}")
    return 1 if run.errors else 0


if __name__ == "__main__":
    sys.exit(main())
