"""Box non-maximum suppression in plain torch (torchvision cannot be installed beside the CPU torch).

Semantics of ``torchvision.ops.batched_nms``: boxes ``(x0, y0, x1, y1)`` with area
``(x1 - x0) * (y1 - y0)``; boxes are visited by decreasing score; a box is dropped when its IoU
with an already kept box *of the same group* is strictly greater than the threshold. Returns the
kept indices sorted by decreasing score. Exact score ties are visited in index order (a stable
sort); torchvision leaves that order unspecified.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["box_iou", "nms", "batched_nms", "masks_to_boxes"]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU: (N, 4), (M, 4) -> (N, M) (0 where both boxes are empty)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS: (N, 4) float boxes, (N,) scores -> kept indices (int64) by decreasing score."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.float()
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = box_iou(boxes[order], boxes[order]).cpu()
    over = (iou > iou_threshold).numpy()
    suppressed = np.zeros(order.numel(), dtype=bool)
    kept = []
    for i in range(order.numel()):
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed |= over[i]  # over[i, j] for j <= i never matters: those are decided already
    return order[torch.tensor(kept, dtype=torch.long, device=order.device)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each group (boxes of different groups never suppress each other).

    Boxes are shifted apart by group (the usual coordinate trick), so one :func:`nms` serves all
    groups. Returns kept indices by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.float()
    span = boxes.max() - boxes.min() + 1
    shifted = boxes + (groups.to(boxes) * span)[:, None]
    return nms(shifted, scores, iou_threshold)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of binary masks (SAM's convention: inclusive max coordinates):
    (N, H, W) bool -> (N, 4) int64 ``(x0, y0, x1, y1)``; an empty mask gives ``(0, 0, 0, 0)``."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=masks.device)
    cols = masks.any(dim=1)  # (N, W)
    rows = masks.any(dim=2)  # (N, H)
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    x1 = torch.where(cols, xs, -1).max(dim=1).values
    x0 = torch.where(cols, xs, w).min(dim=1).values
    y1 = torch.where(rows, ys, -1).max(dim=1).values
    y0 = torch.where(rows, ys, h).min(dim=1).values
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    empty = ~cols.any(dim=1)
    boxes[empty] = 0
    return boxes
