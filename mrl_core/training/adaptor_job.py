"""The ``adaptor`` job: a Matryoshka adaptor over a base encoder, trained on the base's
embeddings of an unlabelled corpus. The embedded corpus and its mined neighbours are cached
under ``<out>/data`` with the settings that made them, and rebuilt when those change.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrl_core.adaptor import MatryoshkaAdaptor
from mrl_core.defaults import ENCODER
from mrl_core.nesting import NestingSpec
from mrl_core.sources import read_table
from mrl_core.training.checkpoints import differences, write_json
from mrl_core.training.data import NeighbourDataset, collate_neighbours
from mrl_core.training.loop import FitConfig, Runner, embed_with, fit
from mrl_core.training.objectives import AdaptorObjective

log = logging.getLogger(__name__)

CACHE_SETTINGS = ("base", "data", "text_column", "embeddings", "max_rows", "holdout",
                  "neighbours", "pairs", "pair_columns")
"""Job fields the cached data depends on (with ``fit.seed``): a change rebuilds the cache."""
MODEL_SETTINGS = ("kind", "init", "hidden", "temperature", "contrastive_weight")
SETTINGS_FILE = "settings.json"
CACHE_FILES = ("knn.npy", SETTINGS_FILE, "train.npy", "holdout.npy", "pair_query.npy",
               "pair_doc.npy", "info.json")


@dataclass
class AdaptorJob:
    """A Matryoshka adaptor over the ``base`` encoder, from an unlabelled corpus.

    The corpus comes as texts (``data`` with ``text_column``, embedded here with the base) or as
    precomputed base embeddings (``embeddings``: ``.npy``, or a Lance dataset and its
    ``emb_<dim>`` column). ``holdout`` rows are kept out of training as evaluation queries.
    ``pairs``: optional Parquet/JSONL of (query, document) texts for the contrastive term.
    """

    out: str
    base: str = ENCODER
    data: str | None = None
    text_column: str = "text"
    embeddings: str | None = None
    max_rows: int | None = 100_000
    holdout: int = 2000
    dims: str | None = "16,32,64,128"
    kind: str = "orthogonal"
    init: str = "pca"
    hidden: int = 512
    neighbours: int = 32
    temperature: float = 0.1
    pairs: str | None = None
    pair_columns: tuple[str, str] = ("query", "document")
    contrastive_weight: float = 0.0
    loss_weights: list[float] | None = None
    fit: FitConfig = field(
        default_factory=lambda: FitConfig(epochs=2, batch_size=512, lr=3e-3, cosine=False)
    )


def cache_settings(job: AdaptorJob) -> dict[str, Any]:
    """What the cached data under ``<out>/data`` was built from, in JSON form."""
    settings = {k: getattr(job, k) for k in CACHE_SETTINGS} | {"seed": job.fit.seed}
    return json.loads(json.dumps(settings))


def prepare_adaptor_data(job: AdaptorJob) -> Path:
    """Embed the corpus with the base encoder (or read its embeddings), split off the held-out
    queries and mine neighbours; cached as ``.npy`` files under ``<out>/data``, reused while
    the settings they were built from (``cache_settings``) stay the same."""
    from mrl_core.adaptor import mine_neighbours
    from mrl_core.nesting import l2_normalize

    data_dir = Path(job.out) / "data"
    settings = cache_settings(job)
    if (data_dir / "knn.npy").is_file():
        changed = differences(_read_settings(data_dir), settings, saved_in="cache")
        if not changed:
            return data_dir
        log.info(f"rebuilding the cached data in {data_dir}, made with other settings: "
                 + "; ".join(changed))
        for name in CACHE_FILES:
            (data_dir / name).unlink(missing_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    x, fingerprint = _corpus_embeddings(job)
    x = l2_normalize(np.asarray(x, dtype=np.float32))
    order = np.random.default_rng(job.fit.seed + 1).permutation(len(x))
    holdout, train = x[order[: job.holdout]], x[order[job.holdout :]]
    log.info(f"mining {job.neighbours} exact neighbours of {len(train)} rows")
    knn = mine_neighbours(train, job.neighbours)
    np.save(data_dir / "train.npy", train)
    np.save(data_dir / "holdout.npy", holdout)
    if job.pairs:
        from mrl_core.encoders import get_encoder

        base = get_encoder(job.base)
        table = read_table(job.pairs, list(job.pair_columns))
        for name, col in zip(("pair_query", "pair_doc"), job.pair_columns):
            texts = [t or "" for t in table.column(col).to_pylist()]
            np.save(data_dir / f"{name}.npy", base.encode(texts))
    info = {"base": job.base, "base_fingerprint": fingerprint}
    (data_dir / "info.json").write_text(json.dumps(info))
    write_json(data_dir / SETTINGS_FILE, settings)
    np.save(data_dir / "knn.npy", knn)  # last: its presence marks the cache complete
    return data_dir


def _read_settings(data_dir: Path) -> dict[str, Any]:
    file = data_dir / SETTINGS_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def _corpus_embeddings(job: AdaptorJob) -> tuple[np.ndarray, str]:
    """(the corpus's base embeddings, the base's fingerprint when embedded here, else "")."""
    if job.embeddings:
        return _read_embeddings(job.embeddings, job.max_rows), ""
    if not job.data:
        raise ValueError("an adaptor job needs texts (data) or base embeddings (embeddings)")
    from mrl_core.encoders import get_encoder

    base = get_encoder(job.base)
    column = read_table(job.data, [job.text_column], None).column(job.text_column)
    texts = [t or "" for t in column.to_pylist()]
    rng = np.random.default_rng(job.fit.seed)
    if job.max_rows and len(texts) > job.max_rows + job.holdout:
        pick = np.sort(rng.permutation(len(texts))[: job.max_rows + job.holdout])
        texts = [texts[i] for i in pick]
    log.info(f"embedding {len(texts)} texts with {job.base}")
    chunks = [base.encode(texts[i : i + 65536]) for i in range(0, len(texts), 65536)]
    return np.concatenate(chunks), base.fingerprint


def _read_embeddings(uri: str, max_rows: int | None) -> np.ndarray:
    if uri.endswith(".npy"):
        x = np.load(uri, mmap_mode="r")
        return np.asarray(x[:max_rows] if max_rows else x)
    import lance

    path, _, column = uri.partition("#")
    ds = lance.dataset(path)
    column = column or max((f.name for f in ds.schema if f.name.startswith("emb_")),
                           key=lambda n: int(n[4:]))
    table = ds.head(max_rows, columns=[column]) if max_rows else ds.to_table(columns=[column])
    return np.stack(table.column(column).to_numpy(zero_copy_only=False)).astype(np.float32)


def run_adaptor_job(job: AdaptorJob, runner: Runner | None = None) -> dict[str, Any]:
    """Train an adaptor on prepared data (``prepare_adaptor_data``), then (rank 0) evaluate each
    prefix's recall@10 on the held-out queries against raw prefixes and PCA, and save it to
    ``<out>/adaptor`` (``get_encoder("adaptor:<out>/adaptor")``)."""
    from mrl_core.adaptor import save_adaptor
    from mrl_core.encoders import get_encoder
    from mrl_core.evaluate import pca_rotation, prefix_recall

    runner = runner or Runner()
    out_dir = Path(job.out)
    data_dir = prepare_adaptor_data(job) if runner.is_main else Path(job.out) / "data"
    _wait_for(data_dir / "knn.npy")
    if runner.is_main:
        write_json(out_dir / "job.json", job)
    train = np.load(data_dir / "train.npy")
    pairs = None
    if (data_dir / "pair_query.npy").is_file():
        pairs = (np.load(data_dir / "pair_query.npy"), np.load(data_dir / "pair_doc.npy"))
    nesting = NestingSpec.for_model(train.shape[1], job.dims)
    settings = cache_settings(job) | {k: getattr(job, k) for k in MODEL_SETTINGS}
    adaptor, _ = train_adaptor(
        train, nesting, job.fit, out_dir, kind=job.kind, neighbours=job.neighbours,
        temperature=job.temperature, init=job.init, hidden=job.hidden, pairs=pairs,
        contrastive_weight=job.contrastive_weight, weights=job.loss_weights, runner=runner,
        knn=np.load(data_dir / "knn.npy"), settings=settings,
    )
    if not runner.is_main:
        return {}
    info = json.loads((data_dir / "info.json").read_text())
    fingerprint = info["base_fingerprint"] or get_encoder(job.base).fingerprint
    save_adaptor(adaptor, out_dir / "adaptor", job.base, fingerprint,
                 extra={"trained_rows": len(train), "neighbours": job.neighbours})
    holdout = np.load(data_dir / "holdout.npy")
    dims = nesting.dims[:-1]
    rot = pca_rotation(train)
    result = {"queries": len(holdout), "corpus": len(train), "recall@10": {
        "raw": prefix_recall(holdout, train, dims),
        "pca": prefix_recall(holdout @ rot, train @ rot, dims),
        "adaptor": prefix_recall(embed_with(adaptor, holdout), embed_with(adaptor, train), dims,
                                 reference=(holdout, train)),
    }}
    write_json(out_dir / "eval.json", result)
    log.info("final per-dim recall@10 (ties counted) vs the base's full dim: "
             + json.dumps(result["recall@10"]))
    return result


def _wait_for(path: Path, timeout_s: float = 3600) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s}s")
        time.sleep(1)


def train_adaptor(
    embeddings: np.ndarray,
    nesting: NestingSpec | Sequence[int],
    config: FitConfig,
    out_dir: str | Path,
    kind: str = "orthogonal",
    neighbours: int = 32,
    temperature: float = 0.1,
    init: str = "pca",
    hidden: int = 512,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    contrastive_weight: float = 0.0,
    weights: Sequence[float] | None = None,
    runner: Runner | None = None,
    knn: np.ndarray | None = None,
    settings: Mapping[str, Any] | None = None,
) -> tuple[MatryoshkaAdaptor, list[dict[str, Any]]]:
    """Train a ``MatryoshkaAdaptor`` on base embeddings [N, d] of an unlabelled corpus.

    Mines each row's ``neighbours`` nearest rows (exact, full dim; or takes ``knn``),
    initialises R from PCA (``init="pca"``) or the identity, and runs ``fit``. ``pairs``:
    optional (query, document) base embeddings for the contrastive term. ``settings``: the
    job's, recorded in the checkpoints (see ``fit``).
    """
    from mrl_core.adaptor import mine_neighbours
    from mrl_core.evaluate import pca_rotation
    from mrl_core.nesting import l2_normalize

    runner = runner or Runner()
    x = l2_normalize(np.asarray(embeddings, dtype=np.float32))
    if not isinstance(nesting, NestingSpec):
        nesting = NestingSpec.for_model(x.shape[1], nesting)
    adaptor = MatryoshkaAdaptor(x.shape[1], nesting, kind=kind, hidden=hidden)
    if init == "pca":
        adaptor.set_rotation(pca_rotation(x))
    elif init != "identity":
        raise ValueError(f"init must be 'pca' or 'identity', got {init!r}")
    if knn is None:
        log.info(f"mining {neighbours} exact neighbours of {len(x)} rows")
        knn = mine_neighbours(x, neighbours)
    objective = AdaptorObjective(adaptor, temperature, weights, contrastive_weight)
    pair_t = None
    if pairs is not None:
        pair_t = tuple(torch.from_numpy(l2_normalize(np.asarray(p, dtype=np.float32)))
                       for p in pairs)
    collate = collate_neighbours(torch.from_numpy(x),
                                 torch.from_numpy(np.asarray(knn)[:, :neighbours]),
                                 pair_t, seed=config.seed + runner.rank)
    history = fit(objective, NeighbourDataset(len(x)), collate, config, out_dir, runner,
                  settings=settings)
    return adaptor.eval(), history
