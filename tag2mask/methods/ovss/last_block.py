"""Last-block variants of CLIP's ViT for training-free open-vocabulary segmentation.

Every variant is a function ``fn(block, x, grid) -> stream`` that replaces the *last* residual
block of the image tower (see :meth:`tag2mask.clip.vision.VisionTransformer.forward_dense`):

* ``block``: the last :class:`~tag2mask.clip.layers.ResidualAttentionBlock` (its weights are reused
  unchanged; no method trains anything);
* ``x``: the block's input stream ``(B, 1 + h*w, C)``, CLS token first;
* ``grid``: the patch grid ``(h, w)``;
* returns the new stream ``(B, 1 + h*w, C)``, which ``forward_dense`` sends through ``ln_post`` and
  ``proj``.

A variant is an *attention kind* (how the attention matrix is formed from CLIP's own q, k, v
projections of ``ln_1(x)``) in one of two *architectures*: ``full`` keeps the block's residual and
FFN (``x + A(ln_1 x)`` then ``+ FFN``); ``reduced`` returns the attention output alone (what
ClearCLIP's ``ignore_residual=True`` and NACLIP's ``arch='reduced'`` do).

Published definitions (checked against the official code and its golden fixtures, see
``docs/open_vocabulary.md``):

================  ============================================  =========
name              attention of the last block                   residual
                                                                 and FFN
================  ============================================  =========
clip              softmax(q kᵀ/√d)  (unchanged CLIP)            kept
maskclip          identity (each token attends to itself)       kept
sclip             softmax(q qᵀ/√d) + softmax(k kᵀ/√d)           kept
clearclip         softmax(q qᵀ/√d)                              dropped
naclip            softmax(k kᵀ/√d + Gaussian prior, σ=5)        dropped
clip-reduced      softmax(q kᵀ/√d)                              dropped
maskclip-reduced  identity                                      dropped
sclip-reduced     softmax(q qᵀ/√d) + softmax(k kᵀ/√d)           dropped
================  ============================================  =========

The ``-reduced`` variants are the baselines of ClearCLIP's ``model_type`` switch with its default
``ignore_residual=True``: ``vanilla`` (the value its shipped ``configs/base_config.py`` sets),
``MaskCLIP`` and ``SCLIP``. ``d`` is the per-head dimension; all attentions are per head with CLIP's
own projections, and the attention output always goes through the block's ``out_proj``.

:func:`attention_weights` returns a variant's attention matrix explicitly (rows = queries) for
inspection; the variants themselves use fused ``scaled_dot_product_attention`` calls.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from tag2mask.clip.layers import ResidualAttentionBlock

LastBlockFn = Callable[[ResidualAttentionBlock, torch.Tensor, tuple[int, int]], torch.Tensor]

__all__ = [
    "LastBlockFn", "LAST_BLOCKS", "get_last_block", "attention_weights", "clip_block", "maskclip_block",
    "maskclip_keys", "sclip_block", "clearclip_block", "NAClipBlock", "naclip_block", "neighbourhood_prior",
]


# --------------------------------------------------------------------------------------------------
# shared pieces


def _attention_output(block: ResidualAttentionBlock, heads_out: torch.Tensor) -> torch.Tensor:
    """Merge heads ``(B, heads, L, d)`` and apply ``out_proj`` -> ``(B, L, C)``."""
    return block.attn.project_out(block.attn.merge_heads(heads_out))


def _self_similarity_attention(t: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(t tᵀ / √d + bias) v`` per head: t, v ``(B, heads, L, d)`` -> ``(B, heads, L, d)``.

    ``scaled_dot_product_attention`` with query = key = ``t`` is exactly this (its default scale is
    1/√d and a float mask is added to the scores), and it avoids materialising the L×L matrix
    where a fused kernel exists.
    """
    return F.scaled_dot_product_attention(t, t, v, attn_mask=bias)


def _ffn(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's second half, ``x + mlp(ln_2(x))``."""
    return x + block.mlp(block.ln_2(x))


def _softmax_scores(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Explicit ``softmax(a bᵀ/√d + bias)``: ``(B, heads, L, d)`` x2 -> ``(B, heads, L, L)``."""
    scores = (a @ b.transpose(-2, -1)) * a.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1)


# --------------------------------------------------------------------------------------------------
# attention kinds: attention output of ln_1(x), before the residual (B, L, C)


def _identity_attention(block: ResidualAttentionBlock, a: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    # token i's output is its own value, so no head split is needed
    _, _, v = block.attn.qkv(a, split_heads=False)
    return block.attn.project_out(v)


def _qk_attention(block: ResidualAttentionBlock, a: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    q, k, v = block.attn.qkv(a)
    return _attention_output(block, F.scaled_dot_product_attention(q, k, v))


def _csa_attention(block: ResidualAttentionBlock, a: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    q, k, v = block.attn.qkv(a)
    # (A_q + A_k) v = A_q v + A_k v: two fused attention calls instead of two L×L matrices
    return _attention_output(block, _self_similarity_attention(q, v) + _self_similarity_attention(k, v))


def _qq_attention(block: ResidualAttentionBlock, a: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    q, _, v = block.attn.qkv(a)
    return _attention_output(block, _self_similarity_attention(q, v))


def _reduced(attend: Callable) -> LastBlockFn:
    def block_fn(block: ResidualAttentionBlock, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return attend(block, block.ln_1(x), grid)

    return block_fn


# --------------------------------------------------------------------------------------------------
# variants


def clip_block(block: ResidualAttentionBlock, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Unchanged CLIP block (the "vanilla CLIP" baseline): ``(B, L, C) -> (B, L, C)``."""
    return block(x)[0]


def maskclip_block(block: ResidualAttentionBlock, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """MaskCLIP: the last block with the attention matrix replaced by the identity.

    ``x + W_o(W_v LN1(x) + b_v) + b_o`` followed by the usual ``+ FFN(LN2(.))``: the official model
    keeps the residual and the FFN (re-implementations that drop them do not reproduce its numbers).
    ``(B, L, C) -> (B, L, C)``.
    """
    return _ffn(block, x + _identity_attention(block, block.ln_1(x), grid))


def maskclip_keys(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The keys MaskCLIP's key smoothing uses: ``W_o(W_k LN1(x) + b_k) + b_o``, ``(B, L, C)``.

    The official code passes q, k and v all through ``out_proj`` (no head split); CLS stays at
    index 0 here, callers drop it.
    """
    _, k, _ = block.attn.qkv(block.ln_1(x), split_heads=False)
    return block.attn.project_out(k)


def sclip_block(block: ResidualAttentionBlock, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """SCLIP correlative self-attention: ``softmax(q qᵀ/√d) + softmax(k kᵀ/√d)``, residual and FFN kept.

    The two softmaxes are summed, not averaged (rows sum to 2), exactly as in the official code;
    ``(B, L, C) -> (B, L, C)``.
    """
    return _ffn(block, x + _csa_attention(block, block.ln_1(x), grid))


def clearclip_block(block: ResidualAttentionBlock, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """ClearCLIP: q–q self-attention, **no residual and no FFN** (``ignore_residual=True`` default).

    Returns ``W_o(softmax(q qᵀ/√d) v) + b_o`` only; ``(B, L, C) -> (B, L, C)``.
    """
    return _qq_attention(block, block.ln_1(x), grid)


def neighbourhood_prior(
    grid: tuple[int, int], std: float, *, cls_token: bool = True,
    device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """NACLIP's additive attention prior: ``ω[p, p'] = exp(-‖pos_p - pos_p'‖² / (2σ²))``.

    Positions are patch-grid coordinates (row, column) in patch units; the Gaussian is not
    normalised (ω = 1 on the diagonal). With ``cls_token`` the CLS row and column are 0, so the
    CLS token gets no spatial bias. Returns ``(1 + h*w, 1 + h*w)`` (or ``(h*w, h*w)``) ``dtype``.
    """
    if std <= 0:
        raise ValueError(f"NACLIP's Gaussian std must be > 0, got {std}")
    h, w = grid
    rows = torch.arange(h, dtype=torch.float64, device=device).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64, device=device).repeat(h)
    dist2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    prior = torch.exp(-dist2 / (2.0 * std * std))
    if cls_token:
        prior = F.pad(prior, (1, 0, 1, 0))
    return prior.to(dtype)


class NAClipBlock:
    """NACLIP: neighbourhood attention in a *reduced* last block (no residual, no FFN).

    Attention ``softmax(k kᵀ/√d + ω)`` with ω the Gaussian :func:`neighbourhood_prior` (σ = ``std``
    patches, 5 in the paper and code), identical for every head; output ``W_o(A v) + b_o`` only.
    The prior is cached per (grid, device, dtype) because sliding windows reuse the same grid.
    """

    def __init__(self, std: float = 5.0):
        if std <= 0:
            raise ValueError(f"NACLIP's Gaussian std must be > 0, got {std}")
        self.std = float(std)
        self._cache: dict[tuple, torch.Tensor] = {}

    def prior(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Cached :func:`neighbourhood_prior` for ``grid``: ``(1 + h*w, 1 + h*w)``."""
        key = (tuple(grid), str(device), dtype)
        if key not in self._cache:
            if len(self._cache) > 16:  # many image sizes in whole mode: keep memory bounded
                self._cache.clear()
            self._cache[key] = neighbourhood_prior(grid, self.std, device=device, dtype=dtype)
        return self._cache[key]

    def _checked_prior(self, k: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if k.shape[2] != 1 + grid[0] * grid[1]:
            raise ValueError(f"NACLIP expects 1 + {grid[0]}*{grid[1]} tokens, got {k.shape[2]}")
        return self.prior(grid, k.device, k.dtype)

    def attention(self, block: ResidualAttentionBlock, a: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Attention output of ``a = ln_1(x)`` before any residual: ``(B, L, C)``."""
        _, k, v = block.attn.qkv(a)
        return _attention_output(block, _self_similarity_attention(k, v, self._checked_prior(k, grid)))

    def weights(self, block: ResidualAttentionBlock, a: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Explicit attention matrix ``(B, heads, L, L)`` of ``a = ln_1(x)``."""
        _, k, _ = block.attn.qkv(a)
        return _softmax_scores(k, k, self._checked_prior(k, grid))

    def __call__(self, block: ResidualAttentionBlock, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(B, 1 + h*w, C) -> (B, 1 + h*w, C)``."""
        return self.attention(block, block.ln_1(x), grid)

    def __repr__(self) -> str:
        return f"NAClipBlock(std={self.std})"


naclip_block = NAClipBlock(std=5.0)

#: name -> last-block function with the published defaults
LAST_BLOCKS: dict[str, LastBlockFn] = {
    "clip": clip_block,
    "maskclip": maskclip_block,
    "sclip": sclip_block,
    "clearclip": clearclip_block,
    "naclip": naclip_block,
    "clip-reduced": _reduced(_qk_attention),
    "maskclip-reduced": _reduced(_identity_attention),
    "sclip-reduced": _reduced(_csa_attention),
}


def get_last_block(name: str, **params: float) -> LastBlockFn:
    """The variant called ``name`` (case-insensitive); ``params`` override defaults (``naclip``: ``std``).

    Raises ``KeyError`` listing the known names, ``TypeError`` for parameters the variant lacks.
    """
    key = name.strip().lower()
    if key not in LAST_BLOCKS:
        raise KeyError(f"unknown method {name!r}; choose one of {sorted(LAST_BLOCKS)}")
    if not params:
        return LAST_BLOCKS[key]
    if key == "naclip":
        unknown = set(params) - {"std"}
        if unknown:
            raise TypeError(f"naclip accepts only 'std', got {sorted(unknown)}")
        return NAClipBlock(std=params["std"])
    raise TypeError(f"method {key!r} takes no parameters, got {sorted(params)}")


def attention_weights(
    name: str, block: ResidualAttentionBlock, a: torch.Tensor, grid: tuple[int, int], std: float = 5.0
) -> torch.Tensor:
    """The attention matrix of variant ``name`` for ``a = ln_1(x)`` ``(B, L, C)``: ``(B, heads, L, L)``.

    Rows are queries. SCLIP's rows sum to 2 (two softmaxes added); MaskCLIP's matrix is the
    identity; ``std`` is NACLIP's σ. Computed explicitly (the variants use fused kernels).
    """
    key = name.strip().lower()
    if key not in LAST_BLOCKS:
        raise KeyError(f"unknown method {name!r}; choose one of {sorted(LAST_BLOCKS)}")
    kind = key.removesuffix("-reduced")
    if kind == "naclip":
        return NAClipBlock(std=std).weights(block, a, grid)
    q, k, _ = block.attn.qkv(a)
    if kind == "maskclip":
        eye = torch.eye(q.shape[2], dtype=q.dtype, device=q.device)
        return eye.expand(q.shape[0], q.shape[1], -1, -1).clone()
    if kind == "clip":
        return _softmax_scores(q, k)
    if kind == "sclip":
        return _softmax_scores(q, q) + _softmax_scores(k, k)
    return _softmax_scores(q, q)  # clearclip
