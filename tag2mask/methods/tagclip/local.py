"""Local stage of TagCLIP: attention vote, refinement, class masks, refined scores (spec 4.3-4.6).

Every function takes and returns float32 torch tensors (n = h*w patches, C texts) and does the
arithmetic the official ``classify.py`` does, in the same order where the fixtures need it
(``int(mean * 255)`` in float32, truncating uint8 casts, strict comparisons).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

__all__ = ["AttentionVote", "attention_vote", "coarse_scores", "ClassMasks", "class_box_masks",
           "threshold_boxes", "refined_scores"]

_EIGHT = np.ones((3, 3), dtype=bool)  # OpenCV's outer contours follow 8-connected foreground


class AttentionVote(NamedTuple):
    """Output of :func:`attention_vote` (``(n, n)`` maps, CLS row/column removed).

    layer_mean: ``(B,)`` mean of each map (its vote threshold).
    count: ``(n, n)`` int64 number of maps whose entry is strictly above their mean.
    sel_mean: ``(n, n)`` mean of the selected maps before masking.
    weight: ``(n, n)`` W = ``sel_mean * (count >= min_count)``, not renormalised.
    """

    layer_mean: Tensor
    count: Tensor
    sel_mean: Tensor
    weight: Tensor


def attention_vote(attentions: Tensor, mean_layers: Sequence[int], min_count: int = 4) -> AttentionVote:
    """First mask of "dual masking" (spec 4.4).

    Args:
        attentions: ``(B, L, L)`` head-averaged maps of all blocks (CLS at index 0).
        mean_layers: 0-based blocks averaged into W.
        min_count: votes needed to keep an entry (all B maps vote, the last one included).
    """
    maps = attentions[:, 1:, 1:].float()
    layer_mean = maps.mean(dim=(1, 2))
    count = (maps > layer_mean[:, None, None]).sum(dim=0)
    sel_mean = maps[list(mean_layers)].mean(dim=0)
    weight = sel_mean * (count >= min_count).to(sel_mean.dtype)
    return AttentionVote(layer_mean, count, sel_mean, weight)


def coarse_scores(tokens: Tensor, text: Tensor, logit_scale: float) -> Tensor:
    """Per-patch softmax over all C texts of ``logit_scale * cos``: tokens ``(L, D)`` (CLS first) -> ``(n, C)``."""
    from tag2mask.methods.tagclip.encoder import text_softmax

    return text_softmax(tokens[1:], text, logit_scale)


def threshold_boxes(fg: np.ndarray, edge_quirk: bool) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Union of the bounding boxes of the 8-connected components of ``fg`` (``cv2.RETR_EXTERNAL``).

    Args:
        fg: ``(h, w)`` bool foreground.
        edge_quirk: right/bottom ends clipped to ``w-1`` / ``h-1`` and used as exclusive ends (official).

    Returns:
        ``(h, w)`` uint8 0/1 mask and the boxes ``(x0, y0, x1, y1)`` (exclusive ends).
    """
    h, w = fg.shape
    comp, _ = ndimage.label(fg, structure=_EIGHT)
    mask = np.zeros((h, w), dtype=np.uint8)
    boxes = []
    for sl in ndimage.find_objects(comp):
        x0, y0, x1, y1 = sl[1].start, sl[0].start, sl[1].stop, sl[0].stop
        if edge_quirk:
            x1, y1 = min(x1, w - 1), min(y1, h - 1)
        boxes.append((int(x0), int(y0), int(x1), int(y1)))
        mask[y0:y1, x0:x1] = 1
    return mask, boxes


def minmax_no_eps(column: Tensor) -> Tensor:
    """``(x - min) / max(x - min)`` in float32 without epsilon (a constant column gives NaN, as official)."""
    s = column - column.min()
    return s / s.max()


class ClassMasks(NamedTuple):
    """Output of :func:`class_box_masks`.

    masks: ``(C, h, w)`` uint8 M_cls per text (0 for texts not processed).
    processed: ``(C,)`` bool texts whose maximum attention score is positive (and not constant).
    thresholds: per text the uint8 threshold ``int(mean * 255)`` (-1 when not processed).
    boxes: per text the list of boxes ``(x0, y0, x1, y1)``.
    """

    masks: np.ndarray
    processed: np.ndarray
    thresholds: list[int]
    boxes: list[list[tuple[int, int, int, int]]]


def class_box_masks(logits_attn: Tensor, grid: tuple[int, int], edge_quirk: bool) -> ClassMasks:
    """Second mask of "dual masking": a box mask per text from its attention-refined scores (spec 4.6).

    Args:
        logits_attn: ``(n, C)`` float32 P_attn = W @ P_coarse.
        grid: ``(h, w)`` with h*w = n.
        edge_quirk: see :func:`threshold_boxes`.
    """
    h, w = grid
    n_texts = logits_attn.shape[1]
    masks = np.zeros((n_texts, h, w), dtype=np.uint8)
    processed = np.zeros(n_texts, dtype=bool)
    thresholds, all_boxes = [], []
    cols = logits_attn.detach().float().cpu()
    for c in range(n_texts):
        col = cols[:, c]
        if not bool(col.max() > 0):
            thresholds.append(-1)
            all_boxes.append([])
            continue
        s = minmax_no_eps(col)
        mean = s.mean() * 255  # float32 product, then truncation (the official int(tensor))
        if not bool(torch.isfinite(mean)):
            # a constant column: the official int(NaN) stops with an error; here it keeps its P_attn scores
            thresholds.append(-1)
            all_boxes.append([])
            continue
        thr = int(mean)
        u8 = (s * 255).clamp(0, 255).to(torch.uint8).reshape(h, w).numpy()
        masks[c], boxes = threshold_boxes(u8 > thr, edge_quirk)
        processed[c] = True
        thresholds.append(thr)
        all_boxes.append(boxes)
    return ClassMasks(masks, processed, thresholds, all_boxes)


def refined_scores(weight: Tensor, logits_coarse: Tensor, logits_attn: Tensor, masks: np.ndarray,
                   processed: np.ndarray) -> Tensor:
    """P_refined (spec 4.6): column c = ``(W * M_cls(c) as columns) @ P_coarse[:, c]``.

    Args:
        weight: ``(n, n)`` W. logits_coarse, logits_attn: ``(n, C)``.
        masks: ``(C, h, w)`` 0/1 class masks; processed: ``(C,)`` bool.

    Returns:
        ``(n, C)`` float32; texts not processed keep their ``logits_attn`` column.
    """
    m = torch.from_numpy(masks.reshape(masks.shape[0], -1)).to(weight.device, weight.dtype)  # (C, n)
    # masking source columns j of W equals masking rows j of the coarse scores (0/1 products are exact)
    refined = weight @ (logits_coarse * m.t())
    keep = torch.from_numpy(processed).to(weight.device)
    return torch.where(keep[None, :], refined, logits_attn)
