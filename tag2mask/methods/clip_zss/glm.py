"""GLM, CLIP-ZSS's global learning module: the student's dense features must pool to CLIP's CLS embedding.

With the student's dense embeddings ``R (B, D, L)`` (L = h·w) and the teacher's CLS embeddings
``S (B, D)``::

    W  = softmax_L( S·R / √D )                       CLS as query, R as keys       (B, L)
    Ŝ  = Σ_L W · R                                    R as values                   (B, D)
    logits_i = [ s_i·ŝ_i, s_j·ŝ_i (j ≠ i), b_k·ŝ_i ] / τ   s, ŝ, bank b L2-normalised
    L_global = mean_i CE(logits_i, target = own image)      (InfoNCE)

``b`` is a first-in-first-out bank of past CLS embeddings (negatives only), checkpointed with the
run. The teacher side carries no gradient: only the student's ``R`` learns.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention_pool", "glm_logits", "glm_loss", "ClsBank"]


def attention_pool(cls: Tensor, dense: Tensor, scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """CLS-queried attention pooling of dense features.

    Args:
        cls: ``(B, D)`` query (the teacher's CLS embedding).
        dense: ``(B, D, h, w)`` or ``(B, D, L)`` keys and values (the student's embeddings).
        scale: multiplier of the dot products; ``None`` = ``1 / √D``.

    Returns:
        ``(pooled (B, D), weights (B, L))``.
    """
    b, d = cls.shape
    r = dense.reshape(b, d, -1)
    s = (1.0 / math.sqrt(d)) if scale is None else float(scale)
    weights = torch.einsum("bd,bdl->bl", cls.to(r.dtype), r).mul(s).softmax(dim=-1)
    return torch.einsum("bl,bdl->bd", weights, r), weights


def glm_logits(cls: Tensor, pooled: Tensor, bank: Optional[Tensor], temperature: float) -> Tensor:
    """InfoNCE logits ``(B, B + N)``: row i = ``[s_0·ŝ_i, ..., s_{B-1}·ŝ_i, b_0·ŝ_i, ...] / τ`` (cosines).

    The positive of row ``i`` is column ``i``; ``bank`` ``(N, D)`` (may be empty or ``None``).
    """
    keys = F.normalize(cls.float(), dim=-1)
    if bank is not None and bank.numel():
        keys = torch.cat([keys, F.normalize(bank.float(), dim=-1).to(keys.device)])
    return F.normalize(pooled.float(), dim=-1) @ keys.t() / temperature


def glm_loss(cls: Tensor, dense: Tensor, bank: Optional[Tensor], temperature: float = 0.07,
             scale: Optional[float] = None) -> Tensor:
    """``L_global``: mean InfoNCE of the attention-pooled student features against the CLS embeddings (scalar)."""
    pooled, _ = attention_pool(cls.detach(), dense, scale)
    logits = glm_logits(cls.detach(), pooled, None if bank is None else bank.detach(), temperature)
    target = torch.arange(cls.shape[0], device=logits.device)
    return F.cross_entropy(logits, target)


class ClsBank:
    """First-in-first-out bank of past CLS embeddings (L2-normalised, newest last), at most ``size`` rows."""

    def __init__(self, size: int, dim: int) -> None:
        self.size, self.dim = int(size), int(dim)
        self.items = torch.zeros(0, dim)

    def tensor(self, device: Optional[torch.device] = None) -> Tensor:
        return self.items if device is None else self.items.to(device)

    def push(self, cls: Tensor) -> None:
        """Append ``(B, D)`` embeddings (normalised, detached, on CPU); the oldest fall out."""
        if self.size == 0:
            return
        new = F.normalize(cls.detach().float(), dim=-1).cpu()
        self.items = torch.cat([self.items, new])[-self.size:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        return {"items": self.items.clone(), "size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        items = state["items"]
        if items.ndim != 2 or (items.numel() and items.shape[1] != self.dim):
            raise ValueError(f"CLS bank of shape {tuple(items.shape)} does not fit dimension {self.dim}")
        self.items = items.float()[-self.size:].contiguous() if self.size else items.float()[:0]
