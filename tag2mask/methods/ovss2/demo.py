"""SC-CLIP and PEARL on the synthetic scenes of ``tag2mask demo``.

SC-CLIP's fixed block indices need 11+ blocks, more than the shipped tiny CLIP's 6: ``demo`` and ``serve``
offer it only when the registry's ``supports`` check passes for the loaded CLIP, and say why otherwise."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

__all__ = ["demo_predictors"]


def demo_predictors(model: Any, vocab: Any, names: Sequence[str], options: dict[str, Any]
                    ) -> dict[str, Callable[[Image.Image, list[int]], np.ndarray]]:
    """``name -> predict(image, tag_ids)``: a ``(H, W)`` uint8 label map; the tags are not used. Whole
    image at its own size, ``options["templates"]`` as prompts."""
    from tag2mask.methods.ovss2.segmenter import NewerOvssSegmenter

    preds = {}
    for m in names:
        seg = NewerOvssSegmenter(model, vocab, m, templates=options["templates"], short_side=None, mode="whole")
        preds[m] = lambda image, ids, seg=seg: seg.predict(image).label
    return preds
