"""The PAMR implementation tag2mask shipped before the vectorised one (kept verbatim as the reference).

The tests hold :mod:`tag2mask.refinement.pamr` to within 1e-5 of it and run the same property tests on both;
``benchmarks/pamr_speed.py`` times the two side by side. Do not optimise this file.

Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR 2020), pure torch.

Masks are repeatedly replaced by an image-adaptive weighted average of their
values at the 8 neighbours of a 3x3 window taken at several dilations:

* for every pixel ``i`` and neighbour ``j`` (8 per dilation, borders replicated)
  the kernel is ``k_ij = -|I_i - I_j| / (0.1 * sigma_i + 1e-8)`` per image channel,
  where ``sigma_i`` is the standard deviation of the image values in ``i``'s
  neighbourhood (the 3x3 windows at all dilations, centre included);
* the kernel is averaged over the image channels and turned into affinities
  with a softmax over all neighbours;
* ``num_iter`` times: ``m_i <- sum_j a_ij m_j``.

Normalising by the local spread makes the step scale free: in a flat region all
neighbours are equally weighted (plain diffusion), while across an edge the
neighbours on the other side get exponentially small weights. Because the
affinities are a convex combination, per-pixel class sums are preserved.

Memory is ``O(B * (C + N) * H * W)`` with ``N = 8 * len(dilations)``: neighbours
are visited one at a time instead of materialising ``(B, C, N, H, W)``.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ReferencePAMR"]

# 3x3 window without its centre
_OFFSETS: Tuple[Tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def _shift_index(n: int, delta: int, device: torch.device) -> torch.Tensor:
    """Indices ``clamp(arange(n) + delta, 0, n - 1)``: a shift with border replication.

    Clamped gathers (unlike ``F.pad(mode='replicate')``) work for any dilation,
    including dilations larger than the image.
    """
    return (torch.arange(n, device=device) + delta).clamp_(0, n - 1)


class ReferencePAMR(nn.Module):
    """Pixel-adaptive mask refinement.

    Args:
        num_iter: number of propagation steps.
        dilations: dilations of the 3x3 neighbourhoods.
        sigma_scale: the 0.1 factor multiplying the local standard deviation.
        eps: added to the scaled deviation (flat regions have sigma = 0).
    """

    def __init__(self, num_iter: int = 10, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
                 sigma_scale: float = 0.1, eps: float = 1e-8) -> None:
        super().__init__()
        if num_iter < 0:
            raise ValueError("num_iter must be >= 0")
        if not dilations or any(int(d) < 1 for d in dilations):
            raise ValueError("dilations must be positive integers")
        self.num_iter = int(num_iter)
        self.dilations = tuple(int(d) for d in dilations)
        self.sigma_scale = float(sigma_scale)
        self.eps = float(eps)

    def _shifts(self, H: int, W: int, device: torch.device) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Row/column gather indices of every neighbour, in (dilation, offset) order."""
        out = []
        for d in self.dilations:
            for dy, dx in _OFFSETS:
                out.append((_shift_index(H, dy * d, device), _shift_index(W, dx * d, device)))
        return out

    @staticmethod
    def _gather(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``x[..., rows, :][..., cols]`` for a ``(B, C, H, W)`` tensor."""
        return x.index_select(2, rows).index_select(3, cols)

    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """Neighbour affinities of an image.

        Args:
            image: ``(B, K, H, W)`` float image (any number of channels).

        Returns:
            ``(B, N, H, W)`` affinities (softmax over ``N = 8 * len(dilations)``
            neighbours, same order as the propagation), dtype of ``image``.
        """
        B, K, H, W = image.shape
        shifts = self._shifts(H, W, image.device)
        neigh = torch.stack([self._gather(image, r, c) for r, c in shifts], dim=2)  # (B, K, N, H, W)
        # Local spread: every dilation's 3x3 window with its centre (the centre
        # thus appears once per dilation), unbiased standard deviation.
        centre = image.unsqueeze(2).expand(B, K, len(self.dilations), H, W)
        sigma = torch.cat([neigh, centre], dim=2).std(dim=2, keepdim=True)  # (B, K, 1, H, W)
        k = -(image.unsqueeze(2) - neigh).abs() / (self.sigma_scale * sigma + self.eps)
        return F.softmax(k.mean(dim=1), dim=1)

    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Refine masks with image-adaptive propagation.

        Args:
            image: ``(B, 3, H, W)`` float image (any normalisation; the kernel is
                invariant to a per-pixel-neighbourhood affine rescaling).
            masks: ``(B, C, H, W)`` float masks/scores. If their spatial size
                differs from the image they are first resized bilinearly
                (``align_corners=False``).

        Returns:
            ``(B, C, H, W)`` refined masks (dtype of ``masks``). The affinities
            are computed without gradient tracking (the image is a fixed guide);
            gradients still flow to ``masks``.
        """
        if image.dim() != 4 or masks.dim() != 4 or image.shape[0] != masks.shape[0]:
            raise ValueError(f"expected image (B,3,H,W) and masks (B,C,H,W), got {tuple(image.shape)}, "
                             f"{tuple(masks.shape)}")
        H, W = image.shape[-2:]
        if masks.shape[-2:] != (H, W):
            masks = F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=False)
        with torch.no_grad():
            aff = self.affinity(image.to(masks.dtype if masks.is_floating_point() else torch.float32))
        shifts = self._shifts(H, W, masks.device)
        aff = aff.to(masks.device)
        for _ in range(self.num_iter):
            acc = torch.zeros_like(masks)
            for n, (r, c) in enumerate(shifts):
                acc = acc + aff[:, n : n + 1] * self._gather(masks, r, c)
            masks = acc
        return masks
