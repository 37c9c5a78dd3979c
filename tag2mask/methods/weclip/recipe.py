"""WeCLIP's fully supervised setting as a segmenter recipe (its decoder on ground-truth masks).

Plain data (no torch): :mod:`tag2mask.methods.registry` lists the names, and
:func:`tag2mask.methods.registry.segmenter_preset` turns one into a
:class:`~tag2mask.segmenter.task.SegmenterConfig`; ``tag2mask train segmenter --preset NAME`` trains it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SEGMENTER_RECIPES"]

#: recipe name -> SegmenterConfig fields (see docs/segmenter.md)
SEGMENTER_RECIPES: dict[str, dict[str, Any]] = {
    # WeCLIP's fully supervised setting: its frozen-CLIP decoder trained on ground-truth masks with
    # WeCLIP's optimiser (AdamW, decoder lr 2e-3, wd 0.01, 50 warm-up iterations, poly power 1),
    # crop 320, batch 4, 30k iterations; test: long side 512, scales {1, 0.75} + flip.
    "weclip-fs": dict(
        model="clip-decoder", model_options={"normalization": "imagenet", "compat_numerics": True},
        crop_size=320, scales=(), scale_range=(0.5, 2.0), hflip=True, photometric=False,
        batch_size=4, max_iters=30000, optimizer="adamw", lr=2e-3, weight_decay=0.01, betas=(0.9, 0.999),
        head_lr_mult=1.0, head_bias_lr_mult=1.0, head_bias_weight_decay=True, poly_power=1.0, lr_step=1,
        warmup_iters=50, warmup_ratio=1e-6, test_mode="whole", test_scales=(1.0, 0.75), test_flip=True,
        test_long_side=512,
    ),
}
