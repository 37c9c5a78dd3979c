"""Class-wise re-identification (CWR) decisions, crops, fusion and the final tags (spec 4.7-4.8).

The crop pass itself is :func:`tag2mask.methods.tagclip.encoder.encode_crops`; everything here is
cheap tensor work. All crops of one image are encoded in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tag2mask.methods.tagclip.local import minmax_no_eps

__all__ = ["CropPlan", "plan_crops", "crop_inputs", "fuse", "relative_threshold", "tags_from_scores"]


@dataclass
class CropPlan:
    """Which candidates get a crop and where (spec 4.7 steps 1-3).

    threshold: τ = min + θ(max - min) over the whole refined matrix.
    candidates: class ids c < K with local score > τ, ascending.
    crops: per encoded crop ``(cls, (y1, y2, x1, x2), (h, w) mask)``, boxes in patch units, exclusive ends.
    before_clip: per encoded crop the box before the official end clipping.
    early_return: the candidate whose empty box ended the loop (official quirk), else ``None``.
    skipped: candidates not re-identified (they keep their local score).
    """

    threshold: float
    candidates: list[int]
    crops: list[tuple[int, tuple[int, int, int, int], Tensor]] = field(default_factory=list)
    before_clip: list[tuple[int, int, int, int]] = field(default_factory=list)
    early_return: Optional[int] = None
    skipped: list[int] = field(default_factory=list)


def _mask_box(mask: Tensor) -> tuple[int, int, int, int]:
    """``(y1, y2, x1, x2)``: first and last+1 occupied row/column of a ``(h, w)`` bool mask; zeros if empty."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        return 0, 0, 0, 0
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def plan_crops(logits_refined: Tensor, local: Tensor, num_classes: int, grid: tuple[int, int], theta: float,
               edge_quirk: bool, early_exit: bool) -> CropPlan:
    """Candidates and crop boxes.

    Args:
        logits_refined: ``(n, C)`` P_refined (all texts, background words included in τ).
        local: ``(C,)`` its maximum over patches.
        num_classes: K; only classes ``< K`` can be candidates.
        grid: ``(h, w)``.
        theta: θ of the preset.
        edge_quirk: clip the box end to ``w-1`` / ``h-1`` (official).
        early_exit: an empty box ends the loop (official); otherwise only that candidate is skipped.
    """
    h, w = grid
    lo, hi = logits_refined.min(), logits_refined.max()
    tau = lo + theta * (hi - lo)
    candidates = [c for c in range(num_classes) if bool(local[c] > tau)]
    plan = CropPlan(float(tau), candidates)
    for n, c in enumerate(candidates):
        mask = (minmax_no_eps(logits_refined[:, c]) > 0.5).reshape(h, w)
        y1, y2, x1, x2 = _mask_box(mask)
        plan_box = (y1, y2, x1, x2)
        if edge_quirk:
            x2, y2 = min(x2, w - 1), min(y2, h - 1)
        if x1 == x2 or y1 == y2:
            if early_exit:
                plan.early_return = c
                plan.skipped = candidates[n:]
                break
            plan.skipped.append(c)
            continue
        plan.crops.append((c, (y1, y2, x1, x2), mask[y1:y2, x1:x2]))
        plan.before_clip.append(plan_box)
    return plan


def crop_inputs(image: Tensor, plan: CropPlan, patch: int, size: int) -> tuple[Tensor, Tensor]:
    """Crop inputs and masks of every planned crop (spec 4.7 steps 4-5).

    Args:
        image: ``(1, 3, H16, W16)`` normalised input tensor.
        plan: :class:`CropPlan` with at least one crop.
        patch: patch size; size: crop side (the pretraining size, 224).

    Returns:
        ``(J, 3, size, size)`` float32 bilinear crops (tensor space, ``align_corners=False``, no
        antialias) and ``(J, size/patch, size/patch)`` float32 nearest-resized 0/1 masks.
    """
    crops, masks = [], []
    g = size // patch
    for _, (y1, y2, x1, x2), m in plan.crops:
        region = image[:, :, patch * y1 : patch * y2, patch * x1 : patch * x2]
        crops.append(_bilinear_planes(region, size))
        masks.append(F.interpolate(m[None, None].float(), size=(g, g), mode="nearest")[0, 0])
    return torch.cat(crops), torch.stack(masks)


def _bilinear_planes(region: Tensor, size: int) -> Tensor:
    """``(N, C, h, w)`` -> ``(N, C, size, size)`` bilinear (``align_corners=False``), one plane at a time.

    Why the planes are folded into the batch: on CPU, PyTorch picks its bilinear kernel from the
    thread count. With one intra-op thread and exactly 3 channels it runs the channels-last kernel,
    otherwise (2+ threads, or 1 channel) the generic NCHW kernel; the two round differently (1-2
    float32 ulps). The official reference ran with 2 threads, i.e. the generic kernel. A ``(N*C, 1,
    h, w)`` view always takes the generic kernel, so the crops are bit-identical to the reference
    whatever ``torch.get_num_threads()`` is (each output value is computed the same way by every
    thread split). Other devices have their own kernels; no bit-exactness is claimed there.
    """
    n, c, h, w = region.shape
    planes = region.reshape(n * c, 1, h, w)
    return F.interpolate(planes, size=(size, size), mode="bilinear", align_corners=False).reshape(n, c, size, size)


def fuse(local: Tensor, crop_probs: Tensor, plan: CropPlan, num_classes: int, weight: float) -> Tensor:
    """Final scores ``(K,)``: ``(1 - weight) * local + weight * crop probability`` for re-identified classes."""
    scores = local[:num_classes].clone()
    for j, (c, _, _) in enumerate(plan.crops):
        scores[c] = (1.0 - weight) * local[c] + weight * crop_probs[j, c]
    return scores


def relative_threshold(scores: Tensor, theta: float) -> Tensor:
    """``min + θ (max - min)`` of a score vector (the per-image tag threshold)."""
    return scores.min() + theta * (scores.max() - scores.min())


def tags_from_scores(scores: Tensor, theta: float) -> tuple[list[int], bool]:
    """Tags: ids with score strictly above :func:`relative_threshold`, ascending; the argmax if none.

    Returns ``(tags, argmax_fallback)``.
    """
    tags = torch.nonzero(scores > relative_threshold(scores, theta)).flatten().tolist()
    if tags:
        return [int(t) for t in tags], False
    return [int(scores.argmax())], True
