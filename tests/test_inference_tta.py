"""Sliding-window and multi-scale + flip inference against direct computations on small cases."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tag2mask.inference import multiscale_flip_logits, slide_logits, sliding_windows


def crop_dependent_fn(x: torch.Tensor) -> torch.Tensor:
    """Half-resolution logits that depend on the whole crop (so window placement matters)."""
    pooled = F.avg_pool2d(x, 2, ceil_mode=True)
    crop_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return torch.cat([pooled * (1 + crop_mean), pooled.flip(1) - crop_mean], dim=1)


def starts(size: int, crop: int, stride: int) -> list[int]:
    if size <= crop:
        return [0]
    out = list(range(0, size - crop, stride))
    return out + [size - crop]


def direct_slide(fn, x: torch.Tensor, crop: int, stride: int) -> np.ndarray:
    b, _, h, w = x.shape
    ch, cw = min(crop, h), min(crop, w)
    total, count = None, np.zeros((h, w))
    for y in starts(h, crop, stride):
        for xx in starts(w, crop, stride):
            piece = x[:, :, y : y + ch, xx : xx + cw]
            logits = F.interpolate(fn(piece), size=(ch, cw), mode="bilinear", align_corners=False).numpy()
            if total is None:
                total = np.zeros((b, logits.shape[1], h, w))
            for i in range(y, y + ch):
                for j in range(xx, xx + cw):
                    total[:, :, i, j] += logits[:, :, i - y, j - xx]
                    count[i, j] += 1
    assert count.min() >= 1
    return total / count


def test_windows_cover_the_image_and_stay_inside():
    boxes = sliding_windows(10, 7, crop=4, stride=3)
    assert [b[:2] for b in boxes] == [(y, x) for y in (0, 3, 6) for x in (0, 3)]
    assert all(b[2:] == (4, 4) for b in boxes)
    assert sliding_windows(3, 5, crop=8, stride=4) == [(0, 0, 3, 5)]  # smaller than a crop: one clipped crop


@pytest.mark.parametrize("size,crop,stride,crop_batch", [((13, 17), 8, 5, 2), ((16, 9), 6, 6, 8), ((7, 7), 9, 4, 1)])
def test_slide_equals_direct_computation(size, crop, stride, crop_batch):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    got = slide_logits(crop_dependent_fn, x, crop, stride, crop_batch)
    np.testing.assert_allclose(got.numpy(), direct_slide(crop_dependent_fn, x, crop, stride), rtol=1e-5, atol=1e-6)


def test_multiscale_flip_equals_direct_computation():
    x = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    scales = (1.0, 0.5, 1.5)
    got = multiscale_flip_logits(crop_dependent_fn, x, scales, flip=True)
    want = 0
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        plain = F.interpolate(crop_dependent_fn(xs), size=(12, 10), mode="bilinear", align_corners=False)
        mirrored = F.interpolate(crop_dependent_fn(xs.flip(-1)), size=(12, 10), mode="bilinear", align_corners=False).flip(-1)
        want = want + (plain + mirrored) / 2
    assert torch.allclose(got, want / len(scales), atol=1e-6)
    # out_size keeps the logits at a lower resolution (WeCLIP averages at stride 16)
    assert multiscale_flip_logits(crop_dependent_fn, x, scales, out_size=(6, 5)).shape == (2, 6, 6, 5)


def test_weclip_multiscale_logits_keeps_the_official_recipe():
    from tag2mask.methods.weclip.inference import multiscale_logits

    conv = torch.nn.Conv2d(3, 4, 16, stride=16)  # a stand-in with WeCLIP's stride-16 output
    model = lambda x: SimpleNamespace(seg_logits=conv(x))  # noqa: E731
    image = torch.randn(1, 3, 70, 52)
    with torch.no_grad():
        got = multiscale_logits(model, image, scales=(1.0, 0.75), flip=True)
        size = (70 // 16, 52 // 16)
        acc = []
        for s in (1.0, 0.75):
            x = image if s == 1.0 else F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=False)
            seg = conv(torch.cat([x, x.flip(-1)]))
            if seg.shape[-2:] != size:
                seg = F.interpolate(seg, size=size, mode="bilinear", align_corners=False)
            acc.append((seg[0] + seg[1].flip(-1)) / 2)
        want = torch.stack(acc).mean(0, keepdim=True)
    assert torch.equal(got, want)


def test_segmenter_predict_matches_its_logits():
    from tag2mask.models import build_segmenter

    torch.manual_seed(0)
    model = build_segmenter("segformer", 4, tiny=True).eval()
    rgb = np.random.default_rng(0).integers(0, 256, size=(40, 36, 3), dtype=np.uint8)
    x = model.normalization(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)
    with torch.no_grad():
        whole = F.interpolate(model(x), size=(40, 36), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
        msf = multiscale_flip_logits(model, x, (1.0, 0.75), flip=True)[0].argmax(0).numpy()
        slid = slide_logits(model, x, 16, 10)[0].argmax(0).numpy()
    assert np.array_equal(model.predict(rgb), whole)
    assert np.array_equal(model.predict(rgb, mode="slide", crop=64, stride=32), whole)  # one window = whole image
    assert np.array_equal(model.predict(rgb, scales=(1.0, 0.75), flip=True), msf)
    assert np.array_equal(model.predict(rgb, mode="slide", crop=16, stride=10), slid)
    assert model.predict(rgb, long_side=48).shape == (40, 36)
    with pytest.raises(ValueError, match="mode"):
        model.predict(rgb, mode="tiles")
