"""``transformers`` Mask2Former as a semantic :class:`~tag2mask.models.base.Segmenter` (FMA-WSSS stage 2).

Data flow (Q queries, C classes)::

    image (B, 3, H, W) -> backbone (Swin / ResNet) -> multi-scale deformable pixel decoder
      -> masked-attention transformer decoder -> class logits (B, Q, C+1), mask logits (B, Q, H/4, W/4)
    semantic score[c] = Σ_q softmax(class_q)[c] · sigmoid(mask_q)      (the "no object" class dropped)
    forward() returns log(score) (B, C, H/4, W/4): argmax is the semantic prediction, softmax the
    scores renormalised over classes.

Training (:meth:`Mask2Former.training_loss`) turns the semantic target into one binary mask per
class present (``mask_labels``/``class_labels``) and uses ``transformers``' own Mask2Former loss
(Hungarian matching, CE ×2 with no-object weight 0.1, sigmoid BCE ×5 and dice ×5 on sampled
points, deep supervision). As in Mask2Former and mmseg, pixels labelled 255 belong to no
ground-truth mask: they never create a class target, but the mask losses treat them as "outside"
every mask (the published behaviour FMA-WSSS trained with). No text head (it classifies queries).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from tag2mask.models.base import IMAGENET_NORMALIZATION, check_target
from tag2mask.models.hf_loading import from_pretrained, require_transformers
from tag2mask.models.hf_models import (
    BACKBONE_VARIANTS,
    HFSegmenter,
    load_backbone_weights,
    backbone_config_for,
    freeze_unused_backbone_parameters,
)
from tag2mask.models.registry import register_segmenter

__all__ = ["Mask2FormerConfig", "Mask2Former", "semantic_targets"]

#: log of the smallest semantic score, so that log-scores stay finite
_MIN_SCORE = 1e-8


@dataclass
class Mask2FormerConfig:
    """Mask2Former.

    Attributes:
        backbone: one of ``BACKBONE_VARIANTS`` (``swin-tiny`` default; FMA-WSSS uses ``swin-large``
            with ImageNet-22k weights; ``tiny-swin`` for tests).
        pretrained: complete Mask2Former folder / hub id (``facebook/mask2former-swin-large-ade-semantic``).
        backbone_pretrained: ImageNet backbone folder / hub id (``microsoft/swin-large-patch4-window12-384-in22k``).
        num_queries: object queries (100); hidden_dim: transformer width (256);
        decoder_layers: masked-attention decoder layers (10 in ``transformers``' default = 9 + 1);
        encoder_layers: deformable pixel-decoder layers (6).
        hf_config: a full ``transformers`` ``Mask2FormerConfig`` dict (written by ``export_config``).
    """

    backbone: str = "swin-tiny"
    pretrained: Optional[str] = None
    backbone_pretrained: Optional[str] = None
    num_queries: int = 100
    hidden_dim: int = 256
    decoder_layers: int = 10
    encoder_layers: int = 6
    hf_config: Optional[dict] = None

    @classmethod
    def tiny(cls, **overrides) -> "Mask2FormerConfig":
        return cls(**{"backbone": "tiny-swin", "num_queries": 5, "hidden_dim": 32, "decoder_layers": 2,
                      "encoder_layers": 1, **overrides})


def semantic_targets(target: Tensor, ignore_index: int = 255) -> tuple[list[Tensor], list[Tensor]]:
    """Semantic label maps ``(B, H, W)`` -> per image ``mask_labels (n, H, W)`` float and ``class_labels (n,)`` int64.

    One binary mask per class present (ascending class order); ``ignore_index`` pixels are in no mask.
    """
    masks, classes = [], []
    for t in target:
        present = torch.unique(t)
        present = present[present != ignore_index]
        classes.append(present.long())
        masks.append((t[None] == present.view(-1, 1, 1)).float())
    return masks, classes


class Mask2Former(HFSegmenter):
    """``transformers`` ``Mask2FormerForUniversalSegmentation``; semantic log-scores at stride 4."""

    name = "mask2former"
    runtime_options = ("allow_download",)

    def __init__(self, config: Mask2FormerConfig, num_classes: int, allow_download: Optional[bool] = None) -> None:
        super().__init__(config, num_classes, IMAGENET_NORMALIZATION, 4)
        tf = require_transformers()
        if config.pretrained:
            self.hf = from_pretrained(tf.Mask2FormerForUniversalSegmentation, config.pretrained, allow_download,
                                      num_labels=num_classes, ignore_mismatched_sizes=True)
        else:
            if config.hf_config is not None:
                hf_cfg = tf.Mask2FormerConfig.from_dict(config.hf_config)
            else:
                if config.backbone not in BACKBONE_VARIANTS:
                    raise ValueError(f"unknown backbone {config.backbone!r}; choose from {list(BACKBONE_VARIANTS)}")
                dim = config.hidden_dim
                hf_cfg = tf.Mask2FormerConfig(
                    backbone_config=backbone_config_for(config, allow_download), num_queries=config.num_queries,
                    hidden_dim=dim, feature_size=dim, mask_feature_size=dim,
                    encoder_feedforward_dim=4 * dim if dim < 256 else 1024, dim_feedforward=8 * dim,
                    decoder_layers=config.decoder_layers, encoder_layers=config.encoder_layers,
                    num_attention_heads=max(1, dim // 32),
                )
                if dim < 256:  # test-sized models: fewer sampled points keep the loss cheap
                    hf_cfg.train_num_points = 64
            hf_cfg.num_labels = num_classes
            self.hf = tf.Mask2FormerForUniversalSegmentation(hf_cfg)
            if config.backbone_pretrained and config.hf_config is None:
                load_backbone_weights(self.hf.model.pixel_level_module.encoder, config.backbone_pretrained, allow_download)
        freeze_unused_backbone_parameters(self.hf.model.pixel_level_module.encoder)

    def head_modules(self) -> list[Any]:
        pixel = self.hf.model.pixel_level_module
        return [pixel.decoder, self.hf.model.transformer_module, self.hf.class_predictor]

    @staticmethod
    def semantic_scores(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
        """``(B, Q, C+1)`` and ``(B, Q, h, w)`` -> ``(B, C, h, w)`` scores ``Σ_q p_q(c) σ(m_q)``."""
        probs = class_logits.float().softmax(dim=-1)[..., :-1]
        return torch.einsum("bqc,bqhw->bchw", probs, mask_logits.float().sigmoid())

    def logits(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, C, H/4, W/4)`` log semantic scores (argmax = the semantic prediction)."""
        out = self.hf(pixel_values=images)
        return self.semantic_scores(out.class_queries_logits, out.masks_queries_logits).clamp_min(_MIN_SCORE).log()

    @contextlib.contextmanager
    def onnx_export_context(self, dynamic: bool) -> Iterator[None]:
        """Entered by :func:`tag2mask.export.onnx_graph.export_onnx` while it traces; restores the model after.

        ``dynamic`` (symbolic height and width) is refused: the traced graph holds the traced size in the
        deformable encoder's reference points and sampling-offset normaliser (``torch.linspace`` /
        ``torch.tensor`` of the feature sizes become constants) and, with a Swin backbone, in its per-size
        padding and window choices (Python ``if``s), so at another size it fails or is silently wrong.

        The TorchScript-based exporter writes ``torch.linspace(..., dtype=float32)`` with traced end points (the
        deformable encoder's ``get_reference_points``) as a float64 tensor, so the sampling grid of every
        ``GridSample`` node becomes float64 next to a float32 feature map, a type pair onnxruntime's CPU kernel
        does not have (``NOT_IMPLEMENTED``). Casting the reference points ``(B, L, levels, 2)`` to the dtype
        torch gives them (a no-op in eager mode) keeps the graph float32 throughout.
        """
        if dynamic:
            raise ValueError("Mask2Former exports at a fixed size only (its deformable encoder's reference points "
                             "are traced as constants of the traced size): export with --size H W")
        encoder = self.hf.model.pixel_level_module.decoder.encoder
        original = type(encoder).get_reference_points

        def reference_points(spatial_shapes_list: Any, valid_ratios: Tensor, device: Any) -> Tensor:
            return original(spatial_shapes_list, valid_ratios, device).to(valid_ratios.dtype)

        encoder.get_reference_points = reference_points  # this instance only; other models are untouched
        try:
            yield
        finally:
            del encoder.get_reference_points  # the class's own method is visible again

    def training_loss(self, images: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Mask2Former's matching loss from a semantic target ``(B, H, W)`` (255 = ignore)."""
        if target.ndim != 3 or target.shape[0] != images.shape[0]:
            raise ValueError(f"expected target (B, H, W) for {images.shape[0]} images, got {tuple(target.shape)}")
        check_target(target, self.num_classes, self.ignore_index)
        masks, classes = semantic_targets(target, self.ignore_index)
        out = self.hf(pixel_values=images, mask_labels=masks, class_labels=classes)
        return {"loss": out.loss, "mask2former": out.loss.detach()}


register_segmenter("mask2former", Mask2FormerConfig, Mask2Former,
                   "transformers Mask2Former (Swin / ResNet), mask classification: FMA-WSSS stage 2")
