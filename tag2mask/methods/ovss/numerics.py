"""Numerics of the training-free segmenters: MaskCLIP's ViT numerics, fp16-rounded weights, input mean / std.

The official harnesses differ from plain CLIP in how they run the same weights; these helpers give a
:class:`~tag2mask.methods.ovss.segmenter.OpenVocabSegmenter` each harness's numerics without copying
the official code.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

from tag2mask.clip.layers import Attention, ResidualAttentionBlock, set_numerics
from tag2mask.clip.model import CLIP, CLIP_MEAN, CLIP_STD
from tag2mask.clip.vision import VisionTransformer

__all__ = ["maskclip_numerics", "fp16_rounding_targets", "is_fp16_rounded", "fp16_rounded", "input_mean_std"]

# mean / std in 0-255 units: the SCLIP-family SegDataPreProcessor and MaskCLIP's mmseg config
_HARNESS_MEAN, _HARNESS_STD = (122.771, 116.746, 104.094), (68.501, 66.632, 70.323)
_MMSEG_IMAGENET_MEAN, _MMSEG_IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def input_mean_std(numerics: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in 0-255 units of a preset's ``numerics`` (``harness``, ``maskclip``, ``model``)."""
    if numerics == "harness":
        return _HARNESS_MEAN, _HARNESS_STD
    if numerics == "maskclip":
        return _MMSEG_IMAGENET_MEAN, _MMSEG_IMAGENET_STD
    return tuple(255.0 * m for m in CLIP_MEAN), tuple(255.0 * s for s in CLIP_STD)


@contextlib.contextmanager
def maskclip_numerics(visual: nn.Module) -> Iterator[None]:
    """Temporarily give a ViT image tower MaskCLIP's official numerics; restored on exit.

    The official model runs CLIP weights as an mmseg ViT with LayerNorm eps 1e-6 (CLIP: 1e-5),
    exact erf GELU (CLIP: QuickGELU) and bicubic positional interpolation. ResNets are unchanged.
    """
    if not isinstance(visual, VisionTransformer):
        yield
        return
    eps = [(m, m.eps) for m in visual.modules() if isinstance(m, nn.LayerNorm)]
    acts = [(b, b.mlp.gelu) for b in visual.modules() if isinstance(b, ResidualAttentionBlock)]
    interpolation = visual.pos_interpolation
    try:
        set_numerics(visual, ln_eps=1e-6, activation="gelu")
        visual.pos_interpolation = "bicubic"
        yield
    finally:
        for m, e in eps:
            m.eps = e
        for b, act in acts:
            b.mlp.gelu = act
        visual.pos_interpolation = interpolation


def fp16_rounding_targets(model: CLIP) -> Iterator[torch.Tensor]:
    """The tensors the official OpenAI / open_clip loaders round to fp16 (87 for a ViT CLIP)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            yield from (p for p in (m.weight, m.bias) if p is not None)
        elif isinstance(m, Attention):
            yield from (m.in_proj_weight, m.in_proj_bias)
    yield model.text_projection
    if isinstance(model.visual, VisionTransformer):
        yield model.visual.proj


def is_fp16_rounded(model: CLIP) -> bool:
    return all(torch.equal(p, p.half().to(p.dtype)) for p in fp16_rounding_targets(model))


def fp16_rounded(model: CLIP) -> CLIP:
    """``model`` if its weights are already fp16-rounded, else a rounded copy (the caller's model is kept)."""
    if is_fp16_rounded(model):
        return model
    from tag2mask.clip.loading import round_weights_to_fp16

    rounded = copy.deepcopy(model)
    round_weights_to_fp16(rounded)
    rounded.fingerprint = f"{getattr(model, 'fingerprint', 'unknown')}:fp16r"
    return rounded
