"""Nesting dims of a Matryoshka embedding: which prefixes are meaningful, slicing and re-normalising them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def default_dims(full_dim: int, start: int = 8) -> tuple[int, ...]:
    """Doubling dims from ``start`` up to ``full_dim``, the full dim always last (8, 16, ..., full)."""
    if full_dim < 1:
        raise ValueError(f"full_dim must be >= 1, got {full_dim}")
    dims = []
    m = start
    while m < full_dim:
        dims.append(m)
        m *= 2
    dims.append(full_dim)
    return tuple(dims)


@dataclass(frozen=True)
class NestingSpec:
    """The nested prefix dims of an embedding of size ``full_dim``; ``dims[-1] == full_dim``."""

    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        dims = tuple(int(d) for d in self.dims)
        if not dims:
            raise ValueError("nesting dims must not be empty")
        if any(d < 1 for d in dims):
            raise ValueError(f"nesting dims must be positive, got {list(dims)}")
        if any(b <= a for a, b in zip(dims, dims[1:])):
            raise ValueError(f"nesting dims must be strictly increasing, got {list(dims)}")
        object.__setattr__(self, "dims", dims)

    @classmethod
    def of(cls, nesting: NestingSpec | Iterable[int]) -> NestingSpec:
        """``nesting`` itself when it is a ``NestingSpec``, else the spec of those dims."""
        return nesting if isinstance(nesting, NestingSpec) else cls(tuple(nesting))

    @classmethod
    def for_model(cls, full_dim: int, dims: Iterable[int] | str | None = None) -> NestingSpec:
        """Nesting for a model of ``full_dim``: ``dims`` given (list or "16,64,256") or doubling from 8.

        The full dim is appended when missing; a dim above the model's dim is an error.
        """
        if dims is None:
            return cls(default_dims(full_dim))
        if isinstance(dims, str):
            try:
                dims = [int(d) for d in dims.split(",") if d.strip()]
            except ValueError as exc:
                raise ValueError(f"nesting dims must be comma-separated integers, got {dims!r}") from exc
        dims = sorted({int(d) for d in dims})
        too_big = [d for d in dims if d > full_dim]
        if too_big:
            raise ValueError(
                f"nesting dim(s) {too_big} exceed the model's embedding dim {full_dim}"
            )
        if not dims or dims[-1] != full_dim:
            dims.append(full_dim)
        return cls(tuple(dims))

    @property
    def full_dim(self) -> int:
        """The largest dim: the model's full embedding size."""
        return self.dims[-1]

    def __iter__(self):
        return iter(self.dims)

    def __len__(self) -> int:
        return len(self.dims)

    def prefixes(self, x: Array, normalize: bool = True) -> dict[int, Array]:
        """Every nested prefix of ``x`` [N, full_dim] as {dim: x[:, :dim]}, each re-normalised."""
        if x.shape[-1] < self.full_dim:
            raise ValueError(
                f"embedding has {x.shape[-1]} dims, fewer than the nesting's {self.full_dim}"
            )
        return {m: prefix(x, m, normalize=normalize) for m in self.dims}


def prefix(x: Array, dim: int, normalize: bool = True) -> Array:
    """The first ``dim`` coordinates of ``x`` (last axis), L2-normalised on their own if asked."""
    if not 1 <= dim <= x.shape[-1]:
        raise ValueError(f"prefix dim {dim} outside 1..{x.shape[-1]}")
    head = x[..., :dim]
    return l2_normalize(head) if normalize else head


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """Divide each row (last axis) by its L2 norm; an all-zero row stays zero.

    Works on numpy arrays and torch tensors alike; numpy input is computed in float32 or wider.
    """
    if isinstance(x, torch.Tensor):
        return torch.nn.functional.normalize(x, p=2.0, dim=-1, eps=eps)
    x = np.asarray(x)
    work = x.astype(np.float32) if x.dtype == np.float16 else x
    norms = np.linalg.norm(work, axis=-1, keepdims=True)
    return (work / np.maximum(norms, eps)).astype(x.dtype, copy=False)

