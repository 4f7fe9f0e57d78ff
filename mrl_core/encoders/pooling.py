"""Pooling, one implementation for serving (the encoders) and training (``mrl_core.training``).

A trained model only embeds at serving time as it did in training if both pool the same way;
so both call these functions.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

POOLINGS = ("mean", "cls")
"""How a transformer's last hidden state becomes one vector: masked mean, or the first token."""


def token_bag_mean(
    ids: torch.Tensor, offsets: torch.Tensor, table: torch.Tensor, sparse: bool = False
) -> torch.Tensor:
    """Mean of each bag's token vectors: bag i is ``ids[offsets[i]:offsets[i + 1]]`` (the last
    runs to the end); an empty bag pools to zero. ``sparse``: sparse gradients for ``table``."""
    return F.embedding_bag(ids, table, offsets, mode="mean", sparse=sparse)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """float32 [N, D] from a last hidden state [N, T, D] and its attention mask [N, T]: the mean
    over the mask (``mean``; a row with no tokens pools to zero) or the first token (``cls``).

    Pooled in float32 whatever the model's dtype, so bfloat16 models sum without rounding.
    """
    if mode == "cls":
        return hidden[:, 0].float()
    if mode != "mean":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {mode!r}")
    m = mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)
