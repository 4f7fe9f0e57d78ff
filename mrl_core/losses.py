"""Matryoshka losses: the paper's nested classification loss, a nested InfoNCE, and the
neighbourhood distillation that trains a Matryoshka adaptor.

Each is a ``MatryoshkaLoss``: it takes what the model produced once per batch (logits per dim,
or full embeddings), computes one loss per nesting dim (``per_dim``) and sums them weighted by
c_m; nothing here runs the encoder again per dim. Dims and weights are validated once, in the
base class (as sentence-transformers' ``MatryoshkaLoss`` wraps any loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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


def _positive_temperature(temperature: float) -> float:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


class MatryoshkaLoss(nn.Module):
    """sum_m c_m * loss_m over the nesting dims: subclasses compute ``per_dim`` (shape
    [num_dims]); ``forward`` is its weighted sum. ``weights`` are the c_m (default 1 each)."""

    def __init__(self, num_dims: int, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("weights", dim_weights(num_dims, weights))

    def per_dim(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The unweighted loss at each nesting dim, shape [num_dims]."""
        raise NotImplementedError

    def weighted_sum(self, per_dim: torch.Tensor) -> torch.Tensor:
        """sum_m c_m * per_dim[m]: the scalar to minimise."""
        return (self.weights * per_dim).sum()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The weighted sum over dims (a scalar); arguments as for ``per_dim``."""
        return self.weighted_sum(self.per_dim(*inputs))

    def get_config_dict(self) -> dict[str, Any]:
        """The settings that define the loss (for logs and checkpoints)."""
        return {"weights": self.weights.tolist()}


class MatryoshkaClassificationLoss(MatryoshkaLoss):
    """sum_m c_m * CE(logits_m, y) over the per-dim logits of a ``NestedLinear``.

    ``weights`` are the c_m (default 1 each); ``label_smoothing`` passes through to cross-entropy.
    """

    def __init__(
        self,
        num_dims: int,
        weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(num_dims, weights)
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

    def get_config_dict(self) -> dict[str, Any]:
        """The settings that define the loss."""
        return {**super().get_config_dict(), "label_smoothing": self.label_smoothing}


class MatryoshkaContrastiveLoss(MatryoshkaLoss):
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
        self.nesting = NestingSpec.of(nesting)
        super().__init__(len(self.nesting), weights)
        self.temperature = _positive_temperature(temperature)
        self.symmetric = symmetric

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

    def get_config_dict(self) -> dict[str, Any]:
        """The settings that define the loss."""
        return {**super().get_config_dict(), "dims": list(self.nesting.dims),
                "temperature": self.temperature, "symmetric": self.symmetric}


class NeighbourhoodLoss(MatryoshkaLoss):
    """Matryoshka neighbourhood distillation: KL(full-dim teacher || prefix student) per dim.

    For anchor i with candidates C_i (its mined full-dim neighbours, then every other anchor of
    the batch), the teacher is softmax(base cosine(i, C_i) / ``temperature``) and the student at
    prefix m is softmax(cosine of the re-normalised m-prefixes * s_m), with a learnt scale s_m
    per dim (prefix similarities live on a different scale than full-dim ones).
    """

    def __init__(
        self,
        nesting: NestingSpec | Sequence[int],
        temperature: float = 0.1,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.nesting = NestingSpec.of(nesting)
        super().__init__(len(self.nesting), weights)
        self.temperature = _positive_temperature(temperature)
        self.log_scale = nn.Parameter(torch.full((len(self.nesting),), math.log(1 / temperature)))

    @staticmethod
    def _logits(anchor: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """[B, K + B] similarities: each anchor with its K neighbours, then with every anchor
        (itself masked out)."""
        own = torch.einsum("bd,bkd->bk", anchor, neighbours)
        batch = anchor @ anchor.T
        self_pairs = torch.eye(len(anchor), dtype=torch.bool, device=anchor.device)
        batch = batch.masked_fill(self_pairs, -1e4)
        return torch.cat([own, batch], 1)

    def per_dim(
        self,
        base_anchor: torch.Tensor,
        base_neighbours: torch.Tensor,
        anchor: torch.Tensor,
        neighbours: torch.Tensor,
    ) -> torch.Tensor:
        """The KL at each nesting dim, shape [num_dims].

        ``base_*``: normalised base embeddings, anchors [B, d] and neighbours [B, K, d];
        ``anchor``/``neighbours``: the adaptor's outputs for the same rows.
        """
        teacher = torch.softmax(self._logits(base_anchor, base_neighbours) / self.temperature, 1)
        out = []
        for j, m in enumerate(self.nesting.dims):
            a = nn.functional.normalize(anchor[:, :m], dim=-1)
            n = nn.functional.normalize(neighbours[..., :m], dim=-1)
            student = self._logits(a, n) * self.log_scale[j].exp()
            out.append(
                nn.functional.kl_div(student.log_softmax(1), teacher, reduction="batchmean")
            )
        return torch.stack(out)

    def get_config_dict(self) -> dict[str, Any]:
        """The settings that define the loss."""
        return {**super().get_config_dict(), "dims": list(self.nesting.dims),
                "temperature": self.temperature}
