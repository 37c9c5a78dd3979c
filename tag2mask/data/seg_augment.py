"""Training augmentation for segmentation: random scale, pad + crop, flip, photometric jitter.

Order (deeplab-pytorch's, which CLIP-ES stage 3 uses; mmseg differs only in minor ways, see
``docs/segmenter.md``): rescale the image (bilinear, ``align_corners=False``) and the mask (nearest)
by a factor drawn from ``scales`` (uniformly among the listed values) or from ``U(scale_range)``,
optionally relative to an mmseg-style reference size; pad to at least ``crop × crop`` at the bottom
and right (image: the normalisation mean, i.e. 0 after normalisation; mask: 255 = ignore); take a
random ``crop × crop`` window; flip horizontally with p = 0.5; optional photometric jitter of the real
pixels (mmseg ``PhotoMetricDistortion``: brightness ±32, contrast and saturation ×U(0.5, 1.5), hue
±18/180 of the circle, each with p = 0.5); normalise.

All draws come from the ``numpy.random.Generator`` passed in, so a sample is a function of its
stream position (:mod:`tag2mask.engine.data_stream`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["SegAugment", "photometric_jitter", "rgb_to_hsv", "hsv_to_rgb"]

IGNORE = 255


@dataclass(frozen=True)
class SegAugment:
    """Augmentation settings (see the module docstring).

    Attributes:
        crop: output side.
        scales: discrete scale factors (deeplab-pytorch: 0.5 … 1.5); empty: ``scale_range``.
        scale_range: continuous factor range (mmseg ``ratio_range``: 0.5, 2.0).
        reference_size: ``(long, short)``: the factor multiplies the scale that fits the image into
            this box first (mmseg ``img_scale`` with ``keep_ratio``); ``None``: the original size.
        hflip: random horizontal flip.
        photometric: photometric jitter.
    """

    crop: int = 321
    scales: tuple[float, ...] = ()
    scale_range: tuple[float, float] = (0.5, 2.0)
    reference_size: Optional[tuple[int, int]] = None
    hflip: bool = True
    photometric: bool = False

    def __call__(self, rgb: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                 normalize: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``rgb (H, W, 3) uint8``, ``mask (H, W) uint8`` → ``image (3, crop, crop) float32``, ``target (crop, crop) int64``.

        ``normalize`` maps ``(1, 3, h, w)`` RGB in 0..1 to the network's input (its ``normalization``).
        """
        h, w = mask.shape
        factor = float(self.scales[int(rng.integers(len(self.scales)))]) if self.scales \
            else float(rng.uniform(*self.scale_range))
        if self.reference_size is not None:
            long_side, short_side = self.reference_size
            factor *= min(long_side / max(h, w), short_side / min(h, w))
        nh, nw = max(1, int(h * factor)), max(1, int(w * factor))
        image = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
        if (nh, nw) != (h, w):
            image = F.interpolate(image, size=(nh, nw), mode="bilinear", align_corners=False)
            mask = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.NEAREST))
        c = self.crop
        y0 = int(rng.integers(max(nh, c) - c + 1))
        x0 = int(rng.integers(max(nw, c) - c + 1))
        image = image[..., y0 : y0 + c, x0 : x0 + c]  # the real pixels of the window (top-left of the canvas)
        mask = mask[y0 : y0 + c, x0 : x0 + c]
        flip = self.hflip and rng.random() < 0.5
        if self.photometric:
            jittered = photometric_jitter(image[0].permute(1, 2, 0).numpy(), rng)
            image = torch.from_numpy(jittered).permute(2, 0, 1)[None]
        image = normalize(image.clamp(0, 255) / 255.0)[0]
        canvas = image.new_zeros((3, c, c))
        target = torch.full((c, c), IGNORE, dtype=torch.int64)
        ih, iw = mask.shape
        canvas[:, :ih, :iw] = image
        target[:ih, :iw] = torch.from_numpy(np.array(mask, dtype=np.int64))
        if flip:
            canvas, target = canvas.flip(-1), target.flip(-1)
        return canvas.contiguous(), target.contiguous()


def photometric_jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` on ``(H, W, 3)`` RGB values in 0..255 (float32 in and out)."""
    x = np.clip(rgb.astype(np.float32), 0, 255)
    if rng.integers(2):
        x = np.clip(x + rng.uniform(-32, 32), 0, 255)
    contrast_first = bool(rng.integers(2))
    contrast = (rng.integers(2), rng.uniform(0.5, 1.5))
    if contrast_first and contrast[0]:
        x = np.clip(x * contrast[1], 0, 255)
    hsv = rgb_to_hsv(x / 255.0)
    if rng.integers(2):
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 1)
    if rng.integers(2):
        hsv[..., 0] = (hsv[..., 0] + rng.integers(-18, 19) / 180.0) % 1.0
    x = hsv_to_rgb(hsv) * 255.0
    if not contrast_first and contrast[0]:
        x = np.clip(x * contrast[1], 0, 255)
    return x.astype(np.float32)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """RGB in 0..1 → HSV in 0..1 (hue as a fraction of the circle), any leading shape ``(..., 3)``."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = np.where(delta > 0, hue / 6.0, 0.0)
    sat = np.where(mx > 0, delta / np.where(mx > 0, mx, 1.0), 0.0)
    return np.stack([hue, sat, mx], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv[..., 0] * 6.0, hsv[..., 1], hsv[..., 2]
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape, dtype=np.float64)
    for k, (r, g, b) in enumerate(choices):
        sel = i == k
        out[..., 0] = np.where(sel, r, out[..., 0])
        out[..., 1] = np.where(sel, g, out[..., 1])
        out[..., 2] = np.where(sel, b, out[..., 2])
    return out
