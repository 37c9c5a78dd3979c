"""Image -> tensor transforms shared by the methods (no torchvision)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_normalized_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL RGB image -> (1, 3, H, W) float32, ``(x / 255 - mean) / std`` per channel in float32.

    Matches ``ToTensor`` + ``Normalize`` bit for bit (true division by 255, then float32 arithmetic).
    """
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    t = torch.from_numpy(arr).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return ((t - m) / s)[None].contiguous()


def size_to_multiple(height: int, width: int, multiple: int, rounding: str = "ceil") -> tuple[int, int]:
    """Round (H, W) to multiples of ``multiple``: ``ceil`` (CLIP-ES) or ``floor``."""
    op = math.ceil if rounding == "ceil" else math.floor
    return max(multiple, op(height / multiple) * multiple), max(multiple, op(width / multiple) * multiple)


def resize_pil(image: Image.Image, height: int, width: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Resize to (height, width); returns a copy without resampling when the size already matches (as PIL does)."""
    if image.size == (width, height):
        return image.copy()
    return image.resize((width, height), resample)
