"""The ``classify`` job: supervised MRL from labelled text or images, from reading the data to
the exported encoder that ``get_encoder`` loads (``static:``, ``hf:``, ``mrl-resnet50:``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mrl_core.defaults import ENCODER
from mrl_core.nesting import NestingSpec
from mrl_core.sources import read_table
from mrl_core.training.checkpoints import write_json
from mrl_core.training.data import (
    ImageDataset,
    TokenDataset,
    WebDatasetStream,
    collate_bag,
    collate_images,
    collate_padded,
    expand_shards,
    image_bytes,
    image_transform,
    is_webdataset,
    iter_webdataset,
    label_index,
    ragged_rows,
    scan_shards,
    split_rows,
)
from mrl_core.training.loop import FitConfig, Runner, fit, predict
from mrl_core.training.modules import (
    HFTextEncoder,
    ImageBackbone,
    NestedClassifier,
    Projection,
    TokenBagEncoder,
)
from mrl_core.training.objectives import ClassifierObjective

log = logging.getLogger(__name__)

MODEL_SETTINGS = (
    "modality", "encoder", "init", "random_init", "freeze_table", "sparse_table", "pretrained",
    "embed_dim", "efficient", "label_smoothing", "max_length", "image_size", "pooling",
)
"""Job fields a checkpoint records: resuming under other values is refused."""


@dataclass
class ClassifierJob:
    """Supervised MRL: an encoder plus nested heads trained on labelled text or images.

    ``data``: Parquet/JSONL/CSV (file, directory or fsspec URL) with a text (or image bytes)
    column and a label column, or WebDataset ``.tar`` shards for images. ``encoder``: ``bag``
    (token-embedding bag, tokenizer and initial table from the static encoder ``init``) or
    ``hf:/dir`` for text (pooled by ``pooling``: mean or cls); a backbone (``resnet50``,
    ``torchvision:NAME``, ``timm:NAME``) for images. ``dims``: the nesting (``"8,16,...,256"``;
    a single full dim trains a plain, non-MRL model, the paper's FF baseline). ``embed_dim``: a
    linear projection after the encoder (default: none, the encoder's own dim).
    ``samples_per_epoch``: WebDataset training samples (default: counted in one pass over the
    shards, reading only labels), which sizes the LR schedule.
    """

    out: str
    data: str
    modality: str = "text"
    text_column: str = "text"
    label_column: str = "label"
    image_column: str = "image"
    val_data: str | None = None
    val_fraction: float = 0.1
    max_rows: int | None = None
    encoder: str = "bag"
    init: str | None = ENCODER
    random_init: bool = False
    freeze_table: bool = False
    sparse_table: bool = False
    pretrained: str | None = None
    embed_dim: int | None = None
    dims: str | None = None
    efficient: bool = False
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    max_length: int = 256
    pooling: str = "mean"
    image_size: int = 224
    num_classes: int | None = None
    samples_per_epoch: int | None = None
    knn_rows: int = 20000
    fit: FitConfig = field(default_factory=FitConfig)


def build_classifier(job: ClassifierJob, runner: Runner) -> dict[str, Any]:
    """Read the data and build the model, datasets and collate function of a ``ClassifierJob``.

    Returns a dict: ``model``, ``objective``, ``nesting``, ``labels``, ``collate``, ``train``,
    ``train_eval`` and ``val`` (when there is validation data); for text also ``tokenizer``.
    """
    if job.modality == "image":
        parts = _image_parts(job, runner)
    elif job.modality == "text":
        parts = _text_parts(job)
    else:
        raise ValueError(f"modality must be 'text' or 'image', got {job.modality!r}")
    encoder = parts.pop("encoder")
    if job.embed_dim is not None and not isinstance(encoder, TokenBagEncoder):
        encoder = nn.Sequential(encoder, Projection(encoder.out_dim, job.embed_dim))
        encoder.out_dim = job.embed_dim
    nesting = NestingSpec.for_model(job.embed_dim or encoder.out_dim, job.dims)
    model = NestedClassifier(encoder, nesting, len(parts["labels"]), efficient=job.efficient)
    parts.update(model=model, nesting=nesting,
                 objective=ClassifierObjective(model, job.loss_weights, job.label_smoothing))
    return parts


def _image_parts(job: ClassifierJob, runner: Runner) -> dict[str, Any]:
    train_tf = image_transform(job.image_size, True)
    eval_tf = image_transform(job.image_size, False)
    if is_webdataset(job.data):
        out = _webdataset_images(job, runner, train_tf, eval_tf)
    else:
        out = _table_images(job, train_tf, eval_tf)
    out.update(encoder=ImageBackbone(job.encoder, job.pretrained), collate=collate_images)
    return out


def _webdataset_images(
    job: ClassifierJob, runner: Runner, train_tf: Any, eval_tf: Any
) -> dict[str, Any]:
    """Training images streamed from the shards; the validation shards (``val_data``, else the
    last data shard) read into memory."""
    shards = expand_shards(job.data)
    val_shards = (expand_shards(job.val_data) if job.val_data
                  else shards[-1:] if len(shards) > 1 else [])
    train_shards = [s for s in shards if s not in val_shards] or shards
    counts, seen = {}, set()
    if job.num_classes is None or job.samples_per_epoch is None:
        counts, seen = scan_shards(shards)
    labels = sorted(seen) if job.num_classes is None else [str(i) for i in range(job.num_classes)]
    index = {lbl: i for i, lbl in enumerate(labels)}
    samples = job.samples_per_epoch or sum(counts[s] for s in train_shards)
    out: dict[str, Any] = {"labels": labels, "train": WebDatasetStream(
        train_shards, train_tf, index, runner.rank, runner.world_size, job.fit.seed, samples)}
    if val_shards:
        rows = [(img, index[str(lbl)]) for s in val_shards for img, lbl in iter_webdataset(s)]
        out["val"] = ImageDataset([r[0] for r in rows], np.array([r[1] for r in rows]), eval_tf)
    return out


def _table_images(job: ClassifierJob, train_tf: Any, eval_tf: Any) -> dict[str, Any]:
    """Images (encoded bytes) and labels from a table; validation rows split off or read from
    ``val_data``."""
    table = read_table(job.data, [job.image_column, job.label_column], job.max_rows)
    images = image_bytes(table.column(job.image_column).to_pylist())
    raw = table.column(job.label_column).to_pylist()
    index = label_index(raw)
    y = np.array([index[str(v)] for v in raw])
    tr, va = split_rows(len(y), 0.0 if job.val_data else job.val_fraction, job.fit.seed)
    out: dict[str, Any] = {"labels": list(index),
                           "train": ImageDataset([images[i] for i in tr], y[tr], train_tf)}
    if job.val_data:
        vt = read_table(job.val_data, [job.image_column, job.label_column])
        vy = np.array([index[str(v)] for v in vt.column(job.label_column).to_pylist()])
        out["val"] = ImageDataset(image_bytes(vt.column(job.image_column).to_pylist()), vy, eval_tf)
    elif len(va):
        out["val"] = ImageDataset([images[i] for i in va], y[va], eval_tf)
    out["train_eval"] = ImageDataset(out["train"].images, out["train"].labels, eval_tf)
    return out


def _text_parts(job: ClassifierJob) -> dict[str, Any]:
    texts, raw = _text_data(job, job.data)
    index = label_index(raw)
    if job.encoder == "bag":
        out, tokenize = _bag_encoder(job)
    elif job.encoder.startswith("hf:"):
        out, tokenize = _hf_encoder(job)
    else:
        raise ValueError(f"unknown text encoder {job.encoder!r}: use 'bag' or 'hf:/dir'")
    ids = ragged_rows(tokenize(texts), job.max_length if job.encoder == "bag" else None)
    y = np.array([index[str(v)] for v in raw])
    if job.val_data:
        vtexts, vraw = _text_data(job, job.val_data)
        tr, va_ids = np.arange(len(y)), ragged_rows(tokenize(vtexts))
        vy = np.array([index[str(v)] for v in vraw])
    else:
        tr, va = split_rows(len(y), job.val_fraction, job.fit.seed)
        va_ids, vy = [ids[i] for i in va], y[va]
    out["train"] = TokenDataset([ids[i] for i in tr], y[tr])
    if len(vy):
        out["val"] = TokenDataset(va_ids, vy)
    out["train_eval"] = out["train"]
    out["labels"] = list(index)
    return out


def _bag_encoder(job: ClassifierJob) -> tuple[dict[str, Any], Any]:
    """A ``TokenBagEncoder`` starting from the static encoder ``job.init``, and its tokenizer."""
    from mrl_core.encoders import get_encoder

    base = get_encoder(job.init or ENCODER, device="cpu")
    if not hasattr(base, "table"):
        raise ValueError(f"--init {job.init} is not a static token-embedding encoder")
    table = base.table.float().cpu().numpy()
    encoder = TokenBagEncoder(
        table.shape[0], table.shape[1], job.embed_dim,
        None if job.random_init else table, job.freeze_table, job.sparse_table,
    )
    pre = getattr(base, "preprocessor", None)
    tokenizer = pre.tokenizer if pre is not None else base.tokenizer
    return {"encoder": encoder, "tokenizer": tokenizer, "collate": collate_bag}, base.preprocess


def _hf_encoder(job: ClassifierJob) -> tuple[dict[str, Any], Any]:
    """An ``HFTextEncoder`` from the local checkpoint ``job.encoder``, and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    path = job.encoder[3:]
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    encoder = HFTextEncoder(model, job.pooling)

    def tokenize(batch: list[str]) -> dict[str, np.ndarray]:
        enc = tok(batch, truncation=True, max_length=job.max_length)["input_ids"]
        lengths = np.array([len(e) for e in enc], dtype=np.int64)
        ids = np.concatenate([np.asarray(e, dtype=np.int64) for e in enc])
        return {"ids": ids, "lengths": lengths}

    parts = {"encoder": encoder, "tokenizer": tok, "collate": collate_padded(tok.pad_token_id or 0)}
    return parts, tokenize


def _text_data(job: ClassifierJob, uri: str) -> tuple[list[str], list[Any]]:
    table = read_table(uri, [job.text_column, job.label_column], job.max_rows)
    texts = [t or "" for t in table.column(job.text_column).to_pylist()]
    return texts, table.column(job.label_column).to_pylist()


def run_classifier_job(job: ClassifierJob, runner: Runner | None = None) -> dict[str, Any]:
    """Train, then (rank 0) evaluate per dim and export; returns the evaluation."""
    runner = runner or Runner()
    out_dir = Path(job.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if runner.is_main:
        write_json(out_dir / "job.json", job)
    parts = build_classifier(job, runner)
    settings = {k: getattr(job, k) for k in MODEL_SETTINGS}
    fit(parts["objective"], parts["train"], parts["collate"], job.fit, out_dir, runner,
        settings=settings)
    if not runner.is_main:
        return {}
    model: NestedClassifier = parts["model"]
    result = evaluate_classifier(model, parts, job.knn_rows, runner.device, job.fit.seed)
    write_json(out_dir / "eval.json", result)
    log.info("final per-dim evaluation: " + json.dumps(result))
    export_classifier(job, parts, out_dir / "export")
    return result


def evaluate_classifier(
    model: NestedClassifier, parts: dict[str, Any], knn_rows: int, device: torch.device,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-dim head accuracy and 1-NN accuracy (validation rows against up to ``knn_rows``
    training rows) of a trained classifier; empty without a validation set."""
    from mrl_core.evaluate import knn_accuracy, per_dim

    if "val" not in parts:
        return {}
    dims = parts["nesting"].dims
    z_val, logits, y_val = predict(model, parts["val"], parts["collate"], device=device)
    result: dict[str, Any] = {
        "dims": list(dims),
        "head_accuracy": {str(m): float(np.mean(lg.argmax(1) == y_val))
                          for m, lg in zip(dims, logits)},
    }
    train = parts.get("train_eval")
    if train is not None and knn_rows:
        pick = np.sort(np.random.default_rng(seed).permutation(len(train))[:knn_rows])
        sub = torch.utils.data.Subset(train, pick.tolist())
        z_tr, _, y_tr = predict(model, sub, parts["collate"], device=device)
        knn = per_dim(knn_accuracy, dims, z_tr, y_tr, z_val, y_val)
        result["knn1_accuracy"] = {str(m): v for m, v in knn.items()}
    return result


def export_classifier(job: ClassifierJob, parts: dict[str, Any], path: Path) -> None:
    """Write the trained model where an encoder loader reads it; the nested heads and the class
    labels go to ``<path>/heads`` (``heads.safetensors``, ``labels.json``).

    ``bag``: a static-encoder directory (``static:<path>``), projection folded into the table;
    ``hf:``: ``save_pretrained`` plus ``mrl_encoder.json`` (pooling, max length, nesting) for
    ``hf:<path>``; ``resnet50``: the official MRL state-dict layout
    (``mrl-resnet50:<path>/model.pt``); other backbones: ``model.pt``.
    """
    from safetensors.torch import save_file

    from mrl_core.encoders.hf import write_encoder_config

    heads = path / "heads"
    heads.mkdir(parents=True, exist_ok=True)
    model: NestedClassifier = parts["model"].cpu()
    nesting = parts["nesting"]
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()},
              str(heads / "heads.safetensors"))
    meta = {"labels": parts["labels"], "dims": list(nesting.dims), "efficient": job.efficient,
            "encoder": job.encoder, "modality": job.modality}
    (heads / "labels.json").write_text(json.dumps(meta, indent=2))
    enc = model.encoder
    if isinstance(enc, TokenBagEncoder):
        save_file({"embeddings": torch.from_numpy(enc.folded_table())},
                  str(path / "model.safetensors"))
        (path / "tokenizer.json").write_text(parts["tokenizer"].to_str())
        config = {"nesting_dims": list(nesting.dims), "max_tokens_per_text": job.max_length}
        (path / "config.json").write_text(json.dumps(config))
    elif isinstance(enc, HFTextEncoder):
        enc.model.save_pretrained(path)
        parts["tokenizer"].save_pretrained(path)
        write_encoder_config(path, enc.pooling, job.max_length, nesting.dims)
    elif isinstance(enc, ImageBackbone):
        state = {k: v for k, v in enc.net.state_dict().items() if not k.startswith("fc.")}
        state.update({f"fc.{k}": v for k, v in model.head.state_dict().items()})
        torch.save(state, path / "model.pt")
    else:
        torch.save(model.state_dict(), path / "model.pt")
