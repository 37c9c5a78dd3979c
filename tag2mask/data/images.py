"""The one image-decoding function used by every tag2mask command.

Policy (documented in ``docs/evaluation.md``):

* **EXIF orientation is always applied** (``PIL.ImageOps.exif_transpose``). The official
  CLIP-ES / WeCLIP code mixes PIL (which ignores EXIF) and OpenCV (which applies it), so the
  same photo could be read in two orientations; we pick one rule everywhere. VOC / COCO JPEGs
  carry no rotating orientation tag, so reference numbers are unaffected.
* **Mode conversion to 8-bit RGB**:

  ======================  =====================================================
  input mode              rule
  ======================  =====================================================
  ``RGB``                 unchanged
  ``L``, ``1``, ``P``     grey / palette colours replicated to RGB (PIL ``convert``)
  ``LA``, ``RGBA``, ``PA``,  alpha-composited **onto black**: ``round(c * a / 255)``;
  ``P`` with transparency  fully opaque pixels are unchanged, so an opaque RGBA image
                          decodes exactly like ``convert("RGB")`` (what the official
                          code does), and transparent areas never leak hidden colours
  ``I;16*`` / ``I``       16-bit grey: values clipped to 0..65535 then ``>> 8``
                          (the high byte; 65535 -> 255, 257 -> 1), replicated to RGB
  ``F``                   float grey: clipped to 0..255, rounded (PIL's own F -> L rule)
  ``CMYK``                PIL's naive conversion (no ICC colour management)
  ``YCbCr``, ``LAB``, ``HSV``  PIL ``convert("RGB")``
  ======================  =====================================================

  16-bit *colour* PNGs are reduced to 8-bit by Pillow itself while decoding.
* Multi-frame files (GIF, TIFF) use the first frame.
* Missing, zero-byte, truncated or non-image files raise :class:`ImageDecodeError` naming
  the file (we never set ``LOAD_TRUNCATED_IMAGES``: a half-grey image would silently skew
  CAMs). Images with more than ``max_pixels`` pixels are refused before decoding.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageDecodeError", "MAX_PIXELS", "fit_max_pixels", "load_image", "load_image_array", "to_rgb"]

#: default limit on width * height (refuses decompression bombs); 2.5x a 6000x6000 photo
MAX_PIXELS: int = 100_000_000


class ImageDecodeError(ValueError):
    """An image file could not be decoded; ``path`` names the file."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def _composite_on_black(img: Image.Image) -> Image.Image:
    """RGBA -> RGB with ``round(c * a / 255)`` per channel (integer arithmetic, exact)."""
    arr = np.asarray(img.convert("RGBA"), dtype=np.uint16)
    rgb, a = arr[..., :3], arr[..., 3:4]
    out = (rgb * a + 127) // 255  # rounding half-up of c*a/255; a=255 gives c exactly
    return Image.fromarray(out.astype(np.uint8), mode="RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an already-loaded PIL image to 8-bit RGB with the module's rules."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _composite_on_black(img)
    if mode.startswith("I"):
        # I;16, I;16B, I;16L, I;16N and I (Pillow >= 10 opens 16-bit grey PNGs as I or I;16)
        arr = np.asarray(img).astype(np.int64)
        grey = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB")
    # L, 1, P (opaque), CMYK, YCbCr, LAB, HSV: PIL's conversions are the documented rule
    return img.convert("RGB")


def load_image(path: "str | Path | RemoteFile", max_pixels: int | None = MAX_PIXELS, data: bytes | None = None) -> Image.Image:
    """Decode ``path`` to an RGB PIL image with EXIF orientation applied.

    Args:
        path: image file; a :class:`~tag2mask.io.uri_inputs.RemoteFile` (an object store's) is read through
            ``pyarrow.fs`` when ``data`` is not given (an unreadable one: ``ImageDecodeError``).
        max_pixels: refuse images with more pixels (width * height) than this before
            decoding them; ``None`` disables our check (Pillow's own hard limit of
            ``2 * Image.MAX_IMAGE_PIXELS`` still applies).
        data: the file's bytes, already read (e.g. by Ray Data): decoded by the same rules, and
            ``path`` only names the file in messages.

    Returns:
        ``PIL.Image.Image`` in mode ``RGB`` (``(W, H)`` size after EXIF rotation).

    Raises:
        ImageDecodeError: missing, empty, truncated, non-image, or too large.
    """
    from tag2mask.io.uri_inputs import RemoteFile, read_uri

    if isinstance(path, RemoteFile):  # an object store's file: its bytes through pyarrow.fs
        if data is None:
            try:
                data = read_uri(path.uri)
            except FileNotFoundError:
                raise ImageDecodeError(path.uri, "file not found") from None
            except (OSError, ValueError) as exc:
                raise ImageDecodeError(path.uri, f"cannot be read ({exc})") from None
        path = path.uri
    # with the bytes in hand ``path`` only names them in messages: kept as given (a URI stays whole)
    name, path = (path if data is not None else Path(path)), Path(path)
    if data is None:
        if not path.is_file():
            if path.is_symlink() and not path.exists():
                raise ImageDecodeError(name, f"file not found (a broken symbolic link to {os.readlink(path)})")
            raise ImageDecodeError(name, "file not found" if not path.exists() else "not a regular file (a folder?)")
    if (len(data) if data is not None else path.stat().st_size) == 0:
        raise ImageDecodeError(name, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # we enforce our own limit below; Pillow's warning would only add noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as img:
                w, h = img.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageDecodeError(
                        name, f"image is {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels} "
                        "(possible decompression bomb; raise max_pixels if the image is genuine)")
                img.seek(0)
                img.load()
                oriented = ImageOps.exif_transpose(img)
                rgb = to_rgb(oriented)
                if rgb is img:  # detach from the file handle that the with-block closes
                    rgb = rgb.copy()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(name, f"image too large ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(name, "not a recognised image format (is it really an image?)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated / corrupt data as OSError ("image file is truncated") or SyntaxError
        raise ImageDecodeError(name, f"corrupt or truncated image data ({exc})") from exc
    return rgb


def load_image_array(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Like :func:`load_image` but returns an ``(H, W, 3)`` uint8 C-contiguous array."""
    return np.ascontiguousarray(np.asarray(load_image(path, max_pixels=max_pixels), dtype=np.uint8))


def fit_max_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest ``(w, h)`` with the same aspect ratio and ``w * h <= max_pixels`` (each side >= 1).

    Images already within the limit are returned unchanged. Commands that bound their working
    resolution (``label``, ``segment``, the web server) process at this size and scale the mask back.
    """
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    while w * h > max_pixels:  # floating point may overshoot by a pixel row
        if w >= h:
            w -= 1
        else:
            h -= 1
    return w, h
