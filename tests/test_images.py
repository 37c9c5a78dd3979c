"""Image decoding policy: every input mode becomes (H, W, 3) uint8 by the documented rule."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tag2mask.data.images import ImageDecodeError, load_image, load_image_array


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_rgb_unchanged(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = load_image_array(_save(Image.fromarray(arr), tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, arr)


def test_grayscale_replicated(tmp_path: Path) -> None:
    g = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
    out = load_image_array(_save(Image.fromarray(g, mode="L"), tmp_path / "g.png"))
    assert out.shape == (4, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_palette_uses_colours(tmp_path: Path) -> None:
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    img = Image.frombytes("P", (2, 2), idx.tobytes())
    img.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * (253 * 3))
    out = load_image_array(_save(img, tmp_path / "p.png"))
    np.testing.assert_array_equal(out[0, 1], [10, 20, 30])
    np.testing.assert_array_equal(out[1, 0], [200, 100, 50])


def test_rgba_composited_on_black(tmp_path: Path) -> None:
    arr = np.zeros((1, 3, 4), dtype=np.uint8)
    arr[0, 0] = (200, 100, 50, 255)  # opaque: unchanged
    arr[0, 1] = (200, 100, 50, 0)  # transparent: black
    arr[0, 2] = (200, 100, 51, 128)  # half: round(c * 128 / 255)
    out = load_image_array(_save(Image.fromarray(arr, mode="RGBA"), tmp_path / "a.png"))
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])
    np.testing.assert_array_equal(out[0, 2], [round(200 * 128 / 255), round(100 * 128 / 255), round(51 * 128 / 255)])


def test_la_composited(tmp_path: Path) -> None:
    img = Image.fromarray(np.array([[[100, 255], [100, 0]]], dtype=np.uint8), mode="LA")
    out = load_image_array(_save(img, tmp_path / "la.png"))
    np.testing.assert_array_equal(out[0, 0], [100] * 3)
    np.testing.assert_array_equal(out[0, 1], [0] * 3)


def test_16bit_high_byte(tmp_path: Path) -> None:
    a = np.array([[0, 255, 256, 65535], [257, 32768, 1000, 40000]], dtype=np.uint16)
    out = load_image_array(_save(Image.fromarray(a), tmp_path / "g16.png"))
    np.testing.assert_array_equal(out[..., 0], (a >> 8).astype(np.uint8))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_float_clipped(tmp_path: Path) -> None:
    a = np.array([[-5.0, 0.4, 127.6, 300.0]], dtype=np.float32)
    out = load_image_array(_save(Image.fromarray(a, mode="F"), tmp_path / "f.tiff"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 128, 255])


def test_cmyk_converted(tmp_path: Path) -> None:
    img = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # pure red in naive CMYK
    out = load_image_array(_save(img, tmp_path / "c.tiff"))
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])


def test_cmyk_jpeg(tmp_path: Path) -> None:
    img = Image.new("CMYK", (16, 8), (0, 0, 0, 0))
    out = load_image_array(_save(img, tmp_path / "c.jpg", quality=95))
    assert out.shape == (8, 16, 3) and out.min() > 240  # white, within JPEG noise


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_applied(tmp_path: Path, orientation: int) -> None:
    arr = np.zeros((10, 20, 3), dtype=np.uint8)
    arr[:5, :5] = 255  # white block at the top-left of the stored pixels
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "r.jpg"
    img.save(path, exif=exif.tobytes(), quality=100)
    out = load_image_array(path)
    if orientation in (6, 8):
        assert out.shape == (20, 10, 3)  # rotated by 90 degrees
    else:
        assert out.shape == (10, 20, 3)
    # compare with an explicit transpose of the stored pixels
    stored = np.asarray(Image.open(path).convert("RGB"))
    op = {6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90, 3: Image.Transpose.ROTATE_180}[orientation]
    expected = np.asarray(Image.fromarray(stored).transpose(op))
    np.testing.assert_array_equal(out, expected)


def test_returns_pil_rgb(tmp_path: Path) -> None:
    img = load_image(_save(Image.new("L", (4, 3), 7), tmp_path / "x.png"))
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (4, 3)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")


def test_zero_byte(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty.jpg.*empty"):
        load_image(p)


def test_text_named_jpg(tmp_path: Path) -> None:
    p = tmp_path / "notes.jpg"
    p.write_text("this is not an image\n" * 10)
    with pytest.raises(ImageDecodeError, match="notes.jpg"):
        load_image_array(p)
    assert issubclass(ImageDecodeError, ValueError)


@pytest.mark.parametrize("fmt,suffix", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_truncated(tmp_path: Path, fmt: str, suffix: str) -> None:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
    p = tmp_path / f"cut{suffix}"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match=f"cut{suffix}"):
        load_image(p)


def test_max_pixels_guard(tmp_path: Path) -> None:
    p = _save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    with pytest.raises(ImageDecodeError, match="big.png.*max_pixels"):
        load_image(p, max_pixels=9999)
    assert load_image(p, max_pixels=10000).size == (100, 100)
    assert load_image(p, max_pixels=None).size == (100, 100)
