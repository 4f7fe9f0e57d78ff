"""The paper's MRL ResNet-50 image encoder, loaded from the official repository's checkpoints.

RAIVNLab/MRL saves the ``state_dict`` of a torchvision ``resnet50`` whose ``fc`` is its
``MRL_Linear_Layer`` (keys ``fc.nesting_classifier_{i}.weight``), trained under DDP (keys
prefixed ``module.``) and with BlurPool (strided convs wrapped as ``<conv>.conv`` next to a
``<conv>.blur_filter`` buffer). Its older MRL-E checkpoints keep the shared head as a plain
``fc.weight``. All of these load here; the embedding is the 2048-dim pooled feature before ``fc``.
Images are preprocessed by ``encoders.images``, the code training's eval transform runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mrl_core.encoders.base import (
    Features,
    as_batch,
    budget_batches,
    check_dim,
    fingerprint_of,
    pick_device,
    take_dim,
)
from mrl_core.encoders.images import CROP, RESIZE, decode_image, eval_crop, normalize, to_pixels
from mrl_core.layers import NestedLinear
from mrl_core.nesting import NestingSpec

MRL_NESTING = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
"""The official repository's nesting list, 2**3 .. 2**11."""

FEATURE_DIM = 2048
_HEAD_KEY = re.compile(r"fc\.nesting_classifier_(\d+)\.weight")


class MRLResNet50Encoder:
    """Images (encoded bytes: JPEG, PNG, ...) to the 2048-dim pooled ResNet-50 feature.

    ``head`` is the checkpoint's nested classifier (``None`` for a checkpoint without ``fc``);
    ``nested_logits`` runs it on embeddings for adaptive classification.
    """

    modality = "image"
    dim = FEATURE_DIM

    def __init__(
        self,
        backbone: nn.Module,
        head: NestedLinear | None,
        name: str,
        fingerprint: str,
        nesting: NestingSpec,
        device: torch.device,
        dtype: torch.dtype,
        batch_pixels: int = 64 * CROP * CROP,
    ) -> None:
        self.name = name
        self.fingerprint = fingerprint
        self.nesting = nesting
        self.device = device
        self.dtype = dtype
        self.batch_pixels = int(batch_pixels)
        fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.backbone = backbone.eval().to(device, dtype, memory_format=fmt)
        self.head = None if head is None else head.eval().to(device, dtype)

    def preprocess(self, inputs: Sequence[Any]) -> Features:
        """Decode, convert to RGB, resize the short side to 256 and center-crop 224: uint8 [N,3,224,224]."""
        if isinstance(inputs, (bytes, bytearray, str)):
            raise TypeError("encode() takes a list of images (encoded bytes), not a single one")
        inputs = list(inputs)
        if not inputs:
            raise ValueError("encode() got an empty input list")
        pixels = np.empty((len(inputs), 3, CROP, CROP), dtype=np.uint8)
        for i, data in enumerate(inputs):
            if not isinstance(data, (bytes, bytearray, memoryview)):
                kind = "None" if data is None else type(data).__name__
                raise TypeError(f"input {i} is {kind}, expected encoded image bytes")
            try:
                rgb = decode_image(data)
            except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
                raise ValueError(f"input {i} is not a decodable image: {exc}") from exc
            pixels[i] = to_pixels(eval_crop(rgb, CROP))
        return {"pixels": pixels}

    @torch.inference_mode()
    def embed_features(self, features: Features) -> np.ndarray:
        """float32 [N, 2048] pooled features, ImageNet-normalised, batched by ``batch_pixels``."""
        pixels = features["pixels"]
        out = np.empty((len(pixels), self.dim), dtype=np.float32)
        costs = np.full(len(pixels), pixels.shape[2] * pixels.shape[3])
        for rows in budget_batches(costs, self.batch_pixels):
            x = normalize(torch.from_numpy(pixels[rows]).to(self.device)).to(self.dtype)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            out[rows] = self.backbone(x).float().cpu().numpy()
        return out

    def encode(self, inputs: Sequence[Any] | bytes, dim: int | None = None) -> np.ndarray:
        """float32 [N, 2048] embeddings of a list of encoded images; one bytes object gives one
        row, [1, 2048]; ``dim``: the L2-normalised first ``dim`` coordinates instead."""
        dim = check_dim(dim, self)
        return take_dim(self.embed_features(self.preprocess(as_batch(inputs))), dim)

    @torch.inference_mode()
    def nested_logits(self, embeddings: np.ndarray) -> dict[int, np.ndarray]:
        """The checkpoint head's float32 logits [N, num_classes] for every nesting dim."""
        if self.head is None:
            raise ValueError(f"{self.name} has no classifier head (its checkpoint holds no fc)")
        z = torch.as_tensor(np.asarray(embeddings, dtype=np.float32), device=self.device)
        logits = self.head(z.to(self.dtype))
        return {m: lg.float().cpu().numpy() for m, lg in zip(self.head.nesting.dims, logits, strict=True)}


def load_mrl_resnet50(
    path: str | Path,
    *,
    num_classes: int | None = None,
    efficient: bool | None = None,
    nesting: Sequence[int] | str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    batch_pixels: int = 64 * CROP * CROP,
    **_: Any,
) -> MRLResNet50Encoder:
    """A ResNet-50 checkpoint in the official MRL layout (see the module docstring).

    MRL vs MRL-E, the class count and (for MRL) the nesting dims are read from the keys when not
    given; MRL-E's nesting defaults to the official list. A checkpoint nested under a
    ``state_dict`` or ``model`` key, or with ``module.`` prefixes, loads too. Runs in bfloat16 on
    a GPU and float32 on the CPU unless ``dtype`` says otherwise.
    """
    from torchvision.models import resnet50

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MRL ResNet-50 checkpoint not found: {path}")
    state = _read_state_dict(path)
    efficient, num_classes, nesting_spec = _head_layout(state, path, efficient, num_classes, nesting)
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = resnet50(weights=None)
        if any(k.endswith(".blur_filter") for k in state):
            _apply_blurpool(model)
        has_head = num_classes is not None
        if has_head:
            bias = "fc.nesting_classifier_0.bias" in state
            model.fc = NestedLinear(nesting_spec, num_classes, efficient=efficient, bias=bias)
        else:
            model.fc = nn.Identity()
    _load_strict(model, state, path)
    head = model.fc if has_head else None
    model.fc = nn.Identity()
    device = pick_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    fingerprint = fingerprint_of(
        f"resize={RESIZE},crop={CROP}",
        *(p for k in sorted(state) for p in (f"{k}:{tuple(state[k].shape)}", state[k].reshape(-1))),
    )
    return MRLResNet50Encoder(
        model, head, name=f"mrl-resnet50:{path.resolve()}", fingerprint=fingerprint,
        nesting=nesting_spec, device=device, dtype=dtype, batch_pixels=batch_pixels,
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, unwrapped from ``state_dict``/``model`` and stripped of DDP's
    ``module.`` (and ``torch.compile``'s ``_orig_mod.``) prefixes; the old MRL-E ``fc.weight``
    renamed to ``fc.nesting_classifier_0.weight``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"checkpoint {path} holds {type(obj).__name__}, not a state dict")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint {path}: entry {key!r} is {type(value).__name__}, not a tensor")
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        if key in ("fc.weight", "fc.bias"):
            key = key.replace("fc.", "fc.nesting_classifier_0.")
        state[key] = value
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` into the meta-device ``model``; a ValueError sums up what does not fit."""
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"checkpoint {path} does not fit an MRL ResNet-50: {exc}") from exc
    problems = [
        f"{len(keys)} {kind} keys (e.g. {', '.join(keys[:3])})"
        for kind, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys))
        if keys
    ]
    if problems:
        raise ValueError(f"checkpoint {path} does not fit an MRL ResNet-50: {'; '.join(problems)}")


def _head_layout(
    state: dict[str, torch.Tensor],
    path: Path,
    efficient: bool | None,
    num_classes: int | None,
    nesting: Sequence[int] | str | None,
) -> tuple[bool, int | None, NestingSpec]:
    """(efficient, num_classes, nesting) of the checkpoint's head, filling in what was not given.

    One head over all 2048 dims is MRL-E; several heads, one per nesting dim, are MRL."""
    heads = sorted((int(m.group(1)), w) for k, w in state.items() if (m := _HEAD_KEY.fullmatch(k)))
    if not heads:  # no classifier: an embedding-only checkpoint
        return bool(efficient), None, NestingSpec.for_model(FEATURE_DIM, nesting or MRL_NESTING)
    if [i for i, _ in heads] != list(range(len(heads))) or any(w.ndim != 2 for _, w in heads):
        raise ValueError(f"checkpoint {path} has malformed fc.nesting_classifier_* weights")
    classes = {int(w.shape[0]) for _, w in heads}
    if len(classes) > 1 or (num_classes is not None and classes != {num_classes}):
        raise ValueError(
            f"checkpoint {path} has heads for {sorted(classes)} classes; num_classes={num_classes} given"
        )
    dims = tuple(int(w.shape[1]) for _, w in heads)
    if efficient is None:
        efficient = dims == (FEATURE_DIM,)
    if efficient:
        if dims != (FEATURE_DIM,):
            raise ValueError(f"checkpoint {path} has heads of dims {list(dims)}; MRL-E has one of {FEATURE_DIM}")
        spec = NestingSpec.for_model(FEATURE_DIM, nesting or MRL_NESTING)
    else:
        spec = NestingSpec.for_model(FEATURE_DIM, nesting or dims)
        if spec.dims != dims:
            raise ValueError(f"checkpoint {path} has heads of dims {list(dims)}, not {list(spec.dims)}")
    return efficient, classes.pop(), spec


class _BlurPoolConv2d(nn.Module):
    """A strided conv preceded by a fixed 3x3 binomial blur (the MRL repo's FFCV BlurPool)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
        self.register_buffer("blur_filter", kernel.repeat(conv.in_channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = nn.functional.conv2d(
            x, self.blur_filter, stride=1, padding=1, groups=self.conv.in_channels
        )
        return self.conv(blurred)


def _apply_blurpool(module: nn.Module) -> None:
    """Wrap every strided conv with >= 16 input channels in ``_BlurPoolConv2d``, as the repo does."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, _BlurPoolConv2d(child))
        else:
            _apply_blurpool(child)
