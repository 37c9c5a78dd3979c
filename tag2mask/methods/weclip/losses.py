"""WeCLIP training losses: bg/fg-balanced cross-entropy and the (AFA) affinity loss.

Total loss of the official training loop::

    loss = 1.0 * balanced_ce(upsample(seg_logits), pseudo_label) + 0.1 * affinity_loss(attn_pred, aff_label)

where ``aff_label`` is built from the pseudo label by :func:`cams_to_affinity_label`. All functions
are vectorised over the batch and keep the official edge cases (NaN balanced CE without foreground
or background pixels; counts "+1" in the affinity loss).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SEG_LOSS_WEIGHT",
    "AFF_LOSS_WEIGHT",
    "balanced_ce_terms",
    "balanced_ce_loss",
    "radius_window_mask",
    "cams_to_affinity_label",
    "affinity_loss",
    "WeCLIPLoss",
    "weclip_total_loss",
]

SEG_LOSS_WEIGHT = 1.0
AFF_LOSS_WEIGHT = 0.1


def _upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (``align_corners=False``) resize of ``(B, C, h, w)`` logits to ``size`` when needed."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def balanced_ce_terms(logits: Tensor, label: Tensor, ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over background pixels and over foreground pixels, separately.

    Equivalent to two ``F.cross_entropy(..., ignore_index)`` calls on the label with fg (resp. bg)
    pixels set to ``ignore_index``, but with a single log-softmax.

    Args:
        logits: ``(B, C, H, W)`` float, already at the label resolution.
        label: ``(B, H, W)`` integer pseudo label, 0 = background, ``ignore_index`` = ignored.
        ignore_index: label value excluded from both terms.

    Returns:
        ``(ce_bg, ce_fg)`` scalars; a term is NaN when it has no pixel (0/0, like the official mean).
    """
    label = label.long()
    valid = label != ignore_index
    logp = F.log_softmax(logits.float(), dim=1)
    # Gather at a safe index for ignored pixels; they are masked out below.
    nll = -logp.gather(1, torch.where(valid, label, 0).unsqueeze(1)).squeeze(1)  # (B, H, W)
    bg = valid & (label == 0)
    fg = valid & (label != 0)
    zero = nll.new_zeros(())
    ce_bg = torch.where(bg, nll, zero).sum() / bg.sum()
    ce_fg = torch.where(fg, nll, zero).sum() / fg.sum()
    return ce_bg, ce_fg


def balanced_ce_loss(logits: Tensor, label: Tensor, ignore_index: int = 255) -> Tensor:
    """WeCLIP ``get_seg_loss``: ``0.5 * (CE over bg pixels + CE over fg pixels)``.

    Args:
        logits: ``(B, C, h, w)`` float32; bilinearly upsampled (``align_corners=False``) to the label
            size first when the sizes differ (stride-16 decoder logits → crop size).
        label: ``(B, H, W)`` integer pseudo label.
        ignore_index: ignored label value.

    Returns:
        Scalar loss, NaN when the batch has no foreground (or no background) pixel.
    """
    logits = _upsample_logits(logits, tuple(label.shape[-2:]))
    ce_bg, ce_fg = balanced_ce_terms(logits, label, ignore_index)
    return (ce_bg + ce_fg) * 0.5


def radius_window_mask(h: int, w: int, radius: int = 8, device: Optional[torch.device] = None) -> Tensor:
    """Pairs of grid cells within a square window: ``|Δrow| <= radius and |Δcol| <= radius``.

    Args:
        h, w: feature-grid size (20×20 for a 320 crop at stride 16).
        radius: half window size (8 in WeCLIP).

    Returns:
        ``(h*w, h*w)`` bool, row-major cell order, symmetric, True on the diagonal.
    """
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    near_r = (rows[:, None] - rows[None, :]).abs() <= radius
    near_c = (cols[:, None] - cols[None, :]).abs() <= radius
    return near_r & near_c


def cams_to_affinity_label(
    label: Tensor,
    mask: Optional[Tensor] = None,
    ignore_index: int = 255,
    stride: int = 16,
) -> Tensor:
    """Pairwise affinity target from a pseudo label.

    The label is downsampled with ``F.interpolate(mode='nearest')`` to ``(H // stride, W // stride)``
    (for divisible sizes: the top-left pixel of every cell); ``aff[i, j] = 1`` when cells i and j have
    the same label, else 0; pairs outside ``mask`` and pairs involving an ``ignore_index`` cell are
    set to ``ignore_index``.

    Args:
        label: ``(B, H, W)`` integer pseudo label.
        mask: optional ``(hw, hw)`` bool/0-1 window mask (:func:`radius_window_mask`).
        ignore_index: value for ignored pairs.
        stride: downsampling factor (16 for ViT-B/16).

    Returns:
        ``(B, hw, hw)`` int64 with values in {0, 1, ignore_index}.
    """
    b, h, w = label.shape
    small = F.interpolate(label.unsqueeze(1).float(), size=(h // stride, w // stride), mode="nearest")
    small = small.reshape(b, -1)  # (B, hw), exact integer values in float32
    aff = (small[:, :, None] == small[:, None, :]).long()
    ignore = torch.full_like(aff, ignore_index)
    if mask is not None:
        aff = torch.where(mask.to(aff.device).bool().unsqueeze(0), aff, ignore)
    ign = small == ignore_index
    aff = torch.where(ign[:, :, None] | ign[:, None, :], ignore, aff)
    return aff


def affinity_loss(attn_pred: Tensor, aff_label: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """AFA affinity loss as used by WeCLIP (``get_aff_loss``).

    ``loss = 0.5 * Σ_pos (1 - A) / (n_pos + 1) + 0.5 * Σ_neg A / (n_neg + 1)``, summed over the
    whole batch (targets 1 = positive, 0 = negative, anything else ignored).

    Args:
        attn_pred: ``(B, hw, hw)`` predicted affinity in (0, 1) (the decoder's ``sigmoid(FᵀF)``).
        aff_label: ``(B, hw, hw)`` integer target from :func:`cams_to_affinity_label`.

    Returns:
        ``(loss, pos_count, neg_count)``; the counts are int64 scalars **plus one**, as returned by
        the official function.
    """
    pos = aff_label == 1
    neg = aff_label == 0
    pos_count = pos.sum() + 1
    neg_count = neg.sum() + 1
    zero = attn_pred.new_zeros(())
    pos_loss = torch.where(pos, 1 - attn_pred, zero).sum() / pos_count
    neg_loss = torch.where(neg, attn_pred, zero).sum() / neg_count
    return 0.5 * pos_loss + 0.5 * neg_loss, pos_count, neg_count


class WeCLIPLoss(NamedTuple):
    """Loss terms of one WeCLIP training step (all scalars)."""

    total: Tensor
    seg: Tensor
    aff: Tensor
    pos_count: Tensor
    neg_count: Tensor


def weclip_total_loss(
    seg_logits: Tensor,
    attn_pred: Tensor,
    pseudo_label: Tensor,
    mask: Optional[Tensor] = None,
    *,
    radius: int = 8,
    stride: int = 16,
    ignore_index: int = 255,
    seg_weight: float = SEG_LOSS_WEIGHT,
    aff_weight: float = AFF_LOSS_WEIGHT,
) -> WeCLIPLoss:
    """``seg_weight * balanced CE + aff_weight * affinity loss``, as in the training loop.

    Args:
        seg_logits: ``(B, C, h, w)`` decoder logits (upsampled to the label size inside).
        attn_pred: ``(B, hw, hw)`` decoder affinity.
        pseudo_label: ``(B, H, W)`` integer online pseudo label.
        mask: ``(hw, hw)`` window mask; built with ``radius`` from the label grid when omitted.
        radius, stride, ignore_index: affinity-label settings.
        seg_weight, aff_weight: loss weights (1.0 and 0.1 in WeCLIP).

    Returns:
        :class:`WeCLIPLoss` with the total and the individual terms.
    """
    if mask is None:
        _, h, w = pseudo_label.shape
        mask = radius_window_mask(h // stride, w // stride, radius, device=pseudo_label.device)
    aff_label = cams_to_affinity_label(pseudo_label, mask=mask, ignore_index=ignore_index, stride=stride)
    aff, pos_count, neg_count = affinity_loss(attn_pred, aff_label)
    seg = balanced_ce_loss(seg_logits, pseudo_label, ignore_index=ignore_index)
    return WeCLIPLoss(seg_weight * seg + aff_weight * aff, seg, aff, pos_count, neg_count)
