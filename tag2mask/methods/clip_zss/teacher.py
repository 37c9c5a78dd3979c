"""The frozen CLIP teacher of CLIP-ZSS: one pass gives the CLS embedding and the dense tokens.

Data flow (ViT, D = joint dim, crop S, patch p, h = w = S / p)::

    crop, RGB 0..1 (B, 3, S, S) --CLIP mean/std--> blocks 1..n-1 (once)
        -> last block as CLIP runs it --ln_post, proj--> CLS embedding  S_cls (B, D)        (GLM, synthesizer)
        -> last block, MaskCLIP's value path (or CLIP's own) --ln_post, proj--> tokens (B, D, h, w) (K-means)

Training only: the student never calls it, and inference does not build it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tag2mask.clip.model import CLIP_MEAN, CLIP_STD
from tag2mask.methods.ovss.last_block import maskclip_block

__all__ = ["TeacherOutput", "ClipTeacher"]


@dataclass
class TeacherOutput:
    """``cls``: (B, D) projected CLS embeddings (not normalised); ``dense``: (B, D, h, w) projected tokens."""

    cls: Tensor
    dense: Tensor


class ClipTeacher(nn.Module):
    """Frozen CLIP image tower producing what GLM and PLM need.

    Args:
        visual: a CLIP ViT image tower (``clip.visual``); it is frozen and kept in eval mode.
        dense: ``maskclip`` (identity attention in the last block, MaskCLIP's dense features) or
            ``last`` (the last block's ordinary output tokens).
        input_size: resize the crop to this square side first (``None``: as it is).
    """

    def __init__(self, visual: nn.Module, dense: str = "maskclip", input_size: Optional[int] = None) -> None:
        super().__init__()
        if not hasattr(visual, "blocks") or not hasattr(visual, "embed"):
            raise ValueError("the CLIP-ZSS teacher needs a ViT CLIP (ResNet CLIPs have no per-block patch tokens)")
        if dense not in ("maskclip", "last"):
            raise ValueError(f"dense must be 'maskclip' or 'last', got {dense!r}")
        self.visual = visual.requires_grad_(False).eval()
        self.dense_kind, self.input_size = dense, input_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "ClipTeacher":
        """Always in eval mode (frozen)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images01: Tensor) -> TeacherOutput:
        """``(B, 3, H, W)`` RGB in 0..1 -> :class:`TeacherOutput`."""
        x = (images01.float() - self.mean) / self.std
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        v = self.visual
        tokens, grid = v.embed(x)
        stream = v.run_blocks(tokens, 0, v.num_blocks - 1, keep_tokens=False).last
        last = v.blocks[-1]
        clip_out = last(stream)[0]
        cls = v.head(clip_out[:, :1])[:, 0]
        dense_stream = clip_out if self.dense_kind == "last" else maskclip_block(last, stream, grid)
        dense = v.head(dense_stream[:, 1:])  # (B, hw, D), row-major patches
        b, _, d = dense.shape
        return TeacherOutput(cls=cls.float(), dense=dense.transpose(1, 2).reshape(b, d, *grid).float())
