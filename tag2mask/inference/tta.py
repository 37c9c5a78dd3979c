"""Sliding-window and multi-scale + flip inference around any logit function.

Sliding window (the mmseg / SCLIP ``slide`` mode): crops of ``crop`` pixels every ``stride``
pixels; the last row and column of crops are shifted back inside the image, an image smaller
than a crop is one smaller crop (no padding). Each crop's logits are resized bilinearly
(``align_corners=False``) to the crop size, summed where crops overlap and divided by the number
of crops that cover each pixel.

Multi-scale + flip (WeCLIP's ``test_msc_flip`` and mmseg's ``MultiScaleFlipAug`` in spirit): the
image is resized with ``F.interpolate(scale_factor=s, mode='bilinear', align_corners=False)`` per
scale; with ``flip`` the mirrored copy runs in the same batch and its logits are mirrored back;
every result is resized bilinearly to one output size and the logits are averaged (flip first,
then scales).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LogitFn", "sliding_windows", "slide_logits", "multiscale_flip_logits"]

#: ``images (n, 3, h, w) -> logits (n, C, h', w')``
LogitFn = Callable[[Tensor], Tensor]
Size = Union[int, Sequence[int]]


def _pair(v: Size, what: str) -> tuple[int, int]:
    pair = (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))
    if min(pair) <= 0:
        raise ValueError(f"{what} must be positive, got {v}")
    return pair


def sliding_windows(height: int, width: int, crop: Size, stride: Size) -> list[tuple[int, int, int, int]]:
    """Crop boxes ``(top, left, crop_h, crop_w)`` covering an image of ``height`` × ``width``.

    ``rows = ceil(max(H - crop, 0) / stride) + 1`` (same for columns); the last crops are shifted
    back so that they end at the border; a crop larger than the image is clipped to it.
    """
    (crop_h, crop_w), (stride_h, stride_w) = _pair(crop, "crop"), _pair(stride, "stride")
    ch, cw = min(crop_h, height), min(crop_w, width)
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    boxes = []
    for i in range(rows):
        for j in range(cols):
            bottom, right = min(i * stride_h + ch, height), min(j * stride_w + cw, width)
            boxes.append((bottom - ch, right - cw, ch, cw))
    return boxes


def slide_logits(fn: LogitFn, images: Tensor, crop: Size, stride: Size, crop_batch: int = 8) -> Tensor:
    """Sliding-window logits at the input size.

    Args:
        fn: logit function (see :data:`LogitFn`); called with up to ``crop_batch × B`` crops at once.
        images: ``(B, 3, H, W)`` normalised images.
        crop, stride: window size and step in pixels (an int or ``(h, w)``).
        crop_batch: number of window positions per call of ``fn``.

    Returns:
        ``(B, C, H, W)`` float32 logits, averaged where windows overlap.
    """
    if crop_batch <= 0:
        raise ValueError(f"crop_batch must be positive, got {crop_batch}")
    b, _, h, w = images.shape
    boxes = sliding_windows(h, w, crop, stride)
    total: Optional[Tensor] = None
    count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
    for start in range(0, len(boxes), crop_batch):
        chunk = boxes[start : start + crop_batch]
        ch, cw = chunk[0][2], chunk[0][3]
        crops = torch.cat([images[:, :, y : y + ch, x : x + cw] for y, x, _, _ in chunk])
        logits = fn(crops).float()
        if tuple(logits.shape[-2:]) != (ch, cw):
            logits = F.interpolate(logits, size=(ch, cw), mode="bilinear", align_corners=False)
        if total is None:
            total = logits.new_zeros((b, logits.shape[1], h, w))
        for k, (y, x, _, _) in enumerate(chunk):
            total[:, :, y : y + ch, x : x + cw] += logits[k * b : (k + 1) * b]
            count[:, :, y : y + ch, x : x + cw] += 1
    assert total is not None  # at least one window always exists
    return total / count


def multiscale_flip_logits(
    fn: LogitFn,
    images: Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    out_size: Optional[Sequence[int]] = None,
) -> Tensor:
    """Scale- and flip-averaged logits.

    Args:
        fn: logit function (see :data:`LogitFn`), e.g. a network or a :func:`slide_logits` closure.
        images: ``(B, 3, H, W)`` normalised images at the base size.
        scales: factors for ``F.interpolate(scale_factor=s)``; 1.0 runs the base image unchanged.
        flip: also run the horizontally mirrored images (same batch) and average.
        out_size: ``(h, w)`` every result is resized to before averaging; default the input size.

    Returns:
        ``(B, C, h, w)`` float32 logits.
    """
    if not scales:
        raise ValueError("scales must not be empty")
    size = tuple(int(s) for s in (out_size if out_size is not None else images.shape[-2:]))
    b = images.shape[0]
    acc = []
    for s in scales:
        if s <= 0:
            raise ValueError(f"scales must be positive, got {s}")
        x = images if s == 1.0 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        logits = fn(torch.cat([x, x.flip(-1)]) if flip else x).float()
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        acc.append((logits[:b] + logits[b:].flip(-1)) / 2 if flip else logits)
    return torch.stack(acc).mean(dim=0)
