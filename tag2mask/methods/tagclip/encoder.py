"""The two image-tower regimes of TagCLIP's CLIP fork, on tag2mask's CLIP core (spec 2.2-2.4, 4.2, 4.7).

* :func:`encode_full_image`: all blocks; the last block adds ``mask`` off the diagonal (each token
  attends almost only to itself) while the attention map it *returns* is the softmax of the unmasked
  logits (the fork's ``MultiheadAttention2`` returns those); ``ln_post`` + ``proj`` on every token.
* :func:`encode_crops`: 224x224 crops with an additive key mask on the CLS query row, added in every
  block, no self-only block; the CLS token after ``ln_post`` + ``proj``.

Positional table (:func:`positional_table`): bilinear resize of the stored grid, rounded to float16,
except at the pretraining grid where the stored table is used unrounded.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FullPass", "positional_table", "encode_full_image", "encode_crops", "crop_attention_mask"]


class FullPass(NamedTuple):
    """Output of :func:`encode_full_image` for one image.

    tokens: ``(L, D)`` float32 every token after ``ln_post`` and ``proj`` (not normalised), CLS first.
    attentions: ``(B, L, L)`` float32 head-averaged maps of all B blocks (last: unmasked logits).
    grid: ``(h, w)`` patch grid, L = 1 + h*w.
    pos_table: ``(L, width)`` float32 positional table used.
    """

    tokens: Tensor
    attentions: Tensor
    grid: tuple[int, int]
    pos_table: Tensor


def positional_table(visual, h: int, w: int, round_fp16: bool = True) -> Tensor:
    """``(1 + h*w, width)`` float32 table of the fork: fp16-rounded interpolation, unrounded at the pretrain grid."""
    g = visual.pretrain_grid
    exact = (h, w) == (g, g)
    # the fork uses the stored table itself at 224x224, so nothing is rounded there (spec 2.4)
    return visual.interpolate_pos_embed(h, w, mode="bilinear", round_fp16=round_fp16 and not exact)


def _last_block_split_mask(block, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The last block with ``mask`` in its output path only: (B, L, C) -> (out (B, L, C), unmasked map (B, L, L))."""
    attn = block.attn
    q, k, v = attn.qkv(block.ln_1(x))
    logits = (q * attn.head_dim**-0.5) @ k.transpose(-2, -1)
    unmasked = logits.softmax(dim=-1)
    out = attn.project_out(attn.merge_heads((logits + mask).softmax(dim=-1) @ v))
    x = x + out
    x = x + block.mlp(block.ln_2(x))
    return x, unmasked.mean(dim=1)


@torch.no_grad()
def encode_full_image(visual, image: Tensor, last_block_mask: float = -100.0, round_pos_fp16: bool = True) -> FullPass:
    """Full-image pass of the tagger (spec 4.2).

    Args:
        visual: tag2mask's CLIP ViT image tower (float32 weights, as the fork loads them).
        image: ``(1, 3, H16, W16)`` float32 normalised image, sides multiples of the patch size.
        last_block_mask: value added off the diagonal in the last block (``-100`` in the fork).
        round_pos_fp16: see :func:`positional_table`.
    """
    p = visual.patch_size
    h, w = image.shape[-2] // p, image.shape[-1] // p
    pos = positional_table(visual, h, w, round_pos_fp16)
    x, grid = visual.embed(image.float(), pos_embed=pos)
    maps = []
    for block in list(visual.blocks)[:-1]:
        x, a = block(x, need_weights=True)
        maps.append(a)
    n = x.shape[1]
    mask = (1.0 - torch.eye(n, dtype=x.dtype, device=x.device)) * last_block_mask
    x, a = _last_block_split_mask(visual.blocks[-1], x, mask)
    maps.append(a)
    tokens = visual.head(x)[0]
    return FullPass(tokens, torch.stack([m[0] for m in maps]), grid, pos)


def crop_attention_mask(crop_masks: Tensor, value: float = -1000.0) -> Tensor:
    """Additive mask of the crop pass: ``(J, g, g)`` 0/1 crop masks -> ``(J, 1, L, L)`` float32.

    Zero everywhere except the CLS query row, which gets ``value`` at every patch key whose crop-mask
    cell is 0 (the CLS token sees itself and the masked-in patches; patch tokens attend freely).
    """
    j = crop_masks.shape[0]
    flat = crop_masks.reshape(j, -1)
    n = flat.shape[1] + 1
    mask = torch.zeros(j, 1, n, n, dtype=torch.float32, device=crop_masks.device)
    mask[:, 0, 0, 1:] = (flat == 0).float() * value
    return mask


@torch.no_grad()
def encode_crops(visual, crops: Tensor, crop_masks: Tensor, mask_value: float = -1000.0) -> Tensor:
    """Crop pass of class-wise re-identification (spec 4.7 steps 6-7).

    Args:
        visual: the CLIP ViT image tower.
        crops: ``(J, 3, S, S)`` float32 crop inputs at the pretraining size S.
        crop_masks: ``(J, S/p, S/p)`` 0/1 crop masks.
        mask_value: additive value on the CLS row for masked-out patches.

    Returns:
        ``(J, D)`` float32 CLS tokens after ``ln_post`` and ``proj`` (not normalised).
    """
    p = visual.patch_size
    g = crops.shape[-1] // p
    pos = positional_table(visual, g, g, round_fp16=False)  # the stored table, as the fork at 224x224
    x, _ = visual.embed(crops.float(), pos_embed=pos)
    mask = crop_attention_mask(crop_masks, mask_value).to(x.device)
    for block in visual.blocks:
        x, _ = block(x, attn_mask=mask)
    return visual.head(x[:, :1])[:, 0]


def normalized(x: Tensor) -> Tensor:
    """Rows divided by their L2 norm (no epsilon, as the fork's ``x / x.norm(dim=-1, keepdim=True)``)."""
    return x / x.norm(dim=-1, keepdim=True)


def text_softmax(features: Tensor, text: Tensor, logit_scale: float) -> Tensor:
    """``softmax(logit_scale * normalized(features) @ text.T)`` over all texts: (N, D), (C, D) -> (N, C)."""
    return F.softmax(logit_scale * normalized(features) @ text.t(), dim=-1)
