"""From CAMs and mask proposals to a seed map (FMA-WSSS's SAM-based seeding, "SAMS").

Each proposal votes as a whole, so seed boundaries follow the proposals instead of the blurry CAM:

1. CAMs resized bilinearly (``align_corners=False``) to the image; ``fg = max(cam, 0)``;
2. per proposal and class, the mean of ``fg`` over the proposal (its ``area``);
3. per class, min-max across proposals (``+1e-7``); background ``(1 - max_c s) ** alpha``;
4. each proposal takes the argmax label (ties to the first: background, then CAM order) and that
   score as its confidence;
5. proposals are painted in ascending (level, confidence) order, a stable sort (later ones
   overwrite); pixels no proposal covers stay background (or ``uncovered`` if set).

Seeds are (H, W) uint8 with 0 = background and ``class_id + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse

from tag2mask.proposals.base import MaskProposals

__all__ = ["SeedMap", "resize_cams", "proposal_scores", "seed_from_proposals"]

NORM_EPS = 1e-7


@dataclass
class SeedMap:
    """Seed of one image (S proposals, P CAM channels).

    seed: (H, W) uint8. mask_scores: (S, P+1) float32 [background, classes]. mask_label: (S,) int64
    label of each proposal (0 or class_id + 1). mask_conf: (S,) float32. paint_order: (S,) int64.
    cam_full: (P, H, W) float32 CAMs at the image size.
    """

    seed: np.ndarray
    mask_scores: np.ndarray
    mask_label: np.ndarray
    mask_conf: np.ndarray
    paint_order: np.ndarray
    cam_full: np.ndarray


def resize_cams(cams: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(P, h, w) float -> (P, H, W) float32, bilinear with ``align_corners=False`` (no-op at equal size)."""
    c = torch.from_numpy(np.ascontiguousarray(cams, dtype=np.float32))
    if tuple(c.shape[-2:]) == tuple(size_hw) or c.shape[0] == 0:
        return c.numpy() if c.shape[0] else np.zeros((0,) + tuple(size_hw), np.float32)
    return F.interpolate(c[None], size=tuple(size_hw), mode="bilinear", align_corners=False)[0].numpy()


def _mask_means(masks: np.ndarray, areas: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per mask and channel: sum of ``values`` over the mask / area. (S,H,W), (S,), (P,H,W) -> (S,P) float32.

    Sums are exact-ish (float64 over the mask pixels, a sparse product), then one float32 division.
    """
    s = masks.shape[0]
    flat = masks.reshape(s, -1)
    rows, cols = np.nonzero(flat)
    m = sparse.csr_matrix((np.ones(rows.size), (rows, cols)), shape=flat.shape)
    sums = np.asarray(m @ values.reshape(values.shape[0], -1).T.astype(np.float64), dtype=np.float64)
    return (sums.astype(np.float32) / areas.astype(np.float32)[:, None]).astype(np.float32)


def proposal_scores(cam_full: np.ndarray, proposals: MaskProposals, alpha: float) -> np.ndarray:
    """Per-proposal scores (S, P+1) float32: [(1 - max_c s) ** alpha, s_1 .. s_P] (steps 2-3)."""
    s_count, p = len(proposals), cam_full.shape[0]
    if s_count == 0:
        return np.zeros((0, p + 1), np.float32)
    if np.any(proposals.areas <= 0):
        raise ValueError("a proposal has a non-positive area")
    fg = np.maximum(cam_full, np.float32(0))
    if p:
        means = _mask_means(proposals.masks, proposals.areas, fg)  # (S, P)
        lo, hi = means.min(axis=0, keepdims=True), means.max(axis=0, keepdims=True)
        cls = (means - lo) / (hi - lo + np.float32(NORM_EPS))
        top = cls.max(axis=1)
    else:
        cls = np.zeros((s_count, 0), np.float32)
        top = np.zeros(s_count, np.float32)
    bg = (np.float32(1) - top) ** np.float32(alpha)
    return np.concatenate([bg[:, None], cls], axis=1).astype(np.float32)


def seed_from_proposals(
    cams: np.ndarray,
    class_ids: np.ndarray,
    proposals: MaskProposals,
    alpha: float,
    uncovered: int = 0,
) -> SeedMap:
    """Seed map of one image.

    Args:
        cams: (P, h, w) float CAMs of the image's classes (any resolution, not necessarily >= 0).
        class_ids: (P,) int class ids (seed label = id + 1).
        proposals: the image's proposals at its full size (H, W).
        alpha: background exponent (FMA-WSSS: 0.6 coarse / 0.7 fine on VOC).
        uncovered: label of pixels no proposal covers (0 = background, as FMA-WSSS; 255 = ignore).
    """
    cams = np.asarray(cams)
    class_ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)
    if cams.ndim != 3 or cams.shape[0] != class_ids.shape[0]:
        raise ValueError(f"cams must be (P, h, w) with P = {class_ids.shape[0]} class ids, got {cams.shape}")
    if class_ids.size and (class_ids.min() < 0 or class_ids.max() > 253):
        raise ValueError(f"class ids must be in 0..253 for a uint8 seed, got {class_ids.min()}..{class_ids.max()}")
    height, width = proposals.image_size
    cam_full = resize_cams(cams, (height, width))
    scores = proposal_scores(cam_full, proposals, alpha)
    winner = scores.argmax(axis=1) if len(proposals) else np.zeros(0, np.int64)  # ties: first index
    labels = np.concatenate([[0], class_ids + 1])[winner].astype(np.int64)
    conf = scores[np.arange(len(proposals)), winner].astype(np.float32)
    order = sorted(range(len(proposals)), key=lambda i: (int(proposals.levels[i]), float(conf[i])))
    seed = np.full((height, width), uncovered, dtype=np.uint8)
    for i in order:
        seed[proposals.masks[i]] = labels[i]
    return SeedMap(seed=seed, mask_scores=scores, mask_label=labels, mask_conf=conf,
                   paint_order=np.asarray(order, dtype=np.int64), cam_full=cam_full)

