"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR 2020), pure torch.

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

How it is computed (what makes it fast on a CPU): the masks are padded once per
step by border replication, wide enough for the largest dilation, so that every
neighbour is a strided *view* of one buffer instead of a gathered copy; each step
accumulates ``a_j * m_j`` neighbour by neighbour with one fused in-place
multiply-add into preallocated buffers (nothing is allocated inside the loop);
the affinities are built neighbour by neighbour from element-wise operations
only, so no ``(B, K, N, H, W)`` temporary exists and the result does not depend
on how many threads torch uses; and a step that leaves the masks bit for bit
unchanged ends the loop (a fixed point: every further step would return the
same bits). The outputs agree with the straightforward formulation to about
1e-6 (float32 rounding order; the tests hold them to 1e-5).

Memory is ``O(B * (C + N) * H * W)`` with ``N = 8 * len(dilations)`` (the
affinities), plus one padded copy of the masks.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PAMR"]

# 3x3 window without its centre
_OFFSETS: Tuple[Tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


class PAMR(nn.Module):
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

    @property
    def num_neighbours(self) -> int:
        return len(_OFFSETS) * len(self.dilations)

    def _offsets(self) -> List[Tuple[int, int]]:
        """(row, column) shift of every neighbour, in (dilation, offset) order."""
        return [(dy * d, dx * d) for d in self.dilations for dy, dx in _OFFSETS]

    def _pad(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, C, H, W) padded by border replication to (B, C, H + 2P, W + 2P), P = max dilation.

        Unlike ``F.pad(mode='replicate')`` this works for any pad, including pads larger than the
        image (dilation 24 on a 5-pixel-high image): the same values as gathering at
        ``clamp(index, 0, size - 1)``.
        """
        pad = max(self.dilations)
        B, C, H, W = x.shape
        if out is None:
            out = x.new_empty(B, C, H + 2 * pad, W + 2 * pad)
        out[:, :, pad: pad + H, pad: pad + W] = x
        out[:, :, pad: pad + H, :pad] = x[:, :, :, :1]
        out[:, :, pad: pad + H, pad + W:] = x[:, :, :, W - 1:]
        out[:, :, :pad] = out[:, :, pad: pad + 1]
        out[:, :, pad + H:] = out[:, :, pad + H - 1: pad + H]
        return out

    def _neighbour_views(self, padded: torch.Tensor, H: int, W: int) -> List[torch.Tensor]:
        """Every neighbour's shifted image as a view of ``padded`` (from :meth:`_pad`): each (B, C, H, W)."""
        pad = max(self.dilations)
        return [padded[:, :, pad + oy: pad + oy + H, pad + ox: pad + ox + W] for oy, ox in self._offsets()]

    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """Neighbour affinities of an image.

        Args:
            image: ``(B, K, H, W)`` float image (any number of channels).

        Returns:
            ``(B, N, H, W)`` affinities (softmax over ``N = 8 * len(dilations)``
            neighbours, same order as the propagation), dtype of ``image``.
        """
        B, K, H, W = image.shape
        N, D = self.num_neighbours, len(self.dilations)
        views = self._neighbour_views(self._pad(image), H, W)
        # Only element-wise operations (and a max) below, neighbour by neighbour: no (B, K, N, H, W)
        # temporaries, and the bits do not depend on how torch splits work over threads (its
        # softmax over a middle dimension does).
        # Local spread: the neighbours and the centre once per dilation, unbiased std (two passes).
        total = image * D
        for view in views:
            total.add_(view)
        mean = total.div_(N + D)
        diff = torch.empty_like(image)
        spread = (image - mean).square_().mul_(D)
        for view in views:
            torch.sub(view, mean, out=diff)
            spread.addcmul_(diff, diff)
        scale = spread.div_(N + D - 1).sqrt_().mul_(self.sigma_scale).add_(self.eps)  # (B, K, H, W)
        # kernel_n = mean over channels of -|I - I_n| / scale, then a softmax over n
        kernel = image.new_empty(B, N, H, W)
        for n, view in enumerate(views):
            torch.sub(image, view, out=diff)
            diff.abs_().div_(scale)
            channel_sum = kernel[:, n]
            channel_sum.copy_(diff[:, 0])
            for c in range(1, K):
                channel_sum.add_(diff[:, c])
        kernel.div_(-K)
        kernel.sub_(kernel.amax(dim=1, keepdim=True)).exp_()
        norm = kernel[:, 0].clone()
        for n in range(1, N):
            norm.add_(kernel[:, n])
        return kernel.div_(norm.unsqueeze(1))

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
        aff = aff.to(masks.device)
        if self.num_iter == 0:
            return masks
        if masks.requires_grad and torch.is_grad_enabled():
            return self._propagate_differentiable(aff, masks)
        return self._propagate(aff, masks)

    def _propagate(self, aff: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``num_iter`` steps in preallocated buffers (no autograd)."""
        B, C, H, W = masks.shape
        pad = max(self.dilations)
        padded = masks.new_empty(B, C, H + 2 * pad, W + 2 * pad)
        views = self._neighbour_views(padded, H, W)
        weights = [aff[:, n: n + 1] for n in range(len(views))]
        current, spare = masks, masks.new_empty(B, C, H, W)
        for _ in range(self.num_iter):
            self._pad(current, out=padded)
            spare.zero_()
            for view, weight in zip(views, weights):
                spare.addcmul_(view, weight)  # one fused pass per neighbour, in place
            if torch.equal(spare, current):
                break  # a fixed point: every further step would give these same bits
            current, spare = spare, (current if current is not masks else masks.new_empty(B, C, H, W))
        return current if current is not masks else masks.clone()

    def _propagate_differentiable(self, aff: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The same steps with out-of-place operations, so that gradients reach ``masks``."""
        H, W = masks.shape[-2:]
        for _ in range(self.num_iter):
            views = self._neighbour_views(self._pad(masks), H, W)
            acc = torch.zeros_like(masks)
            for n, view in enumerate(views):
                acc = acc + aff[:, n: n + 1] * view
            masks = acc
        return masks
