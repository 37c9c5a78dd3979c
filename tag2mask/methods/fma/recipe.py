"""FMA-WSSS stage 2: the Mask2Former recipes trained on its fine seeds.

Plain data (no torch): :mod:`tag2mask.methods.registry` lists the names, and
:func:`tag2mask.methods.registry.segmenter_preset` turns one into a
:class:`~tag2mask.segmenter.task.SegmenterConfig`; ``tag2mask train segmenter --preset NAME`` trains it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SEGMENTER_RECIPES"]

# FMA-WSSS stage 2: Mask2Former Swin-L (ImageNet-22k) on the fine seeds, the official run's
# "m2f-sl22-bt4-80k-512x" (batch 4, 80k iterations, crop 512; its mmseg fork is unpublished) with mmseg's
# Mask2Former recipe: AdamW lr 1e-4 with the backbone at x0.1 (so lr = 1e-5, head x10), weight decay 0.05,
# gradient norm clipped at 0.01, poly 0.9 to 0; short side 512 x {0.5, 0.6, ..., 2.0}, crop 512, flip,
# PhotoMetricDistortion; test: whole image resized to fit (2048, 512).
_MASK2FORMER_SWIN_L: dict[str, Any] = dict(
    model="mask2former", model_options={"backbone": "swin-large"},
    crop_size=512, scales=tuple(round(0.1 * x, 1) for x in range(5, 21)), reference_size=(2048, 512),
    hflip=True, photometric=True, batch_size=4, max_iters=80000, optimizer="adamw", lr=1e-5, weight_decay=0.05,
    betas=(0.9, 0.999), head_lr_mult=10.0, head_bias_lr_mult=10.0, head_bias_weight_decay=False, poly_power=0.9,
    lr_step=1, min_lr=0.0, max_grad_norm=0.01, sync_bn=True, ddp_find_unused=True, test_mode="whole",
    test_scales=(1.0,), test_flip=False, test_reference_size=(2048, 512),
)

#: recipe name -> SegmenterConfig fields (see docs/segmenter.md)
SEGMENTER_RECIPES: dict[str, dict[str, Any]] = {
    # FMA-WSSS stage 2 (VOC): see _MASK2FORMER_SWIN_L; checkpoint iter_30000 of the 80k schedule reported as the best
    "fma": _MASK2FORMER_SWIN_L,
    # FMA-WSSS stage 2 on COCO-2014: "m2f-sl22-bt4-100k-512x", checkpoint iter_90000 reported
    "fma:coco": {**_MASK2FORMER_SWIN_L, "max_iters": 100000},
}
