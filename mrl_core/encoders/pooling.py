"""Pooling, one implementation for serving (the encoders) and training (``mrl_core.training``).

A trained model only embeds at serving time as it did in training if both pool the same way;
so both call these functions. The modes are sentence-transformers' ``Pooling`` modes, computed
as it computes them, so ``st:`` directories embed here as ``SentenceTransformer.encode`` does.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

POOLINGS = ("mean", "cls", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens")
"""How a transformer's last hidden state becomes one vector: masked mean, the first token, the
per-dim max, the last token, the mean weighted by position (1, 2, ...), or the sum over sqrt(length)."""


def token_bag_mean(
    ids: torch.Tensor, offsets: torch.Tensor, table: torch.Tensor, sparse: bool = False
) -> torch.Tensor:
    """Mean of each bag's token vectors: bag i is ``ids[offsets[i]:offsets[i + 1]]`` (the last
    runs to the end); an empty bag pools to zero. ``sparse``: sparse gradients for ``table``."""
    return F.embedding_bag(ids, table, offsets, mode="mean", sparse=sparse)


def pool(
    hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean", skip: torch.Tensor | int = 0
) -> torch.Tensor:
    """float32 [N, D] from a last hidden state [N, T, D] and its attention mask [N, T].

    ``mode`` is one of ``POOLINGS``. ``skip`` [N] (or one int): leading tokens of each row left
    out of the pool (a prompt that the model pools without, sentence-transformers'
    ``include_prompt=False``); ``weightedmean`` still counts positions from each row's first token.
    A row with no tokens left pools to zero. Pooled in float32 whatever the model's dtype, so
    bfloat16 models sum without rounding. Left- or right-padded masks both work.
    """
    if mode not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {mode!r}")
    hidden = hidden.float()
    mask = mask.bool()
    width = mask.shape[1]
    first = mask.int().argmax(dim=1, keepdim=True)  # each row's first token (after any left padding)
    position = torch.arange(width, device=mask.device).unsqueeze(0) - first  # 0 at the first token
    keep = mask & (position >= torch.as_tensor(skip, device=mask.device).reshape(-1, 1))
    any_kept = keep.any(dim=1, keepdim=True)
    if mode in ("cls", "lasttoken"):
        at = keep.int().argmax(dim=1) if mode == "cls" else width - 1 - keep.int().flip(1).argmax(dim=1)
        picked = hidden[torch.arange(len(hidden), device=hidden.device), at]
        return picked * any_kept
    if mode == "max":
        masked = hidden.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(dim=1)
        return torch.where(any_kept, masked, torch.zeros_like(masked))
    weights = keep.float()
    if mode == "weightedmean":
        weights = weights * (position + 1).float()
    total = (hidden * weights.unsqueeze(-1)).sum(1)
    count = weights.sum(1, keepdim=True)
    if mode == "mean_sqrt_len_tokens":
        return total / count.clamp(min=1.0).sqrt()
    return total / count.clamp(min=1.0)
