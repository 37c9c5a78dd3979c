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

from typing import Tuple

import numpy as np

__all__ = ["resize_uint8_like_cv2"]

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


def resize_uint8_like_cv2(image: np.ndarray, size_hw: Tuple[int, int]) -> np.ndarray:
    """Resize an 8-bit image bilinearly exactly as ``cv2.resize(..., INTER_LINEAR)`` does.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` uint8.
        size_hw: target ``(h, w)``, both >= 1.

    Returns:
        ``(h, w)`` or ``(h, w, C)`` uint8.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W[, C]) uint8 image, got {image.dtype} of shape {image.shape}")
    h, w = int(size_hw[0]), int(size_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"target size must be at least 1x1, got {size_hw}")
    src_h, src_w = image.shape[:2]
    x = image.reshape(src_h, src_w, -1).astype(np.int64)
    out_shape = (h, w) + image.shape[2:]
    if (src_h, src_w) == (2 * h, 2 * w):
        quad = x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]
        return ((quad + 2) >> 2).astype(np.uint8).reshape(out_shape)
    xi0, xi1, xw0, xw1 = _taps(src_w, w, clamp_weights=True)
    rows = x[:, xi0] * xw0[None, :, None] + x[:, xi1] * xw1[None, :, None]  # (H, w, C), 2048-scaled
    yi0, yi1, yw0, yw1 = _taps(src_h, h, clamp_weights=False)
    top = ((rows[yi0] >> 4) * yw0[:, None, None]) >> 16
    bottom = ((rows[yi1] >> 4) * yw1[:, None, None]) >> 16
    return np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8).reshape(out_shape)
