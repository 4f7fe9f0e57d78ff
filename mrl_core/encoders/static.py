"""Static token-embedding encoders: the mean of a text's token vectors from one table.

Covers WordLlama's Matryoshka table (read straight from the installed ``wordllama`` package's
files, never through its downloading loader) and any model2vec-style directory holding a
safetensors table and a ``tokenizer.json``. Pooling is ``pooling.token_bag_mean`` (torch's
``embedding_bag``, so it runs on a GPU too), as in training's ``TokenBagEncoder``.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from mrl_core.encoders.base import Features, TextEncoderBase, Tokenize, fingerprint_of, pick_device
from mrl_core.encoders.pooling import token_bag_mean
from mrl_core.nesting import NestingSpec

WORDLLAMA_TRAINED_DIMS = (64, 128, 256)
"""The prefixes WordLlama's l2_supercat table was trained at (up to 1024; the wheel ships 256)."""

MAX_TOKENS_PER_TEXT = 8192
"""Tokens past this are dropped: the mean has long converged and memory stays bounded."""


class StaticEncoder(TextEncoderBase):
    """Mean-pooled token embeddings. An empty text (no tokens) encodes to the zero vector.

    Args:
        table: [vocab, dim] token-embedding table.
        tokenizer: a ``tokenizers.Tokenizer``; special tokens are not added (as WordLlama and
            model2vec do).
        name: the encoder's name, recorded in dataset metadata.
        nesting: the dims the table was trained at (the full dim is always included).
        device, dtype: where and in which precision pooling runs (default: CUDA if present, and
            float16 there, float32 on CPU).
        batch_tokens: tokens pooled per device call.
    """

    def __init__(
        self,
        table: np.ndarray,
        tokenizer: Tokenizer,
        name: str,
        nesting: Sequence[int] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_tokens: int = 1 << 20,
        max_tokens_per_text: int = MAX_TOKENS_PER_TEXT,
    ) -> None:
        if table.ndim != 2:
            raise ValueError(f"token table must be 2-D [vocab, dim], got shape {table.shape}")
        self.name = name
        self.dim = int(table.shape[1])
        self.nesting = NestingSpec.for_model(self.dim, nesting)
        # a non-default truncation changes long texts' embeddings: part of the fingerprint then
        limit = () if max_tokens_per_text == MAX_TOKENS_PER_TEXT else (f"max_tokens={max_tokens_per_text}",)
        self.fingerprint = fingerprint_of(table, tokenizer.to_str(), name, *limit)
        self.device = pick_device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.batch_tokens = batch_tokens
        self.vocab_size = int(table.shape[0])
        self.table = torch.from_numpy(np.ascontiguousarray(table)).to(self.device, self.dtype)
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_tokens_per_text)
        self.preprocessor = Tokenize(tokenizer, add_special_tokens=False)

    @torch.inference_mode()
    def embed_features(self, features: Features) -> np.ndarray:
        """Mean of each text's token vectors, pooled in chunks of ``batch_tokens`` tokens."""
        ids = np.clip(features["ids"], 0, self.vocab_size - 1)
        lengths = features["lengths"]
        n = len(lengths)
        out = np.zeros((n, self.dim), dtype=np.float32)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        start = 0
        while start < n:
            # the largest run of rows starting at `start` whose tokens fit the budget (>= 1 row)
            stop = int(np.searchsorted(offsets, offsets[start] + self.batch_tokens, side="right")) - 1
            stop = min(max(stop, start + 1), n)
            lo, hi = int(offsets[start]), int(offsets[stop])
            flat = torch.from_numpy(ids[lo:hi]).to(self.device)
            offs = torch.from_numpy(offsets[start:stop] - lo).to(self.device)
            pooled = token_bag_mean(flat, offs, self.table)
            out[start:stop] = pooled.float().cpu().numpy()
            start = stop
        return out


def load_static(
    path: str | Path,
    name: str | None = None,
    nesting: Sequence[int] | None = None,
    **kwargs: Any,
) -> StaticEncoder:
    """A model2vec-style directory: one safetensors file (the table) and ``tokenizer.json``.

    ``config.json``, if present, may give ``nesting_dims`` and ``max_tokens_per_text`` (the
    truncation a trained table was trained with; an explicit keyword wins).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"static encoder directory not found: {path}")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"no .safetensors file in static encoder directory {path}")
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in static encoder directory {path}")
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    table = _read_table(weights[0])
    return StaticEncoder(
        table,
        _read_tokenizer(tokenizer_file),
        name=name or f"static:{path.resolve()}",
        nesting=nesting or config.get("nesting_dims"),
        **{"max_tokens_per_text": config.get("max_tokens_per_text", MAX_TOKENS_PER_TEXT), **kwargs},
    )


def load_wordllama(
    dim: int = 256, nesting: Sequence[int] | None = None, **kwargs: Any
) -> StaticEncoder:
    """WordLlama's Matryoshka table and tokenizer, read from the installed package's files.

    ``nesting`` defaults to the prefixes the table was trained at (64, 128, 256).
    """
    # only the package's files: importing wordllama would run its logging.basicConfig(level=INFO)
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default encoder reads its weights from the 'wordllama' package: pip install wordllama"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    weights = package / "weights" / "l2_supercat_256.safetensors"
    tokenizer_file = package / "tokenizers" / "l2_supercat_tokenizer_config.json"
    table = _read_table(Path(str(weights)))
    if dim > table.shape[1]:
        raise ValueError(f"wordllama ships a {table.shape[1]}-dim table; {dim} dims requested")
    table = table[:, :dim]
    if nesting is None:
        nesting = [d for d in WORDLLAMA_TRAINED_DIMS if d <= dim]
    return StaticEncoder(
        table, _read_tokenizer(Path(str(tokenizer_file))), name=f"wordllama-{dim}",
        nesting=nesting, **kwargs,
    )


def _read_table(file: Path) -> np.ndarray:
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"cannot read token table {file}: {exc}") from exc
    for key in ("embedding.weight", "embeddings", "weight"):
        if key in tensors:
            return tensors[key]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ValueError(f"{file} holds {sorted(tensors)}; expected one table or 'embeddings'")


def _read_tokenizer(file: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"cannot read tokenizer {file}: {exc}") from exc
