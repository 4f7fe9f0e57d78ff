"""Sentence-transformers model directories (``modules.json``) as encoders: ``st:/dir``.

The directory is loaded with the ``sentence-transformers`` package itself (local files only), so
its Transformer (tokenizer, ``max_seq_length``, lower-casing), Dense, Normalize and other
modules after pooling are exactly the ones ``SentenceTransformer(dir)`` runs. The rest is ours,
as for ``hf:``: tokenising on the CPU in a picklable preprocessor, batches packed to a
padded-token budget on the device, and pooling with ``pooling.pool`` (every sentence-transformers
mode: mean, cls, max, lasttoken, weightedmean, mean_sqrt_len_tokens, and their concatenations).

Prompts come from ``config_sentence_transformers.json``: ``encode`` embeds documents with the
document prompt (the first of ``document``, ``passage``, ``corpus`` it has), ``encode_queries``
queries with the ``query`` prompt; a model without prompts embeds both alike.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from tokenizers import Tokenizer, normalizers
from torch import nn

from mrl_core.encoders.base import (
    Features,
    TextEncoderBase,
    Tokenize,
    as_batch,
    check_dim,
    fingerprint_of,
    pick_device,
    take_dim,
)
from mrl_core.encoders.hf import TOKENIZER_FILES, config_text, padded_batches, tokenizer_texts, weight_digests
from mrl_core.encoders.pooling import POOLINGS, pool
from mrl_core.nesting import NestingSpec

logger = logging.getLogger(__name__)

DOCUMENT_PROMPTS = ("document", "passage", "corpus")
"""Prompt names used for documents, in the order sentence-transformers' ``encode_document`` tries them."""

_LEGACY_POOLING_FLAGS = {  # sentence-transformers < 6: one flag per mode, concatenated in this order
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


class STEncoder(TextEncoderBase):
    """A sentence-transformers model: its Transformer, our pooling, then its modules after pooling.

    ``preprocessor`` / ``query_preprocessor`` are the picklable CPU halves (the model's fast
    tokenizer, truncating to ``max_length`` with special tokens, the document / query prompt
    prepended). A text with no tokens encodes to the zero vector.

    Args:
        transformer: the loaded sentence-transformers ``Transformer`` module, on ``device``.
        head: the modules after pooling (Dense, Normalize, ...), run in order on the pooled vector.
        tokenizer: the Transformer's Hugging Face fast tokenizer.
        name, fingerprint: recorded in dataset metadata (see ``load_st``).
        pooling: the pooling modes, concatenated in this order (one of ``POOLINGS`` each).
        include_prompt: whether pooling covers the prompt's tokens (sentence-transformers'
            ``include_prompt``).
        query_prompt, document_prompt: prepended to queries / documents before tokenising.
        batch_tokens: padded tokens (rows x longest row) per forward pass.
        max_length: texts (prompt included) are truncated to this many tokens, special tokens included.
        nesting: the dims the model was trained at (default: doubling from 8).
    """

    def __init__(
        self,
        transformer: nn.Module,
        head: Sequence[nn.Module],
        tokenizer: Any,
        name: str,
        fingerprint: str,
        pooling: Sequence[str] = ("mean",),
        include_prompt: bool = True,
        query_prompt: str = "",
        document_prompt: str = "",
        batch_tokens: int = 16384,
        max_length: int = 512,
        nesting: Sequence[int] | str | None = None,
    ) -> None:
        bad = [m for m in pooling if m not in POOLINGS]
        if not pooling or bad:
            raise ValueError(f"pooling modes must be one or more of {POOLINGS}, got {list(pooling)}")
        self.transformer = transformer.eval()
        modules_after_pooling = nn.Sequential(*head)
        self.head = modules_after_pooling.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.fingerprint = fingerprint
        self.pooling = tuple(pooling)
        self.include_prompt = include_prompt
        self.query_prompt = query_prompt
        self.document_prompt = document_prompt
        self.batch_tokens = int(batch_tokens)
        self.max_length = int(max_length)
        self.device = next(transformer.parameters()).device
        pad = tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)
        backend = _backend_copy(tokenizer, self.max_length, getattr(transformer, "do_lower_case", False))
        self.preprocessor = self._tokenize(backend, document_prompt)
        self.query_preprocessor = self._tokenize(backend, query_prompt)
        hidden = int(transformer.auto_model.config.hidden_size)
        self.dim = int(self._head(torch.zeros(1, hidden * len(self.pooling), device=self.device)).shape[1])
        self.nesting = NestingSpec.for_model(self.dim, nesting)

    def encode_queries(self, texts: Sequence[str] | str, dim: int | None = None) -> np.ndarray:
        """float32 [N, dim] embeddings of queries (the query prompt instead of the document one);
        one str gives one row, [1, dim]; ``dim``: the L2-normalised prefix, as ``encode``."""
        dim = check_dim(dim, self)
        return take_dim(self.embed_features(self.query_preprocessor(as_batch(texts))), dim)

    @torch.inference_mode()
    def embed_features(self, features: Features) -> np.ndarray:
        """Embeddings in input order; rows are length-sorted into padded-token batches."""
        out = np.zeros((len(features["lengths"]), self.dim), dtype=np.float32)  # zero-token rows stay zero
        skip = features.get("skip")
        for rows, input_ids, mask in padded_batches(features, self.batch_tokens, self.pad_id):
            ids_t = torch.from_numpy(input_ids).to(self.device)
            mask_t = torch.from_numpy(mask).to(self.device)
            hidden = self.transformer({"input_ids": ids_t, "attention_mask": mask_t})["token_embeddings"]
            skip_t = 0 if skip is None else torch.from_numpy(skip[rows]).to(self.device)
            pooled = torch.cat([pool(hidden, mask_t, mode, skip_t) for mode in self.pooling], dim=-1)
            out[rows] = self._head(pooled).float().cpu().numpy()
        return out

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        """The modules after pooling, on the float32 pooled vectors, as sentence-transformers runs them."""
        features = {"sentence_embedding": pooled}
        for module in self.head:
            features = module(features)
        return features["sentence_embedding"]

    def _tokenize(self, backend: Tokenizer, prompt: str) -> Tokenize:
        """The CPU half for one prompt; with ``include_prompt=False`` pooling skips the prompt's tokens."""
        skip = 0
        if prompt and not self.include_prompt:
            ids = backend.encode(prompt, add_special_tokens=True).ids
            special = set(getattr(self.tokenizer, "all_special_ids", ()))
            skip = len(ids) - (1 if ids and ids[-1] in special else 0)  # as sentence-transformers counts it
        return Tokenize(backend, add_special_tokens=True, prefix=prompt, skip=skip)


def load_st(
    path: str | Path,
    *,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    batch_tokens: int = 16384,
    max_length: int | None = None,
    nesting: Sequence[int] | str | None = None,
    trust_remote_code: bool = False,
    **_: Any,
) -> STEncoder:
    """A local sentence-transformers model directory as an ``STEncoder`` (never touches the hub).

    ``query_prompt`` / ``document_prompt`` override the directory's prompts; ``max_length`` its
    ``max_seq_length`` (capped by the model's position embeddings); ``nesting`` the dims it was
    trained at. On a GPU the transformer runs in
    bfloat16 with SDPA attention, on the CPU in float32 (``dtype`` overrides); pooling and the
    modules after it run in float32. The fingerprint covers every module's weights and config,
    ``modules.json``, the tokenizer files, the prompts, pooling and ``max_length``: the content,
    not the location, and not the device or dtype.
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "st: encoders load with the 'sentence-transformers' package: pip install 'mrl-embed[st]'"
        ) from exc

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"sentence-transformers model directory not found: {path}")
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"no modules.json in {path}: not a sentence-transformers directory (hf:{path}?)")
    # read (and hash) every weight file first: a corrupt one is a ValueError naming it
    digests = [*_directory_digests(path, _read_modules(path)), *tokenizer_texts(path)]
    device = pick_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model_kwargs: dict[str, Any] = {"dtype": dtype}
    if device.type == "cuda":
        model_kwargs["attn_implementation"] = "sdpa"
    try:
        model = SentenceTransformer(
            str(path), device=str(device), local_files_only=True, trust_remote_code=trust_remote_code,
            model_kwargs=model_kwargs,
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as exc:
        raise ValueError(f"cannot load the sentence-transformers model in {path}: {exc}") from exc
    transformer, pooling, head = _split_modules(list(model), path)
    modes = _pooling_modes(pooling)
    include_prompt = bool(getattr(pooling, "include_prompt", True))
    prompts = {k: v for k, v in (getattr(model, "prompts", None) or {}).items() if v}
    if query_prompt is None:
        query_prompt = prompts.get("query", "")
    if document_prompt is None:
        document_prompt = next((prompts[k] for k in DOCUMENT_PROMPTS if k in prompts), "")
    positions = getattr(transformer.auto_model.config, "max_position_embeddings", None)
    max_length = max_length or _max_seq_length(transformer)
    if isinstance(positions, int) and positions > 0:  # longer inputs would not fit the model
        max_length = min(max_length, positions)
    for module in head:  # pooled vectors are float32: so are the modules after pooling
        module.float()

    fingerprint = fingerprint_of(
        *digests,
        f"pooling={','.join(modes)}", f"include_prompt={include_prompt}",
        f"query_prompt={query_prompt!r}", f"document_prompt={document_prompt!r}", f"max_length={max_length}",
    )
    logger.debug("st:%s: pooling %s, max_length %d, prompts %r / %r",
                 path, modes, max_length, query_prompt, document_prompt)
    return STEncoder(
        transformer, head, transformer.tokenizer, name=f"st:{path.resolve()}", fingerprint=fingerprint,
        pooling=modes, include_prompt=include_prompt, query_prompt=query_prompt,
        document_prompt=document_prompt, batch_tokens=batch_tokens, max_length=max_length, nesting=nesting,
    )


def _read_modules(path: Path) -> list[dict[str, Any]]:
    """``modules.json``: one {idx, name, path, type} entry per module, in order."""
    file = path / "modules.json"
    try:
        entries = json.loads(file.read_text())
    except ValueError as exc:
        raise ValueError(f"cannot parse {file}: {exc}") from exc
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "type" in e for e in entries):
        raise ValueError(f"{file} must list modules as objects with a 'type'")
    return entries


def _split_modules(modules: list[nn.Module], path: Path) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    """(Transformer, Pooling, modules after pooling); a ValueError naming any other layout."""
    names = [type(m).__name__ for m in modules]
    at = next((i for i, m in enumerate(modules) if _is_pooling(m)), None)
    if at != 1 or not (hasattr(modules[0], "auto_model") and getattr(modules[0], "tokenizer", None) is not None):
        raise ValueError(
            f"{path} has modules {names}; st: embeds a Transformer (with a tokenizer) followed by a "
            f"Pooling module and any modules after pooling (Dense, Normalize, ...)"
        )
    return modules[0], modules[1], modules[2:]


def _is_pooling(module: nn.Module) -> bool:
    return hasattr(module, "pooling_mode") or any(hasattr(module, flag) for flag in _LEGACY_POOLING_FLAGS)


def _pooling_modes(pooling: nn.Module) -> tuple[str, ...]:
    """The Pooling module's modes, in the order it concatenates them."""
    mode = getattr(pooling, "pooling_mode", None)
    if mode is None:
        modes = tuple(m for flag, m in _LEGACY_POOLING_FLAGS.items() if getattr(pooling, flag, False))
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    bad = [m for m in modes if m not in POOLINGS]
    if not modes or bad:
        raise ValueError(f"unsupported pooling {list(modes)}; supported modes: {POOLINGS}")
    return modes


def _max_seq_length(transformer: nn.Module) -> int:
    """The Transformer's ``max_seq_length``, else its position-embedding count, else 512."""
    for limit in (getattr(transformer, "max_seq_length", None),
                  getattr(transformer.auto_model.config, "max_position_embeddings", None)):
        if isinstance(limit, int) and 0 < limit < 1_000_000:  # HF uses ~1e30 for "no limit"
            return limit
    return 512


def _backend_copy(tokenizer: Any, max_length: int, lower_case: bool) -> Tokenizer:
    """Our own copy of the fast tokenizer's backend: no padding, truncation to ``max_length``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("st: needs a fast (tokenizers-backed) tokenizer")
    backend = Tokenizer.from_str(backend.to_str())
    if lower_case:  # older sentence-transformers lower-case in Python; newer ones in the normaliser
        current = backend.normalizer
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *([current] if current else [])])
    backend.no_padding()
    backend.enable_truncation(max_length)
    return backend


def _directory_digests(path: Path, entries: list[dict[str, Any]]) -> Iterator[str]:
    """Per module in ``modules.json`` order: its type, its JSON configs (minus the fields a re-save
    changes) and a hash per stored tensor."""
    for entry in entries:
        folder = path / str(entry.get("path", ""))
        yield f"module {entry.get('idx')} {entry['type']} at {entry.get('path', '')!r}"
        for file in sorted(folder.glob("*.json")):
            if file.name in TOKENIZER_FILES:
                continue  # hashed as tokenizer files, byte for byte
            yield f"{file.name}:{config_text(file)}"
        if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
            yield fingerprint_of(*weight_digests(folder))
