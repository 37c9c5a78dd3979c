"""VOC colour palette and palette-PNG label maps.

Label maps are stored as 8-bit palette PNGs (mode ``P``) whose pixel *indices* are the
class ids (0 background, 255 ignore), exactly like VOC's ``SegmentationClass``; the palette
only affects how viewers show them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tag2mask.io.atomic import atomic_path

__all__ = ["voc_palette", "encode_label_png", "save_label_png", "read_label_png", "colorize"]


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard VOC colour map: ``(n, 3)`` uint8; colour ``i`` spreads the bits of ``i``
    over the high bits of R, G, B (0 -> black, 1 -> (128, 0, 0), 255 -> (224, 224, 192))."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


_PALETTE = voc_palette(256)


def colorize(label: np.ndarray) -> np.ndarray:
    """``(H, W)`` uint8 label map -> ``(H, W, 3)`` uint8 VOC colours."""
    return _PALETTE[np.asarray(label, dtype=np.uint8)]


def _label_image(label: np.ndarray, where: str) -> Image.Image:
    arr = np.asarray(label)
    if arr.ndim != 2:
        raise ValueError(f"{where}: label map must be (H, W), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"{where}: label values must be in 0..255, got {arr.min()}..{arr.max()}")
        arr = arr.astype(np.uint8)
    # build mode P directly from the bytes so the values are the palette indices
    img = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.tobytes())
    img.putpalette(_PALETTE.reshape(-1).tolist())
    return img


def encode_label_png(label: np.ndarray) -> bytes:
    """An ``(H, W)`` label map (values 0..255) as the bytes of a VOC-palette PNG (what the web API returns)."""
    buf = io.BytesIO()
    _label_image(label, "label map").save(buf, format="PNG")
    return buf.getvalue()


def save_label_png(path: str | Path, label: np.ndarray) -> None:
    """Write an ``(H, W)`` label map (values 0..255) as a VOC-palette PNG, atomically.

    Raises:
        ValueError: not 2-D, or values outside 0..255 (they would wrap silently in uint8).
    """
    img = _label_image(label, str(path))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a label PNG (mode ``P`` indices or ``L`` values) as ``(H, W)`` uint8.

    No EXIF rotation is applied: label maps are pixel-aligned data, not photos.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: unreadable, or a colour (RGB) image rather than a label map.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("P", "L"):
                return np.array(img, dtype=np.uint8)
            if mode in ("I", "I;16", "I;16B", "I;16L"):
                arr = np.array(img)
                if arr.size and (arr.min() < 0 or arr.max() > 255):
                    raise ValueError(f"{path}: 16-bit label values {arr.min()}..{arr.max()} exceed 255")
                return arr.astype(np.uint8)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: cannot read label PNG ({exc})") from exc
    raise ValueError(f"{path}: label map must be a palette (P) or grayscale (L) PNG, got mode {mode}")
