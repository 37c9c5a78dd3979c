"""Post-filters of mask proposals: FMA-WSSS's level-overlap ("rock-sand-water") filter and SAM's
small-region clean-up."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage, sparse

from tag2mask.proposals.base import MaskProposals

__all__ = ["overlap_counts", "level_overlap_filter", "remove_small_regions"]

_EIGHT = np.ones((3, 3), dtype=bool)


def _as_sparse(masks: np.ndarray) -> sparse.csr_matrix:
    """(S, H, W) bool -> (S, H*W) sparse 0/1 (cost proportional to the mask areas, not S * S * H * W)."""
    flat = masks.reshape(masks.shape[0], -1)
    rows, cols = np.nonzero(flat)
    return sparse.csr_matrix((np.ones(rows.size, dtype=np.int64), (rows, cols)), shape=flat.shape)


def overlap_counts(masks_a: np.ndarray, masks_b: np.ndarray) -> np.ndarray:
    """Exact pixel intersections ``|a_i & b_j|``: (A, H, W), (B, H, W) bool -> (A, B) int64."""
    if len(masks_a) == 0 or len(masks_b) == 0:
        return np.zeros((len(masks_a), len(masks_b)), dtype=np.int64)
    return np.asarray((_as_sparse(masks_a) @ _as_sparse(masks_b).T).todense(), dtype=np.int64)


def level_overlap_filter(proposals: MaskProposals, threshold: float = 0.3,
                         level_order: Sequence[int] = (2, 1, 0)) -> np.ndarray:
    """FMA-WSSS's "rock-sand-water" filter; returns the kept indices in output order.

    Levels are visited in ``level_order`` (whole -> part -> sub-part). The first non-empty level is
    kept whole; a mask of a later level is kept only if ``max_j |m & M_j| / |m| < threshold`` over
    the masks already kept from earlier levels (strict; the ratio in float32 with ``|m|`` the
    proposal's area, as the reference). Masks of one level are never compared with each other and
    dropped masks do not count. Output: kept masks level by level, each level in original order.
    """
    kept: list[int] = []
    for level in level_order:
        members = np.flatnonzero(proposals.levels == level)
        if members.size == 0:
            continue
        if not kept:
            kept.extend(members.tolist())
            continue
        inter = overlap_counts(proposals.masks[members], proposals.masks[np.asarray(kept)])  # (m, k)
        area = proposals.areas[members, None].astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = inter.astype(np.float32) / area
        keep = (recall.max(axis=1) < np.float32(threshold)) & (area[:, 0] > 0)  # empty masks never kept
        kept.extend(members[keep].tolist())
    return np.asarray(kept, dtype=np.int64)


def remove_small_regions(mask: np.ndarray, area_threshold: int, mode: str) -> tuple[np.ndarray, bool]:
    """SAM's clean-up of one (H, W) bool mask: fill background holes (``'holes'``) or drop foreground
    islands (``'islands'``) smaller than ``area_threshold`` pixels (8-connected regions).

    When every island is small the largest one is kept. Returns (mask, changed).
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    fill_holes = mode == "holes"
    working = ~mask if fill_holes else mask
    labels, n = ndimage.label(working, structure=_EIGHT)
    if n == 0:
        return mask, False
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = np.flatnonzero(sizes < area_threshold) + 1
    if small.size == 0:
        return mask, False
    if fill_holes:
        return mask | np.isin(labels, small), True
    keep = np.setdiff1d(np.arange(1, n + 1), small)
    if keep.size == 0:
        keep = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(labels, keep), True
