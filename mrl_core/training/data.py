"""Training data: datasets and collate functions for each encoder, the WebDataset image stream,
labels and splits. Inputs are read by the modules serving reads them with: tables by
``sources.read_table``, tar shards by ``mrl_core.webdataset``, images by ``encoders.images``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from mrl_core.encoders.images import decode_image, eval_crop, to_normalized
from mrl_core.sources import list_shards
from mrl_core.webdataset import image_field, stream_samples

LABEL_FIELDS = ("cls", "json")

# ---------------------------------------------------------------------------------------------
# text


class TokenDataset(Dataset):
    """Tokenised texts (ragged id arrays) with integer labels."""

    def __init__(self, ids: Sequence[np.ndarray], labels: np.ndarray) -> None:
        if len(ids) != len(labels):
            raise ValueError(f"{len(ids)} texts but {len(labels)} labels")
        self.ids, self.labels = list(ids), np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.ids[i], int(self.labels[i])


def ragged_rows(features: dict[str, np.ndarray], max_len: int | None = None) -> list[np.ndarray]:
    """Tokeniser output (flat ``ids`` + ``lengths``) as one id array per text, cut to
    ``max_len`` tokens."""
    offsets = np.concatenate([[0], np.cumsum(features["lengths"])])
    ids = features["ids"]
    rows = [ids[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return [r[:max_len] for r in rows] if max_len else rows


def collate_bag(rows: Sequence[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
    """Token rows to ``{"ids", "offsets", "labels"}`` for ``TokenBagEncoder`` (a text without
    tokens is an empty bag: it pools to zero, as ``static:`` embeds it)."""
    lengths = np.fromiter((len(r[0]) for r in rows), dtype=np.int64, count=len(rows))
    ids = np.concatenate([np.asarray(r[0], dtype=np.int64) for r in rows])
    return {
        "ids": torch.from_numpy(ids),
        "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]])),
        "labels": torch.tensor([r[1] for r in rows], dtype=torch.int64),
    }


def collate_padded(
    pad_id: int = 0,
) -> Callable[[Sequence[tuple[np.ndarray, int]]], dict[str, torch.Tensor]]:
    """Token rows to padded ``{"input_ids", "attention_mask", "labels"}`` for transformers."""

    def collate(rows: Sequence[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
        width = max(1, max(len(r[0]) for r in rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for j, (t, _) in enumerate(rows):
            ids[j, : len(t)] = torch.as_tensor(t, dtype=torch.int64)
            mask[j, : len(t)] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([r[1] for r in rows], dtype=torch.int64)}

    return collate


# ---------------------------------------------------------------------------------------------
# images


class ImageDataset(Dataset):
    """Encoded images (bytes) with integer labels, decoded and transformed on access."""

    def __init__(self, images: Sequence[bytes], labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = list(images), np.asarray(labels), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(decode_image(self.images[i])), int(self.labels[i])


def image_transform(size: int = 224, train: bool = True) -> Callable:
    """PIL image -> normalised [3, size, size]: random-resized crop and flip to train; to
    evaluate, the serving encoder's resize and center crop (``encoders.images``)."""
    from torchvision import transforms as T

    if train:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), to_normalized])
    return T.Compose([partial(eval_crop, size=size), to_normalized])


def collate_images(rows: Sequence[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """Image rows to ``{"pixels", "labels"}``."""
    return {"pixels": torch.stack([r[0] for r in rows]),
            "labels": torch.tensor([r[1] for r in rows], dtype=torch.int64)}


def image_bytes(values: list[Any]) -> list[bytes]:
    """A Parquet image column's values as bytes (``{"bytes": ...}`` structs unwrapped)."""
    return [v["bytes"] if isinstance(v, dict) else v for v in values]


class WebDatasetStream(IterableDataset):
    """Images streamed from WebDataset tar shards: ``<key>.jpg|png|...`` beside ``<key>.cls``
    (an integer) or ``<key>.json`` (``{"label": ...}``).

    Shards are split over Ray workers (``rank``/``world_size``) and DataLoader workers, and
    shuffled per epoch (``set_epoch``); ``label_index`` maps raw labels to class numbers.
    ``samples``: the shards' sample count (``scan_shards``), which sizes the LR schedule.
    """

    def __init__(
        self,
        shards: Sequence[str],
        transform: Callable,
        label_index: dict[str, int],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        samples: int | None = None,
    ) -> None:
        self.shards, self.transform, self.label_index = list(shards), transform, label_index
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.samples = samples

    @property
    def samples_per_epoch(self) -> int | None:
        """Samples one worker (rank) sees per epoch, on average; None when not counted."""
        return None if self.samples is None else self.samples // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.shards))
        mine = [self.shards[i] for i in order[self.rank :: self.world_size]]
        info = torch.utils.data.get_worker_info()
        if info is not None:
            mine = mine[info.id :: info.num_workers]
        for shard in mine:
            for image, label in iter_webdataset(shard):
                yield self.transform(decode_image(image)), self.label_index[str(label)]


def iter_webdataset(shard: str) -> Iterator[tuple[bytes, Any]]:
    """(image bytes, raw label) per sample of one WebDataset tar (local path or fsspec URL);
    samples without an image are skipped."""
    for key, fields in stream_samples(shard):
        ext = image_field(fields)
        if ext is not None:
            yield fields[ext], _label(fields, shard, key)


def scan_shards(shards: Sequence[str]) -> tuple[dict[str, int], set[str]]:
    """One pass over the shards reading only labels: each shard's count of labelled images (as
    ``iter_webdataset`` yields them), and every raw label seen (as str)."""
    counts, labels = {}, set()
    for shard in shards:
        counts[shard] = 0
        for key, fields in stream_samples(shard, read=lambda ext: ext in LABEL_FIELDS):
            if image_field(fields) is not None:
                labels.add(str(_label(fields, shard, key)))
                counts[shard] += 1
    return counts, labels


def _label(fields: dict[str, bytes | None], shard: str, key: str) -> Any:
    if fields.get("cls") is not None:
        return fields["cls"].decode().strip()
    if fields.get("json") is not None:
        return json.loads(fields["json"]).get("label")
    raise ValueError(f"sample {key} in {shard} has no .cls or .json label")


def is_webdataset(uri: str) -> bool:
    """Whether ``uri`` names WebDataset shards: a .tar, a brace pattern, or a directory of tars."""
    return uri.rstrip("/").endswith(".tar") or "{" in uri or (
        os.path.isdir(uri) and any(p.suffix == ".tar" for p in Path(uri).iterdir())
    )


def expand_shards(uri: str) -> list[str]:
    """The WebDataset shards ``uri`` names, listed as the embed job lists its input
    (``mrl_core.sources.list_shards``): a tar, a directory's tars, globs and brace patterns
    (``x-{000..009}.tar``, ``{train,extra}/*.tar``); a directory's other files are left out."""
    shards = list_shards(uri)
    named_directly = "{" not in uri and not any(c in uri for c in "*?[") and not os.path.isdir(uri)
    return [s.uri for s in shards if named_directly or s.uri.endswith(".tar")]


# ---------------------------------------------------------------------------------------------
# adaptor batches


class NeighbourDataset(Dataset):
    """Anchors for adaptor training: row i yields its index; the collate gathers embeddings."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def collate_neighbours(
    embeddings: torch.Tensor,
    neighbours: torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
) -> Callable[[Sequence[int]], dict[str, torch.Tensor]]:
    """Anchor indices to ``{"anchor" [B, d], "neighbours" [B, K, d]}`` (normalised base
    embeddings), plus a random batch of ``pairs`` when given."""
    gen = torch.Generator().manual_seed(seed)

    def collate(rows: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(rows), dtype=torch.int64)
        out = {"anchor": embeddings[idx], "neighbours": embeddings[neighbours[idx]]}
        if pairs is not None:
            pick = torch.randint(len(pairs[0]), (len(idx),), generator=gen)
            out["pair_query"], out["pair_doc"] = pairs[0][pick], pairs[1][pick]
        return out

    return collate


# ---------------------------------------------------------------------------------------------
# labels and splits


def label_index(labels: Sequence[Any]) -> dict[str, int]:
    """Raw labels to class numbers, in sorted order of their string form."""
    return {lbl: i for i, lbl in enumerate(sorted({str(x) for x in labels}))}


def split_rows(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random (train, val) split of ``range(n)``."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])
