"""The Encoder protocol and the helpers every encoder shares: input checks, device choice,
fingerprints and batching by a token (or pixel) budget rather than by a row count."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from tokenizers import Tokenizer

from mrl_core.nesting import NestingSpec, l2_normalize

Features = dict[str, np.ndarray]
"""What ``preprocess`` returns: plain numpy arrays, cheap to ship between Ray tasks."""


@runtime_checkable
class Encoder(Protocol):
    """A model that maps inputs to float32 embeddings whose nested prefixes are meaningful.

    ``preprocess`` is the CPU half (tokenise, decode images) and ``embed_features`` the device
    half, so a pipeline can run them in different processes; ``encode`` does both.
    """

    name: str
    dim: int
    nesting: NestingSpec
    modality: str  # "text" or "image"
    fingerprint: str

    def preprocess(self, inputs: Sequence[Any]) -> Features:
        """CPU work for one batch of inputs: validate, tokenise or decode."""
        ...

    def embed_features(self, features: Features) -> np.ndarray:
        """Device work: the float32 [N, dim] embeddings of a preprocessed batch."""
        ...

    def encode(self, inputs: Sequence[Any] | Any, dim: int | None = None) -> np.ndarray:
        """float32 [N, dim] embeddings of ``inputs``, batched by total tokens (or pixels).

        One input (a str, or bytes for images) gives one row, [1, dim]. ``dim``: the first
        ``dim`` coordinates, L2-normalised (``take_dim``); None: the full embedding as the model
        gives it.
        """
        ...


def as_batch(inputs: Sequence[Any] | Any) -> Sequence[Any]:
    """A single input (a str, or encoded image bytes) as a one-item list; a sequence as it is."""
    if isinstance(inputs, (str, bytes, bytearray, memoryview)):
        return [inputs]
    return inputs


def check_dim(dim: int | None, encoder: Any) -> int | None:
    """``dim`` as an int (None stays None); a ValueError naming it unless it is 1..``encoder.dim``."""
    if dim is None:
        return None
    full = int(encoder.dim)
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= full:
        raise ValueError(
            f"dim={dim!r} is not a prefix of {encoder.name}'s {full}-dim embeddings: ask for 1..{full} "
            f"(its nesting dims: {', '.join(map(str, encoder.nesting.dims))})"
        )
    return int(dim)


def take_dim(embeddings: np.ndarray, dim: int | None) -> np.ndarray:
    """``embeddings`` as they are when ``dim`` is None, else their first ``dim`` coordinates,
    L2-normalised on their own (any prefix works; an MRL model's nesting dims are the good ones)."""
    if dim is None:
        return embeddings
    return l2_normalize(np.ascontiguousarray(embeddings[:, :dim], dtype=np.float32))


def check_texts(texts: Sequence[Any]) -> list[str]:
    """The inputs as a list of str; raise naming the first input that is None or not a str."""
    if isinstance(texts, str):
        raise TypeError("preprocess() takes a list of texts, not a single str; wrap it: [text] (encode() takes one)")
    texts = list(texts)
    if not texts:
        raise ValueError("encode() got an empty input list")
    if set(map(type, texts)) <= {str}:  # the common case, without a Python loop
        return texts
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            kind = "None" if t is None else type(t).__name__
            raise TypeError(f"input {i} is {kind}, expected str")
    return texts


def pick_device(device: str | torch.device | None) -> torch.device:
    """``device`` as given, else the first CUDA GPU when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fingerprint_of(*parts: bytes | str | np.ndarray | torch.Tensor) -> str:
    """A stable 16-hex-digit hash of weights and config, in the order given."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous().view(torch.uint8).numpy()
        if isinstance(part, np.ndarray):
            h.update(str((part.dtype, part.shape)).encode())
            part = np.ascontiguousarray(part).view(np.uint8).tobytes()
        elif isinstance(part, str):
            part = part.encode()
        h.update(part)
        h.update(b"\x00")
    return h.hexdigest()[:16]


def budget_batches(
    costs: Sequence[int] | np.ndarray, budget: int, sort: bool = False, padded: bool = False
) -> Iterator[np.ndarray]:
    """Split row indices into batches whose total cost (tokens, pixels) stays within ``budget``.

    ``padded=True`` counts a batch as ``len(batch) * max(cost)``, as a padded transformer batch
    costs; ``sort=True`` orders rows by cost first so padding is small. A row costlier than the
    budget forms a batch on its own.
    """
    costs = np.asarray(costs, dtype=np.int64)
    order = np.argsort(costs, kind="stable") if sort else np.arange(len(costs))
    start, total, widest = 0, 0, 0
    for pos, idx in enumerate(order):
        c = max(int(costs[idx]), 1)
        new_total = (pos - start + 1) * max(widest, c) if padded else total + c
        if pos > start and new_total > budget:
            yield order[start:pos]
            start, total, widest = pos, 0, 0
            new_total = c
        total, widest = new_total, max(widest, c)
    if start < len(order):
        yield order[start:]



def ragged_features(token_ids: Sequence[Sequence[int]]) -> Features:
    """Token id lists as flat ``ids`` plus per-row ``lengths`` (no padding, Ray-friendly)."""
    lengths = np.fromiter(map(len, token_ids), dtype=np.int64, count=len(token_ids))
    ids = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=int(lengths.sum()))
    return {"ids": ids, "lengths": lengths}


@dataclass
class Tokenize:
    """The picklable CPU half of a text encoder: texts -> ragged token ids (all cores).

    Pipelines ship this (``encoder.preprocessor``) to CPU tasks instead of the model weights.
    """

    tokenizer: Tokenizer
    add_special_tokens: bool = False
    prefix: str = ""
    skip: int = 0
    """Leading tokens (the prefix, with any special token before it) that pooling leaves out;
    when non-zero each row's count travels as the ``skip`` feature."""

    def __call__(self, inputs: Sequence[Any]) -> Features:
        texts = check_texts(inputs)
        if self.prefix:
            texts = [self.prefix + t for t in texts]
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=self.add_special_tokens)
        features = ragged_features([e.ids for e in encodings])
        if self.skip:
            features["skip"] = np.full(len(texts), self.skip, dtype=np.int64)
        return features


class TextEncoderBase:
    """``preprocess`` and ``encode`` for text encoders that set ``self.preprocessor``."""

    modality = "text"
    preprocessor: Tokenize

    def preprocess(self, inputs: Sequence[Any]) -> Features:
        """Tokenise a batch of texts (see ``Tokenize``)."""
        return self.preprocessor(inputs)

    def encode(self, inputs: Sequence[str] | str, dim: int | None = None) -> np.ndarray:
        """float32 [N, dim] embeddings of a list of texts; one str gives one row, [1, dim].

        ``dim``: the L2-normalised first ``dim`` coordinates instead of the full raw embedding.
        """
        dim = check_dim(dim, self)
        return take_dim(self.embed_features(self.preprocess(as_batch(inputs))), dim)
