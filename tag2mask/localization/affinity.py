"""Class-aware attention affinity (CAA) of CLIP-ES / WeCLIP.

The frozen ViT's patch-to-patch attention is turned into a (doubly) stochastic
transition matrix that propagates a CAM over the patch grid:

1. :func:`mean_attention` - mean of the last ``last`` head-averaged attention
   maps with the CLS row/column removed (rows then no longer sum to 1);
2. :func:`sinkhorn_normalize` - alternate column / row normalisation, no epsilon;
3. :func:`transition_matrix` - symmetrise and raise to a small power;
4. :func:`refine_cams` - propagate each class's box-masked CAM:
   ``r_i = sum_j T_ij * mask_j * cam_j``.

All functions are torch based (CPU or GPU) and keep the input dtype. The
reference fixtures were produced in float32; feeding float32 reproduces them.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

__all__ = ["mean_attention", "sinkhorn_normalize", "transition_matrix", "refine_cams"]

TensorLike = Union[torch.Tensor, np.ndarray]


def _as_tensor(x: TensorLike) -> torch.Tensor:
    """View a numpy array as a tensor (no copy when possible); tensors pass through."""
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def mean_attention(attn_maps: Union[Sequence[torch.Tensor], torch.Tensor], last: int = 8,
                   drop_cls: bool = True) -> torch.Tensor:
    """Mean of the last ``last`` attention maps, optionally without the CLS token.

    Args:
        attn_maps: a sequence of ``(L, L)`` head-averaged attention maps in block
            order (for CLIP-ES: the 11 encoder maps + block 12's map), or one
            ``(n_layers, L, L)`` tensor. A leading batch axis of size 1 per map
            (``(1, L, L)``) is accepted and squeezed.
        last: how many of the final maps to average (CLIP-ES: 8; WeCLIP's RFM uses 6).
        drop_cls: remove row and column 0 (the CLS token), giving ``n = L - 1``.

    Returns:
        ``(n, n)`` tensor (dtype of the maps), ``n = L - 1`` if ``drop_cls`` else ``L``.
    """
    if isinstance(attn_maps, (torch.Tensor, np.ndarray)):
        stack = _as_tensor(attn_maps)
    else:
        maps = [_as_tensor(a) for a in attn_maps]
        if not maps:
            raise ValueError("attn_maps is empty")
        stack = torch.stack([m.reshape(m.shape[-2], m.shape[-1]) for m in maps], dim=0)
    if stack.dim() == 4 and stack.shape[1] == 1:
        stack = stack[:, 0]
    if stack.dim() != 3 or stack.shape[-1] != stack.shape[-2]:
        raise ValueError(f"expected (n_layers, L, L) attention, got {tuple(stack.shape)}")
    if last < 1:
        raise ValueError(f"last must be at least 1, got {last}")
    # like the official ``[-last:]`` slice: a model with fewer blocks averages all of them
    sel = stack[-last:]
    if drop_cls:
        sel = sel[:, 1:, 1:]
    return sel.mean(dim=0)


def sinkhorn_normalize(W: TensorLike, rounds: int = 3) -> torch.Tensor:
    """Alternate column and row normalisation (CLIP-ES's Sinkhorn-style step).

    Each round divides by the column sums, then by the row sums. There is
    deliberately no epsilon (as in the official code): an all-zero row or column
    yields NaN, which cannot happen for softmax attention.

    Args:
        W: ``(n, n)`` non-negative float tensor (or array).
        rounds: number of (column, row) rounds; CLIP-ES uses 3.

    Returns:
        ``(n, n)`` tensor, rows summing to 1 (columns approximately).
    """
    T = _as_tensor(W)
    for _ in range(rounds):
        T = T / T.sum(dim=0, keepdim=True)
        T = T / T.sum(dim=1, keepdim=True)
    return T


def transition_matrix(W: TensorLike, rounds: int = 3, power: int = 2) -> torch.Tensor:
    """Attention affinity -> symmetric transition matrix ``((S + S^T) / 2) ** power``.

    Args:
        W: ``(n, n)`` mean attention from :func:`mean_attention`.
        rounds: Sinkhorn rounds (:func:`sinkhorn_normalize`).
        power: matrix power, computed by repeated right-multiplication; the
            default 2 is exactly one matmul ``T @ T`` (the official loop body runs once).

    Returns:
        ``(n, n)`` tensor (dtype of ``W``); for CLIP-ES = the fixture ``trans_mat``.
    """
    if power < 1:
        raise ValueError(f"power must be >= 1, got {power}")
    T = sinkhorn_normalize(W, rounds)
    T = (T + T.t()) / 2
    out = T
    for _ in range(power - 1):
        out = out @ T
    return out


def refine_cams(trans: TensorLike, cams: TensorLike, box_masks: TensorLike) -> TensorLike:
    """Propagate box-masked CAMs with the transition matrix, all classes at once.

    ``r_i = sum_j T_ij * mask_j * cam_j``: the mask selects *source* patches
    (columns of ``T``), so patches outside the boxes still receive mass. The
    official code forms ``T * mask_row`` and multiplies by ``vec(cam)`` per class;
    with a 0/1 mask ``(T_ij * m_j) * c_j == T_ij * (m_j * c_j)`` exactly, so one
    ``(n, n) @ (n, K)`` matmul gives the same products (only the order of the
    floating-point sum inside the matmul may differ, ~1 ulp).

    Args:
        trans: ``(n, n)`` transition matrix, ``n = h * w`` (row-major patches).
        cams: ``(K, h, w)`` float low-resolution CAMs.
        box_masks: ``(K, h, w)`` 0/1 masks (float or bool).

    Returns:
        ``(K, h, w)`` refined maps, numpy if ``cams`` was numpy else a tensor
        (dtype of ``cams``).
    """
    as_numpy = isinstance(cams, np.ndarray)
    T = _as_tensor(trans)
    c = _as_tensor(cams)
    m = _as_tensor(box_masks).to(device=c.device, dtype=c.dtype)
    if c.dim() != 3 or m.shape != c.shape:
        raise ValueError(f"cams {tuple(c.shape)} and box_masks {tuple(m.shape)} must both be (K, h, w)")
    K, h, w = c.shape
    n = h * w
    if T.shape != (n, n):
        raise ValueError(f"trans must be ({n}, {n}) for a {h}x{w} grid, got {tuple(T.shape)}")
    src = (m * c).reshape(K, n).t()  # (n, K): one column per class
    out = (T.to(c.dtype) @ src).t().reshape(K, h, w)
    return out.numpy() if as_numpy else out
