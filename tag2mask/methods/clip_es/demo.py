"""CLIP-ES on the synthetic scenes of ``tag2mask demo``: raw GradCAM, CLIP-ES, + PAMR, + its CRF."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

__all__ = ["demo_predictors"]


def demo_predictors(model: Any, vocab: Any, names: Sequence[str], options: dict[str, Any]
                    ) -> dict[str, Callable[[Image.Image, list[int]], np.ndarray]]:
    """``name -> predict(image, tag_ids)`` giving a ``(H, W)`` uint8 label map (0 bg, class id + 1).

    ``names`` among ``gradcam``, ``clip-es``, ``clip-es+pamr``, ``clip-es+crf`` (the last only with
    ``options["with_crf"]``: scored without the 0.95 ignore region, as the official ``--eval_only`` does).
    """
    from tag2mask.methods.clip_es.label_maps import LabelRefiner
    from tag2mask.methods.clip_es.pipeline import ClipES, preset_for

    device = next(model.parameters()).device
    maker = ClipES(model, vocab, preset_for("synth"))  # photo template, float32: what the tiny CLIP knows
    plain = LabelRefiner("none", device=device)
    pamr = LabelRefiner("pamr", device=device)
    crf = LabelRefiner("crf", compat=False, confidence=None, device=device) if options.get("with_crf") else None

    def gradcam_only(image: Image.Image, ids: list[int]) -> np.ndarray:
        # raw softmax-GradCAM (no attention affinity), upsampled like the refined maps
        _, cams, _ = maker.lowres(image, ids)
        high = maker._upsample(cams, (image.size[1], image.size[0])).astype(np.float16)
        return plain(high, np.asarray(ids), np.asarray(image))[0]

    def es_with(refiner):
        return lambda image, ids: refiner(maker(image, ids).cams, np.asarray(ids), np.asarray(image))[0]

    table = {"gradcam": gradcam_only, "clip-es": es_with(plain), "clip-es+pamr": es_with(pamr)}
    if crf is not None:
        table["clip-es+crf"] = es_with(crf)
    return {k: v for k, v in table.items() if k in names}
