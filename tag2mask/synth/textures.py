"""Procedural stuff textures (grass, water, sky, brick, sand, wood) with numpy + PIL resizes.

Every texture function has the signature ``f(rng, size) -> np.ndarray`` of shape ``(size, size, 3)``,
dtype float32, values in ``[0, 255]``. They are cheap (a few low-resolution noise grids upsampled
bilinearly, plus sines and index arithmetic) so that scene generation stays well above 100 images/s.
Each texture has random orientation/scale/tint so that a stuff class is a *family*, not one image.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

TextureFn = Callable[[np.random.Generator, int], np.ndarray]


def smooth_noise(rng: np.random.Generator, size: int, gh: int, gw: int) -> np.ndarray:
    """Value noise: a ``(gh, gw)`` uniform grid upsampled bilinearly to ``(size, size)`` float32 in [0, 1].

    Anisotropic grids (``gh != gw``) give streaks, e.g. ``gh`` small and ``gw`` large -> vertical blades.
    """
    grid = rng.random((max(gh, 2), max(gw, 2)), dtype=np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BILINEAR))


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinate grids ``(yy, xx)`` of shape ``(size, 1)`` / ``(1, size)`` (broadcastable)."""
    r = np.arange(size, dtype=np.float32)
    return r[:, None], r[None, :]


def _rotated(size: int, angle: float) -> np.ndarray:
    """Coordinate along direction ``angle`` (radians), shape ``(size, size)`` float32."""
    yy, xx = _coords(size)
    return xx * np.float32(np.cos(angle)) + yy * np.float32(np.sin(angle))


def _lerp(a: np.ndarray | tuple, b: np.ndarray | tuple, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of two RGB colours: ``t`` (H, W) -> (H, W, 3) float32."""
    a32 = np.asarray(a, dtype=np.float32)
    d32 = np.asarray(b, dtype=np.float32) - a32
    out = np.empty(t.shape + (3,), dtype=np.float32)
    # Per-channel loop: broadcasting over a trailing axis of length 3 is ~10x slower in numpy.
    for c in range(3):
        np.multiply(t, d32[c], out=out[..., c])
        out[..., c] += a32[c]
    return out


def _tint(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float = 12.0) -> np.ndarray:
    """Base colour with small per-image jitter so textures vary across samples."""
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32), 0, 255)


def grass(rng: np.random.Generator, size: int) -> np.ndarray:
    """Green, vertically streaked blades with low-frequency patches of dry/lush grass."""
    patches = smooth_noise(rng, size, 5, 5)
    blades = smooth_noise(rng, size, 6, size // 3)  # few rows, many columns -> vertical streaks
    grain = smooth_noise(rng, size, size // 2, size // 2)
    t = np.clip(0.55 * patches + 0.6 * (blades - 0.5) + 0.3 * (grain - 0.5) + 0.2, 0, 1)
    return _lerp(_tint(rng, (30, 85, 25)), _tint(rng, (115, 175, 55)), t)


def water(rng: np.random.Generator, size: int) -> np.ndarray:
    """Blue water with wavy horizontal ripples and sparse bright highlights."""
    yy, _ = _coords(size)
    warp = smooth_noise(rng, size, 4, 4)
    freq = rng.uniform(0.25, 0.5)
    ripple = 0.5 + 0.5 * np.sin(yy * np.float32(freq) + 8.0 * warp)
    depth = smooth_noise(rng, size, 3, 3)
    img = _lerp(_tint(rng, (15, 55, 130)), _tint(rng, (60, 130, 200)), 0.55 * ripple + 0.45 * depth)
    glint = np.clip((ripple - 0.9) * 6.0, 0, 1) * (depth > 0.5)
    return _lerp_img(img, (200, 225, 245), glint * 0.6)


def _lerp_img(img: np.ndarray, rgb: tuple[int, int, int], t: np.ndarray) -> np.ndarray:
    """Blend an image ``(H, W, 3)`` float32 in place towards a flat colour with weight ``t`` (H, W)."""
    for c in range(3):
        ch = img[..., c]
        ch += (np.float32(rgb[c]) - ch) * t
    return img


def sky(rng: np.random.Generator, size: int) -> np.ndarray:
    """Vertical blue gradient (deep at the top) with soft white clouds."""
    yy, _ = _coords(size)
    t = np.broadcast_to(yy / np.float32(size - 1), (size, size))
    img = _lerp(_tint(rng, (55, 115, 210)), _tint(rng, (180, 212, 245)), t)
    cloud = np.clip((smooth_noise(rng, size, 4, 6) - rng.uniform(0.45, 0.7)) * 3.0, 0, 1)
    return _lerp_img(img, (245, 246, 250), cloud * 0.85)


def brick(rng: np.random.Generator, size: int) -> np.ndarray:
    """Running-bond brick wall: per-brick colour jitter, grey mortar lines."""
    bh = int(size / rng.uniform(6, 11))
    bw = int(bh * rng.uniform(2.0, 2.6))
    mortar = max(1, bh // 8)
    yy, xx = np.mgrid[0:size, 0:size]
    row = yy // bh
    xs = xx + (row % 2) * (bw // 2)  # offset every other row
    col = xs // bw
    jitter = rng.random((size // bh + 2, size // bw + 3), dtype=np.float32)[row, col]
    base = _lerp(_tint(rng, (125, 45, 30)), _tint(rng, (185, 85, 55)), jitter)
    grain = smooth_noise(rng, size, size // 3, size // 3)
    scale = 0.88 + 0.24 * grain
    for c in range(3):
        base[..., c] *= scale
    is_mortar = ((yy % bh) < mortar) | ((xs % bw) < mortar)
    base[is_mortar] = _tint(rng, (185, 180, 170))
    return base


def sand(rng: np.random.Generator, size: int) -> np.ndarray:
    """Beige sand: fine grain plus gentle wind-rippled dunes at a random angle."""
    u = _rotated(size, rng.uniform(0, np.pi))
    warp = smooth_noise(rng, size, 4, 4)
    dunes = 0.5 + 0.5 * np.sin(u * np.float32(rng.uniform(0.12, 0.25)) + 6.0 * warp)
    grain = rng.random((size, size), dtype=np.float32)
    t = 0.45 * dunes + 0.3 * grain + 0.25 * smooth_noise(rng, size, 5, 5)
    return _lerp(_tint(rng, (190, 155, 100)), _tint(rng, (240, 215, 160)), t)


def wood(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brown planks: wavy grain lines along a random axis, plank seams parallel to the grain."""
    angle = rng.choice([0.0, np.pi / 2]) + rng.uniform(-0.15, 0.15)
    u = _rotated(size, angle)  # across the grain
    warp = smooth_noise(rng, size, 3, 3)
    grain = 0.5 + 0.5 * np.sin(u * np.float32(rng.uniform(0.35, 0.7)) + 10.0 * warp)
    plank_w = size / rng.uniform(3, 6)
    seam = (np.mod(u, plank_w) < 1.5).astype(np.float32)
    shade = np.floor(u / plank_w)
    plank_tone = (np.sin(shade * 12.9898) * 0.5 + 0.5).astype(np.float32)  # per-plank tone, cheap hash
    t = np.clip(0.5 * grain ** 3 + 0.35 * plank_tone + 0.15 * smooth_noise(rng, size, 4, 4), 0, 1)
    img = _lerp(_tint(rng, (85, 50, 25)), _tint(rng, (165, 110, 60)), t)
    return _lerp_img(img, (45, 25, 12), seam * 0.8)


TEXTURES: dict[str, TextureFn] = {
    "grass": grass,
    "water": water,
    "sky": sky,
    "brick": brick,
    "sand": sand,
    "wood": wood,
}


def render_stuff(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Render stuff texture ``name`` as ``(size, size, 3)`` float32 in [0, 255]."""
    try:
        fn = TEXTURES[name]
    except KeyError:
        raise KeyError(f"unknown stuff texture {name!r}; known: {', '.join(TEXTURES)}") from None
    return np.clip(fn(rng, size), 0, 255)
