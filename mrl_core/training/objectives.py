"""Training objectives: modules whose forward maps a batch to (total loss, loss per nesting dim),
so that one loop (``fit``) trains any of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mrl_core.adaptor import MatryoshkaAdaptor
from mrl_core.losses import (
    MatryoshkaClassificationLoss,
    MatryoshkaContrastiveLoss,
    NeighbourhoodLoss,
)
from mrl_core.training.modules import NestedClassifier


class ClassifierObjective(nn.Module):
    """The Matryoshka classification loss of a ``NestedClassifier`` on labelled batches."""

    def __init__(
        self,
        model: NestedClassifier,
        weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss = MatryoshkaClassificationLoss(
            len(model.head.nesting), weights=weights, label_smoothing=label_smoothing
        )

    @property
    def dims(self) -> tuple[int, ...]:
        return self.model.head.nesting.dims

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        _, logits = self.model(batch)
        per_dim = self.loss.per_dim(logits, batch["labels"])
        return self.loss.weighted_sum(per_dim), per_dim


class AdaptorObjective(nn.Module):
    """``NeighbourhoodLoss`` of a ``MatryoshkaAdaptor``, plus ``contrastive_weight`` times the
    Matryoshka InfoNCE on (query, document) base-embedding pairs when batches carry them."""

    def __init__(
        self,
        adaptor: MatryoshkaAdaptor,
        temperature: float = 0.1,
        weights: Sequence[float] | None = None,
        contrastive_weight: float = 0.0,
        contrastive_temperature: float = 0.05,
    ) -> None:
        super().__init__()
        self.adaptor = adaptor
        self.loss = NeighbourhoodLoss(adaptor.nesting, temperature, weights)
        self.contrastive_weight = contrastive_weight
        self.contrastive = MatryoshkaContrastiveLoss(
            adaptor.nesting, temperature=contrastive_temperature, weights=weights
        )

    @property
    def dims(self) -> tuple[int, ...]:
        return self.adaptor.nesting.dims

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        anchor, neighbours = batch["anchor"], batch["neighbours"]
        b, k, d = neighbours.shape
        y = self.adaptor(torch.cat([anchor, neighbours.reshape(b * k, d)]))
        per_dim = self.loss.per_dim(anchor, neighbours, y[:b], y[b:].reshape(b, k, d))
        total = self.loss.weighted_sum(per_dim)
        if self.contrastive_weight > 0 and "pair_query" in batch:
            q = self.adaptor(batch["pair_query"])
            p = self.adaptor(batch["pair_doc"])
            c = self.contrastive.per_dim(q, p)
            per_dim = per_dim + self.contrastive_weight * c
            total = total + self.contrastive_weight * self.contrastive.weighted_sum(c)
        return total, per_dim
