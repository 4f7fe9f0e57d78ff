"""The models that train: encoders (batch -> [N, D] features) and ``NestedClassifier``, an
encoder with nested heads. Pooling is the serving encoders' own (``encoders.pooling``), so an
export embeds as the trained model did.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from mrl_core.encoders.pooling import POOLINGS, pool, token_bag_mean
from mrl_core.layers import NestedLinear
from mrl_core.nesting import NestingSpec


class TokenBagEncoder(nn.Module):
    """Mean of a text's token vectors, optionally through a linear projection to ``out_dim``:
    the static token-embedding encoder (``StaticEncoder``), trainable end to end.
    ``sparse=True`` gives the table sparse gradients (``fit`` then updates it with SparseAdam,
    touching only the rows of a batch: much faster on a CPU; DDP needs the gloo backend).

    Batches: ``{"ids": flat int64 token ids, "offsets": start of each text}``.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        out_dim: int | None = None,
        table: np.ndarray | None = None,
        freeze_table: bool = False,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        # an EmbeddingBag holds the table: ``fit`` finds sparse parameters by its ``sparse``
        self.bag = nn.EmbeddingBag(vocab_size, dim, mode="mean", sparse=sparse)
        if table is not None:
            with torch.no_grad():
                self.bag.weight.copy_(torch.as_tensor(np.asarray(table, dtype=np.float32)))
        else:
            nn.init.normal_(self.bag.weight, std=dim**-0.5)
        self.bag.weight.requires_grad_(not freeze_table)
        self.proj = nn.Linear(dim, out_dim) if out_dim is not None else None
        self.out_dim = out_dim or dim

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = token_bag_mean(batch["ids"], batch["offsets"], self.bag.weight, self.bag.sparse)
        return self.proj(pooled) if self.proj is not None else pooled

    @torch.no_grad()
    def folded_table(self) -> np.ndarray:
        """The table with the projection folded in (the mean commutes with a linear map), so the
        trained encoder is a plain static table: ``static:`` loads it."""
        w = self.bag.weight.float()
        if self.proj is not None:
            w = w @ self.proj.weight.T + self.proj.bias
        return w.cpu().numpy()


class HFTextEncoder(nn.Module):
    """A Hugging Face transformer pooled as ``hf:`` pools it (``pooling``: mean or cls).

    Batches: ``{"input_ids", "attention_mask"}`` padded [N, T].
    """

    def __init__(self, model: nn.Module, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model = model
        self.pooling = pooling
        self.out_dim = int(model.config.hidden_size)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=mask)
        return pool(hidden.last_hidden_state, mask, self.pooling)


class ImageBackbone(nn.Module):
    """A torchvision or timm image model with its classifier removed: pooled features.

    ``name``: ``resnet50`` (or any torchvision model with an ``fc``: ``torchvision:resnet18``)
    or ``timm:<model>`` (needs the ``timm`` package). Batches: ``{"pixels": [N, 3, H, W]}``.
    """

    def __init__(self, name: str = "resnet50", pretrained_path: str | None = None) -> None:
        super().__init__()
        self.name = name
        if name.startswith("timm:"):
            self.net, self.out_dim = _timm_model(name)
        else:
            self.net, self.out_dim = _torchvision_model(name)
        if pretrained_path:
            state = torch.load(pretrained_path, map_location="cpu", weights_only=True)
            state = {k.removeprefix("module."): v for k, v in state.items()
                     if not k.startswith("fc.")}
            self.net.load_state_dict(state, strict=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch["pixels"])


def _timm_model(name: str) -> tuple[nn.Module, int]:
    try:
        import timm
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"backbone {name!r} needs timm: pip install timm") from exc
    net = timm.create_model(name[5:], pretrained=False, num_classes=0)
    return net, int(net.num_features)


def _torchvision_model(name: str) -> tuple[nn.Module, int]:
    import torchvision.models as tvm

    arch = name.split(":", 1)[1] if name.startswith("torchvision:") else name
    if not hasattr(tvm, arch):
        raise ValueError(f"unknown torchvision model {arch!r}")
    net = getattr(tvm, arch)(weights=None)
    if not hasattr(net, "fc"):
        raise ValueError(f"torchvision model {arch!r} has no fc layer to replace")
    out_dim = int(net.fc.in_features)
    net.fc = nn.Identity()
    return net, out_dim


class Projection(nn.Module):
    """A linear map of an encoder's features to ``out_dim`` (``--embed-dim``)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)


class NestedClassifier(nn.Module):
    """An encoder module (batch -> [N, D] features) and a ``NestedLinear`` head on its output."""

    def __init__(
        self,
        encoder: nn.Module,
        nesting: NestingSpec | Sequence[int],
        num_classes: int,
        efficient: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = NestedLinear(nesting, num_classes, efficient=efficient)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(embeddings [N, D], one logits tensor per nesting dim)."""
        z = self.encoder(batch)
        return z, self.head(z)
