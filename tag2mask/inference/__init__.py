"""Test-time helpers shared by every segmenter: sliding-window and multi-scale + flip logits.

Both take a *logit function* ``fn(images (n, 3, h, w)) -> logits (n, C, h', w')`` (any output
stride), so the same code serves trained networks (:mod:`tag2mask.models`), WeCLIP's decoder and
the training-free open-vocabulary segmenters.
"""

from tag2mask.inference.tta import LogitFn, multiscale_flip_logits, slide_logits, sliding_windows

__all__ = ["LogitFn", "multiscale_flip_logits", "slide_logits", "sliding_windows"]
