"""FMA-WSSS's two prompt-training losses, with the official semantics and edge cases.

* :func:`multilabel_contrastive_loss` (classification prompts): each positive class of an image
  against all of that image's negative classes, on ``100 * cos`` logits.
* :func:`cam_activation_loss` (segmentation prompts): raise each positive CAM to its own
  (detached) foreground maximum inside the seed's region of that class, push it to <= 0 on the
  seed's other labelled pixels.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["multilabel_contrastive_loss", "cam_activation_loss", "REDUCTIONS"]

REDUCTIONS = ("pos_mean", "sample_mean")


def multilabel_contrastive_loss(scores: torch.Tensor, labels: torch.Tensor, reduce: str = "pos_mean") -> torch.Tensor:
    """Multi-label contrastive loss ``-log(e^{S_np} / (e^{S_np} + sum_{j neg} e^{S_nj}))``.

    Args:
        scores: (N, F) similarity logits of the foreground classes (``100 * cos``).
        labels: (N, F) 0/1 image-level labels.
        reduce: ``'pos_mean'`` (mean over every positive of every valid image; the official
            setting) or ``'sample_mean'`` (mean over a valid image's positives, then over images).

    Only images with at least one positive and one negative count; when there is none the result
    is ``0 * mean(S)`` (zero, with a zero gradient). Each term is ``log(e^{S_np} + sum) - S_np``
    with the exponentials not max-shifted, as in the official code: a float32 logit above ~88.7
    overflows and makes the loss NaN (a log-sum-exp form would stay finite there and differ from
    the reference).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if scores.shape != labels.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must both be (N, F)")
    pos = labels > 0
    neg = ~pos
    valid = pos.any(dim=1) & neg.any(dim=1)
    n_valid = int(valid.sum())
    if n_valid == 0:
        return 0 * scores.mean()
    # masks and exponentials over all rows, as the reference: an overflow (inf * 0 = NaN) in any
    # row reaches the gradient the same way
    pos_mask = (pos & valid[:, None]).to(scores.dtype)
    neg_mask = (neg & valid[:, None]).to(scores.dtype)
    e = torch.exp(scores)
    neg_sum = (e * neg_mask).sum(dim=1)  # (N,)
    anchor, cls = torch.nonzero(pos_mask, as_tuple=True)
    terms = -(scores[anchor, cls] - torch.log(e[anchor, cls] + neg_sum[anchor]))  # one per positive
    if reduce == "pos_mean":
        return terms.mean()
    per_anchor = pos_mask.sum(dim=1)[anchor]
    return (terms / per_anchor).sum() / n_valid


def cam_activation_loss(
    pos_cam: torch.Tensor, pairs: torch.Tensor, seeds: torch.Tensor, ignore_index: int = 255
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official CAM activation (intensity) loss, L1 form: returns ``(fg_loss, bg_loss)``.

    Args:
        pos_cam: (P, h, w) raw CAMs of the positive pairs.
        pairs: (P, 2) long (image, class) of each CAM (class c has seed label c + 1).
        seeds: (N, H, W) integer seed maps (0 background, c + 1, ``ignore_index``).

    The CAMs are resized bilinearly (``align_corners=False``) to the seed size when the sizes
    differ. For pair (n, c): F = {seed == c+1}, B = {seed not in (c+1, ignore)},
    ``m = max(0, max_F cam)`` detached (0 when F is empty);
    ``fg = sum_pairs sum_F |m - cam|``, ``bg = sum_pairs sum_B max(cam, 0)``, both divided by
    ``Z = sum_pairs (|F| + |B|)``. ``Z = 0`` (all pixels ignored) gives NaN, as the official code.
    """
    if pos_cam.dim() != 3 or pairs.shape != (pos_cam.shape[0], 2):
        raise ValueError(f"pos_cam must be (P, h, w) with pairs (P, 2), got {tuple(pos_cam.shape)} and {tuple(pairs.shape)}")
    size = tuple(seeds.shape[-2:])
    cam = pos_cam
    if tuple(cam.shape[-2:]) != size:
        cam = F.interpolate(cam[None], size=size, mode="bilinear", align_corners=False)[0]
    pairs = pairs.to(seeds.device)
    seed = seeds[pairs[:, 0]].to(torch.long)  # (P, H, W)
    own = seed == (pairs[:, 1] + 1)[:, None, None]
    other = ~own & (seed != ignore_index)
    own_f, other_f = own.to(cam.dtype), other.to(cam.dtype)
    # masked products first and masks applied again after the non-linearities, as the reference
    # does: with Z = 0 the NaN gradient then reaches every pixel, like the official one
    own_cam, other_cam = cam * own_f, cam * other_f
    peak = own_cam.detach().amax(dim=(1, 2), keepdim=True).clamp_min(0)  # 0 when F is empty
    zero = torch.zeros((), dtype=cam.dtype, device=cam.device)
    fg_terms = (peak - own_cam).abs() * own_f
    bg_terms = torch.maximum(other_cam, zero).abs() * other_f
    z = own_f.sum() + other_f.sum()
    return fg_terms.sum() / z, bg_terms.sum() / z
