"""Matryoshka losses: the paper's nested classification loss and a nested InfoNCE.

Both take what the model produced once per batch (logits per dim, or full embeddings) and
sum a per-dim loss weighted by c_m; nothing here runs the encoder again per dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mrl_core.nesting import NestingSpec, prefix


def dim_weights(n: int, weights: Sequence[float] | None) -> torch.Tensor:
    """The loss weight c_m of each of ``n`` nesting dims as a float tensor (default 1 each)."""
    if weights is None:
        return torch.ones(n)
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} loss weights for {n} nesting dims")
    return torch.as_tensor(list(weights), dtype=torch.float32)


class MatryoshkaClassificationLoss(nn.Module):
    """sum_m c_m * CE(logits_m, y) over the per-dim logits of a ``NestedLinear``.

    ``weights`` are the c_m (default 1 each); ``label_smoothing`` passes through to cross-entropy.
    """

    def __init__(
        self,
        num_dims: int,
        weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_buffer("weights", dim_weights(num_dims, weights))
        self.label_smoothing = label_smoothing

    def per_dim(self, logits: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """The unweighted cross-entropy of each dim's logits, shape [num_dims]."""
        if len(logits) != len(self.weights):
            raise ValueError(f"got logits for {len(logits)} dims, loss built for {len(self.weights)}")
        return torch.stack(
            [
                nn.functional.cross_entropy(lg, target, label_smoothing=self.label_smoothing)
                for lg in logits
            ]
        )

    def forward(self, logits: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """The weighted sum over dims (a scalar)."""
        return (self.weights * self.per_dim(logits, target)).sum()


class MatryoshkaContrastiveLoss(nn.Module):
    """InfoNCE with in-batch negatives at every nesting prefix, each prefix re-normalised.

    Row i of ``queries`` is positive with row i of ``docs``; every other row of the batch is a
    negative. ``symmetric=True`` averages the query->doc and doc->query directions.
    """

    def __init__(
        self,
        nesting: NestingSpec | Sequence[int],
        temperature: float = 0.05,
        symmetric: bool = False,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.nesting = NestingSpec.of(nesting)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.symmetric = symmetric
        self.register_buffer("weights", dim_weights(len(self.nesting), weights))

    def per_dim(self, queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
        """The InfoNCE loss at each nesting prefix, shape [num_dims]."""
        if queries.shape != docs.shape:
            raise ValueError(f"queries {tuple(queries.shape)} and docs {tuple(docs.shape)} differ")
        labels = torch.arange(queries.shape[0], device=queries.device)
        losses = []
        for m in self.nesting.dims:
            sim = prefix(queries, m) @ prefix(docs, m).T / self.temperature
            loss = nn.functional.cross_entropy(sim, labels)
            if self.symmetric:
                loss = (loss + nn.functional.cross_entropy(sim.T, labels)) / 2
            losses.append(loss)
        return torch.stack(losses)

    def forward(self, queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
        """The weighted sum over prefixes (a scalar)."""
        return (self.weights * self.per_dim(queries, docs)).sum()
