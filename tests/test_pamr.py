"""PAMR: property tests (run on the shipped implementation *and* on the straightforward reference it
replaced, ``tests/pamr_reference.py``), and the shipped one held to 1e-5 of the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pamr_reference import ReferencePAMR
from tag2mask.refinement.pamr import PAMR

IMPLEMENTATIONS = pytest.mark.parametrize("PAMR", [PAMR, ReferencePAMR], ids=["vectorised", "reference"])


def _two_class_masks(H: int, W: int) -> torch.Tensor:
    m = torch.zeros(1, 2, H, W)
    m[:, 0, H // 3 : 2 * H // 3, 2 : W // 4] = 1.0  # a blob on the left side
    m[:, 1] = 1.0 - m[:, 0]
    return m


@IMPLEMENTATIONS
def test_constant_image_smooths_and_preserves_class_sums(PAMR):
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


@IMPLEMENTATIONS
def test_uniform_affinities_on_flat_image(PAMR):
    aff = PAMR(dilations=(1, 3)).affinity(torch.ones(2, 3, 9, 11))
    assert aff.shape == (2, 16, 9, 11)
    assert torch.allclose(aff, torch.full_like(aff, 1 / 16))


@IMPLEMENTATIONS
def test_edge_stops_propagation(PAMR):
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


@IMPLEMENTATIONS
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 3, 17, 9), (3, 3, 1, 13)])
def test_odd_sizes_batches_and_large_dilations(PAMR, shape):
    B, _, H, W = shape
    g = torch.Generator().manual_seed(0)
    img = torch.rand(shape, generator=g)
    masks = torch.softmax(torch.randn(B, 4, H, W, generator=g), dim=1)
    out = PAMR()(img, masks)  # dilation 24 exceeds these images: borders replicate
    assert out.shape == masks.shape and torch.isfinite(out).all()
    assert torch.allclose(out.sum(1), torch.ones(B, H, W), atol=1e-5)


@IMPLEMENTATIONS
def test_masks_resized_to_image_and_dtype(PAMR):
    img = torch.rand(1, 3, 16, 20, dtype=torch.float64)
    masks = torch.rand(1, 2, 4, 5, dtype=torch.float64)
    out = PAMR(num_iter=2)(img, masks)
    assert out.shape == (1, 2, 16, 20) and out.dtype == torch.float64


@IMPLEMENTATIONS
def test_invalid_arguments(PAMR):
    with pytest.raises(ValueError):
        PAMR(dilations=())
    with pytest.raises(ValueError):
        PAMR(num_iter=-1)
    with pytest.raises(ValueError):
        PAMR()(torch.rand(1, 3, 4, 4), torch.rand(2, 2, 4, 4))


# ---- the vectorised implementation against the reference ------------------------------------------------


def _scene(H: int, W: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A piecewise-flat image with soft noise and blurred edges, and CAM-like scores of 4 classes."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(1, 3, H, W)
    for _ in range(6):  # rectangles of flat colour (exactly flat regions: sigma = 0 there)
        y0, x0 = int(torch.randint(0, H, (1,), generator=g)), int(torch.randint(0, W, (1,), generator=g))
        image[:, :, y0: y0 + H // 3 + 1, x0: x0 + W // 3 + 1] = torch.rand(1, 3, 1, 1, generator=g)
    image[:, :, :, W // 2:] += 0.02 * torch.rand(1, 3, H, W - W // 2, generator=g)  # a noisy half
    image = torch.round(image.clamp(0, 1) * 255) / 255  # 8-bit levels, as decoded images
    coarse = torch.randn(1, 4, H // 16 + 2, W // 16 + 2, generator=g) * 3
    scores = F.interpolate(coarse.softmax(dim=1), size=(H, W), mode="bilinear", align_corners=False)
    return image, scores


@pytest.mark.parametrize("size", [(375, 500), (224, 224), (61, 47), (3, 200), (1, 1)])
def test_matches_the_reference_within_1e5(size):
    """Equal output: max |difference| <= 1e-5 on generated scenes (VOC size, tiny, degenerate)."""
    H, W = size
    for seed in range(2 if H * W > 50_000 else 4):
        image, scores = _scene(H, W, seed)
        new, ref = PAMR(), ReferencePAMR()
        aff_new, aff_ref = new.affinity(image), ref.affinity(image)
        assert aff_new.shape == aff_ref.shape
        assert float((aff_new - aff_ref).abs().max()) <= 1e-5
        out_new, out_ref = new(image, scores), ref(image, scores)
        assert out_new.dtype == out_ref.dtype == torch.float32
        assert float((out_new - out_ref).abs().max()) <= 1e-5, (size, seed)
        # the labels a user gets: equal except where two classes tie within the tolerance
        top2 = out_ref.topk(2, dim=1).values
        decided = (top2[:, 0] - top2[:, 1]) > 2e-5
        assert torch.equal(out_new.argmax(1)[decided], out_ref.argmax(1)[decided])


@pytest.mark.parametrize("iters,dilations", [(1, (1,)), (3, (2, 5)), (10, (8, 16))])
def test_matches_the_reference_for_other_settings(iters, dilations):
    image, scores = _scene(40, 70, seed=7)
    scores = torch.cat([scores, scores[:, :1] * 0.5], dim=1)  # 5 channels
    out_new = PAMR(iters, dilations)(image, scores)
    out_ref = ReferencePAMR(iters, dilations)(image, scores)
    assert float((out_new - out_ref).abs().max()) <= 1e-5


def test_float64_matches_the_reference():
    image, scores = _scene(30, 41, seed=3)
    out_new = PAMR()(image.double(), scores.double())
    out_ref = ReferencePAMR()(image.double(), scores.double())
    assert out_new.dtype == torch.float64 and float((out_new - out_ref).abs().max()) <= 1e-12


def test_same_bits_whatever_the_thread_count():
    """Serial and worker processes run with different thread counts: the bits must not change.

    The image is large enough (> 32k pixels) for torch to split element-wise work over threads.
    """
    image, scores = _scene(211, 307, seed=5)
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            outs.append(PAMR()(image, scores))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])


def test_early_exit_at_a_fixed_point_changes_nothing():
    """A step that returns its input bit for bit ends the loop; the result is that of every step.

    On a flat image with one dilation the 8 affinities are exactly 1/8, so a constant mask of 0.25
    is an exact fixed point (8 * 0.25/8 == 0.25 in float32).
    """
    steps = []

    class Counting(PAMR):
        def _pad(self, x, out=None):
            if out is not None:  # one padding per propagation step
                steps.append(1)
            return super()._pad(x, out)

    flat = torch.full((1, 3, 50, 60), 0.5)
    const = torch.full((1, 3, 50, 60), 0.25)
    out = Counting(num_iter=10, dilations=(1,))(flat, const)
    assert len(steps) == 1
    assert torch.equal(out, ReferencePAMR(num_iter=10, dilations=(1,))(flat, const)) and torch.equal(out, const)
    # not a fixed point (an edge): every step runs
    steps.clear()
    image, scores = _scene(50, 60, seed=1)
    Counting(num_iter=10)(image, scores)
    assert len(steps) == 10


def test_input_masks_are_not_modified_and_zero_steps():
    image, scores = _scene(20, 30, seed=2)
    kept = scores.clone()
    PAMR()(image, scores)
    assert torch.equal(scores, kept)
    assert torch.equal(PAMR(num_iter=0)(image, scores), scores)


def test_gradients_flow_to_the_masks():
    image, scores = _scene(16, 20, seed=4)
    masks = scores.clone().requires_grad_(True)
    out = PAMR(num_iter=3)(image, masks)
    (out[:, 0] * torch.arange(20.0)).sum().backward()
    assert masks.grad is not None and float(masks.grad.abs().sum()) > 0
    with torch.no_grad():
        assert float((out - PAMR(num_iter=3)(image, scores)).abs().max()) <= 1e-6


def test_label_refiner_pamr_masks_match_the_reference():
    """What ``tag2mask label --refine pamr`` writes: the masks of the reference PAMR."""
    from tag2mask.methods.clip_es.label_maps import LabelRefiner

    rng = np.random.default_rng(0)
    rgb = np.repeat(np.repeat(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), 8, 0), 8, 1)
    cams = rng.random((3, 96, 128)).astype(np.float16)
    keys = np.array([2, 7, 11])
    refiner = LabelRefiner("pamr")
    label, _ = refiner(cams, keys, rgb)
    refiner._pamr = ReferencePAMR()
    expected, _ = refiner(cams, keys, rgb)
    assert label.shape == (96, 128) and np.array_equal(label, expected)
