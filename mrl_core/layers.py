"""The paper's nested classifier layer (MRL) and its weight-shared variant (MRL-E).

State-dict keys match the reference implementation's ``MRL_Linear_Layer``
(``nesting_classifier_{i}.weight`` / ``.bias``), so its checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mrl_core.nesting import NestingSpec


class NestedLinear(nn.Module):
    """One logits tensor per nesting dim m, each computed from the prefix ``z[:, :m]``.

    ``efficient=False`` (MRL): an independent ``nn.Linear(m, num_classes)`` per dim,
    ``nesting_classifier_{i}``.
    ``efficient=True`` (MRL-E): a single ``nn.Linear(full_dim, num_classes)``,
    ``nesting_classifier_0``, whose first m weight columns serve dim m, with one shared bias
    (or none when ``bias=False``).
    """

    def __init__(
        self,
        nesting: NestingSpec | Sequence[int],
        num_classes: int,
        efficient: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.nesting = NestingSpec.of(nesting)
        self.num_classes = int(num_classes)
        self.efficient = efficient
        if efficient:
            self.nesting_classifier_0 = nn.Linear(self.nesting.full_dim, num_classes, bias=bias)
        else:
            for i, m in enumerate(self.nesting.dims):
                setattr(self, f"nesting_classifier_{i}", nn.Linear(m, num_classes, bias=bias))

    def head(self, i: int) -> nn.Linear:
        """The ``nn.Linear`` that holds the weights of nesting dim number ``i``."""
        return getattr(self, f"nesting_classifier_{0 if self.efficient else i}")

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Logits [N, num_classes] for each nesting dim, in the order of ``nesting.dims``."""
        if z.shape[-1] < self.nesting.full_dim:
            raise ValueError(
                f"NestedLinear expects {self.nesting.full_dim}-dim features, got {z.shape[-1]}"
            )
        if not self.efficient:
            return [self.head(i)(z[:, :m]) for i, m in enumerate(self.nesting.dims)]
        shared = self.nesting_classifier_0
        return [
            nn.functional.linear(z[:, :m], shared.weight[:, :m], shared.bias)
            for m in self.nesting.dims
        ]

    def extra_repr(self) -> str:
        kind = "MRL-E" if self.efficient else "MRL"
        return f"{kind}, dims={list(self.nesting.dims)}, num_classes={self.num_classes}"
