"""A trained WeCLIP run on the synthetic scenes of the demo / quality benchmark."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

__all__ = ["demo_predictors"]


def demo_predictors(model: Any, vocab: Any, names: Sequence[str], options: dict[str, Any]
                    ) -> dict[str, Callable[[Image.Image, list[int]], np.ndarray]]:
    """``{"weclip": predict(image, tag_ids)}`` from ``options["weclip_checkpoint"]`` (a run trained with
    ``tag2mask train weclip --data synth`` on the same CLIP weights); it predicts from the image alone."""
    checkpoint = options.get("weclip_checkpoint")
    if not checkpoint:
        raise ValueError("method 'weclip' needs a trained checkpoint (tag2mask train weclip --data synth)")
    from tag2mask.methods.weclip.inference import WeCLIPSegmenter

    device = next(model.parameters()).device
    weclip = WeCLIPSegmenter(checkpoint, device=device, weights=getattr(model, "source_path", None))
    return {"weclip": lambda image, ids: weclip.predict(image)[0]}
