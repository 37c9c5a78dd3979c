"""DeepLab-v2 and DeepLab-v3+ over a dilated ResNet (plain PyTorch).

DeepLab-v2 (CLIP-ES stage 3 via deeplab-pytorch; MaskCLIP+ target model)::

    image (B, 3, H, W) -> ResNet, output stride 8 -> (B, 2048, H/8, W/8)
      aspp='sum' (deeplab-pytorch / Caffe): four 3×3 convs, dilations 6/12/18/24, bias, N(0, 0.01)
                  init, straight to C logits, summed                          -> (B, C, H/8, W/8)
      aspp='bn'  (MaskCLIP+'s ASPPHeadV2): four 3×3 conv + BN + ReLU branches to ``aspp_channels``,
                  summed, then the classifier (1×1 conv, or the text head)     -> (B, C, H/8, W/8)

deeplab-pytorch's multi-scale training (``msc_scales=(0.5, 0.75)``): the network also runs on the
input resized by each factor; the outputs are the full-scale logits, each scale's logits and their
pixel-wise max over scales (upsampled to the full-scale logits). The loss sums the CE of all of them
(each against the target downsampled to its size, ``loss_at_logit_resolution``); ``forward`` returns
the max, as deeplab-pytorch does at test time.

DeepLab-v3+ (mmseg ``DepthwiseSeparableASPPHead``, MaskCLIP+ on Context)::

    stage-4 features -> [image pooling, 1×1, separable 3×3 at dilations 12/24/36] -> concat -> 3×3
    bottleneck -> upsample to stage 1 (stride 4) -> concat with 1×1(stage 1 -> 48) -> two separable
    3×3 -> dropout -> classifier                                              -> (B, C, H/4, W/4)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tag2mask.clip.loading import WeightsError
from tag2mask.models.base import (
    CAFFE_NORMALIZATION,
    IMAGENET_NORMALIZATION,
    Normalization,
    Segmenter,
)
from tag2mask.models.registry import register_segmenter
from tag2mask.models.resnet import RESNET_DEPTHS, STYLES, DilatedResNet, detect_layout, load_resnet_checkpoint, read_checkpoint
from tag2mask.models.text_head import TextEmbeddingClassifier, TextHeadConfig

__all__ = ["DeepLabV2Config", "DeepLabV3PlusConfig", "DeepLabV2", "DeepLabV3Plus"]


def _check_variant(variant: str) -> None:
    if variant not in RESNET_DEPTHS:
        raise ValueError(f"unknown ResNet variant {variant!r}; choose from {sorted(RESNET_DEPTHS)}")


def _backbone_from_config(cfg, norm_eval: bool) -> tuple[DilatedResNet, dict[str, Tensor], Normalization]:
    """Build the ResNet (style resolved from the checkpoint when ``auto``), load it, pick the normalisation."""
    _check_variant(cfg.variant)
    sd = read_checkpoint(cfg.pretrained) if cfg.pretrained else None
    style = cfg.backbone_style
    if style == "auto":
        layout = detect_layout(sd) if sd is not None else None
        style = "torchvision" if layout in (None, "transformers") else layout
        cfg.backbone_style = style  # the saved config records what was built
    if style not in STYLES:
        raise ValueError(f"backbone_style must be 'auto' or one of {STYLES}, got {cfg.backbone_style!r}")
    base_width = 8 if cfg.variant == "tiny" else 64
    backbone = DilatedResNet(RESNET_DEPTHS[cfg.variant], style, cfg.output_stride, cfg.contract_dilation, base_width, norm_eval)
    extra = load_resnet_checkpoint(backbone, sd, str(cfg.pretrained)) if sd is not None else {}
    norm = CAFFE_NORMALIZATION if style == "caffe" else IMAGENET_NORMALIZATION
    return backbone, extra, norm


def _classifier(in_channels: int, num_classes: int, text_head: Optional[TextHeadConfig],
                text_embeddings: Optional[Tensor]) -> nn.Module:
    if text_head is None:
        if text_embeddings is not None:
            raise ValueError("text_embeddings given but text_head is None")
        return nn.Conv2d(in_channels, num_classes, kernel_size=1)
    head = TextEmbeddingClassifier(in_channels, text_head, text_embeddings)
    if head.num_outputs != num_classes:
        raise ValueError(
            f"num_classes={num_classes} but the text head gives {head.num_outputs} logits "
            f"({head.text.shape[0]} embeddings{' + learned background' if text_head.learned_background else ''})"
        )
    return head


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1, groups: int = 1) -> None:
        pad = dilation * (kernel // 2)
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, padding=pad, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class SeparableConv(nn.Sequential):
    """Depthwise 3×3 (+BN+ReLU) then pointwise 1×1 (+BN+ReLU), mmcv's ``DepthwiseSeparableConvModule``."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1) -> None:
        super().__init__(ConvBNReLU(in_ch, in_ch, 3, dilation, groups=in_ch), ConvBNReLU(in_ch, out_ch, 1))


class SummedASPP(nn.Module):
    """Parallel dilated 3×3 branches whose outputs are summed (DeepLab-v2).

    ``batch_norm=False``: plain convs with bias, N(0, 0.01) weights (deeplab-pytorch ``_ASPP``, ``c0..c3``);
    ``True``: conv + BN + ReLU per branch (MaskCLIP+'s ``ASPPHeadV2``).
    """

    def __init__(self, in_ch: int, out_ch: int, dilations: tuple[int, ...], batch_norm: bool) -> None:
        super().__init__()
        self.batch_norm = batch_norm
        for i, d in enumerate(dilations):
            if batch_norm:
                branch: nn.Module = ConvBNReLU(in_ch, out_ch, 3, d)
            else:
                branch = nn.Conv2d(in_ch, out_ch, 3, padding=d, dilation=d, bias=True)
                nn.init.normal_(branch.weight, mean=0.0, std=0.01)
                nn.init.zeros_(branch.bias)
            self.add_module(f"c{i}", branch)

    def forward(self, x: Tensor) -> Tensor:
        out = None
        for branch in self.children():
            y = branch(x)
            out = y if out is None else out + y
        return out


@dataclass
class DeepLabV2Config:
    """DeepLab-v2 over a dilated ResNet.

    Attributes:
        variant: ``resnet101`` (default), ``resnet50``, ``resnet152`` or ``tiny`` (tests).
        backbone_style: ``auto`` (from the checkpoint; torchvision without one), ``torchvision``,
            ``caffe`` or ``v1c``.
        pretrained: ImageNet/COCO ResNet checkpoint (see :mod:`tag2mask.models.resnet`); ASPP weights in a
            deeplab-pytorch file are used when their shapes fit (same class count).
        output_stride: 8 (DeepLab-v2) or 16.
        contract_dilation: first block of a dilated stage at half dilation (off in deeplab-pytorch).
        norm_eval: frozen BatchNorm in the backbone (deeplab-pytorch ``freeze_bn``); MaskCLIP+ trains it.
        aspp: ``sum`` (logits straight from the branches) or ``bn`` (ASPPHeadV2 features + classifier).
        aspp_dilations: branch dilations (6, 12, 18, 24).
        aspp_channels: branch width for ``aspp='bn'`` (MaskCLIP+: the CLIP text dim, 512 for ViT-B/16).
        msc_scales: extra training/test input scales with pixel-wise max (deeplab-pytorch: (0.5, 0.75)).
        loss_at_logit_resolution: CE against the target downsampled to the logits (deeplab-pytorch).
        loss_average_over_ignored: CE mean over all pixels, ignored ones included (mmseg 0.20, MaskCLIP+).
        text_head: classify against text embeddings instead of a 1×1 conv (MaskCLIP+).
    """

    variant: str = "resnet101"
    backbone_style: str = "auto"
    pretrained: Optional[str] = None
    output_stride: int = 8
    contract_dilation: bool = False
    norm_eval: bool = True
    aspp: str = "sum"
    aspp_dilations: tuple[int, ...] = (6, 12, 18, 24)
    aspp_channels: int = 512
    msc_scales: tuple[float, ...] = ()
    loss_at_logit_resolution: bool = False
    loss_average_over_ignored: bool = False
    text_head: Optional[TextHeadConfig] = None

    def __post_init__(self) -> None:
        if self.aspp not in ("sum", "bn"):
            raise ValueError(f"aspp must be 'sum' or 'bn', got {self.aspp!r}")
        if any(s <= 0 for s in self.msc_scales):
            raise ValueError(f"msc_scales must be positive, got {self.msc_scales}")

    @classmethod
    def tiny(cls, **overrides) -> "DeepLabV2Config":
        """A few-thousand-parameter model for tests."""
        return cls(**{"variant": "tiny", "aspp_channels": 16, **overrides})


class DeepLabV2(Segmenter):
    """DeepLab-v2: see the module docstring. Output stride 8 (or 16)."""

    name = "deeplab-v2"

    def __init__(self, config: DeepLabV2Config, num_classes: int, text_embeddings: Optional[Tensor] = None) -> None:
        backbone, extra, norm = _backbone_from_config(config, config.norm_eval)
        super().__init__(config, num_classes, norm, config.output_stride)
        self.backbone = backbone
        in_ch = backbone.out_channels[-1]
        if config.aspp == "sum":
            # the branches are the classifier; with a text head they produce the D-dim embeddings
            if config.text_head is not None:
                dim = config.text_head.embed_dim or (text_embeddings.shape[1] if text_embeddings is not None else None)
                if dim is None:
                    raise ValueError("a text head needs text_embeddings")
                self.decode_head = SummedASPP(in_ch, dim, tuple(config.aspp_dilations), batch_norm=False)
                self.classifier = _classifier(dim, num_classes, config.text_head, text_embeddings)
            else:
                self.decode_head = SummedASPP(in_ch, num_classes, tuple(config.aspp_dilations), batch_norm=False)
                self.classifier = nn.Identity()
        else:
            self.decode_head = SummedASPP(in_ch, config.aspp_channels, tuple(config.aspp_dilations), batch_norm=True)
            self.classifier = _classifier(config.aspp_channels, num_classes, config.text_head, text_embeddings)
        self._load_aspp(extra, str(config.pretrained))

    def _load_aspp(self, extra: dict[str, Tensor], source: str) -> None:
        """Use deeplab-pytorch ASPP weights when the file has them and they fit (same classes)."""
        if not extra or self.config.aspp != "sum":
            return
        own = self.decode_head.state_dict()
        if set(extra) == set(own) and all(extra[k].shape == own[k].shape for k in own):
            self.decode_head.load_state_dict(extra)
        elif set(extra) - set(own):
            raise WeightsError(f"{source}: ASPP entries {sorted(set(extra) - set(own))[:4]} do not fit aspp_dilations")

    def forward_features(self, images: Tensor) -> Tensor:
        """The classifier's input ``(B, F, H/8, W/8)``: the summed ASPP output (for ``aspp='sum'`` without a
        text head these already are the logits, the classifier being the identity)."""
        return self.decode_head(self.backbone(images)[-1])

    def _single_scale(self, images: Tensor) -> Tensor:
        return self.classifier(self.forward_features(images))

    def _scale_logits(self, images: Tensor) -> dict[str, Tensor]:
        full = self._single_scale(images)
        out = {"ce": full}
        if not self.config.msc_scales:
            return out
        size = full.shape[-2:]
        pyramid = [full]
        for s in self.config.msc_scales:
            x = F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
            logits = self._single_scale(x)
            out[f"ce_x{s:g}"] = logits
            pyramid.append(F.interpolate(logits, size=size, mode="bilinear", align_corners=False))
        out["ce_max"] = torch.stack(pyramid).amax(dim=0)
        return out

    def logits(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, C, ceil(H/8), ceil(W/8))`` logits (max over ``msc_scales`` if set)."""
        out = self._scale_logits(images)
        return out.get("ce_max", out["ce"])

    def loss_logits(self, images: Tensor) -> dict[str, tuple[Tensor, float]]:
        return {k: (v, 1.0) for k, v in self._scale_logits(images).items()}


@dataclass
class DeepLabV3PlusConfig:
    """DeepLab-v3+ (mmseg's depthwise-separable ASPP head) over a dilated ResNet.

    Attributes: as :class:`DeepLabV2Config` for the backbone, plus
        aspp_dilations: image pooling is always added; ``None`` = (1, 12, 24, 36) at stride 8,
            (1, 6, 12, 18) at stride 16.
        channels: head width (512 in mmseg), low_level_channels: projected stage-1 width (48),
        dropout: before the classifier (0.1).
    """

    variant: str = "resnet101"
    backbone_style: str = "auto"
    pretrained: Optional[str] = None
    output_stride: int = 8
    contract_dilation: bool = True
    norm_eval: bool = False
    aspp_dilations: Optional[tuple[int, ...]] = None
    channels: int = 512
    low_level_channels: int = 48
    dropout: float = 0.1
    loss_average_over_ignored: bool = False
    text_head: Optional[TextHeadConfig] = None

    @classmethod
    def tiny(cls, **overrides) -> "DeepLabV3PlusConfig":
        return cls(**{"variant": "tiny", "channels": 16, "low_level_channels": 8, **overrides})


class DeepLabV3Plus(Segmenter):
    """DeepLab-v3+: see the module docstring. Output stride 4."""

    name = "deeplab-v3plus"

    def __init__(self, config: DeepLabV3PlusConfig, num_classes: int, text_embeddings: Optional[Tensor] = None) -> None:
        backbone, _, norm = _backbone_from_config(config, config.norm_eval)
        super().__init__(config, num_classes, norm, 4)
        if config.aspp_dilations is None:
            config.aspp_dilations = (1, 12, 24, 36) if config.output_stride == 8 else (1, 6, 12, 18)
        self.backbone = backbone
        c1_in, c4_in = backbone.out_channels[0], backbone.out_channels[-1]
        ch = config.channels
        self.image_pool = ConvBNReLU(c4_in, ch, 1)
        self.aspp = nn.ModuleList([ConvBNReLU(c4_in, ch, 1) if d == 1 else SeparableConv(c4_in, ch, d) for d in config.aspp_dilations])
        self.bottleneck = ConvBNReLU((len(config.aspp_dilations) + 1) * ch, ch, 3)
        self.low_level = ConvBNReLU(c1_in, config.low_level_channels, 1)
        self.fuse = nn.Sequential(SeparableConv(ch + config.low_level_channels, ch), SeparableConv(ch, ch))
        self.dropout = nn.Dropout2d(config.dropout) if config.dropout > 0 else nn.Identity()
        self.classifier = _classifier(ch, num_classes, config.text_head, text_embeddings)

    def forward_features(self, images: Tensor) -> Tensor:
        """Decoder features ``(B, channels, H/4, W/4)`` (after dropout)."""
        feats = self.backbone(images)
        c1, c4 = feats[0], feats[-1]
        pooled = self.image_pool(F.adaptive_avg_pool2d(c4, 1))
        branches = [F.interpolate(pooled, size=c4.shape[-2:], mode="bilinear", align_corners=False)]
        branches += [branch(c4) for branch in self.aspp]
        x = self.bottleneck(torch.cat(branches, dim=1))
        x = F.interpolate(x, size=c1.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([self.low_level(c1), x], dim=1))
        return self.dropout(x)


register_segmenter("deeplab-v2", DeepLabV2Config, DeepLabV2,
                   "DeepLab-v2 (summed ASPP) over a dilated ResNet-101, output stride 8: CLIP-ES stage 3, MaskCLIP+")
register_segmenter("deeplab-v3plus", DeepLabV3PlusConfig, DeepLabV3Plus,
                   "DeepLab-v3+ (separable ASPP + stride-4 decoder) over a dilated ResNet-101: MaskCLIP+ on Context")
