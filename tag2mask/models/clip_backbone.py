"""A frozen CLIP image tower as backbone, decoded by WeCLIP's decoder (trainable).

Data flow (ViT-B/16: width C = 768, 12 blocks; crop 320 -> h = w = 20)::

    image (B, 3, H, W) -> frozen CLIP ViT blocks 1..n (no grad; n = blocks - 1 by default, as WeCLIP)
      -> n × (B, C, h, w) patch tokens (CLS dropped)
      -> WeCLIPDecoder: per-block MLP, 1×1 fuse, Dropout2d, 3 transformer blocks -> (B, 256, h, w)
      -> classifier: 1×1 conv (WeCLIP) or a text-embedding head (CLIP-ZSS student) -> (B, C, h, w)

Output stride = the patch size (16). This is WeCLIP's network trained on any labels (its fully
supervised setting, or pseudo-labels); the frozen CLIP is not saved with the model (the saved
config records the weights' path and fingerprint; :func:`~tag2mask.models.load_segmenter`
reloads and checks them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from tag2mask.models.base import CLIP_NORMALIZATION, IMAGENET_NORMALIZATION, Segmenter
from tag2mask.models.registry import register_segmenter
from tag2mask.models.text_head import TextEmbeddingClassifier, TextHeadConfig
from tag2mask.models.weclip_decoder import WeCLIPDecoder

__all__ = ["ClipDecoderConfig", "ClipDecoder"]


def _weights_fp16_exact(visual: nn.Module) -> bool:
    """Whether the tower's patch embedding and first attention projection survive a float16 round trip."""
    probes = [visual.conv1.weight, visual.blocks[0].attn.in_proj_weight]
    return all(torch.equal(p, p.half().to(p.dtype)) for p in probes)


@dataclass
class ClipDecoderConfig:
    """Frozen CLIP ViT + WeCLIP decoder.

    Attributes:
        clip_weights: CLIP weights (file, Hugging Face folder or registry name such as ``ViT-B/16``);
            required unless a loaded ``clip_model`` is passed to ``build_segmenter``.
        clip_fingerprint: fingerprint of the weights the model was trained on (set automatically;
            checked when the model is reloaded).
        normalization: ``clip`` (CLIP's mean/std) or ``imagenet`` (what WeCLIP feeds its CLIP).
        compat_numerics: WeCLIP's released numerics (fp16-rounded CLIP weights and positional
            embedding, fp16 attention out-projection in the decoder).
        num_layers: CLIP block outputs fused (default: all blocks but the last, WeCLIP's 11 of 12).
        embed_dim, depth, heads, dropout: decoder width (256), transformer blocks (3), heads (8),
            Dropout2d on the fused features (0.1).
        loss_average_over_ignored: CE mean over all pixels (mmseg 0.20 behaviour).
        text_head: classify against CLIP text embeddings (CLIP-ZSS student).
    """

    clip_weights: Optional[str] = None
    clip_fingerprint: Optional[str] = None
    normalization: str = "clip"
    compat_numerics: bool = False
    num_layers: Optional[int] = None
    embed_dim: int = 256
    depth: int = 3
    heads: int = 8
    dropout: float = 0.1
    loss_average_over_ignored: bool = False
    text_head: Optional[TextHeadConfig] = None

    def __post_init__(self) -> None:
        if self.normalization not in ("clip", "imagenet"):
            raise ValueError(f"normalization must be 'clip' or 'imagenet', got {self.normalization!r}")

    @classmethod
    def tiny(cls, **overrides) -> "ClipDecoderConfig":
        return cls(**{"embed_dim": 16, "depth": 1, "heads": 2, **overrides})


class ClipDecoder(Segmenter):
    """Frozen CLIP ViT + trainable :class:`~tag2mask.models.weclip_decoder.WeCLIPDecoder`."""

    name = "clip-decoder"
    runtime_options = ("text_embeddings", "allow_download", "clip_model")

    def __init__(self, config: ClipDecoderConfig, num_classes: int, text_embeddings: Optional[Tensor] = None,
                 allow_download: Optional[bool] = None, clip_model: Any = None) -> None:
        clip = clip_model if clip_model is not None else self._load_clip(config, allow_download)
        if not getattr(clip, "is_vit", False):
            raise ValueError("clip-decoder needs a ViT CLIP (ResNet CLIPs have no per-block patch tokens)")
        if config.compat_numerics and not _weights_fp16_exact(clip.visual):
            raise ValueError("compat_numerics needs a CLIP loaded with round_fp16_weights=True (the official loader's "
                             "fp16 rounding); load it so, or pass clip_weights instead of clip_model")
        norm = CLIP_NORMALIZATION if config.normalization == "clip" else IMAGENET_NORMALIZATION
        visual = clip.visual
        super().__init__(config, num_classes, norm, visual.patch_size)
        fingerprint = getattr(clip, "fingerprint", None)
        if config.clip_fingerprint and fingerprint and fingerprint != config.clip_fingerprint:
            raise ValueError(
                f"CLIP weights {config.clip_weights} (fingerprint {fingerprint}) are not the ones this model was "
                f"trained on ({config.clip_fingerprint}); pass the right clip_weights"
            )
        config.clip_fingerprint = fingerprint
        if clip_model is not None and config.clip_weights is None:
            config.clip_weights = getattr(clip, "source_path", None)
        visual.requires_grad_(False)
        self.backbone = visual.eval()  # only the image tower: the text tower is not needed here
        n = config.num_layers if config.num_layers is not None else visual.num_blocks - 1
        if not 1 <= n <= visual.num_blocks:
            raise ValueError(f"num_layers must be in 1..{visual.num_blocks}, got {n}")
        self.num_layers = n
        self.decoder = WeCLIPDecoder(
            in_channels=visual.width, num_classes=num_classes, num_layers=n, embed_dim=config.embed_dim,
            depth=config.depth, heads=config.heads, dropout=config.dropout, compat_fp16_out_proj=config.compat_numerics,
        )
        if config.text_head is not None:
            head = TextEmbeddingClassifier(config.embed_dim, config.text_head, text_embeddings)
            if head.num_outputs != num_classes:
                raise ValueError(f"num_classes={num_classes} but the text head gives {head.num_outputs} logits")
            self.decoder.classifier = head
        elif text_embeddings is not None:
            raise ValueError("text_embeddings given but text_head is None")

    @staticmethod
    def _load_clip(config: ClipDecoderConfig, allow_download: Optional[bool]) -> Any:
        if not config.clip_weights:
            raise ValueError("clip-decoder needs clip_weights (a CLIP file, folder or name such as 'ViT-B/16')")
        from tag2mask.clip.loading import load_clip

        return load_clip(config.clip_weights, round_fp16_weights=config.compat_numerics, allow_download=allow_download)

    @property
    def classifier(self) -> nn.Module:
        return self.decoder.classifier

    def train(self, mode: bool = True) -> "ClipDecoder":
        """Only the decoder changes mode; the frozen CLIP stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def frozen_prefixes(self) -> tuple[str, ...]:
        return ("backbone.",)

    def head_modules(self) -> list[nn.Module]:
        return [self.decoder]

    @torch.no_grad()
    def clip_features(self, images: Tensor) -> Tensor:
        """Frozen block outputs 1..n, CLS dropped: ``(B, 3, H, W)`` -> ``(n, B, C, h, w)``."""
        visual = self.backbone
        saved = visual.round_pos_embed_fp16
        visual.round_pos_embed_fp16 = bool(self.config.compat_numerics)  # WeCLIP rounds the interpolated table
        try:
            inter = visual.forward_intermediates(images, self.num_layers)
        finally:
            visual.round_pos_embed_fp16 = saved  # the CLIP may be shared (a teacher); leave it as found
        h, w = inter.grid
        tokens = torch.stack([t[:, 1:] for t in inter.tokens])  # (n, B, hw, C), row-major patches
        n, b, _, c = tokens.shape
        return tokens.transpose(2, 3).reshape(n, b, c, h, w)

    def forward_features(self, images: Tensor) -> Tensor:
        """Decoder features before the classifier ``(B, embed_dim, H/16, W/16)``."""
        return self.decoder.transform(self.decoder.fuse_features(self.clip_features(images)))

    def logits(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, C, H // 16, W // 16)`` logits (the decoder's affinity output is unused)."""
        return self.decoder.classifier(self.forward_features(images))


register_segmenter("clip-decoder", ClipDecoderConfig, ClipDecoder,
                   "frozen CLIP ViT + WeCLIP's decoder, stride 16: WeCLIP fully supervised, CLIP-ZSS student")
