"""The training-free open-vocabulary segmenters on the synthetic scenes of ``tag2mask demo``."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

__all__ = ["demo_predictors"]


def demo_predictors(model: Any, vocab: Any, names: Sequence[str], options: dict[str, Any]
                    ) -> dict[str, Callable[[Image.Image, list[int]], np.ndarray]]:
    """``name -> predict(image, tag_ids)``: a ``(H, W)`` uint8 label map; the tags are not used (the
    methods get only the class names). Whole image at its own size, ``options["templates"]`` as prompts."""
    from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter

    preds = {}
    for m in names:
        seg = OpenVocabSegmenter(model, vocab, m, templates=options["templates"], short_side=None, mode="whole")
        preds[m] = lambda image, ids, seg=seg: seg.predict(image).label
    return preds
