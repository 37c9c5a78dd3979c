"""Min-max scaling and bilinear resizing of class activation maps.

CLIP-ES normalises every refined low-resolution map to ``[0, 1)`` and then
upsamples it with ``cv2.resize(..., INTER_LINEAR)`` before casting to float16.
OpenCV is not a core dependency of tag2mask, so :func:`resize_bilinear_like_cv2`
re-implements OpenCV's float32 bilinear resize in numpy, including its rounding.

Measured fact (opencv-python 5.0.0, x86-64): ``cv2.resize`` on float32 with
``INTER_LINEAR`` is served by the Intel IPP kernel, whose rounding differs from
OpenCV's own C++ kernel (the CLIP-ES fixtures were produced that way and only the
IPP arithmetic reproduces ``attn_highres`` bit for bit). Both are replicated; see
:func:`resize_bilinear_like_cv2` for which one is exact.

:func:`resize_bilinear` is the plain torch alternative (``F.interpolate`` with
``align_corners=False``); it computes the source coordinate in float32 and
agrees with OpenCV to a few float32 ulps, i.e. up to one float16 ulp after the
CLIP-ES cast.

Limitation: sources with a single row or column are not reproduced bit for bit
(OpenCV takes yet another path there, which is not even constant-preserving);
the CLIP-ES patch grids are at least 2x2 for any image larger than 16 px.
"""

from __future__ import annotations

from typing import Tuple, TypeVar, Union

import numpy as np
import torch
import torch.nn.functional as F

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

__all__ = ["minmax_scale", "resize_bilinear_like_cv2", "resize_bilinear", "scale_and_resize"]


def minmax_scale(x: ArrayT, eps: float = 1e-7) -> ArrayT:
    """Per-map min-max normalisation with an *absolute* epsilon (official ``scale_cam_image``).

    Each map is shifted by its minimum and divided by ``eps + max(shifted)``.
    Because ``eps`` is absolute, the result is not exactly scale-invariant:
    a map whose range is comparable to ``eps`` ends with a maximum well below 1
    (CLIP-ES applies the normalisation twice for this reason, see the fixtures
    README section 4.6). An all-zero map stays all zero.

    Args:
        x: ``(..., h, w)`` float array or tensor (numpy or torch); every trailing
            ``(h, w)`` slice is normalised independently.
        eps: absolute epsilon added to the denominator. It is cast to ``x``'s
            dtype before the addition, as numpy >= 2 / torch do for a Python float.

    Returns:
        Same type, shape and dtype as ``x``.
    """
    if isinstance(x, torch.Tensor):
        mn = x.amin(dim=(-2, -1), keepdim=True)
        y = x - mn
        mx = y.amax(dim=(-2, -1), keepdim=True)
        return y / (mx + eps)
    x = np.asarray(x)
    mn = x.min(axis=(-2, -1), keepdims=True)
    y = x - mn
    mx = y.max(axis=(-2, -1), keepdims=True)
    # Add eps in the array's own precision (numpy 2 "weak scalar" rule, which
    # is what produced the reference fixtures).
    return y / (mx + np.asarray(eps, dtype=y.dtype))


def _generic_taps(src: int, dst: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Taps of OpenCV's own C++ bilinear kernel (``resizeGeneric``) along one axis.

    Returns ``(i0, i1, w0, w1)``: ``(dst,) int64`` indices and ``(dst,) float32``
    weights such that ``out[d] = in[i0[d]] * w0[d] + in[i1[d]] * w1[d]``.
    """
    # OpenCV computes inv_scale = dst / src and then scale = 1 / inv_scale, both
    # in double; 1/(dst/src) can differ from src/dst in the last bit.
    scale = 1.0 / (float(dst) / float(src))
    d = np.arange(dst, dtype=np.float64)
    # Source coordinate (half-pixel centres) in double, rounded to float, and the
    # fractional part taken in float (exact).
    f = ((d + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    f = (f - i0.astype(np.float32)).astype(np.float32)
    # Border replication: outside the valid range snap to the edge sample, weight (1, 0).
    f[i0 < 0] = 0.0
    i0[i0 < 0] = 0
    high = i0 >= src - 1
    f[high] = 0.0
    i0[high] = src - 1
    return i0, np.minimum(i0 + 1, src - 1), (np.float32(1.0) - f).astype(np.float32), f


def _ipp_taps(src: int, dst: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Taps of the IPP bilinear kernel along one axis: ``(i0, i1, t)``, ``t (dst,) float32``.

    The fractional position is taken in double and only then rounded to float32
    (unlike OpenCV's own kernel, which rounds the coordinate first).
    """
    d = np.arange(dst, dtype=np.float64)
    f = (d + 0.5) * (float(src) / float(dst)) - 0.5
    fl = np.floor(f)
    t = f - fl
    i0 = fl.astype(np.int64)
    t[i0 < 0] = 0.0
    i0[i0 < 0] = 0
    high = i0 >= src - 1
    t[high] = 0.0
    i0[high] = src - 1
    return i0, np.minimum(i0 + 1, src - 1), t.astype(np.float32)


def _fma_lerp_f32(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``fma(b - a, t, a)`` in float32 with a single correct rounding, emulated in float64.

    ``(b - a)`` is rounded to float32 first (a separate instruction in IPP); the
    product with the float32 ``t`` is exact in float64 (24 + 24 bits). The sum is
    computed with an exact error term (Knuth's TwoSum) so the double-rounding
    case (float64 result exactly halfway between two float32 values) is resolved
    like a true fused multiply-add.
    """
    a64 = a.astype(np.float64)
    p = (b - a).astype(np.float32).astype(np.float64) * t.astype(np.float64)
    s = a64 + p
    bb = s - a64
    err = (a64 - (s - bb)) + (p - bb)  # exact: a64 + p == s + err
    r = s.astype(np.float32)
    # float64 -> float32 drops 29 mantissa bits; a tie has exactly the top dropped bit set.
    low = s.view(np.uint64) & np.uint64((1 << 29) - 1)
    tie = (low == np.uint64(1 << 28)) & (err != 0)
    if np.any(tie):
        r64 = r.astype(np.float64)
        away = np.sign(err) == np.sign(s - r64)  # true value lies beyond the tie, away from r
        fix = tie & away
        r[fix] = (2.0 * s[fix] - r64[fix]).astype(np.float32)  # the other neighbour, exact
    return r


def resize_bilinear_like_cv2(x: np.ndarray, size_hw: Tuple[int, int], variant: str = "ipp") -> np.ndarray:
    """Numpy replica of ``cv2.resize(map, (W, H), interpolation=cv2.INTER_LINEAR)`` for float32.

    Two OpenCV code paths exist and they round differently:

    * ``variant="ipp"`` (default): the Intel IPP kernel that the x86-64
      ``opencv-python`` wheels dispatch to (the build that produced the CLIP-ES
      fixtures). Horizontal pass then vertical pass, each output
      ``fma(x1 - x0, t, x0)`` in float32 with ``t`` the double-precision
      fractional position rounded to float32. Bit-identical to
      ``cv2.resize`` whenever ``cv2.ipp.useIPP()`` is true, for upscaling and
      downscaling of sources of at least 2x2, as tested; an exact factor-2
      downsize too up to OpenCV 5.0 (5.1 takes a 2x2 mean there instead,
      within 2 float32 ulps of this).
    * ``variant="generic"``: OpenCV's own C++ kernel (builds without IPP, e.g. ARM,
      or ``cv2.ipp.setUseIPP(False)``): ``x0 * (1 - t) + x1 * t`` with float32
      coefficients. Not bit-exact: typically 0.1-2% of values differ by 1 float32 ulp
      (vectorised code paths), and factor-2 downscaling uses an area kernel there.

    Args:
        x: ``(K, h, w)`` or ``(h, w)`` array, cast to float32.
        size_hw: target ``(H, W)`` (note: OpenCV takes ``(W, H)``).
        variant: ``"ipp"`` or ``"generic"``.

    Returns:
        ``(K, H, W)`` (or ``(H, W)``) float32 array.
    """
    arr = np.asarray(x, dtype=np.float32)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected (K, h, w) or (h, w), got shape {arr.shape}")
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"invalid target size {size_hw}")
    _, in_h, in_w = arr.shape
    if (in_h, in_w) == (out_h, out_w):
        res = arr.copy()  # OpenCV copies when the size is unchanged
    elif variant == "ipp":
        c0, c1, tx = _ipp_taps(in_w, out_w)
        tmp = _fma_lerp_f32(arr[:, :, c0], arr[:, :, c1], tx)  # horizontal first
        r0, r1, ty = _ipp_taps(in_h, out_h)
        res = _fma_lerp_f32(tmp[:, r0, :], tmp[:, r1, :], ty[:, None])
    elif variant == "generic":
        c0, c1, a0, a1 = _generic_taps(in_w, out_w)
        tmp = arr[:, :, c0] * a0 + arr[:, :, c1] * a1  # each product rounded, then the sum
        r0, r1, b0, b1 = _generic_taps(in_h, out_h)
        res = tmp[:, r0, :] * b0[:, None] + tmp[:, r1, :] * b1[:, None]
    else:
        raise ValueError(f"unknown variant {variant!r} (expected 'ipp' or 'generic')")
    res = np.ascontiguousarray(res, dtype=np.float32)
    return res[0] if squeeze else res


def resize_bilinear(x: torch.Tensor, size_hw: Tuple[int, int]) -> torch.Tensor:
    """Torch bilinear resize with half-pixel centres (``align_corners=False``, no antialias).

    Args:
        x: ``(K, h, w)``, ``(h, w)`` or ``(B, K, h, w)`` float tensor (any device).
        size_hw: target ``(H, W)``.

    Returns:
        Tensor of the same rank with the last two dims ``(H, W)``, dtype of ``x``.
        Agrees with :func:`resize_bilinear_like_cv2` up to float rounding.
    """
    nd = x.dim()
    if nd == 2:
        y = x[None, None]
    elif nd == 3:
        y = x[None]
    elif nd == 4:
        y = x
    else:
        raise ValueError(f"expected 2-4 dims, got shape {tuple(x.shape)}")
    y = F.interpolate(y, size=(int(size_hw[0]), int(size_hw[1])), mode="bilinear", align_corners=False)
    if nd == 2:
        return y[0, 0]
    if nd == 3:
        return y[0]
    return y


def scale_and_resize(refined: Union[np.ndarray, torch.Tensor], size_hw: Tuple[int, int],
                     exact_cv2: bool = True) -> np.ndarray:
    """Official ``scale_cam_image`` + float16 cast: min-max at low res, then bilinear upsampling.

    Args:
        refined: ``(K, h, w)`` float32 refined low-resolution maps.
        size_hw: original image size ``(H, W)``.
        exact_cv2: use the bit-exact OpenCV replica (default) or torch's interpolate
            (differs by at most one float16 ulp after the cast).

    Returns:
        ``(K, H, W)`` float16 array (= the official ``attn_highres``).
    """
    if isinstance(refined, torch.Tensor):
        refined = refined.detach().cpu().numpy()
    low = minmax_scale(np.asarray(refined, dtype=np.float32))
    if exact_cv2:
        high = resize_bilinear_like_cv2(low, size_hw)
    else:
        high = resize_bilinear(torch.from_numpy(np.ascontiguousarray(low)), size_hw).numpy()
    return high.astype(np.float16)
