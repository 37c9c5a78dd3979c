"""Transformer building blocks in OpenAI CLIP's parameter layout, with explicit dense hooks.

Tokens are batch-first everywhere in tag2mask: ``(B, L, C)`` with the CLS token (vision) at index 0.
Parameter names match OpenAI's checkpoints (``attn.in_proj_weight``, ``mlp.c_fc`` ...), so state dicts
load without renaming.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm that normalises in float32 and casts back, as CLIP does for half-precision inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig = x.dtype
        if orig in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled():
            out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
            return out.to(orig)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def fp16_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], emulated: bool) -> torch.Tensor:
    """``F.linear`` with input, weight and bias cast to float16 and a float16 result (``(..., out)``).

    ``emulated``: the product is formed in float32 from the float16 values and rounded once, which is
    what a float16 GEMM accumulating in float32 returns (the GPU kernels) and is several times faster
    than torch's CPU half kernels; otherwise torch's float16 kernel runs.
    """
    b = None if bias is None else bias.half()
    if emulated:
        return F.linear(x.half().float(), weight.half().float(), None if b is None else b.float()).half()
    return F.linear(x.half(), weight.half(), b)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation OpenAI CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    """``quick_gelu`` (OpenAI CLIP) or ``gelu`` (exact erf GELU, open_clip non-quickgelu models, MaskCLIP compat)."""
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; expected 'quick_gelu' or 'gelu'")


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection (``in_proj``), like ``nn.MultiheadAttention``.

    ``fp16_mixed`` (set by :class:`tag2mask.clip.numerics.BoundNumerics` for WeCLIP's numerics) runs it
    as WeCLIP's official attention module does on a float16 stream: q, k and v are projected from
    float32 copies of the input with the float32 ``in_proj`` (three projections, as the official
    module takes on three separate casts), scores and softmax in float32, and the output projection in
    float16 (input, weight and bias cast to half).

    Unlike ``nn.MultiheadAttention`` it exposes its pieces (:meth:`qkv`, :meth:`project_out`) so that
    methods can rebuild the attention of a block (MaskCLIP, SCLIP, ClearCLIP, NACLIP) from the same
    weights, and it uses ``scaled_dot_product_attention`` whenever attention maps are not requested.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.width = width
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.fp16_mixed = False
        self.fp16_emulated = False  # fp16 products as float32 arithmetic rounded once (CPUs; see numerics)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def qkv(self, x: torch.Tensor, split_heads: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project ``x`` (B, L, C) to q, k, v: each (B, heads, L, head_dim), or (B, L, C) if not ``split_heads``."""
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if not split_heads:
            return q, k, v
        return self._split(q), self._split(k), self._split(v)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, heads, L, head_dim) -> (B, L, C)."""
        b, h, n, d = t.shape
        return t.transpose(1, 2).reshape(b, n, h * d)

    def project_out(self, t: torch.Tensor) -> torch.Tensor:
        """Apply the output projection to merged heads (B, L, C)."""
        return self.out_proj(t)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Self-attention of ``x`` (B, L, C).

        Returns the output (B, L, C) and, if ``need_weights``, the softmax attention averaged over
        heads (B, L, L) (rows = queries; CLS at index 0 for vision towers).
        """
        if self.fp16_mixed:
            return self._forward_fp16_mixed(x, attn_mask, need_weights)
        q, k, v = self.qkv(x)
        if not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            return self.project_out(self.merge_heads(out)), None
        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores + attn_mask
        probs = scores.softmax(dim=-1)
        out = probs @ v
        return self.project_out(self.merge_heads(out)), probs.mean(dim=1)


    def _forward_fp16_mixed(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], need_weights: bool,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """WeCLIP's official attention on ``x`` (B, L, C) any float dtype -> ((B, L, C) float16, (B, L, L) float32)."""
        xf = x.float()
        w = self.in_proj_weight.float().chunk(3)
        b = self.in_proj_bias.float().chunk(3)
        q, k, v = (self._split(F.linear(xf, w[i], b[i])) for i in range(3))
        # q / sqrt(d) (a division, as the official module) before the score matmul
        scores = (q / math.sqrt(self.head_dim)) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores + attn_mask.float()
        probs = scores.softmax(dim=-1)
        out = self.merge_heads(probs @ v)
        out = fp16_linear(out, self.out_proj.weight, self.out_proj.bias, self.fp16_emulated)
        weights = probs.sum(dim=1) / self.heads if need_weights else None
        return out, weights


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, activation: str = "quick_gelu", ln_eps: float = 1e-5):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=ln_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width, eps=ln_eps)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, width * 4)),
                    ("gelu", make_activation(activation)),
                    ("c_proj", nn.Linear(width * 4, width)),
                ]
            )
        )

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        need_weights: bool = False,
        ln1_hook: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Run the block on ``x`` (B, L, C) -> ((B, L, C), head-averaged attention (B, L, L) or None).

        ``ln1_hook`` receives the ``ln_1`` output (the activation that feeds attention only) and
        returns the tensor to use instead; GradCAM uses it to capture that activation for gradients.
        """
        a = self.ln_1(x)
        if ln1_hook is not None:
            a = ln1_hook(a)
        attn_out, weights = self.attn(a, attn_mask=attn_mask, need_weights=need_weights)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` stored as ``resblocks`` (OpenAI key layout)."""

    def __init__(self, width: int, layers: int, heads: int, activation: str = "quick_gelu", ln_eps: float = 1e-5):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, activation, ln_eps) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.resblocks:
            x, _ = block(x, attn_mask=attn_mask)
        return x


def set_numerics(module: nn.Module, *, ln_eps: Optional[float] = None, activation: Optional[str] = None) -> None:
    """Change LayerNorm eps and/or the MLP activation of every block in ``module`` in place.

    MaskCLIP's official model runs CLIP weights with eps 1e-6 and erf GELU; this switches an
    already-loaded model to those numerics (and back) without reloading weights.
    """
    for m in module.modules():
        if ln_eps is not None and isinstance(m, nn.LayerNorm):
            m.eps = ln_eps
        if activation is not None and isinstance(m, ResidualAttentionBlock):
            m.mlp.gelu = make_activation(activation)
