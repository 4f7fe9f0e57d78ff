"""Hugging Face transformer encoders from a local checkpoint directory (AutoModel + AutoTokenizer).

Texts are tokenised without padding on the CPU; the device half sorts them by length, packs
batches to a padded-token budget (``padded_batches``), and pools the last hidden state with
``pooling.pool`` (mean over the attention mask, the first token, ...), as training's
``HFTextEncoder`` does. A checkpoint
exported by training carries ``mrl_encoder.json`` (pooling, max length, nesting dims), which
``load_hf`` follows unless told otherwise. Asymmetric models (e.g. nomic's ``search_query: `` /
``search_document: ``) get their prefixes here: ``encode`` embeds documents, ``encode_queries``
queries.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from mrl_core.encoders.base import (
    Features,
    TextEncoderBase,
    Tokenize,
    as_batch,
    budget_batches,
    check_dim,
    fingerprint_of,
    pick_device,
    take_dim,
)
from mrl_core.encoders.pooling import POOLINGS, pool
from mrl_core.nesting import NestingSpec

ENCODER_CONFIG = "mrl_encoder.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
)
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "__version__")
"""Config fields a re-save changes (library versions, source path, dtype): left out of fingerprints."""


class HFEncoder(TextEncoderBase):
    """A transformer whose pooled last hidden state is the embedding.

    ``preprocessor`` / ``query_preprocessor`` are the picklable CPU halves (a copy of the fast
    tokenizer's backend, truncating to ``max_length``, special tokens added, prefix prepended).
    A text with no tokens at all (an empty string under a tokenizer that adds no special tokens)
    encodes to the zero vector; where the tokenizer adds special tokens (BERT's [CLS] [SEP]) an
    empty string encodes to whatever the model gives for those.

    Args:
        model, tokenizer: a loaded ``transformers`` model and tokenizer, already on ``device``.
        name, fingerprint: recorded in dataset metadata (see ``load_hf``).
        pooling: one of ``pooling.POOLINGS``: "mean" (over the attention mask), "cls" (the first
            token), "max", "lasttoken", "weightedmean" or "mean_sqrt_len_tokens".
        query_prefix, document_prefix: prepended to queries / documents before tokenising.
        batch_tokens: padded tokens (rows x longest row) per forward pass.
        max_length: texts are truncated to this many tokens, special tokens included.
        nesting: the dims the model was trained at (default: doubling from 8).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        fingerprint: str,
        pooling: str = "mean",
        query_prefix: str = "",
        document_prefix: str = "",
        batch_tokens: int = 16384,
        max_length: int = 512,
        nesting: Sequence[int] | str | None = None,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.fingerprint = fingerprint
        self.pooling = pooling
        self.query_prefix = query_prefix
        self.document_prefix = document_prefix
        self.batch_tokens = int(batch_tokens)
        self.max_length = int(max_length)
        self.dim = int(model.config.hidden_size)
        self.nesting = NestingSpec.for_model(self.dim, nesting)
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{name} needs a fast (tokenizers-backed) tokenizer")
        backend = Tokenizer.from_str(backend.to_str())  # our own copy: truncation set once here
        backend.no_padding()
        backend.enable_truncation(self.max_length)
        # ``preprocess`` (documents) runs ``self.preprocessor``; pipelines ship it to CPU tasks
        self.preprocessor = Tokenize(backend, add_special_tokens=True, prefix=document_prefix)
        self.query_preprocessor = Tokenize(backend, add_special_tokens=True, prefix=query_prefix)

    def encode_queries(self, texts: Sequence[str] | str, dim: int | None = None) -> np.ndarray:
        """float32 [N, dim] embeddings of queries (the query prefix instead of the document one);
        one str gives one row, [1, dim]; ``dim``: the L2-normalised prefix, as ``encode``."""
        dim = check_dim(dim, self)
        return take_dim(self.embed_features(self.query_preprocessor(as_batch(texts))), dim)

    @torch.inference_mode()
    def embed_features(self, features: Features) -> np.ndarray:
        """Pooled embeddings in input order; rows are length-sorted into padded-token batches."""
        out = np.zeros((len(features["lengths"]), self.dim), dtype=np.float32)  # zero-token rows stay zero
        for rows, input_ids, mask in padded_batches(features, self.batch_tokens, self.pad_id):
            out[rows] = self._forward(input_ids, mask)
        return out

    def _forward(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        ids_t = torch.from_numpy(input_ids).to(self.device)
        mask_t = torch.from_numpy(mask).to(self.device)
        hidden = self.model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
        return pool(hidden, mask_t, self.pooling).cpu().numpy()


def padded_batches(
    features: Features, batch_tokens: int, pad_id: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(rows, input_ids [B, T], attention_mask [B, T]) batches of ragged token ids, right-padded.

    Rows are sorted by length and packed so that rows x longest row stays within
    ``batch_tokens`` (one longer row forms a batch on its own); rows with no tokens are left out.
    """
    ids, lengths = features["ids"], features["lengths"]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    nonempty = np.flatnonzero(lengths > 0)
    for batch in budget_batches(lengths[nonempty], batch_tokens, sort=True, padded=True):
        rows = nonempty[batch]
        width = int(lengths[rows].max())
        input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, r in enumerate(rows):
            n = int(lengths[r])
            input_ids[j, :n] = ids[offsets[r] : offsets[r] + n]
            mask[j, :n] = 1
        yield rows, input_ids, mask


def load_hf(
    path: str | Path,
    *,
    pooling: str | None = None,
    query_prefix: str = "",
    document_prefix: str = "",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    batch_tokens: int = 16384,
    max_length: int | None = None,
    nesting: Sequence[int] | str | None = None,
    trust_remote_code: bool = False,
    **_: Any,
) -> HFEncoder:
    """A local Hugging Face checkpoint directory as an ``HFEncoder`` (never touches the hub).

    On a GPU the model runs in bfloat16 with SDPA attention, on the CPU in float32 (``dtype``
    overrides). ``max_length`` is capped by the tokenizer's own limit. The fingerprint covers the
    stored weights (sorted by key), the config, the tokenizer files, pooling, prefixes and
    ``max_length``, so it does not depend on the device or dtype the model runs in.

    ``pooling`` (default mean), ``max_length`` (default 512) and ``nesting`` not given come from
    the directory's ``mrl_encoder.json`` when it has one (a training export).
    """
    from transformers import AutoModel, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in Hugging Face checkpoint directory {path}")
    saved = read_encoder_config(path)
    pooling = pooling or saved.get("pooling", "mean")
    max_length = max_length or saved.get("max_length", 512)
    nesting = nesting or saved.get("nesting_dims")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    weights_hash = fingerprint_of(*weight_digests(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load the tokenizer of {path}: {exc}") from exc
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:  # HF uses ~1e30 for "no limit"
        max_length = min(max_length, limit)

    device = pick_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    extra = {"attn_implementation": "sdpa"} if device.type == "cuda" else {}
    try:
        model = AutoModel.from_pretrained(
            path, local_files_only=True, dtype=dtype, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"cannot load the model in {path}: {exc}") from exc

    fingerprint = fingerprint_of(
        weights_hash, config_text(config_file), *tokenizer_texts(path),
        f"pooling={pooling}", f"query_prefix={query_prefix!r}",
        f"document_prefix={document_prefix!r}", f"max_length={max_length}",
    )
    return HFEncoder(
        model.to(device), tokenizer, name=f"hf:{path.resolve()}", fingerprint=fingerprint,
        pooling=pooling, query_prefix=query_prefix, document_prefix=document_prefix,
        batch_tokens=batch_tokens, max_length=max_length, nesting=nesting,
    )


def write_encoder_config(
    path: str | Path, pooling: str, max_length: int, nesting: Sequence[int]
) -> None:
    """Record how a checkpoint embeds (``mrl_encoder.json``) so that ``load_hf`` reproduces it."""
    config = {"pooling": pooling, "max_length": int(max_length), "nesting_dims": list(nesting)}
    (Path(path) / ENCODER_CONFIG).write_text(json.dumps(config, indent=2))


def read_encoder_config(path: Path) -> dict[str, Any]:
    """The checkpoint's ``mrl_encoder.json``, or {} for a plain checkpoint."""
    file = path / ENCODER_CONFIG
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text())
    except ValueError as exc:
        raise ValueError(f"cannot parse {file}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{file} holds {type(config).__name__}, expected an object")
    return config


def weight_digests(path: Path) -> Iterator[str]:
    """One hash per stored tensor of the weights in ``path`` (``*.safetensors``, else
    ``pytorch_model*.bin``), in sorted key order across shards; read lazily, one at a time.

    Reading every tensor also turns a corrupt weights file into a ValueError naming it.
    """
    files = sorted(path.glob("*.safetensors"))
    if not files:
        files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
    if files[0].suffix == ".safetensors":
        yield from _safetensors_digests(files)
        return
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            try:
                part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (pre-zip) files cannot be memory-mapped
                part = torch.load(file, map_location="cpu", weights_only=True)
            state.update(part)
        except Exception as exc:  # pickle, zip and torch errors alike
            raise ValueError(f"cannot read weights file {file}: {exc}") from exc
    for key in sorted(state):
        yield _tensor_digest(key, state[key])


def _safetensors_digests(files: list[Path]) -> Iterator[str]:
    with ExitStack() as stack:
        owner: dict[str, Any] = {}
        for file in files:
            try:
                handle = stack.enter_context(safe_open(str(file), framework="pt"))
            except (SafetensorError, OSError) as exc:
                raise ValueError(f"cannot read weights file {file}: {exc}") from exc
            owner.update(dict.fromkeys(handle.keys(), (file, handle)))
        for key in sorted(owner):
            file, handle = owner[key]
            try:
                tensor = handle.get_tensor(key)
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise ValueError(f"cannot read tensor {key!r} of weights file {file}: {exc}") from exc
            yield _tensor_digest(key, tensor)


def _tensor_digest(key: str, tensor: torch.Tensor) -> str:
    return fingerprint_of(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}", tensor.reshape(-1))


def config_text(config_file: Path) -> str:
    """A JSON config (config.json, ...), keys sorted, minus ``VOLATILE_CONFIG_KEYS``."""
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ValueError(f"cannot parse {config_file}: {exc}") from exc
    if isinstance(config, dict):
        for key in VOLATILE_CONFIG_KEYS:
            config.pop(key, None)
    return json.dumps(config, sort_keys=True)


def tokenizer_texts(path: Path) -> list[bytes | str]:
    """(name, bytes) of each tokenizer file in ``path`` (``TOKENIZER_FILES``), flattened."""
    return [p for name in TOKENIZER_FILES if (f := path / name).is_file() for p in (name, f.read_bytes())]
