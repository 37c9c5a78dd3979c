"""``transformers`` SegFormer and UperNet as :class:`~tag2mask.models.base.Segmenter` networks.

SegFormer (MiT encoder + all-MLP decoder)::

    image (B, 3, H, W) -> MiT stages (strides 4, 8, 16, 32) -> per-stage linear to the decoder width,
    upsample to stride 4, concat, 1×1 fuse + BN + ReLU, dropout -> classifier -> (B, C, H/4, W/4)

UperNet (PPM on the last stage + FPN over the four stages of a ConvNeXt / Swin / ResNet backbone)::

    image -> backbone stages -> FPN outputs at stride 4, concat, 3×3 bottleneck -> classifier -> (B, C, H/4, W/4)
    auxiliary FCN head on stage 3 (training only; loss weight 0.4 as in mmseg)

The logits are returned *before* ``transformers``' upsampling to the input size (the loss and the
inference helpers upsample). With a text head, the head's final 1×1 conv is replaced by
:class:`~tag2mask.models.text_head.TextEmbeddingClassifier` (the auxiliary head keeps a plain
classifier when its class count still fits, otherwise it is dropped).

Pretrained weights: ``pretrained`` = a complete model of the same kind (a folder or a hub id:
``nvidia/mit-b2`` / ``nvidia/segformer-b2-finetuned-ade-512-512``, ``openmmlab/upernet-convnext-small``);
the classifier is re-initialised when the class count differs. UperNet also takes
``backbone_pretrained`` = an ImageNet backbone (``facebook/convnext-tiny-224``, a Swin, a ResNet).
The saved config stores the full ``transformers`` config (``hf_config``), so a trained model rebuilds
offline without the original source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor, nn

from tag2mask.models.base import IMAGENET_NORMALIZATION, Segmenter
from tag2mask.models.hf_loading import from_pretrained, require_transformers
from tag2mask.models.registry import register_segmenter
from tag2mask.models.text_head import TextEmbeddingClassifier, TextHeadConfig

__all__ = [
    "SEGFORMER_VARIANTS",
    "BACKBONE_VARIANTS",
    "SegFormerConfig",
    "UperNetConfig",
    "SegFormer",
    "UperNet",
    "backbone_hf_config",
    "hf_config_dict",
]

# MiT encoders of the SegFormer paper (hidden sizes, depths, decoder width)
_MIT = {
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
    "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
    "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
    "b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
    "b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768),
    "b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768),
    "tiny": ([8, 16, 24, 32], [1, 1, 1, 1], 16),
}
SEGFORMER_VARIANTS = tuple(_MIT)

_STAGES = ["stage1", "stage2", "stage3", "stage4"]
# backbone name -> (transformers config class, kwargs)
_BACKBONES: dict[str, tuple[str, dict[str, Any]]] = {
    "convnext-tiny": ("ConvNextConfig", {"depths": [3, 3, 9, 3], "hidden_sizes": [96, 192, 384, 768]}),
    "convnext-small": ("ConvNextConfig", {"depths": [3, 3, 27, 3], "hidden_sizes": [96, 192, 384, 768]}),
    "convnext-base": ("ConvNextConfig", {"depths": [3, 3, 27, 3], "hidden_sizes": [128, 256, 512, 1024]}),
    "convnext-large": ("ConvNextConfig", {"depths": [3, 3, 27, 3], "hidden_sizes": [192, 384, 768, 1536]}),
    "swin-tiny": ("SwinConfig", {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7}),
    "swin-small": ("SwinConfig", {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24], "window_size": 7}),
    "swin-base": ("SwinConfig", {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "window_size": 12, "image_size": 384}),
    "swin-large": ("SwinConfig", {"embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48], "window_size": 12, "image_size": 384}),
    "resnet-50": ("ResNetConfig", {"depths": [3, 4, 6, 3], "hidden_sizes": [256, 512, 1024, 2048], "layer_type": "bottleneck"}),
    "resnet-101": ("ResNetConfig", {"depths": [3, 4, 23, 3], "hidden_sizes": [256, 512, 1024, 2048], "layer_type": "bottleneck"}),
    "tiny-convnext": ("ConvNextConfig", {"depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 24, 32]}),
    "tiny-swin": ("SwinConfig", {"image_size": 64, "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 2], "window_size": 4}),
}
BACKBONE_VARIANTS = tuple(_BACKBONES)


def backbone_hf_config(name: str) -> Any:
    """``transformers`` config of a named backbone with all four stages as outputs."""
    transformers = require_transformers()
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(_BACKBONES)}")
    cls_name, kwargs = _BACKBONES[name]
    return getattr(transformers, cls_name)(out_features=list(_STAGES), **kwargs)


def hf_config_dict(config: Any) -> dict[str, Any]:
    """A ``transformers`` config as a complete JSON-ready dict (nested configs included)."""
    return json.loads(config.to_json_string(use_diff=False))


def _take_classifier(head: nn.Module, num_classes: int, text_head: Optional[TextHeadConfig], text_embeddings) -> nn.Module:
    """Detach the decode head's final 1×1 conv (the head then returns features) and return it, or a
    text-embedding classifier in its place."""
    old = head.classifier
    head.classifier = nn.Identity()
    if text_head is None:
        if text_embeddings is not None:
            raise ValueError("text_embeddings given but text_head is None")
        return old
    head = TextEmbeddingClassifier(old.in_channels, text_head, text_embeddings)
    if head.num_outputs != num_classes:
        raise ValueError(f"num_classes={num_classes} but the text head gives {head.num_outputs} logits")
    return head


class HFSegmenter(Segmenter):
    """Shared parts of the ``transformers``-backed networks (``self.hf`` is the wrapped model)."""

    runtime_options = ("text_embeddings", "allow_download")
    hf: nn.Module

    def export_config(self) -> dict[str, Any]:
        d = super().export_config()
        d["hf_config"] = hf_config_dict(self.hf.config)
        for key in ("pretrained", "backbone_pretrained"):
            if key in d:
                d[key] = None
        return d


@dataclass
class SegFormerConfig:
    """SegFormer.

    Attributes:
        variant: ``b0`` .. ``b5`` (MiT sizes of the paper) or ``tiny`` (tests); ignored with
            ``pretrained`` or ``hf_config``.
        pretrained: folder or hub id of a SegFormer / MiT checkpoint.
        hf_config: a full ``transformers`` ``SegformerConfig`` dict (written by ``export_config``).
        loss_average_over_ignored: CE mean over all pixels (mmseg 0.20 behaviour).
        text_head: classify against CLIP text embeddings (CLIP-ZSS student).
    """

    variant: str = "b0"
    pretrained: Optional[str] = None
    hf_config: Optional[dict] = None
    loss_average_over_ignored: bool = False
    text_head: Optional[TextHeadConfig] = None

    @classmethod
    def tiny(cls, **overrides) -> "SegFormerConfig":
        return cls(**{"variant": "tiny", **overrides})


class SegFormer(HFSegmenter):
    """``transformers`` ``SegformerForSemanticSegmentation``; logits at stride 4."""

    name = "segformer"

    def __init__(self, config: SegFormerConfig, num_classes: int, text_embeddings: Optional[Tensor] = None,
                 allow_download: Optional[bool] = None) -> None:
        super().__init__(config, num_classes, IMAGENET_NORMALIZATION, 4)
        tf = require_transformers()
        if config.pretrained:
            self.hf = from_pretrained(tf.SegformerForSemanticSegmentation, config.pretrained, allow_download,
                                      num_labels=num_classes, ignore_mismatched_sizes=True)
        else:
            if config.hf_config is not None:
                hf_cfg = tf.SegformerConfig.from_dict(config.hf_config)
            else:
                if config.variant not in _MIT:
                    raise ValueError(f"unknown SegFormer variant {config.variant!r}; choose from {list(_MIT)}")
                hidden, depths, decoder = _MIT[config.variant]
                tiny = config.variant == "tiny"
                hf_cfg = tf.SegformerConfig(hidden_sizes=hidden, depths=depths, decoder_hidden_size=decoder,
                                            num_attention_heads=[1, 1, 1, 1] if tiny else [1, 2, 5, 8],
                                            sr_ratios=[4, 2, 1, 1] if tiny else [8, 4, 2, 1])
            hf_cfg.num_labels = num_classes
            self.hf = tf.SegformerForSemanticSegmentation(hf_cfg)
        self.classifier = _take_classifier(self.hf.decode_head, num_classes, config.text_head, text_embeddings)

    def head_modules(self) -> list[nn.Module]:
        return [self.hf.decode_head, self.classifier]

    def forward_features(self, images: Tensor) -> Tensor:
        """Fused decoder features ``(B, decoder_hidden_size, ceil(H/4), ceil(W/4))`` (after dropout)."""
        hidden = self.hf.segformer(images, output_hidden_states=True).hidden_states
        return self.hf.decode_head(hidden)


@dataclass
class UperNetConfig:
    """UperNet over a ``transformers`` backbone.

    Attributes:
        backbone: one of :data:`BACKBONE_VARIANTS` (``convnext-tiny`` default; ``tiny-convnext`` for tests).
        pretrained: complete UperNet folder / hub id (``openmmlab/upernet-convnext-tiny``).
        backbone_pretrained: ImageNet backbone folder / hub id (its config replaces ``backbone``).
        channels: decoder width (512).
        auxiliary_head: FCN head on stage 3 during training; auxiliary_weight: its loss weight (0.4).
        hf_config: a full ``transformers`` ``UperNetConfig`` dict (written by ``export_config``).
        loss_average_over_ignored, text_head: as for SegFormer.
    """

    backbone: str = "convnext-tiny"
    pretrained: Optional[str] = None
    backbone_pretrained: Optional[str] = None
    channels: int = 512
    auxiliary_head: bool = True
    auxiliary_weight: float = 0.4
    hf_config: Optional[dict] = None
    loss_average_over_ignored: bool = False
    text_head: Optional[TextHeadConfig] = None

    @classmethod
    def tiny(cls, **overrides) -> "UperNetConfig":
        return cls(**{"backbone": "tiny-convnext", "channels": 16, **overrides})


def load_backbone_weights(hf_backbone: nn.Module, source: str, allow_download: Optional[bool]) -> None:
    """Copy an ImageNet backbone (``AutoBackbone`` from ``source``) into ``hf_backbone`` strictly."""
    tf = require_transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING

    # the concrete class, not AutoBackbone: its from_pretrained asks the hub about local paths (and timm)
    config = from_pretrained(tf.AutoConfig, source, allow_download)
    if type(config) not in MODEL_FOR_BACKBONE_MAPPING:
        from tag2mask.clip.loading import WeightsError

        raise WeightsError(f"{source}: a {type(config).__name__}, which transformers offers no backbone for")
    backbone_cls = MODEL_FOR_BACKBONE_MAPPING[type(config)]
    pretrained = from_pretrained(backbone_cls, source, allow_download, out_features=list(_STAGES))
    try:
        hf_backbone.load_state_dict(pretrained.state_dict())
    except RuntimeError as e:
        from tag2mask.clip.loading import WeightsError

        raise WeightsError(f"{source}: backbone weights do not fit the configured backbone ({e})") from e


def freeze_unused_backbone_parameters(hf_backbone: nn.Module) -> None:
    """Freeze what a ``transformers`` backbone holds but never uses for its feature maps.

    ``SwinBackbone`` wraps a ``SwinModel`` whose final LayerNorm serves only classification; left
    trainable it gets no gradient, which ``DistributedDataParallel`` rejects.
    """
    inner = getattr(hf_backbone, "swin", None)
    if inner is not None and isinstance(getattr(inner, "layernorm", None), nn.Module):
        inner.layernorm.requires_grad_(False)


def backbone_config_for(config: Any, allow_download: Optional[bool]) -> Any:
    """The backbone's ``transformers`` config: from ``backbone_pretrained`` if given, else the named variant."""
    tf = require_transformers()
    if config.backbone_pretrained:
        source = config.backbone_pretrained
        cfg = from_pretrained(tf.AutoConfig, source, allow_download)
        cfg.out_features = list(_STAGES)  # also fixes out_indices
        return cfg
    return backbone_hf_config(config.backbone)


class UperNet(HFSegmenter):
    """``transformers`` ``UperNetForSemanticSegmentation``; logits at stride 4 (before its upsampling)."""

    name = "upernet"

    def __init__(self, config: UperNetConfig, num_classes: int, text_embeddings: Optional[Tensor] = None,
                 allow_download: Optional[bool] = None) -> None:
        super().__init__(config, num_classes, IMAGENET_NORMALIZATION, 4)
        tf = require_transformers()
        if config.pretrained:
            self.hf = from_pretrained(tf.UperNetForSemanticSegmentation, config.pretrained, allow_download,
                                      num_labels=num_classes, ignore_mismatched_sizes=True)
        else:
            if config.hf_config is not None:
                hf_cfg = tf.UperNetConfig.from_dict(config.hf_config)
            else:
                hf_cfg = tf.UperNetConfig(backbone_config=backbone_config_for(config, allow_download),
                                          hidden_size=config.channels, use_auxiliary_head=config.auxiliary_head,
                                          auxiliary_in_channels=None, auxiliary_loss_weight=config.auxiliary_weight,
                                          auxiliary_channels=max(config.channels // 2, 8))
            hf_cfg.num_labels = num_classes
            self.hf = tf.UperNetForSemanticSegmentation(hf_cfg)
            if config.backbone_pretrained and config.hf_config is None:
                load_backbone_weights(self.hf.backbone, config.backbone_pretrained, allow_download)
        freeze_unused_backbone_parameters(self.hf.backbone)
        self.classifier = _take_classifier(self.hf.decode_head, num_classes, config.text_head, text_embeddings)
        aux = self.hf.auxiliary_head
        if aux is not None and config.text_head is not None:
            aux.classifier = nn.Conv2d(aux.classifier.in_channels, self.num_classes, 1)
        self.auxiliary_weight = float(getattr(self.hf.config, "auxiliary_loss_weight", config.auxiliary_weight))

    def head_modules(self) -> list[nn.Module]:
        return [m for m in (self.hf.decode_head, self.classifier, self.hf.auxiliary_head) if m is not None]

    def _stages(self, images: Tensor):
        return self.hf.backbone(images).feature_maps

    def forward_features(self, images: Tensor) -> Tensor:
        """FPN bottleneck features ``(B, channels, H/4, W/4)`` (before the classifier)."""
        return self.hf.decode_head(self._stages(images))

    def loss_logits(self, images: Tensor) -> dict[str, tuple[Tensor, float]]:
        stages = self._stages(images)
        out = {"ce": (self.classifier(self.hf.decode_head(stages)), 1.0)}
        if self.hf.auxiliary_head is not None and self.auxiliary_weight > 0:
            out["ce_aux"] = (self.hf.auxiliary_head(stages), self.auxiliary_weight)
        return out


register_segmenter("segformer", SegFormerConfig, SegFormer,
                   "transformers SegFormer (MiT-b0..b5 encoder, all-MLP decoder), stride 4: CLIP-ZSS student")
register_segmenter("upernet", UperNetConfig, UperNet,
                   "transformers UperNet over ConvNeXt / Swin / ResNet, stride 4")
