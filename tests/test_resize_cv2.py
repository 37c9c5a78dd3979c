"""``resize_bilinear_like_cv2`` against OpenCV itself (cv2 is a test-only dependency)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tag2mask.localization.scaling import resize_bilinear, resize_bilinear_like_cv2

cv2 = pytest.importorskip("cv2")

# OpenCV 5.1 computes an exact factor-2 downsize as a 2x2 mean instead of the IPP bilinear kernel, which
# rounds differently in the last bits (checked: 4.14.0.94 and 5.0.0.93 bit-identical, 5.1.0.95 not). The
# CLIP-ES fixtures were made with the older kernel, and the pipeline only ever upsamples, so the replica keeps
# the old kernel; on newer builds those cases are held to the rounding bound of either way of averaging.
_FACTOR2_KERNEL_CHANGED = tuple(int(v) for v in cv2.__version__.split(".")[:2]) >= (5, 1)

# (h, w) -> (H, W): CLIP-ES grids to image sizes, non-integer up/down factors,
# exact factor 2 both ways, one axis unchanged, tiny sources (>= 2 per axis).
SIZES = [
    ((24, 32), (375, 500)), ((16, 21), (250, 333)), ((26, 18), (401, 287)), ((14, 14), (224, 224)),
    ((7, 5), (13, 11)), ((5, 7), (5, 20)), ((12, 12), (12, 30)), ((2, 3), (50, 70)),
    ((30, 40), (17, 23)), ((31, 41), (15, 20)), ((40, 40), (13, 13)), ((10, 12), (7, 9)),
    ((20, 20), (10, 10)), ((64, 48), (32, 24)), ((33, 17), (300, 129)), ((32, 24), (3, 500)),
]


def _cv2_resize(x: np.ndarray, hw) -> np.ndarray:
    return np.stack([cv2.resize(m, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR).reshape(hw) for m in x])


@pytest.mark.parametrize("src,dst", SIZES, ids=[f"{s[0]}x{s[1]}-{d[0]}x{d[1]}" for s, d in SIZES])
def test_bit_identical_to_cv2(src, dst):
    if not (hasattr(cv2, "ipp") and cv2.ipp.useIPP()):
        pytest.skip("this OpenCV build does not use IPP; the default variant replicates the IPP kernel")
    rng = np.random.default_rng(hash((src, dst)) % 2**32)
    for scale in (1.0, 1e-3, 250.0):
        x = (rng.standard_normal((3, *src)) * scale).astype(np.float32)
        out = resize_bilinear_like_cv2(x, dst)
        assert out.dtype == np.float32 and out.shape == (3, *dst)
        _assert_matches_cv2(x, out, src, dst)
    # minmax-normalised maps in [0, 1), the pipeline's actual input
    x = rng.random((2, *src)).astype(np.float32) * np.float32(0.9999999)
    _assert_matches_cv2(x, resize_bilinear_like_cv2(x, dst), src, dst)


def _assert_matches_cv2(x: np.ndarray, out: np.ndarray, src, dst) -> None:
    ref = _cv2_resize(x, dst)
    exact_half = dst[0] * 2 == src[0] and dst[1] * 2 == src[1]
    if not (exact_half and _FACTOR2_KERNEL_CHANGED):
        assert np.array_equal(out, ref)
        return
    # Both are a rounded mean of the same 2x2 block: within 2 float32 ulps of the block's largest magnitude
    # (measured worst case: 2.0 over scales 1e-30..1e20).
    block_max = np.abs(x).reshape(x.shape[0], dst[0], 2, dst[1], 2).max(axis=(2, 4))
    assert np.all(np.abs(out.astype(np.float64) - ref) <= 2 * np.spacing(block_max))


def test_generic_variant_close_to_cv2_without_ipp():
    # OpenCV's own kernel (non-IPP builds): within 1 float32 ulp, not bit-exact.
    if not hasattr(cv2, "ipp"):
        pytest.skip("cannot toggle IPP")
    was = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(False)
    try:
        rng = np.random.default_rng(3)
        for src, dst in SIZES:
            if dst[0] * 2 == src[0] and dst[1] * 2 == src[1]:
                continue  # OpenCV switches to its area kernel for an exact factor 2
            x = rng.random((2, *src)).astype(np.float32)
            ref = _cv2_resize(x, dst)
            out = resize_bilinear_like_cv2(x, dst, variant="generic")
            assert np.abs(out - ref).max() <= 2 * np.spacing(np.float32(1.0))
            assert (out != ref).mean() < 0.05
    finally:
        cv2.ipp.setUseIPP(was)


def test_2d_input_identity_and_errors():
    x = np.random.default_rng(0).random((6, 9)).astype(np.float32)
    assert resize_bilinear_like_cv2(x, (6, 9)).shape == (6, 9)
    assert np.array_equal(resize_bilinear_like_cv2(x, (6, 9)), x)
    with pytest.raises(ValueError):
        resize_bilinear_like_cv2(x, (0, 3))
    with pytest.raises(ValueError):
        resize_bilinear_like_cv2(x, (4, 4), variant="cubic")


def test_torch_fallback_matches_within_float_rounding():
    x = np.random.default_rng(1).random((2, 24, 32)).astype(np.float32)
    ref = _cv2_resize(x, (375, 500))
    t = resize_bilinear(torch.from_numpy(x), (375, 500)).numpy()
    # torch derives the source coordinate in float32: a few float32 ulps, not bit-exact
    assert np.abs(t - ref).max() <= 1e-5
    assert resize_bilinear(torch.from_numpy(x)[None], (5, 5)).shape == (1, 2, 5, 5)
    assert resize_bilinear(torch.from_numpy(x[0]), (5, 5)).shape == (5, 5)
