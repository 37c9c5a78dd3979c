"""CLIP's ViT image tower with the dense hooks the localisation methods need.

The hooks (``forward_intermediates``, ``run_blocks``, ``forward_dense``) replace the monkeypatched
copies of OpenAI's model that the official CLIP-ES / WeCLIP / MaskCLIP repositories vendor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tag2mask.clip.layers import LayerNorm, ResidualAttentionBlock, Transformer

LastBlockFn = Callable[[ResidualAttentionBlock, torch.Tensor, tuple[int, int]], torch.Tensor]


@dataclass
class VisionIntermediates:
    """What :meth:`VisionTransformer.forward_intermediates` returns.

    ``tokens[i]`` is the residual stream after block ``i`` (B, L, C), CLS at index 0;
    ``attentions[i]`` its head-averaged softmax attention (B, L, L) when requested;
    ``grid`` is the patch grid (h, w), L = 1 + h*w.
    """

    tokens: list[torch.Tensor] = field(default_factory=list)
    attentions: list[torch.Tensor] = field(default_factory=list)
    grid: tuple[int, int] = (0, 0)

    @property
    def last(self) -> torch.Tensor:
        return self.tokens[-1]


class VisionTransformer(nn.Module):
    """OpenAI CLIP ViT: ``conv1`` patchify, CLS, positional embedding, ``ln_pre``, blocks, ``ln_post``, ``proj``.

    Positional-embedding behaviour at other resolutions is set by two attributes, which presets
    change: ``pos_interpolation`` (``'bilinear'`` as CLIP-ES/WeCLIP, or ``'bicubic'`` as MaskCLIP/HF)
    and ``round_pos_embed_fp16`` (the official CLIP-ES/WeCLIP code casts the interpolated table to fp16).
    :meth:`embed` and :meth:`forward_dense` also take a per-call ``pos_mode`` / ``pos_scale_offset``,
    so a method can use its own interpolation without changing a shared model.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        activation: str = "quick_gelu",
        ln_eps: float = 1e-5,
    ):
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        grid = image_size // patch_size
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width, eps=ln_eps)
        self.transformer = Transformer(width, layers, heads, activation, ln_eps)
        self.ln_post = LayerNorm(width, eps=ln_eps)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.pos_interpolation = "bilinear"
        self.round_pos_embed_fp16 = False

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.resblocks)

    @property
    def pretrain_grid(self) -> int:
        return int(math.isqrt(self.positional_embedding.shape[0] - 1))

    def interpolate_pos_embed(
        self, h: int, w: int, mode: Optional[str] = None, round_fp16: Optional[bool] = None,
        scale_offset: Optional[float] = None,
    ) -> torch.Tensor:
        """Positional embedding for an (h, w) patch grid -> (1 + h*w, C); the CLS row is kept as is.

        The patch rows are viewed as a square grid (channels first), resized with
        ``F.interpolate(align_corners=False)`` in float32, flattened row-major.

        ``scale_offset=None`` (default) resizes to exactly ``(h, w)``, so source coordinates are
        ``(i + 0.5) * g / h - 0.5``. A number ``o`` instead passes ``scale_factor=((h + o) / g,
        (w + o) / g)`` (no recomputation), the DINO-style ``interpolate_pos_encoding`` that SCLIP,
        NACLIP and ClearCLIP ship with ``o = 0.1``: the output is still (h, w), but source
        coordinates are ``(i + 0.5) * g / (h + o) - 0.5``, which shifts the table slightly.
        """
        mode = mode or self.pos_interpolation
        round_fp16 = self.round_pos_embed_fp16 if round_fp16 is None else round_fp16
        pos = self.positional_embedding
        g = self.pretrain_grid
        # While an ONNX export traces, h and w are 0-dim tensors of the (maybe symbolic) input size: the
        # shortcut would freeze the traced size into the graph, so the table is always resized then. A
        # same-size resize is the identity (source coordinates fall on the grid), so the values do not change.
        if (h, w) == (g, g) and not torch.jit.is_tracing():
            table = pos
        else:
            patch = pos[1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
            if scale_offset is None:
                patch = F.interpolate(patch, size=(h, w), mode=mode, align_corners=False)
            else:
                factors = ((h + scale_offset) / g, (w + scale_offset) / g)
                patch = F.interpolate(patch, scale_factor=factors, mode=mode, align_corners=False,
                                      recompute_scale_factor=False)
                if patch.shape[-2:] != (h, w):
                    raise ValueError(f"scale_offset {scale_offset} gives a {tuple(patch.shape[-2:])} grid, not ({h}, {w})")
            patch = patch.permute(0, 2, 3, 1).reshape(h * w, -1).to(pos.dtype)
            table = torch.cat([pos[:1], patch], dim=0)
        if round_fp16:
            table = table.half().to(pos.dtype)
        return table

    def embed(
        self,
        images: torch.Tensor,
        pos_embed: Optional[torch.Tensor] = None,
        pos_mode: Optional[str] = None,
        pos_scale_offset: Optional[float] = None,
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify + CLS + positional embedding + ``ln_pre``: (B, 3, H, W) -> ((B, L, C), (h, w)).

        H and W are floored to multiples of the patch size by the stride-``patch`` convolution.
        ``pos_embed`` ((L, C) or per image (B, L, C)) replaces :meth:`interpolate_pos_embed`, e.g. a
        table placed on the real patches of a padded image.
        ``pos_mode`` / ``pos_scale_offset``: see :meth:`interpolate_pos_embed` (default: the
        model's ``pos_interpolation``, exact-size resizing).
        """
        x = self.conv1(images.to(self.conv1.weight.dtype))
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, c)
        x = torch.cat([cls, x], dim=1)
        if pos_embed is None:
            pos_embed = self.interpolate_pos_embed(h, w, mode=pos_mode, scale_offset=pos_scale_offset)
        elif pos_embed.shape[-2] != x.shape[1]:
            raise ValueError(f"pos_embed has {pos_embed.shape[-2]} rows, the {h}x{w} grid needs {x.shape[1]}")
        x = x + pos_embed.to(x.dtype)
        return self.ln_pre(x), (h, w)

    def run_blocks(
        self,
        x: torch.Tensor,
        start: int = 0,
        end: Optional[int] = None,
        return_attention: bool = False,
        keep_tokens: bool = True,
        out: Optional[VisionIntermediates] = None,
        attention_from: int = 0,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> VisionIntermediates:
        """Run blocks ``start .. end-1`` on a token stream (B, L, C), collecting outputs (and attention).

        Attention maps are formed only for blocks ``>= attention_from``; earlier blocks take the
        fused ``scaled_dot_product_attention`` path. ``attn_mask`` is an additive mask broadcastable
        to (B, heads, L, L), e.g. :func:`key_padding_attn_mask` for padded images.
        """
        end = self.num_blocks if end is None else end
        out = out if out is not None else VisionIntermediates()
        for i in range(start, end):
            x, attn = self.blocks[i](x, attn_mask=attn_mask, need_weights=return_attention and i >= attention_from)
            if keep_tokens or i == end - 1:
                out.tokens.append(x)
            if attn is not None:
                out.attentions.append(attn)
        if not out.tokens:
            out.tokens.append(x)
        return out

    def forward_intermediates(
        self,
        images: torch.Tensor,
        num_blocks: Optional[int] = None,
        return_attention: bool = False,
        keep_tokens: bool = True,
        attention_from: int = 0,
        pos_embed: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> VisionIntermediates:
        """Embed ``images`` (B, 3, H, W) and run the first ``num_blocks`` blocks (all by default).

        With ``keep_tokens=False`` only the last block's output is kept (saves memory); attention
        maps are returned for blocks ``>= attention_from`` (one (B, L, L) map each).
        ``pos_embed`` and ``attn_mask``: see :meth:`embed` and :meth:`run_blocks`.
        """
        x, grid = self.embed(images, pos_embed)
        out = VisionIntermediates(grid=grid)
        return self.run_blocks(x, 0, num_blocks, return_attention, keep_tokens, out, attention_from, attn_mask)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_post`` then ``proj`` on every token: (B, L, C) -> (B, L, D)."""
        return self.ln_post(x) @ self.proj

    def forward_dense(
        self, images: torch.Tensor, last_block: Optional[LastBlockFn] = None,
        pos_mode: Optional[str] = None, pos_scale_offset: Optional[float] = None,
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Dense patch features in the joint space: (B, 3, H, W) -> ((B, h*w, D), (h, w)).

        ``last_block(block, x, grid)`` replaces the last block (x = its input (B, L, C); it returns the
        new stream (B, L, C)). MaskCLIP, SCLIP, ClearCLIP and NACLIP are such functions.
        ``pos_mode`` / ``pos_scale_offset``: positional-embedding interpolation of this call
        (see :meth:`interpolate_pos_embed`).
        """
        x, grid = self.embed(images, pos_mode=pos_mode, pos_scale_offset=pos_scale_offset)
        x = self.run_blocks(x, 0, self.num_blocks - 1, keep_tokens=False).last
        block = self.blocks[-1]
        x = block(x)[0] if last_block is None else last_block(block, x, grid)
        return self.head(x)[:, 1:], grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Standard CLIP image embedding (CLS token after ``ln_post`` and ``proj``): (B, 3, H, W) -> (B, D)."""
        x, _ = self.embed(images)
        x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj


def key_padding_attn_mask(key_padding: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention mask that hides padded key tokens: (B, L) bool (True = padded) -> (B, 1, 1, L).

    Masked keys get ``-inf`` (attention weight exactly 0), as ``nn.MultiheadAttention``'s
    ``key_padding_mask``; every query row must keep at least one key (the CLS token never is padding).
    """
    mask = torch.zeros(key_padding.shape, dtype=dtype, device=key_padding.device)
    mask = mask.masked_fill(key_padding.bool(), float("-inf"))
    return mask[:, None, None, :]
