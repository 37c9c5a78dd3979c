"""``resize_uint8_like_cv2`` against OpenCV itself, bit for bit (cv2 is a test-only dependency)."""

from __future__ import annotations

import numpy as np
import pytest

from tag2mask.data.resize_cv2 import resize_uint8_like_cv2
from tag2mask.methods.ovss.windows import keep_ratio_size

# (H, W) -> (h, w): keep-ratio resizes of the SCLIP/ClearCLIP harness, up and down, exact factor 2
# (OpenCV's area shortcut), other integer factors, single rows/columns, same size
SIZES = [
    ((375, 500), (336, 448)), ((500, 375), (448, 336)), ((333, 250), (448, 336)), ((1080, 1920), (336, 597)),
    ((672, 1008), (336, 504)), ((900, 1200), (300, 400)), ((42, 56), (96, 128)), ((52, 38), (131, 96)),
    ((40, 40), (88, 88)), ((7, 5), (13, 11)), ((1, 9), (4, 20)), ((9, 1), (3, 2)), ((2, 2), (1, 1)),
    ((64, 64), (64, 64)), ((30, 90), (10, 30)), ((17, 23), (200, 3)),
]


def _image(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("src,dst", SIZES, ids=[f"{s[0]}x{s[1]}-{d[0]}x{d[1]}" for s, d in SIZES])
def test_bit_identical_to_cv2(src, dst):
    cv2 = pytest.importorskip("cv2")
    for channels in (3, None):
        img = _image(src + ((channels,) if channels else ()), hash((src, dst)) % 2**32)
        ours = resize_uint8_like_cv2(img, dst)
        assert ours.dtype == np.uint8 and ours.shape == dst + img.shape[2:]
        np.testing.assert_array_equal(ours, cv2.resize(img, (dst[1], dst[0]), interpolation=cv2.INTER_LINEAR))


def test_random_sizes_bit_identical_to_cv2():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(7)
    for _ in range(150):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        out = tuple(int(v) for v in rng.integers(1, 150, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = cv2.resize(img, (out[1], out[0]), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(resize_uint8_like_cv2(img, out), expected, err_msg=f"{(h, w)} -> {out}")


def test_properties_without_cv2():
    flat = np.full((13, 17, 3), 77, np.uint8)
    assert (resize_uint8_like_cv2(flat, (40, 9)) == 77).all()  # constants are preserved, borders included
    img = _image((12, 20, 3), 1)
    np.testing.assert_array_equal(resize_uint8_like_cv2(img, (12, 20)), img)  # same size: unchanged
    half = resize_uint8_like_cv2(img, (6, 10))  # exact 2x: rounded 2x2 means
    quad = img[0::2, 0::2].astype(int) + img[1::2, 0::2] + img[0::2, 1::2] + img[1::2, 1::2]
    np.testing.assert_array_equal(half, (quad + 2) // 4)
    with pytest.raises(ValueError, match="uint8"):
        resize_uint8_like_cv2(img.astype(np.float32), (3, 3))
    with pytest.raises(ValueError, match="1x1"):
        resize_uint8_like_cv2(img, (0, 3))


def test_keep_ratio_size_is_mmcv_rescale():
    # scale = min(long_max / long, short / short_side), sizes int(x * scale + 0.5)
    assert keep_ratio_size(375, 500, 336, 2048) == (336, 448)
    assert keep_ratio_size(52, 38, 96, 2048) == (131, 96)
    assert keep_ratio_size(100, 5000, 336, 2048) == (41, 2048)  # the long side caps the scale
    assert keep_ratio_size(500, 375, 520, 520) == (520, 390)  # MaskCLIP's Pascal Context (520, 520)
