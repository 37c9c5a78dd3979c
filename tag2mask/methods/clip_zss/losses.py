"""ZegCLIP's non-mutually-exclusive loss (NEL), which CLIP-ZSS applies to its combined prediction.

Every class channel is an independent sigmoid mask (no softmax between classes). As in ZegCLIP's
``SegLossPlus`` / ``SegPlusCriterion`` (behaviour read in its code, written anew here):

* logits are bilinearly upsampled to the label size (``align_corners=False``);
* **focal** term: sigmoid focal loss (α = 0.25, γ = 2) of every (image, class) channel against the
  binary mask "label == class"; ignored pixels are negatives of every class; mean over pixels per
  channel, summed over channels;
* **dice** term: ``1 - (2·Σ p·t + 1) / (Σ p + Σ t + 1)`` with ``p = σ(logit)``, only for the
  classes present in an image's labels, summed;
* both sums are divided by ``num_masks``, the number of (image, present class) pairs (ZegCLIP
  averages it over the processes; at least 1); weights ×100 (focal) and ×1 (dice).

Here a channel can be switched off per image (``valid``): CLIP-ZSS's pseudo channels exist only for
as many potential categories as an image has.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["binary_masks", "count_masks", "sigmoid_focal_loss", "dice_loss", "nel_loss"]


def binary_masks(labels: Tensor, num_classes: int, ignore: int = 255) -> Tensor:
    """``(B, H, W)`` labels -> ``(B, C, H, W)`` float one-hot; ignored pixels are 0 in every channel."""
    valid = labels != ignore
    one_hot = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2)
    return (one_hot * valid[:, None]).float()


def count_masks(labels: Tensor, num_classes: int, ignore: int = 255) -> Tensor:
    """``(B, C)`` bool: which classes occur in each image's labels."""
    present = torch.zeros(labels.shape[0], num_classes, dtype=torch.bool, device=labels.device)
    for b in range(labels.shape[0]):
        ids = torch.unique(labels[b])
        ids = ids[ids != ignore]
        present[b, ids] = True
    return present


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Per-channel mean focal loss: ``logits``, ``targets`` ``(N, P)`` -> ``(N,)``."""
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = logits.sigmoid()
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(dim=1)


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-channel dice loss (smoothing 1): ``(N, P)`` -> ``(N,)``."""
    p = logits.sigmoid()
    return 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)


def nel_loss(logits: Tensor, labels: Tensor, valid: Optional[Tensor] = None, num_masks: Optional[float] = None,
             alpha: float = 0.25, gamma: float = 2.0, ignore: int = 255) -> tuple[Tensor, Tensor]:
    """The two NEL terms, unweighted: ``(focal, dice)`` scalars.

    Args:
        logits: ``(B, C, h, w)``.
        labels: ``(B, H, W)`` int64 in ``0..C-1`` or ``ignore``.
        valid: ``(B, C)`` bool, channels that take part (default: all).
        num_masks: the normaliser; default: the number of (image, present class) pairs here (≥ 1).
    """
    b, c = logits.shape[:2]
    if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    x = logits.float().flatten(2)                     # (B, C, P)
    t = binary_masks(labels, c, ignore).flatten(2)    # (B, C, P)
    present = count_masks(labels, c, ignore)
    valid = torch.ones(b, c, dtype=torch.bool, device=logits.device) if valid is None else valid
    present = present & valid
    norm = float(max(int(present.sum()), 1)) if num_masks is None else max(float(num_masks), 1.0)
    focal = sigmoid_focal_loss(x[valid], t[valid], alpha, gamma).sum() / norm
    dice = dice_loss(x[present], t[present]).sum() / norm
    return focal, dice
