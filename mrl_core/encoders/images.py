"""ImageNet image preprocessing, one copy for serving (``MRLResNet50Encoder``) and training.

Decode to RGB; to evaluate, resize the short side to 256/224 of the crop and center-crop (the
standard ImageNet eval transform the MRL repository uses); normalise with ImageNet's mean and
std. Pixels travel as uint8 [3, H, W] (cheap to ship) and are normalised where they are used.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE, CROP = 256, 224
"""The eval transform at the standard size: short side to 256, center crop 224."""


def decode_image(data: bytes) -> Any:
    """Encoded image bytes (JPEG, PNG, ...) to an RGB PIL image; PIL's error when undecodable."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def eval_crop(image: Any, size: int = CROP) -> Any:
    """Resize the short side to ``size * 256 / 224`` and center-crop ``size`` x ``size``."""
    from torchvision.transforms import functional as tvf

    return tvf.center_crop(tvf.resize(image, int(size * RESIZE / CROP)), size)


def to_pixels(image: Any) -> np.ndarray:
    """A PIL RGB image as uint8 [3, H, W]."""
    return np.array(image, dtype=np.uint8).transpose(2, 0, 1)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """float32 ImageNet-normalised pixels from 0..255 values (uint8 or float) [..., 3, H, W]."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def to_normalized(image: Any) -> torch.Tensor:
    """A PIL RGB image as the float32 normalised [3, H, W] tensor a model takes."""
    return normalize(torch.from_numpy(to_pixels(image)))
