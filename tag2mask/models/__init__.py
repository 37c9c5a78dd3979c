"""Segmentation networks trained on pseudo-labels (or ground truth), behind one interface.

``build_segmenter(name, num_classes, **cfg)`` builds any registered network (:data:`SEGMENTERS`):

================== ============================================================ ==============
name               network                                                      output stride
================== ============================================================ ==============
``deeplab-v2``     dilated ResNet-101 + summed ASPP (CLIP-ES stage 3, MaskCLIP+) 8
``deeplab-v3plus`` dilated ResNet-101 + separable ASPP + decoder (MaskCLIP+ Ctx) 4
``segformer``      ``transformers`` SegFormer (MiT-b0..b5)                      4
``upernet``        ``transformers`` UperNet over ConvNeXt / Swin / ResNet       4
``mask2former``    ``transformers`` Mask2Former (FMA-WSSS stage 2)              4
``clip-decoder``   frozen CLIP ViT + WeCLIP's decoder                           16 (patch)
================== ============================================================ ==============

Every network is a :class:`Segmenter` (see :mod:`.base` for the interface: ``forward``,
``training_loss``, ``normalization``, ``output_stride``, ``predict``); all but Mask2Former can
classify against frozen CLIP text embeddings (:class:`TextEmbeddingClassifier`). Save / load with
:func:`save_segmenter` / :func:`load_segmenter`. ``transformers`` is imported only when one of its
networks is built.
"""

from tag2mask.models.base import (
    CAFFE_NORMALIZATION,
    CLIP_NORMALIZATION,
    IGNORE_INDEX,
    IMAGENET_NORMALIZATION,
    Normalization,
    Segmenter,
    segmentation_cross_entropy,
)
from tag2mask.models.registry import SEGMENTERS, build_segmenter, register_segmenter, segmenter_config
from tag2mask.models.text_head import TextEmbeddingClassifier, TextHeadConfig

# importing the network modules registers them (transformers itself is imported lazily)
from tag2mask.models.deeplab import DeepLabV2, DeepLabV2Config, DeepLabV3Plus, DeepLabV3PlusConfig  # noqa: E402
from tag2mask.models.hf_models import SegFormer, SegFormerConfig, UperNet, UperNetConfig  # noqa: E402
from tag2mask.models.mask2former import Mask2Former, Mask2FormerConfig  # noqa: E402
from tag2mask.models.clip_backbone import ClipDecoder, ClipDecoderConfig  # noqa: E402
from tag2mask.models.serialization import load_segmenter, read_segmenter_header, save_segmenter  # noqa: E402

__all__ = [
    "CAFFE_NORMALIZATION", "CLIP_NORMALIZATION", "IGNORE_INDEX", "IMAGENET_NORMALIZATION", "Normalization",
    "Segmenter", "segmentation_cross_entropy", "SEGMENTERS", "build_segmenter", "register_segmenter",
    "segmenter_config", "TextEmbeddingClassifier", "TextHeadConfig", "DeepLabV2", "DeepLabV2Config",
    "DeepLabV3Plus", "DeepLabV3PlusConfig", "SegFormer", "SegFormerConfig", "UperNet", "UperNetConfig",
    "Mask2Former", "Mask2FormerConfig", "ClipDecoder", "ClipDecoderConfig", "load_segmenter",
    "read_segmenter_header", "save_segmenter",
]
