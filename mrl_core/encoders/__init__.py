"""Encoders behind one protocol, looked up by a spec string with ``get_encoder``.

Specs:
    ``wordllama-256`` (default; also ``wordllama-64``, ``wordllama-128``)
    ``static:/dir``         a model2vec-style directory (safetensors table + tokenizer.json)
    ``hf:/dir``             a local Hugging Face checkpoint (AutoModel + AutoTokenizer)
    ``st:/dir``             a local sentence-transformers model directory (modules.json, prompts)
    ``mrl-resnet50:/file``  a ResNet-50 checkpoint in the official MRL repository's layout
    ``adaptor:/dir``        a trained Matryoshka adaptor over the base encoder it names
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from mrl_core.defaults import ENCODER
from mrl_core.encoders.base import Encoder, Features, budget_batches, check_texts

DEFAULT_ENCODER = ENCODER

# kind -> "module:function"; the function takes the spec's argument plus keyword options.
_LOADERS: dict[str, str] = {
    "static": "mrl_core.encoders.static:load_static",
    "hf": "mrl_core.encoders.hf:load_hf",
    "st": "mrl_core.encoders.st:load_st",
    "mrl-resnet50": "mrl_core.encoders.resnet:load_mrl_resnet50",
    "adaptor": "mrl_core.adaptor:load_adaptor",
}


def register_encoder(kind: str, loader: str | Callable[..., Encoder]) -> None:
    """Make ``get_encoder(f"{kind}:ARG")`` call ``loader(ARG, **kwargs)``.

    ``loader`` is a callable or a lazily imported ``"module:function"`` string.
    """
    _LOADERS[kind] = loader  # type: ignore[assignment]


def known_kinds() -> list[str]:
    """The spec prefixes ``get_encoder`` understands."""
    return ["wordllama-<dim>", *(f"{k}:PATH" for k in _LOADERS)]


def get_encoder(spec: str = DEFAULT_ENCODER, **kwargs: Any) -> Encoder:
    """The encoder named by ``spec`` (see the module docstring); kwargs go to its loader
    (``device``, ``dtype``, ``nesting``, and loader-specific options)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"encoder spec must be a non-empty string, got {spec!r}")
    match = re.fullmatch(r"wordllama-(\d+)", spec)
    if match:
        from mrl_core.encoders.static import load_wordllama

        return load_wordllama(int(match.group(1)), **kwargs)
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in _LOADERS or not arg:
        raise ValueError(f"unknown encoder spec {spec!r}; known: {', '.join(known_kinds())}")
    loader = _LOADERS[kind]
    if isinstance(loader, str):
        module, func = loader.split(":")
        loader = getattr(importlib.import_module(module), func)
    return loader(arg, **kwargs)


__all__ = [
    "DEFAULT_ENCODER",
    "Encoder",
    "Features",
    "budget_batches",
    "check_texts",
    "get_encoder",
    "known_kinds",
    "register_encoder",
]
