"""CLIP-ES stage 3: the segmenter recipe trained on its pseudo-masks.

Plain data (no torch): :mod:`tag2mask.methods.registry` lists the names, and
:func:`tag2mask.methods.registry.segmenter_preset` turns one into a
:class:`~tag2mask.segmenter.task.SegmenterConfig`; ``tag2mask train segmenter --preset NAME`` trains it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SEGMENTER_RECIPES"]

#: recipe name -> SegmenterConfig fields (see docs/segmenter.md)
SEGMENTER_RECIPES: dict[str, dict[str, Any]] = {
    # CLIP-ES stage 3 = deeplab-pytorch configs/voc12.yaml (DeepLab-v2 ResNet-101, MSC, frozen BN) with the
    # paper's lr (Appendix D: 2e-4 ImageNet-pretrained init; 2.5e-5 for the COCO-pretrained init).
    # The pseudo-masks carry 255 where the CRF confidence is below 0.95 (CGL): `tag2mask label --refine crf`.
    "clip-es": dict(
        model="deeplab-v2", model_options={"loss_at_logit_resolution": True, "msc_scales": [0.5, 0.75], "norm_eval": True},
        crop_size=321, scales=(0.5, 0.75, 1.0, 1.25, 1.5), scale_range=(0.5, 1.5), hflip=True, photometric=False,
        batch_size=10, max_iters=20000, optimizer="sgd", lr=2e-4, momentum=0.9, weight_decay=5e-4,
        head_lr_mult=10.0, head_bias_lr_mult=20.0, head_bias_weight_decay=False, poly_power=0.9, lr_step=10,
        test_mode="whole", test_scales=(1.0,), test_flip=False,
    ),
}
