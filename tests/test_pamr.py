"""Property tests of the PAMR refinement (no reference implementation is used)."""

from __future__ import annotations

import pytest
import torch

from tag2mask.refinement.pamr import PAMR


def _two_class_masks(H: int, W: int) -> torch.Tensor:
    m = torch.zeros(1, 2, H, W)
    m[:, 0, H // 3 : 2 * H // 3, 2 : W // 4] = 1.0  # a blob on the left side
    m[:, 1] = 1.0 - m[:, 0]
    return m


def test_constant_image_smooths_and_preserves_class_sums():
    H, W = 33, 47
    masks = _two_class_masks(H, W)
    out = PAMR(num_iter=5)(torch.full((1, 3, H, W), 0.3), masks)
    assert out.shape == masks.shape
    # convex combinations: per-pixel class sum and value range are preserved
    assert torch.allclose(out.sum(1), torch.ones(1, H, W), atol=1e-5)
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6
    # flat image -> uniform affinities -> the blob diffuses
    assert out[:, 0].max() < 1.0 and (out[:, 0] > 1e-3).sum() > (masks[:, 0] > 0).sum()
    # a constant mask is a fixed point
    const = torch.full((1, 3, H, W), 0.25)
    assert torch.allclose(PAMR()(torch.rand(1, 3, H, W), const), const, atol=1e-6)


def test_uniform_affinities_on_flat_image():
    aff = PAMR(dilations=(1, 3)).affinity(torch.ones(2, 3, 9, 11))
    assert aff.shape == (2, 16, 9, 11)
    assert torch.allclose(aff, torch.full_like(aff, 1 / 16))


def test_edge_stops_propagation():
    H, W = 40, 61
    img = torch.zeros(1, 3, H, W)
    img[..., W // 2 :] = 1.0  # vertical step edge
    masks = _two_class_masks(H, W)
    pamr = PAMR(num_iter=10)
    out = pamr(img, masks)
    leak = out[:, 0, :, W // 2 :].max()
    flat_leak = pamr(torch.ones_like(img), masks)[:, 0, :, W // 2 :].max()
    assert leak < 1e-6 < flat_leak
    assert out[:, 0, :, : W // 2].sum() > 0.3 * masks[:, 0].sum()  # mass stays on its side


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 3, 17, 9), (3, 3, 1, 13)])
def test_odd_sizes_batches_and_large_dilations(shape):
    B, _, H, W = shape
    g = torch.Generator().manual_seed(0)
    img = torch.rand(shape, generator=g)
    masks = torch.softmax(torch.randn(B, 4, H, W, generator=g), dim=1)
    out = PAMR()(img, masks)  # dilation 24 exceeds these images: borders replicate
    assert out.shape == masks.shape and torch.isfinite(out).all()
    assert torch.allclose(out.sum(1), torch.ones(B, H, W), atol=1e-5)


def test_masks_resized_to_image_and_dtype():
    img = torch.rand(1, 3, 16, 20, dtype=torch.float64)
    masks = torch.rand(1, 2, 4, 5, dtype=torch.float64)
    out = PAMR(num_iter=2)(img, masks)
    assert out.shape == (1, 2, 16, 20) and out.dtype == torch.float64


def test_invalid_arguments():
    with pytest.raises(ValueError):
        PAMR(dilations=())
    with pytest.raises(ValueError):
        PAMR(num_iter=-1)
    with pytest.raises(ValueError):
        PAMR()(torch.rand(1, 3, 4, 4), torch.rand(2, 2, 4, 4))
