"""Pixel-adaptive refinement (PAR, from AFA; used by ToCo and WeCLIP), batched, pure torch.

Every pixel gets 8 neighbours per dilation ``d`` (offsets ``(±d, 0, ±d)`` without the centre, in
the order top-left, top, top-right, left, right, bottom-left, bottom, bottom-right), with replicate
padding at the border: 48 neighbours for the default dilations ``(1, 2, 4, 8, 12, 24)``.
Weights (per pixel, over the neighbours ``n``)::

    colour   a_n = mean_rgb( -(|I_n - I| / (std_n(I_n) + 1e-8) / 0.3) ** 2 )   # unbiased std over n
    position p_n = -(r_n / (std_n(r_n) + 1e-8) / 0.3) ** 2                     # r_n = d or √2·d
    A_n = softmax_n(a) + 0.01 * softmax_n(p)                                    # sums to 1.01

and the maps are propagated ``num_iter`` times: ``M <- Σ_n A_n · M_n`` (the centre pixel itself is
not a neighbour). The image is first resized to the map size (bilinear, ``align_corners=True``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PAR", "par_refine", "par_weights", "neighbour_offsets"]

DEFAULT_DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
_COLOUR_TEMPERATURE = 0.3
_POSITION_WEIGHT = 0.01


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """``(dy, dx)`` of the neighbours, dilation-major, 8 per dilation in raster order."""
    ring = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    return [(dy * d, dx * d) for d in dilations for dy, dx in ring]


def _neighbours(x: Tensor, dilations: Sequence[int]) -> Tensor:
    """All neighbours of every pixel: ``(B, C, h, w)`` → ``(B, C, N, h, w)`` (replicate borders)."""
    _, _, h, w = x.shape
    out = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        for dy, dx in neighbour_offsets([d]):
            out.append(padded[:, :, d + dy : d + dy + h, d + dx : d + dx + w])
    return torch.stack(out, dim=2)


def _position_weights(dilations: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``0.01 * softmax`` of the positional affinity, ``(N,)``; identical for every pixel."""
    # Built in float32 like the original kernel (float32 √2 times the dilation).
    ring = torch.tensor([math.sqrt(2), 1, math.sqrt(2), 1, 1, math.sqrt(2), 1, math.sqrt(2)], dtype=torch.float32)
    dist = torch.cat([ring * d for d in dilations]).to(device)
    pos_aff = -(dist / (dist.std() + 1e-8) / _COLOUR_TEMPERATURE) ** 2
    return (_POSITION_WEIGHT * F.softmax(pos_aff, dim=0)).to(dtype)


@torch.no_grad()
def par_weights(images: Tensor, dilations: Sequence[int] = DEFAULT_DILATIONS) -> Tensor:
    """Neighbour weights of PAR for images already at the map size.

    Args:
        images: ``(B, 3, h, w)`` float (WeCLIP: ImageNet-normalised).
        dilations: neighbourhood dilations.

    Returns:
        ``(B, N, h, w)`` weights (sum 1.01 over N), N = 8 · len(dilations), in the order of
        :func:`neighbour_offsets`.
    """
    nb = _neighbours(images, dilations)  # (B, 3, N, h, w)
    std = nb.std(dim=2, keepdim=True)  # unbiased, over the neighbours
    # In place on the (large) neighbour stack: the weights are never differentiated.
    aff = nb.sub_(images.unsqueeze(2)).abs_().div_(std + 1e-8).div_(_COLOUR_TEMPERATURE).square_().neg_()
    aff = aff.mean(dim=1)  # (B, N, h, w)
    pos = _position_weights(dilations, aff.dtype, aff.device)
    return F.softmax(aff, dim=1) + pos[None, :, None, None]


def _propagate(masks: Tensor, weights: Tensor, dilations: Sequence[int]) -> Tensor:
    """One step ``M <- Σ_n A_n · M_n`` for ``(B, K, h, w)`` maps and ``(B, N, h, w)`` weights."""
    _, _, h, w = masks.shape
    acc = torch.zeros_like(masks)
    n = 0
    # Accumulating shifted views avoids materialising the (B, K, N, h, w) neighbour stack
    # (~20x faster on CPU than gathering it every iteration); only the summation order changes.
    for d in dilations:
        padded = F.pad(masks, [d] * 4, mode="replicate")
        for dy, dx in neighbour_offsets([d]):
            acc.addcmul_(padded[:, :, d + dy : d + dy + h, d + dx : d + dx + w], weights[:, n : n + 1])
            n += 1
    return acc


@torch.no_grad()
def par_refine(
    images: Tensor,
    masks: Tensor,
    num_iter: int = 20,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
) -> Tensor:
    """Refine score maps with PAR.

    Args:
        images: ``(B, 3, H, W)`` float image batch; resized to the map size if different.
        masks: ``(B, K, h, w)`` float score maps (WeCLIP: ``[bg, fg_1..fg_K]``).
        num_iter: propagation steps (20).
        dilations: neighbourhood dilations.

    Returns:
        ``(B, K, h, w)`` refined maps, same dtype as ``masks``. Runs under ``no_grad`` (PAR only
        produces pseudo labels; the original also calls it without gradients).
    """
    if images.shape[0] != masks.shape[0]:
        raise ValueError(f"batch mismatch: images {tuple(images.shape)} vs masks {tuple(masks.shape)}")
    h, w = masks.shape[-2:]
    images = F.interpolate(images.to(masks.dtype), size=(h, w), mode="bilinear", align_corners=True)
    weights = par_weights(images, dilations)
    out = masks
    for _ in range(num_iter):
        out = _propagate(out, weights, dilations)
    return out


class PAR(nn.Module):
    """Module wrapper of :func:`par_refine` (no parameters).

    Args:
        dilations: neighbourhood dilations (default ``(1, 2, 4, 8, 12, 24)``).
        num_iter: propagation steps (default 20).
    """

    def __init__(self, dilations: Sequence[int] = DEFAULT_DILATIONS, num_iter: int = 20) -> None:
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        self.num_iter = int(num_iter)

    def forward(self, images: Tensor, masks: Tensor) -> Tensor:
        """``(B, 3, H, W)`` images, ``(B, K, h, w)`` maps → ``(B, K, h, w)`` refined maps."""
        return par_refine(images, masks, num_iter=self.num_iter, dilations=self.dilations)

    def extra_repr(self) -> str:
        return f"dilations={self.dilations}, num_iter={self.num_iter}"
