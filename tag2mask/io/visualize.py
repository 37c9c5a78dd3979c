"""Overlay and CAM heat-map PNGs (Pillow only).

* :func:`overlay_image`: the photo blended with VOC colours of a label map, plus a legend
  strip under the image listing the classes present (colour swatch + name).
* :func:`cam_heatmap`: a CAM in [0, 1] mapped to a jet-like colour ramp and blended over the
  photo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tag2mask.io.atomic import atomic_path
from tag2mask.io.palette import voc_palette

__all__ = ["overlay_image", "overlay_beside_mask", "mask_image", "cam_heatmap", "save_overlay", "save_cam_heatmap",
           "jet", "label_colour", "legend_entries"]

_PAL = voc_palette(256)


def _check_pair(image: np.ndarray, other: np.ndarray, what: str) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
    if other.shape[:2] != img.shape[:2]:
        raise ValueError(f"{what} size {other.shape[:2]} differs from image size {img.shape[:2]}")
    return img


def overlay_image(image: np.ndarray, label: np.ndarray, class_names: Sequence[str] | None = None,
                  alpha: float = 0.5, legend: bool = True) -> Image.Image:
    """Blend ``(H, W, 3)`` uint8 ``image`` with the colours of ``(H, W)`` uint8 ``label``.

    Background (0) and ignore (255) pixels are left as the photo. ``class_names`` are the
    foreground names (label ``k`` -> ``class_names[k - 1]``); the legend lists the classes
    present. Returns an RGB PIL image (taller than the input when a legend is drawn).
    """
    label = np.asarray(label)
    img = _check_pair(image, label, "label map").astype(np.float32)
    colours = _PAL[label.astype(np.uint8)].astype(np.float32)
    fg = ((label != 0) & (label != 255))[..., None]
    out = np.where(fg, (1 - alpha) * img + alpha * colours, img)
    pil = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    present = [int(v) for v in np.unique(label) if v not in (0, 255)]
    if not legend or not present:
        return pil
    font = ImageFont.load_default()
    row_h, pad = 14, 4
    h, w = label.shape
    # lay entries out left to right, wrapping to new rows when the width is used up
    entries = []
    for v in present:
        name = class_names[v - 1] if class_names and v - 1 < len(class_names) else f"class {v}"
        entries.append((v, name, int(ImageDraw.Draw(pil).textlength(name, font=font)) + row_h + 2 * pad))
    rows, x = 1, 0
    for *_, ew in entries:
        if x and x + ew > w:
            rows, x = rows + 1, 0
        x += ew
    canvas = Image.new("RGB", (w, h + rows * row_h + pad), (255, 255, 255))
    canvas.paste(pil, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x, y = 0, h + pad // 2
    for v, name, ew in entries:
        if x and x + ew > w:
            x, y = 0, y + row_h
        draw.rectangle([x + pad, y + 2, x + pad + row_h - 4, y + row_h - 2], fill=tuple(int(c) for c in _PAL[v]),
                       outline=(0, 0, 0))
        draw.text((x + pad + row_h, y + 1), name, fill=(0, 0, 0), font=font)
        x += ew
    return canvas


def label_colour(value: int) -> tuple[int, int, int]:
    """The RGB colour :func:`overlay_image` paints label ``value`` with (the VOC palette)."""
    return tuple(int(c) for c in _PAL[int(value)])  # type: ignore[return-value]


def legend_entries(class_names: Sequence[str], values: Sequence[int] | None = None) -> list[tuple[str, tuple[int, int, int]]]:
    """``(name, colour)`` per label value (default ``1..len(class_names)``; label ``k`` is ``class_names[k - 1]``),
    for a legend drawn once on a page instead of under every overlay."""
    values = range(1, len(class_names) + 1) if values is None else values
    return [(class_names[v - 1] if 0 < v <= len(class_names) else f"class {v}", label_colour(v)) for v in values]


def jet(values: np.ndarray) -> np.ndarray:
    """Map ``(...)`` floats in [0, 1] to ``(..., 3)`` uint8 colours of a jet-like ramp
    (dark blue -> cyan -> yellow -> dark red); NaN maps to 0."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0, 1)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.rint(np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def cam_heatmap(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend the jet colours of ``(H, W)`` float ``cam`` (clipped to [0, 1]) over the photo."""
    cam = np.asarray(cam)
    img = _check_pair(image, cam, "CAM").astype(np.float32)
    out = (1 - alpha) * img + alpha * jet(cam).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def mask_image(label: np.ndarray) -> Image.Image:
    """``(H, W)`` uint8 label map -> RGB image of flat palette colours (0 black, 255 the VOC outline colour)."""
    return Image.fromarray(_PAL[np.asarray(label).astype(np.uint8)])


def overlay_beside_mask(image: np.ndarray, label: np.ndarray, alpha: float = 0.5, gap: int = 4) -> Image.Image:
    """The overlay (left) and the flat mask (right), ``gap`` white pixels apart: ``(H, 2 W + gap)`` RGB.

    A blend of class colours over a photo of coloured shapes looks like the photo; the flat mask next
    to it shows the regions themselves.
    """
    over = overlay_image(image, label, alpha=alpha, legend=False)
    w, h = over.size
    canvas = Image.new("RGB", (2 * w + gap, h), (255, 255, 255))
    canvas.paste(over, (0, 0))
    canvas.paste(mask_image(label), (w + gap, 0))
    return canvas


def save_overlay(path: str | Path, image: np.ndarray, label: np.ndarray,
                 class_names: Sequence[str] | None = None, alpha: float = 0.5, legend: bool = True,
                 beside_mask: bool = False) -> None:
    """Write :func:`overlay_image` as a PNG, atomically (``legend=False``: the image size, no legend strip;
    ``beside_mask``: :func:`overlay_beside_mask`, no legend)."""
    pil = overlay_beside_mask(image, label, alpha) if beside_mask else \
        overlay_image(image, label, class_names, alpha, legend=legend)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")


def save_cam_heatmap(path: str | Path, image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> None:
    """Write :func:`cam_heatmap` as a PNG, atomically."""
    pil = cam_heatmap(image, cam, alpha)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
