"""Image-side helpers of the training-free segmenters: keep-ratio resize, sliding windows, padding.

All follow the mmseg harness that SCLIP, NACLIP and ClearCLIP share (see
``tests/data/ovss/README.md`` section 4).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from tag2mask.data.resize_cv2 import resize_uint8_like_cv2
from tag2mask.inference.tta import sliding_windows

ImageT = TypeVar("ImageT", np.ndarray, torch.Tensor)

__all__ = ["keep_ratio_size", "resize_like_mmcv", "window_boxes", "centre_padding"]


def keep_ratio_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """mmcv's ``Resize(scale=(max_long_side, short_side), keep_ratio=True)`` output size ``(h, w)``.

    The scale is the largest one with short side <= ``short_side`` and long side <=
    ``max_long_side``; sizes are ``int(x * scale + 0.5)`` (at least 1).
    """
    scale = min(max_long_side / max(height, width), short_side / min(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_like_mmcv(rgb: ImageT, short_side: int, max_long_side: int) -> ImageT:
    """Keep-ratio resize of an ``(H, W, 3)`` uint8 image (array or tensor) with OpenCV's bilinear kernel (exact replica)."""
    h, w = keep_ratio_size(rgb.shape[0], rgb.shape[1], short_side, max_long_side)
    if (h, w) == tuple(rgb.shape[:2]):
        return rgb
    return resize_uint8_like_cv2(rgb, (h, w))


def window_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Sliding windows ``(y1, x1, y2, x2)`` over an image, rows outer, as mmseg's ``slide_inference``.

    The boxes of :func:`tag2mask.inference.sliding_windows` (the last row/column ends at the
    border; a crop larger than the image covers the whole axis), as corner coordinates.
    """
    return [(top, left, top + ch, left + cw) for top, left, ch, cw in sliding_windows(height, width, crop, stride)]


def centre_padding(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """ClearCLIP's window padding to a multiple of the patch size: ``(left, right, top, bottom)``.

    The missing pixels are split floor/ceil (left/top get the smaller half); ``F.pad`` order.
    """
    dw, dh = (-width) % multiple, (-height) % multiple
    return dw // 2, dw - dw // 2, dh // 2, dh - dh // 2
