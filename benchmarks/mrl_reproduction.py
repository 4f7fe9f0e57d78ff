"""Reproduce the MRL paper's claims on real data that is available offline, and write the report.

    python benchmarks/mrl_reproduction.py                 # about 25 minutes on 2 CPU cores
    python benchmarks/mrl_reproduction.py --quick         # smaller samples, a few minutes

Writes ``benchmarks/reports/mrl_reproduction.md``, its PNG plots and ``mrl_reproduction.json``.

Data:
- Debian's package descriptions with their sections (about 61,000 unique descriptions in 59
  sections), read from apt's lists. They need English translations: when
  ``/var/lib/apt/lists/*Translation-en*`` is missing, this runs
  ``apt-get update -o Acquire::Languages=en`` (as root), and stops with a clear message if it
  cannot.
- The PyPI summaries (``../shared/data/pypi_summaries.parquet``, 841,708 rows).

Experiments:
1. Debian, supervised: a token-embedding bag (WordLlama's table, fine-tuned) plus a linear
   projection and nested heads, trained with the Matryoshka classification loss (MRL, MRL-E)
   against the paper's baselines: independently trained models at each dim (FF), SVD of the
   full FF model's embedding, and truncation of that model (not trained with MRL). Per dim:
   classification accuracy and 1-NN accuracy. Adaptive classification (a confidence cascade
   over MRL's heads). Funnel retrieval against exact full-dim retrieval, by section labels.
2. PyPI, the Matryoshka adaptor on WordLlama's embedding: each prefix's recall@10 (ties counted)
   against the base model's exact 256-dim search for raw prefixes, PCA and the adaptor; the same
   under a random rotation (full-dim quality kept, prefix order destroyed); and the calibrated
   funnel's tier-0 dim and cost at 0.99 recall before and after the adaptor.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hardware  # this directory's
import numpy as np
import pyarrow.parquet as pq
import torch

from mrl_core.calibration import Calibration, cheapest_hits, pick
from mrl_core.defaults import SHORTLISTS as DEFAULT_SHORTLISTS
from mrl_core.encoders import get_encoder
from mrl_core.evaluate import (
    calibrate_cascade,
    cascade_evaluate,
    cascade_frontier,
    format_per_dim,
    funnel_vs_exact,
    knn_accuracy,
    linear_probe_accuracy,
    pca_rotation,
    per_dim,
    prefix_recall,
    random_rotation,
    softmax,
)
from mrl_core.funnel import FunnelSchedule, paper_schedule
from mrl_core.nesting import l2_normalize
from mrl_core.search import exact_search
from mrl_core.training import (
    ClassifierObjective,
    FitConfig,
    NestedClassifier,
    Runner,
    TokenBagEncoder,
    TokenDataset,
    collate_bag,
    embed_with,
    fit,
    predict,
    split_rows,
    train_adaptor,
)

ROOT = Path(__file__).resolve().parents[1]
LISTS = Path("/var/lib/apt/lists")
DIMS = (8, 16, 32, 64, 128, 256)
ADAPTOR_DIMS = (16, 32, 64, 128, 256)
TARGET = 0.99


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class _TrainingLog(logging.Handler):
    """Training's log lines into ``log``, indented; ``only`` keeps those containing one of its words."""

    def __init__(self, only: tuple[str, ...] = ()) -> None:
        super().__init__(logging.INFO)
        self.only = only

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if not self.only or any(word in msg for word in self.only):
            log("  " + msg)


def training_log(only: tuple[str, ...] = ()) -> None:
    """Route the ``mrl_core.training`` logger to ``log`` (replacing an earlier route)."""
    logger = logging.getLogger("mrl_core.training")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for old in [h for h in logger.handlers if isinstance(h, _TrainingLog)]:
        logger.removeHandler(old)
    logger.addHandler(_TrainingLog(only))


# ---------------------------------------------------------------------------------------------
# Debian's descriptions


def _apt_cat(path: str) -> str:
    out = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", path], capture_output=True, check=True)
    return out.stdout.decode("utf-8", "replace")


def _stanzas(text: str):
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.split("\n"):
            if not line:
                continue
            if line[0] in " \t" and key:
                fields[key] += "\n" + line
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        if fields:
            yield fields


def ensure_debian_lists(update: bool = True) -> None:
    """Make sure apt's English translations are present; fetch them with apt-get if allowed."""
    if glob.glob(str(LISTS / "*Translation-en*")) and glob.glob(str(LISTS / "*_Packages*")):
        return
    if not update:
        raise SystemExit(f"no Translation-en lists in {LISTS}; run: apt-get update -o Acquire::Languages=en")
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SystemExit(
            "Debian's package descriptions are not available: this needs a Debian system with "
            f"English translations in {LISTS} (as root: apt-get update -o Acquire::Languages=en)"
        )
    log("fetching apt lists with English translations (apt-get update -o Acquire::Languages=en)")
    proc = subprocess.run(["apt-get", "update", "-o", "Acquire::Languages=en"], capture_output=True, text=True)
    if proc.returncode != 0 or not glob.glob(str(LISTS / "*Translation-en*")):
        raise SystemExit(
            "apt-get update did not produce Translation-en lists (offline, or no Debian "
            f"mirror reachable):\n{proc.stderr[-2000:]}"
        )


def debian_corpus(update: bool = True) -> tuple[list[str], list[str]]:
    """(description texts, sections) of Debian main, one row per distinct description."""
    ensure_debian_lists(update)
    sections: dict[tuple[str, str | None], str] = {}
    for f in sorted(glob.glob(str(LISTS / "*_main_binary-*_Packages*"))):
        for s in _stanzas(_apt_cat(f)):
            if "Section" in s:
                sections.setdefault((s["Package"], s.get("Description-md5")), s["Section"].split("/")[-1])
    descriptions: dict[tuple[str, str | None], str] = {}
    for f in sorted(glob.glob(str(LISTS / "*main_i18n_Translation-en*"))):
        for s in _stanzas(_apt_cat(f)):
            if "Description-en" in s:
                descriptions[(s["Package"], s.get("Description-md5"))] = s["Description-en"]
    texts, labels, seen = [], [], set()
    for key, section in sections.items():
        desc = descriptions.get(key)
        if desc is None:
            continue
        text = " ".join(line.strip() for line in desc.split("\n") if line.strip() not in ("", "."))
        digest = hashlib.md5(text.encode()).digest()
        if digest in seen:
            continue
        seen.add(digest)
        texts.append(text)
        labels.append(section)
    if len(texts) < 1000:
        raise SystemExit(f"only {len(texts)} Debian descriptions with sections found in {LISTS}")
    return texts, labels


# ---------------------------------------------------------------------------------------------
# 1. Debian: supervised MRL against its baselines


def run_debian(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    texts, sections = debian_corpus(update=not args.no_apt_update)
    names = sorted(set(sections))
    index = {s: i for i, s in enumerate(names)}
    y = np.array([index[s] for s in sections])
    if args.quick:
        keep = np.sort(np.random.default_rng(0).permutation(len(y))[:15000])
        texts, y = [texts[i] for i in keep], y[keep]
    log(f"debian: {len(texts)} descriptions in {len(names)} sections")
    base = get_encoder("wordllama-256", device="cpu")
    feats = base.preprocess(texts)
    offsets = np.concatenate([[0], np.cumsum(feats["lengths"])])
    ids = [feats["ids"][offsets[i] : offsets[i + 1]][:256] for i in range(len(texts))]
    rest, test = split_rows(len(y), 0.15, seed=0)
    order = np.random.default_rng(1).permutation(rest)
    n_val = int(0.1 * len(y))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    ds = {name: TokenDataset([ids[i] for i in rows], y[rows])
          for name, rows in (("train", train), ("val", val), ("test", test))}
    table = base.table.float().numpy()
    cfg = FitConfig(epochs=args.epochs, batch_size=256, lr=args.lr, log_every=0, seed=0)
    quiet = Runner()
    training_log(only=("done", "resumed"))

    def train_model(name: str, out_dim: int, dims: tuple[int, ...], efficient: bool = False):
        torch.manual_seed(0)
        enc = TokenBagEncoder(table.shape[0], table.shape[1], out_dim, table, sparse=True)
        model = NestedClassifier(enc, dims, len(names), efficient=efficient)
        log(f"debian: training {name}")
        history = fit(ClassifierObjective(model), ds["train"], collate_bag, cfg, work / "debian" / name, quiet)
        outputs = {part: predict(model, ds[part], collate_bag) for part in ("train", "val", "test")}
        return outputs, sum(h["seconds"] for h in history)  # epochs resumed from a checkpoint included

    dims = DIMS
    runs: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    runs["MRL"], seconds["MRL"] = train_model("mrl", 256, dims)
    runs["MRL-E"], seconds["MRL-E"] = train_model("mrl-e", 256, dims, efficient=True)
    for m in dims:
        runs[f"FF-{m}"], seconds[f"FF-{m}"] = train_model(f"ff-{m}", m, (m,))

    ytr, yva, yte = y[train], y[val], y[test]
    acc: dict[str, dict[int, float]] = {}
    knn: dict[str, dict[int, float]] = {}
    for name in ("MRL", "MRL-E"):
        _, logits, _ = runs[name]["test"]
        acc[name] = {m: float(np.mean(lg.argmax(1) == yte)) for m, lg in zip(dims, logits)}
    acc["FF"] = {m: float(np.mean(runs[f"FF-{m}"]["test"][1][0].argmax(1) == yte)) for m in dims}

    z = {name: (runs[name]["train"][0], runs[name]["test"][0]) for name in ("MRL", "MRL-E", "FF-256")}
    rot = pca_rotation(z["FF-256"][0])
    z["SVD"] = (z["FF-256"][0] @ rot, z["FF-256"][1] @ rot)
    z["Truncation"] = z["FF-256"]
    probe_rows = np.sort(np.random.default_rng(2).permutation(len(ytr))[: args.probe_rows])
    for name in ("SVD", "Truncation", "MRL"):
        log(f"debian: linear probes on {name}")
        ztr, zte = z[name]
        key = name if name != "MRL" else "MRL (linear probe)"
        acc[key] = per_dim(linear_probe_accuracy, dims, ztr[probe_rows], ytr[probe_rows], zte, yte,
                           normalize=False, max_iter=args.probe_iters)
    log("debian: 1-NN per dim")
    for name in ("MRL", "MRL-E", "SVD", "Truncation"):
        knn[name] = per_dim(knn_accuracy, dims, z[name][0], ytr, z[name][1], yte)
    knn["FF"] = {m: knn_accuracy(runs[f"FF-{m}"]["train"][0], ytr, runs[f"FF-{m}"]["test"][0], yte)
                 for m in dims}

    # adaptive classification: thresholds calibrated on val to the full head's val accuracy
    probs_val = [softmax(lg) for lg in runs["MRL"]["val"][1]]
    probs_test = [softmax(lg) for lg in runs["MRL"]["test"][1]]
    full_val = float(np.mean(probs_val[-1].argmax(1) == yva))
    thresholds = calibrate_cascade(probs_val, yva, dims, full_val)
    casc = cascade_evaluate(probs_test, yte, dims, thresholds)
    frontier = cascade_frontier(probs_test, yte, dims, np.linspace(0, 1, 51))
    share = {m: float(np.mean(casc.dims_used == m)) for m in dims}
    adaptive = {
        "thresholds": dict(zip(map(str, dims[:-1]), thresholds)),
        "val_full_accuracy": full_val,
        "test_accuracy": casc.accuracy,
        "test_full_accuracy": acc["MRL"][dims[-1]],
        "expected_dims": casc.expected_dims,
        "share_stopping_at": share,
        "frontier": frontier,
    }

    retrieval = debian_funnel(z, ytr, yte, args)
    return {
        "rows": {"train": len(train), "val": len(val), "test": len(test)},
        "sections": len(names),
        "dims": list(dims),
        "accuracy": acc,
        "knn1": knn,
        "adaptive": adaptive,
        "retrieval": retrieval,
        "train_seconds": seconds,
        "epochs": args.epochs,
    }


def _prefix_dict(x: np.ndarray, dims, dtype=np.float32) -> dict[int, np.ndarray]:
    return {m: l2_normalize(np.ascontiguousarray(x[:, :m], dtype=np.float32)).astype(dtype) for m in dims}


def debian_funnel(z: dict[str, tuple[np.ndarray, np.ndarray]], ytr: np.ndarray, yte: np.ndarray,
                  args: argparse.Namespace) -> dict[str, Any]:
    """Exact 256-dim retrieval against the paper's funnel and the calibrated one, per model: the
    test descriptions as queries, the training descriptions as the corpus, a hit a same-section
    row (mAP@10, precision@10) and recall@10 (ties counted) against the model's exact search."""
    out: dict[str, Any] = {}
    for name in ("MRL", "Truncation"):
        ztr, zte = z[name]
        corpus, queries = _prefix_dict(ztr, DIMS), _prefix_dict(zte, DIMS)
        chosen, _, _ = auto_schedule(Calibration(corpus, np.arange(len(ztr)), queries, k=10), time_it=False)
        schedules = {f"paper funnel: {paper_schedule(DIMS)}": paper_schedule(DIMS),
                     f"calibrated ({TARGET}): {chosen.schedule}": chosen.schedule}
        rows = funnel_vs_exact(corpus, queries, schedules, 10, yte, ytr)
        out[name] = rows
    return out


# ---------------------------------------------------------------------------------------------
# 2. PyPI: the Matryoshka adaptor on WordLlama's embedding


def pypi_embeddings(path: Path, work: Path) -> np.ndarray:
    cache = work / "pypi_wordllama256.npy"
    if cache.is_file():
        return np.load(cache)
    texts = [t or "" for t in pq.read_table(path, columns=["summary"]).column("summary").to_pylist()]
    enc = get_encoder("wordllama-256", device="cpu")
    log(f"pypi: embedding {len(texts)} summaries with wordllama-256")
    x = np.concatenate([enc.encode(texts[i : i + 65536]) for i in range(0, len(texts), 65536)])
    x = l2_normalize(x.astype(np.float32))
    work.mkdir(parents=True, exist_ok=True)
    np.save(cache, x)
    return x


def auto_schedule(cal: Calibration, shortlists=DEFAULT_SHORTLISTS, time_it: bool = True):
    """``build_index(funnel="auto")``'s choice with a flat tier 0, in memory: the target raised by
    one standard error of the recall estimate, each tier-0 dim's cheapest schedule reaching it
    (a full-dim tier 0 only when nothing else does), the two lowest such dims timed, the faster
    kept. Returns (chosen trial, {tier-0 dim: cheapest trial}, the raised target)."""
    q = len(cal.exact_scores)
    required = min(1.0, TARGET + float(np.sqrt(TARGET * (1 - TARGET) / (q * cal.k))))
    hits = cheapest_hits(cal.trials(required, shortlists, tier0=flat_tier0(cal)), required)
    cands = [t for d, t in hits.items() if d != cal.full] or list(hits.values())
    cands = cands[:2]
    if time_it and len(cands) > 1:
        for t in cands:
            t.seconds = cal.seconds(t.schedule, flat_tier0(cal), repeats=1)
    chosen = pick(cands, required) if cands else None
    return chosen, hits, required


def flat_tier0(cal: Calibration) -> Callable[[int, np.ndarray, int], np.ndarray]:
    """An exact tier 0 over the calibration's prefixes by torch matmul + top-k (FAISS's flat
    search slows down badly for shortlists in the thousands)."""

    def search(dim: int, queries: np.ndarray, n: int) -> np.ndarray:
        return exact_search(queries, np.asarray(cal.vectors[dim], dtype=np.float32), n)[1]

    return search


def funnel_study(corpus: np.ndarray, queries: np.ndarray, transform: Callable[[np.ndarray], np.ndarray],
                 full: bool = True) -> dict[str, Any]:
    """The funnel over one embedding: recall of the paper's schedule and, with ``full``, every
    tier-0 dim's cheapest schedule reaching the target, the ``funnel="auto"`` choice, and the
    recall of tier 0 at 64 and 128 dims -> full dim per shortlist size (up to 5000)."""
    dims = ADAPTOR_DIMS
    vecs: dict[int, list[np.ndarray]] = {}
    for lo in range(0, len(corpus), 1 << 17):
        block = transform(corpus[lo : lo + (1 << 17)])
        for m, v in _prefix_dict(block, dims, np.float16).items():
            vecs.setdefault(m, []).append(v)
    cal = Calibration({m: np.concatenate(v) for m, v in vecs.items()}, np.arange(len(corpus)),
                      _prefix_dict(transform(queries), dims), k=10)
    del vecs
    paper = paper_schedule(dims)
    out: dict[str, Any] = {"paper_schedule": str(paper), "paper_recall": cal.recall(paper, flat_tier0(cal))}
    if not full:
        return out
    chosen, hits, required = auto_schedule(cal)
    grid: dict[str, dict[str, float]] = {}
    sizes = (*DEFAULT_SHORTLISTS, 5000)
    for d0 in (64, 128):
        mats = cal.score_matrices(cal.tier0_keys(d0, max(sizes), flat_tier0(cal)))
        grid[str(d0)] = {str(s): cal.recall_of(FunnelSchedule((d0, dims[-1]), (s,)), mats) for s in sizes}
    out.update(
        required=required,
        cheapest_per_tier0={str(d): {**t.to_dict(), "tier0_bytes_per_row": d * 2} for d, t in hits.items()},
        auto={**chosen.to_dict(), "tier0_dim": chosen.schedule.dims[0]},
        direct_recall_by_shortlist=grid,
    )
    return out


def run_pypi(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    x = pypi_embeddings(args.pypi, work)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    queries, corpus = x[perm[: args.queries]], x[perm[args.queries :]]
    del x
    sample = corpus[rng.choice(len(corpus), min(args.adaptor_rows, len(corpus)), replace=False)]
    if args.quick:
        corpus = corpus[: args.quick_corpus]
    log(f"pypi: {len(queries)} queries, {len(corpus)} corpus rows, {len(sample)} adaptor training rows")
    eval_dims = ADAPTOR_DIMS[:-1]
    cfg = FitConfig(epochs=args.adaptor_epochs, batch_size=512, lr=args.adaptor_lr, cosine=True,
                    log_every=100, seed=0)
    weights = [float(w) for w in args.adaptor_weights.split(",")]
    loss = {"temperature": args.adaptor_temperature, "weights": weights}
    # checkpoints resume only a run with the same settings
    tag = (f"e{args.adaptor_epochs}-lr{args.adaptor_lr:g}-t{args.adaptor_temperature:g}"
           f"-w{'_'.join(f'{w:g}' for w in weights)}")
    runner = Runner()
    training_log()
    knn_file = work / f"pypi_knn_{len(sample)}_{args.neighbours}.npy"
    if knn_file.is_file():
        knn = np.load(knn_file)
    else:
        from mrl_core.adaptor import mine_neighbours

        log(f"pypi: mining {args.neighbours} exact neighbours of {len(sample)} rows")
        knn = mine_neighbours(sample, args.neighbours)
        np.save(knn_file, knn)
    timings = {}
    adaptor, hist = train_adaptor(sample, ADAPTOR_DIMS, cfg, work / "pypi" / f"adaptor-{tag}",
                                  neighbours=args.neighbours,
                                  knn=knn, runner=runner, **loss)
    timings["adaptor (PCA init)"] = sum(h["seconds"] for h in hist)
    pca = pca_rotation(sample)
    rotation = random_rotation(x_dim := sample.shape[1], seed=123)
    rot_cfg = FitConfig(**{**cfg.__dict__, "lr": args.identity_lr})
    rot_adaptor, rot_hist = train_adaptor(sample @ rotation, ADAPTOR_DIMS, rot_cfg,
                                          work / "pypi" / f"adaptor-rotated-identity-{tag}-ilr{args.identity_lr:g}",
                                          neighbours=args.neighbours, knn=knn, init="identity", runner=runner, **loss)
    timings["adaptor on rotated (identity init)"] = sum(h["seconds"] for h in rot_hist)
    rot_pca = pca_rotation(sample @ rotation)
    del x_dim

    log("pypi: per-prefix recall@10 against exact 256-dim search")
    ref = (queries, corpus)
    exact, _ = exact_search(queries, corpus, 10)

    def recall(transform: Callable[[np.ndarray], np.ndarray]) -> dict[int, float]:
        return prefix_recall(transform(queries), _chunked(transform, corpus), eval_dims, reference=ref,
                             exact_scores=exact)

    recalls = {
        "raw prefixes": recall(lambda a: a),
        "PCA": recall(lambda a: a @ pca),
        "adaptor": recall(lambda a: embed_with(adaptor, a)),
        "rotated: raw prefixes": recall(lambda a: a @ rotation),
        "rotated: PCA": recall(lambda a: (a @ rotation) @ rot_pca),
        "rotated: adaptor from identity": recall(lambda a: embed_with(rot_adaptor, a @ rotation)),
    }
    log("pypi: funnel calibration before and after the adaptor")
    funnel = {
        "raw": funnel_study(corpus, queries, lambda a: a),
        "PCA": funnel_study(corpus, queries, lambda a: a @ pca, full=not args.light_funnel),
        "adaptor": funnel_study(corpus, queries, lambda a: embed_with(adaptor, a)),
    }
    return {
        "rows": {"queries": len(queries), "corpus": len(corpus), "adaptor_train": len(sample)},
        "recall@10": recalls,
        "funnel": funnel,
        "adaptor_loss_per_dim": {"first_epoch": hist[0]["loss_per_dim"], "last_epoch": hist[-1]["loss_per_dim"]},
        "rotated_adaptor_loss_per_dim": {"first_epoch": rot_hist[0]["loss_per_dim"],
                                         "last_epoch": rot_hist[-1]["loss_per_dim"]},
        "train_seconds": timings,
        "epochs": args.adaptor_epochs,
        "neighbours": args.neighbours,
        "loss_weights": dict(zip(map(str, ADAPTOR_DIMS), weights)),
        "temperature": args.adaptor_temperature,
    }


def _chunked(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, rows: int = 1 << 17) -> np.ndarray:
    return np.concatenate([fn(x[i : i + rows]) for i in range(0, len(x), rows)])


# ---------------------------------------------------------------------------------------------
# plots and the report


def plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def per_dim_plot(file: str, series: dict[str, dict], title: str, ylabel: str) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, vals in series.items():
            ms = sorted(int(m) for m in vals)
            style = "--" if name.startswith("rotated") else "-"
            ax.plot(ms, [vals[m if m in vals else str(m)] for m in ms], style, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("representation size (dims)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / file, dpi=120)
        plt.close(fig)
        made.append(file)

    deb = results.get("debian")
    if deb:
        acc = {k: v for k, v in deb["accuracy"].items()}
        per_dim_plot("mrl_debian_classification.png", acc,
                     "Debian sections: classification accuracy per dim", "top-1 accuracy")
        per_dim_plot("mrl_debian_1nn.png", deb["knn1"], "Debian sections: 1-NN accuracy per dim", "1-NN accuracy")
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        fr = deb["adaptive"]["frontier"]
        ax.plot([f[1] for f in fr], [f[2] for f in fr], ".-", label="cascade, one shared threshold")
        ax.plot(deb["dims"],
                [deb["accuracy"]["MRL"][m if m in deb["accuracy"]["MRL"] else str(m)] for m in deb["dims"]],
                "o", label="MRL head at a fixed dim")
        ax.plot([deb["adaptive"]["expected_dims"]], [deb["adaptive"]["test_accuracy"]], "r*", ms=14,
                label="cascade, per-dim thresholds calibrated on val")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("expected dims per input")
        ax.set_ylabel("test accuracy")
        ax.set_title("Adaptive classification (MRL heads)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "mrl_debian_adaptive.png", dpi=120)
        plt.close(fig)
        made.append("mrl_debian_adaptive.png")
    pypi = results.get("pypi")
    if pypi:
        per_dim_plot("mrl_pypi_adaptor.png", pypi["recall@10"],
                     "PyPI, WordLlama: recall@10 of each prefix vs exact 256-dim", "recall@10 (ties counted)")
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
        for ax, d0 in zip(axes, ("64", "128")):
            for name, study in pypi["funnel"].items():
                g = study.get("direct_recall_by_shortlist", {}).get(d0)
                if g:
                    ax.plot([int(s) for s in g], list(g.values()), marker="o", label=name)
            ax.axhline(TARGET, color="grey", ls="--", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(f"tier 0 at {d0} dims, then 256")
            ax.set_xlabel("tier-0 shortlist")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("recall@10 (ties counted)")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "mrl_pypi_funnel.png", dpi=120)
        plt.close(fig)
        made.append("mrl_pypi_funnel.png")
    return made


def _table(rows: dict[str, dict], digits: int = 3) -> str:
    return format_per_dim({k: {int(m): v for m, v in r.items()} for k, r in rows.items()}, digits)


def _kv_table(rows: dict[str, dict[str, Any]], cols: list[str]) -> str:
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in rows.items():
        cells = [(f"{r[c]:,.0f}" if c == "queries_per_second" else f"{r[c]:.3f}") if isinstance(r.get(c), float)
                 else str(r.get(c, "")) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: Path, command: str) -> Path:
    """Render ``mrl_reproduction.md`` from the results (numbers only; the prose reads them)."""
    r = results
    lines = [
        "# MRL reproduction on offline data",
        "",
        f"Generated by `{command}` on {r['machine']}; total {r['seconds'] / 60:.1f} min.",
        "Absolute times on this shared machine are noise; the ratios and accuracies are what to read.",
        "",
    ]
    deb = r.get("debian")
    if deb:
        a, k, ad = deb["accuracy"], deb["knn1"], deb["adaptive"]
        full = deb["dims"][-1]
        lines += [
            "## 1. Debian package sections: MRL against its baselines",
            "",
            f"{deb['rows']['train']} / {deb['rows']['val']} / {deb['rows']['test']} descriptions "
            f"(train / val / test) in {deb['sections']} sections. Encoder: WordLlama's token table, "
            f"fine-tuned, mean-pooled, then a linear projection to the representation; {deb['epochs']} "
            "epochs each. MRL and MRL-E: one model with nested heads at every dim. FF: one model "
            "trained per dim. SVD: PCA of FF-256's embedding, linear probe. Truncation: FF-256's "
            "first m dims (a model not trained with MRL), linear probe. Linear probes are trained on a "
            "sample of the training rows.",
            "",
            "### Classification accuracy (test)",
            "",
            _table(a),
            "",
            "![classification](mrl_debian_classification.png)",
            "",
            "### 1-NN accuracy (test against train, cosine)",
            "",
            _table(k),
            "",
            "![1-NN](mrl_debian_1nn.png)",
            "",
            "### Adaptive classification",
            "",
            f"A cascade over MRL's heads stops at the first dim whose max softmax probability reaches "
            f"its threshold; thresholds calibrated on the validation rows to the full head's validation "
            f"accuracy ({ad['val_full_accuracy']:.3f}). On the test rows it reaches "
            f"**{ad['test_accuracy']:.3f}** accuracy (the {full}-dim head: {ad['test_full_accuracy']:.3f}) "
            f"with **{ad['expected_dims']:.1f} expected dims** per input "
            f"({full / ad['expected_dims']:.1f}x fewer than {full}).",
            "",
            "Thresholds: " + ", ".join(f"{m}: {t:.2f}" for m, t in ad["thresholds"].items())
            + ". Share of inputs answered at each dim: "
            + ", ".join(f"{m}: {s:.2f}" for m, s in ad["share_stopping_at"].items()) + ".",
            "",
            "![adaptive](mrl_debian_adaptive.png)",
            "",
            "### Funnel against exact full-dim retrieval",
            "",
            "Test descriptions as queries, training descriptions as the corpus; a same-section row is "
            "relevant. recall@10 vs exact counts ties against the same model's exact 256-dim search.",
            "",
        ]
        for model, rows in deb["retrieval"].items():
            lines += [f"**{model}**", "", _kv_table(rows, ["map@10", "precision@10", "mrr@10",
                                                          "recall@k vs exact", "rerank values/query"]), ""]
        lines += ["Training seconds per model: "
                  + ", ".join(f"{n}: {s:.0f}" for n, s in deb["train_seconds"].items()), ""]
    pypi = r.get("pypi")
    if pypi:
        rows = pypi["rows"]
        lines += [
            "## 2. PyPI summaries: a Matryoshka adaptor on WordLlama",
            "",
            f"{rows['queries']} held-out summaries as queries against {rows['corpus']} others. Recall@10 "
            "counts ties, against the base model's exact 256-dim search. The adaptor: an orthogonal "
            "256x256 map (so full-dim neighbours are exactly the base's), initialised from PCA, trained "
            f"{pypi['epochs']} epochs on {rows['adaptor_train']} corpus rows with the neighbourhood "
            f"loss (each row's {pypi['neighbours']} exact neighbours plus the batch as candidates"
            + (f"; teacher temperature {pypi['temperature']}, weight per dim "
               + ", ".join(f"{m}: {w:g}" for m, w in pypi["loss_weights"].items()) if "loss_weights" in pypi else "")
            + ", cosine learning-rate decay). The weights favour the dims a funnel's tier 0 would use; "
            "the full dim's weight is 0 because an orthogonal map keeps it exact anyway. Training "
            "seconds: " + ", ".join(f"{n}: {v:.0f}" for n, v in pypi.get("train_seconds", {}).items()) + ".",
            "",
            "### Each prefix alone",
            "",
            _table(pypi["recall@10"]),
            "",
            "![adaptor](mrl_pypi_adaptor.png)",
            "",
            "### The calibrated funnel at recall@10 >= 0.99",
            "",
        ]
        lines += [
            f"Targets as `build_index(funnel=\"auto\")` sets them: recall@10 {TARGET} raised by one "
            "standard error of the estimate over the queries; tier 0 flat (exact) here, in memory. "
            "Tier-0 bytes per row: the float16 prefix a flat tier 0 holds. `funnel=\"auto\"` times the "
            "two lowest tier-0 dims that reach the target (queries/s on this machine, flat tier 0, "
            "batched) and keeps the faster; `build_index(tier0_dim=64)` (`pipelines/index.py "
            "--tier0-dim 64`) pins the smaller tier 0 instead.",
            "",
        ]
        for name, study in pypi["funnel"].items():
            line = (f"**{name}**: the paper's schedule `{study['paper_schedule']}` reaches "
                    f"{study['paper_recall']:.3f}")
            if "auto" not in study:
                lines += [line + ".", ""]
                continue
            auto = study["auto"]
            lines += [
                line + f"; `funnel=\"auto\"` picks `{auto['schedule']}` (recall {auto['recall']:.4f}, "
                f"tier 0 at {auto['tier0_dim']} dims). Cheapest schedule per tier-0 dim reaching "
                f"{study['required']:.4f}:",
                "",
                _kv_table({f"tier 0 = {d}": v for d, v in study["cheapest_per_tier0"].items()},
                          ["schedule", "recall", "rerank_values", "tier0_bytes_per_row", "queries_per_second"]),
                "",
            ]
        grid_rows = {f"{name}, tier 0 = {d0}": {int(k): v for k, v in g.items()}
                     for name, study in pypi["funnel"].items()
                     for d0, g in study.get("direct_recall_by_shortlist", {}).items()}
        lines += ["Recall@10 of tier 0 (exact, at the prefix) -> full-dim re-rank, by tier-0 shortlist:", "",
                  format_per_dim(grid_rows).replace("| method |", "| embedding, tier 0 |"), ""]
        lines += ["![funnel](mrl_pypi_funnel.png)", ""]
    lines += ["## Findings", "", *r.get("findings", []), ""]
    path = out / "mrl_reproduction.md"
    path.write_text("\n".join(lines))
    return path


def findings(results: dict[str, Any]) -> list[str]:
    """Plain statements read off the numbers, including where MRL does not win."""
    out = []
    deb = results.get("debian")
    if deb:
        a, k = deb["accuracy"], deb["knn1"]
        dims = deb["dims"]
        low = dims[:3]

        def get(d, m):
            return d.get(m, d.get(str(m)))

        wins = [m for m in dims if get(a["MRL"], m) >= get(a["FF"], m) - 0.005]
        out.append(
            f"- Classification: MRL is within 0.5 points of, or above, the separately trained FF model at "
            f"{len(wins)}/{len(dims)} dims ({', '.join(map(str, wins)) or 'none'}); at {dims[-1]} dims MRL "
            f"{get(a['MRL'], dims[-1]):.3f} vs FF {get(a['FF'], dims[-1]):.3f}."
        )
        out.append(
            f"- Against post-hoc compression of a model not trained with MRL, at {', '.join(map(str, low))} dims: "
            + "; ".join(f"{m}: MRL {get(a['MRL'], m):.3f}, SVD {get(a['SVD'], m):.3f}, truncation "
                        f"{get(a['Truncation'], m):.3f}" for m in low) + "."
        )
        out.append(
            "- 1-NN: " + "; ".join(f"{m}: MRL {get(k['MRL'], m):.3f} / FF {get(k['FF'], m):.3f} / SVD "
                                     f"{get(k['SVD'], m):.3f} / truncation {get(k['Truncation'], m):.3f}"
                                     for m in dims) + "."
        )
        e = get(a["MRL-E"], dims[0]), get(a["MRL"], dims[0])
        out.append(f"- MRL-E (one shared head) at {dims[0]} dims: {e[0]:.3f} against MRL's {e[1]:.3f}.")
        ad = deb["adaptive"]
        out.append(
            f"- Adaptive classification: {ad['test_accuracy']:.3f} accuracy at {ad['expected_dims']:.1f} "
            f"expected dims against {ad['test_full_accuracy']:.3f} at {dims[-1]}."
        )
        for model, rows in deb["retrieval"].items():
            paper = next(v for n, v in rows.items() if n.startswith("paper"))
            out.append(
                f"- Funnel on {model}: the paper's schedule keeps mAP@10 {paper['map@10']:.3f} against exact "
                f"{rows['exact 256']['map@10']:.3f} (recall@10 vs exact {paper['recall@k vs exact']:.3f})."
            )
    pypi = results.get("pypi")
    if pypi:
        rec = pypi["recall@10"]
        dims = sorted(int(m) for m in rec["adaptor"])

        def g(name, m):
            return rec[name].get(m, rec[name].get(str(m)))

        beat = [m for m in dims if g("adaptor", m) > g("PCA", m)]
        out.append(
            f"- Adaptor vs PCA: above PCA at {len(beat)}/{len(dims)} dims below the full one ("
            + ", ".join(f"{m}: {g('adaptor', m):.3f} vs {g('PCA', m):.3f} (raw {g('raw prefixes', m):.3f})"
                        for m in dims) + ")."
        )
        out.append(
            "- Random rotation: raw prefixes fall to "
            + ", ".join(f"{m}: {g('rotated: raw prefixes', m):.3f}" for m in dims)
            + "; an adaptor trained from the identity on the rotated embedding recovers "
            + ", ".join(f"{m}: {g('rotated: adaptor from identity', m):.3f}" for m in dims)
            + " (PCA, being rotation-invariant, gives its unrotated numbers; so does a PCA-initialised adaptor)."
        )
        f = pypi["funnel"]
        full = {n: s for n, s in f.items() if "auto" in s}
        out.append(
            "- Funnel at 0.99: `funnel=\"auto\"` picks "
            + "; ".join(f"{n}: `{s['auto']['schedule']}` (tier 0 at {s['auto']['tier0_dim']} dims, "
                        f"re-rank {s['auto']['rerank_values']} values/query)" for n, s in full.items())
            + ". The paper's schedule reaches "
            + "; ".join(f"{n}: {s['paper_recall']:.3f}" for n, s in f.items()) + "."
        )
        lowest = {n: min(s["cheapest_per_tier0"].items(), key=lambda kv: int(kv[0])) for n, s in full.items()}
        out.append(
            f"- Lowest tier-0 dim reaching the calibrated target ({next(iter(full.values()))['required']:.4f}) "
            f"with a shortlist of at most {max(DEFAULT_SHORTLISTS)}: "
            + "; ".join(f"{n}: {d} dims (`{t['schedule']}`, recall {t['recall']:.4f}, "
                        f"{t['recall'] - full[n]['required']:+.4f} over the target, "
                        f"{t['tier0_bytes_per_row']} tier-0 bytes/row)" for n, (d, t) in lowest.items())
            + "."
        )
    return out


def machine() -> str:
    """Where the figures come from: hardware and torch."""
    return f"{hardware.describe()}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "reports", help="report directory")
    p.add_argument("--work-dir", type=Path, default=ROOT / "data" / "mrl_reproduction",
                   help="caches: embeddings, neighbours, checkpoints (a re-run resumes from them)")
    p.add_argument("--fresh", action="store_true", help="delete the work directory first")
    p.add_argument("--pypi", type=Path, default=ROOT.parent / "shared" / "data" / "pypi_summaries.parquet",
                   help="the PyPI summaries Parquet file")
    p.add_argument("--skip-debian", action="store_true", help="leave out the Debian experiments")
    p.add_argument("--skip-pypi", action="store_true", help="leave out the PyPI adaptor experiments")
    p.add_argument("--no-apt-update", action="store_true", help="never run apt-get update")
    p.add_argument("--epochs", type=int, default=4, help="Debian models: epochs each (default 4)")
    p.add_argument("--lr", type=float, default=4e-3, help="Debian models: learning rate (default 4e-3)")
    p.add_argument("--probe-rows", type=int, default=50000, help="linear-probe training rows (default 50000)")
    p.add_argument("--probe-iters", type=int, default=300, help="linear-probe L-BFGS iterations (default 300)")
    p.add_argument("--queries", type=int, default=2000, help="PyPI held-out queries (default 2000)")
    p.add_argument("--adaptor-rows", type=int, default=100_000, help="adaptor training rows (default 100000)")
    p.add_argument("--adaptor-epochs", type=int, default=12, help="adaptor epochs (default 12)")
    p.add_argument("--adaptor-weights", default="0.1,0.25,4,1,0",
                   help="adaptor loss weight per dim 16,32,64,128,256 (default 0.1,0.25,4,1,0)")
    p.add_argument("--adaptor-temperature", type=float, default=0.05,
                   help="adaptor teacher temperature (default 0.05)")
    p.add_argument("--adaptor-lr", type=float, default=3e-3, help="adaptor learning rate (default 3e-3)")
    p.add_argument("--identity-lr", type=float, default=1e-2,
                   help="learning rate of the adaptor trained from the identity (default 1e-2)")
    p.add_argument("--neighbours", type=int, default=32, help="mined neighbours per row (default 32)")
    p.add_argument("--light-funnel", action="store_true",
                   help="PCA: only the paper schedule's recall, not the full calibration")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="small samples: a smoke run of every step")
    p.add_argument("--quick-corpus", type=int, default=100_000, help=argparse.SUPPRESS)
    p.add_argument("--render-only", action="store_true",
                   help="re-render the report and plots from an existing mrl_reproduction.json")
    args = p.parse_args(argv)
    if args.render_only:
        results = json.loads((args.out / "mrl_reproduction.json").read_text())
        results["findings"] = findings(results)
        _dump(results, args.out)
        plots(results, args.out)
        write_report(results, args.out, results.get("command", "python benchmarks/mrl_reproduction.py"))
        print("\n".join(results["findings"]))
        return 0
    if args.quick:
        args.epochs, args.adaptor_rows, args.adaptor_epochs = 1, 20000, 1
        args.probe_rows, args.probe_iters, args.queries = 5000, 30, 500
    if args.threads:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    if args.fresh and args.work_dir.exists():
        shutil.rmtree(args.work_dir)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine()}
    if not args.skip_debian:
        t = time.perf_counter()
        results["debian"] = run_debian(args, args.work_dir)
        results["debian"]["seconds"] = time.perf_counter() - t
        _dump(results, args.out)
    if not args.skip_pypi:
        t = time.perf_counter()
        results["pypi"] = run_pypi(args, args.work_dir)
        results["pypi"]["seconds"] = time.perf_counter() - t
    results["seconds"] = time.perf_counter() - started
    shown = " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    results["command"] = f"python benchmarks/mrl_reproduction.py {shown}".strip()
    results["findings"] = findings(results)
    _dump(results, args.out)
    plots(results, args.out)
    report = write_report(results, args.out, results["command"])
    log(f"wrote {report}")
    print("\n".join(results["findings"]))
    return 0


def _dump(results: dict[str, Any], out: Path) -> None:
    (out / "mrl_reproduction.json").write_text(json.dumps(results, indent=1, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
