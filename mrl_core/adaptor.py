"""A Matryoshka adaptor: a learned map on top of any embedding model so that its prefixes nest.

The adaptor maps the base model's L2-normalised embedding x (dim d) to y = R x (+ MLP(x)), where
R is a d x d orthogonal matrix (initialised from PCA) and the optional residual MLP starts at
zero. With ``kind="orthogonal"`` every inner product is kept, so full-dim neighbours stay exactly
the base model's and only the order of information across coordinates changes; ``"linear"``
frees R and ``"mlp"`` adds the residual, trading exact full-dim neighbours for better prefixes.

It is trained (``mrl_core.training.train_adaptor``) with ``mrl_core.losses.NeighbourhoodLoss``: at each nesting
prefix the softmax over candidate similarities (each anchor's full-dim nearest neighbours plus
the other anchors of the batch) should match the base model's full-dim softmax.

Saved as a directory: ``adaptor.safetensors`` and ``adaptor.json`` (base encoder spec, nesting
dims, kind). ``get_encoder("adaptor:/dir")`` composes it with its base encoder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mrl_core.nesting import NestingSpec, l2_normalize
from mrl_core.search import exact_search

CONFIG_FILE = "adaptor.json"
WEIGHTS_FILE = "adaptor.safetensors"
KINDS = ("orthogonal", "linear", "mlp")
FORMAT_VERSION = 1


class MatryoshkaAdaptor(nn.Module):
    """y = R x, plus a zero-initialised residual MLP(x) for ``kind="mlp"``.

    ``R`` is kept orthogonal (a torch parametrization) for ``kind`` "orthogonal" and "mlp", and
    is free for "linear". Call ``set_rotation`` to initialise it, e.g. from ``pca_rotation``.
    """

    def __init__(
        self,
        dim: int,
        nesting: NestingSpec | Sequence[int],
        kind: str = "orthogonal",
        hidden: int = 512,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"adaptor kind must be one of {KINDS}, got {kind!r}")
        self.nesting = NestingSpec.of(nesting)
        if self.nesting.full_dim != dim:
            raise ValueError(f"nesting ends at {self.nesting.full_dim}, the adaptor's dim is {dim}")
        self.dim, self.kind, self.hidden = int(dim), kind, int(hidden)
        self.rotation = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.rotation.weight)
        if kind != "linear":
            nn.utils.parametrizations.orthogonal(self.rotation)
        self.mlp = None
        if kind == "mlp":
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    @torch.no_grad()
    def set_rotation(self, rotation: np.ndarray | torch.Tensor) -> None:
        """Set R so that y = x @ rotation (columns: the new coordinates, e.g. PCA directions)."""
        r = torch.as_tensor(np.asarray(rotation), dtype=torch.float32)
        if r.shape != (self.dim, self.dim):
            raise ValueError(f"rotation must be [{self.dim}, {self.dim}], got {tuple(r.shape)}")
        if self.kind == "linear":
            self.rotation.weight.copy_(r.T)
        else:  # the orthogonal parametrization maps an assigned orthogonal matrix to its own
            self.rotation.weight = r.T.contiguous()

    def matrix(self) -> torch.Tensor:
        """The current R as a [d, d] matrix acting on rows: y = x @ matrix() (+ MLP)."""
        return self.rotation.weight.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapted embedding of base embeddings ``x`` [N, d] (normalised by the caller)."""
        y = x @ self.matrix()
        if self.mlp is not None:
            y = y + self.mlp(x)
        return y

    def config(self) -> dict[str, Any]:
        """What ``adaptor.json`` records about the module itself."""
        return {"dim": self.dim, "dims": list(self.nesting.dims), "kind": self.kind,
                "hidden": self.hidden}

    def plain_state(self) -> dict[str, torch.Tensor]:
        """The weights without the parametrization's internals: ``matrix`` and the MLP's."""
        out = {"matrix": self.matrix().detach().contiguous().clone()}
        if self.mlp is not None:
            out.update({f"mlp.{k}": v.detach().clone() for k, v in self.mlp.state_dict().items()})
        return out

    @classmethod
    def from_plain_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> MatryoshkaAdaptor:
        """Rebuild from ``config()`` and ``plain_state()``."""
        module = cls(config["dim"], config["dims"], config["kind"], config.get("hidden", 512))
        matrix = state["matrix"].float()
        if module.kind == "linear":
            module.set_rotation(matrix)
        else:
            # re-orthogonalise: float round-off must not make the parametrization refuse it
            u, _, vh = torch.linalg.svd(matrix.double())
            module.set_rotation((u @ vh).float())
        if module.mlp is not None:
            module.mlp.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("mlp.")})
        return module


def mine_neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` nearest rows [N, k] of every row of ``x`` by cosine, itself left out (exact)."""
    x = l2_normalize(np.asarray(x, dtype=np.float32))
    _, ids = exact_search(x, x, k, exclude=np.arange(len(x)))
    return ids


# ---------------------------------------------------------------------------------------------
# saving and loading


def save_adaptor(
    adaptor: MatryoshkaAdaptor,
    path: str | Path,
    base: str,
    base_fingerprint: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``adaptor.safetensors`` and ``adaptor.json`` (naming the ``base`` encoder spec)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(adaptor.plain_state(), str(path / WEIGHTS_FILE))
    config = {
        "format_version": FORMAT_VERSION,
        "base": base,
        "base_fingerprint": base_fingerprint,
        **adaptor.config(),
        "extra": extra or {},
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


def read_adaptor(path: str | Path) -> tuple[MatryoshkaAdaptor, dict[str, Any]]:
    """The adaptor module and its ``adaptor.json`` from a saved directory."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a saved adaptor (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    config = json.loads(config_file.read_text())
    if config.get("format_version", 1) > FORMAT_VERSION:
        raise ValueError(f"{path} was saved by a newer adaptor format {config['format_version']}")
    module = MatryoshkaAdaptor.from_plain_state(config, load_file(str(weights_file)))
    return module.eval(), config


class AdaptedEncoder:
    """An ``Encoder``: the base encoder's embedding, normalised, through a Matryoshka adaptor.

    ``preprocess`` (and ``preprocessor``, where the base has one) is the base's CPU half;
    ``embed_features`` runs the base's device half and then the adaptor.
    """

    def __init__(
        self,
        base: Any,
        adaptor: MatryoshkaAdaptor,
        name: str,
        fingerprint: str,
        nesting: NestingSpec,
        device: torch.device | None = None,
    ) -> None:
        if base.dim != adaptor.dim:
            raise ValueError(f"adaptor is {adaptor.dim}-dim, its base encoder {base.dim}-dim")
        self.base = base
        self.adaptor = adaptor.eval()
        self.name = name
        self.fingerprint = fingerprint
        self.dim = adaptor.dim
        self.nesting = nesting
        self.modality = base.modality
        self.device = device or getattr(base, "device", torch.device("cpu"))
        self.adaptor.to(self.device)
        if getattr(base, "preprocessor", None) is not None:
            self.preprocessor = base.preprocessor

    def preprocess(self, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
        """The base encoder's CPU work (tokenise, decode)."""
        return self.base.preprocess(inputs)

    @torch.inference_mode()
    def adapt(self, embeddings: np.ndarray) -> np.ndarray:
        """The adaptor applied to base embeddings [N, d] (normalised here first)."""
        x = torch.from_numpy(l2_normalize(np.asarray(embeddings, dtype=np.float32)))
        return self.adaptor(x.to(self.device)).float().cpu().numpy()

    def embed_features(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """float32 [N, d]: the base's embedding of a preprocessed batch, adapted."""
        return self.adapt(self.base.embed_features(features))

    def encode(self, inputs: Sequence[Any] | Any, dim: int | None = None) -> np.ndarray:
        """float32 [N, d] adapted embeddings of ``inputs`` (one str or bytes: one row, [1, d]);
        ``dim``: the L2-normalised first ``dim`` coordinates instead."""
        from mrl_core.encoders.base import as_batch, check_dim, take_dim

        dim = check_dim(dim, self)
        return take_dim(self.embed_features(self.preprocess(as_batch(inputs))), dim)

    def encode_queries(self, inputs: Sequence[Any] | Any, dim: int | None = None) -> np.ndarray:
        """Like ``encode``, through the base's ``encode_queries`` (its query prompt) where it has
        one: an adaptor over an asymmetric model embeds queries as that model does."""
        from mrl_core.encoders.base import check_dim, take_dim

        dim = check_dim(dim, self)
        if not hasattr(self.base, "encode_queries"):
            return self.encode(inputs, dim)
        return take_dim(self.adapt(self.base.encode_queries(inputs)), dim)


def load_adaptor(
    path: str | Path,
    nesting: Sequence[int] | str | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> AdaptedEncoder:
    """``get_encoder("adaptor:PATH")``: the saved adaptor composed with the base it names.

    Keyword options (``device``, ``dtype``, ...) go to the base encoder's loader; ``nesting``
    overrides the dims the adaptor was trained at. Refuses a base whose weights changed since
    training (its fingerprint differs from the one recorded).
    """
    from mrl_core.encoders import get_encoder
    from mrl_core.encoders.base import fingerprint_of, pick_device

    path = Path(path)
    adaptor, config = read_adaptor(path)
    base = get_encoder(config["base"], device=device, **kwargs)
    recorded = config.get("base_fingerprint")
    if recorded and recorded != base.fingerprint:
        raise ValueError(
            f"adaptor {path} was trained on {config['base']} with fingerprint {recorded}; the "
            f"encoder loaded now has fingerprint {base.fingerprint}: its weights differ"
        )
    state = adaptor.plain_state()
    fingerprint = fingerprint_of(
        base.fingerprint, json.dumps(adaptor.config(), sort_keys=True),
        *(p for k in sorted(state) for p in (k, state[k])),
    )
    spec = NestingSpec.for_model(adaptor.dim, nesting if nesting is not None else config["dims"])
    dev = getattr(base, "device", None) or pick_device(device)
    return AdaptedEncoder(
        base, adaptor, name=f"adaptor:{path.resolve()}", fingerprint=fingerprint,
        nesting=spec, device=torch.device(dev),
    )
