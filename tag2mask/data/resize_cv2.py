"""Bit-exact NumPy replica of OpenCV's ``cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)`` on uint8 images.

The mmseg/mmcv test pipelines of the training-free segmentation methods (SCLIP, NACLIP, ClearCLIP)
resize the decoded uint8 image with OpenCV before normalising it. Reproducing their inputs exactly
(and therefore their logits to float32 precision) needs OpenCV's fixed-point arithmetic, which a
float bilinear resize only approximates (off by one grey level on a few percent of the pixels).
OpenCV is not a core dependency of tag2mask, so the kernel is re-implemented here.

OpenCV's 8-bit linear kernel, as measured against opencv-python 5.0 (tests/test_resize_cv2_uint8.py):

* per axis, the source coordinate ``f = float32((d + 0.5) * (1 / (dst / src)) - 0.5)`` (double, then
  float), ``i = floor(f)``, weights ``round((1 - frac) * 2048)`` and ``round(frac * 2048)`` (11-bit
  fixed point, round half to even);
* horizontally, taps left of the image or at/after its last column are clamped to the edge **with
  weight (2048, 0)**; vertically only the row *indices* are clamped, the weights are kept (rows
  above the first / below the last use both weights on the same edge row);
* a horizontal pass in exact integers, then the vertical pass as OpenCV's SIMD kernel computes it:
  ``((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16)``, rounded by ``(v + 2) >> 2`` and saturated;
* an exact 2x reduction on both axes takes OpenCV's area shortcut ``(a + b + c + d + 2) >> 2``.
"""

from __future__ import annotations

from typing import Tuple, TypeVar

import numpy as np
import torch

__all__ = ["resize_uint8_like_cv2"]

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)

_COEF_SCALE = np.float32(2048.0)  # OpenCV's INTER_RESIZE_COEF_SCALE (11 fractional bits)


def _taps(src: int, dst: int, clamp_weights: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Indices ``(i0, i1)`` and integer weights ``(w0, w1)`` (summing to about 2048), all ``(dst,) int64``."""
    scale = 1.0 / (float(dst) / float(src))  # OpenCV inverts the inverse scale, in double
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    frac = (f - i0.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        low = i0 < 0
        frac[low], i0[low] = 0.0, 0
        high = i0 >= src - 1
        frac[high], i0[high] = 0.0, src - 1
    w0 = np.rint((np.float32(1.0) - frac) * _COEF_SCALE).astype(np.int64)
    w1 = np.rint(frac * _COEF_SCALE).astype(np.int64)
    return np.clip(i0, 0, src - 1), np.clip(i0 + 1, 0, src - 1), w0, w1


def _torch_taps(src: int, dst: int, clamp_weights: bool, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """:func:`_taps` as tensors: int64 indices, int32 weights."""
    i0, i1, w0, w1 = _taps(src, dst, clamp_weights)
    return (torch.from_numpy(i0).to(device), torch.from_numpy(i1).to(device),
            torch.from_numpy(w0).to(device, torch.int32), torch.from_numpy(w1).to(device, torch.int32))


def resize_uint8_like_cv2(image: ArrayOrTensor, size_hw: Tuple[int, int]) -> ArrayOrTensor:
    """Resize an 8-bit image bilinearly exactly as ``cv2.resize(..., INTER_LINEAR)`` does.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` uint8, a NumPy array or a torch tensor on any device (the
            integer arithmetic then runs there).
        size_hw: target ``(h, w)``, both >= 1.

    Returns:
        ``(h, w)`` or ``(h, w, C)`` uint8 of the input's type (and device).
    """
    if isinstance(image, np.ndarray):
        return resize_uint8_like_cv2(torch.from_numpy(np.ascontiguousarray(image)), size_hw).numpy()
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W[, C]) uint8 image, got {getattr(image, 'dtype', type(image))} "
                         f"of shape {tuple(getattr(image, 'shape', ()))}")
    h, w = int(size_hw[0]), int(size_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"target size must be at least 1x1, got {size_hw}")
    src_h, src_w = image.shape[:2]
    out_shape = (h, w) + tuple(image.shape[2:])
    x = image.reshape(src_h, src_w, -1).to(torch.int32)  # every intermediate fits in int32
    if (src_h, src_w) == (2 * h, 2 * w):
        quad = x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]
        return ((quad + 2) >> 2).to(torch.uint8).reshape(out_shape)
    xi0, xi1, xw0, xw1 = _torch_taps(src_w, w, True, x.device)
    rows = x.index_select(1, xi0) * xw0.view(1, -1, 1) + x.index_select(1, xi1) * xw1.view(1, -1, 1)
    yi0, yi1, yw0, yw1 = _torch_taps(src_h, h, False, x.device)
    top = ((rows.index_select(0, yi0) >> 4) * yw0.view(-1, 1, 1)) >> 16
    bottom = ((rows.index_select(0, yi1) >> 4) * yw1.view(-1, 1, 1)) >> 16
    return ((top + bottom + 2) >> 2).clamp_(0, 255).to(torch.uint8).reshape(out_shape)
