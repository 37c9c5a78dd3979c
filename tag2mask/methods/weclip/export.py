"""The export hook of WeCLIP runs (registry ``RUN_EXPORTERS["weclip"]``): the frozen CLIP image tower and the
trained decoder in one ONNX graph, with the recipe's scales and flip (:func:`.inference.multiscale_logits`).

The dense CRF of ``segment --checkpoint --crf`` is not a graph operation; the sidecar says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tag2mask.export.onnx_graph import ExportSpec

__all__ = ["WeCLIPGraph", "export_spec"]


class WeCLIPGraph(nn.Module):
    """``(1, 3, H, W)`` normalised -> ``(1, C, H, W)`` float32: WeCLIP's logits averaged over scales and flip at
    the stride-16 size of the base scale (as :func:`.inference.multiscale_logits`), then bilinear to ``H, W``."""

    def __init__(self, model: nn.Module, scales: tuple[float, ...], flip: bool) -> None:
        super().__init__()
        self.model, self.scales, self.flip = model, tuple(scales), bool(flip)

    def _one(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        logits = self.model(torch.cat([x, x.flip(-1)]) if self.flip else x).seg_logits.float()
        return (logits[:b] + logits[b:].flip(-1)) / 2 if self.flip else logits

    def forward(self, images: Tensor) -> Tensor:
        # the base scale's logits give the stride-16 size without arithmetic on the (symbolic) input size
        base = self._one(images)
        size = base.shape[-2:]
        acc = [base] if 1.0 in self.scales else []
        for s in self.scales:
            if s != 1.0:
                x = F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
                acc.append(F.interpolate(self._one(x), size=size, mode="bilinear", align_corners=False))
        logits = torch.stack(acc).mean(dim=0)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def export_spec(checkpoint: Union[str, Path], weights: Optional[str] = None,
                classes: Optional[str] = None) -> ExportSpec:
    """The graph and sidecar facts of a WeCLIP run; ``weights`` names its CLIP (default: the recorded one)."""
    from tag2mask.clip.model import CLIP_MEAN, CLIP_STD
    from tag2mask.methods.weclip.inference import WeCLIPSegmenter
    from tag2mask.methods.weclip.model import IMAGENET_MEAN_255, IMAGENET_STD_255

    if classes is not None:
        raise ValueError("--classes does not apply to a WeCLIP run (it brings its own classes)")
    seg = WeCLIPSegmenter(checkpoint, device="cpu", weights=weights)
    if seg.config.normalization == "imagenet":
        mean, std = tuple(v / 255.0 for v in IMAGENET_MEAN_255), tuple(v / 255.0 for v in IMAGENET_STD_255)
    else:
        mean, std = tuple(CLIP_MEAN), tuple(CLIP_STD)
    if 1.0 not in seg.scales:
        raise ValueError(f"a WeCLIP run whose test scales {seg.scales} leave out 1.0 cannot be exported (the graph "
                         "takes the logit size from scale 1)")
    side = int(seg.long_side)
    return ExportSpec(
        module=WeCLIPGraph(seg.model, seg.scales, seg.flip), kind="weclip", class_names=seg.class_names,
        has_background=True, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
        size=(side, side), long_side=side, scales=tuple(seg.scales), flip=bool(seg.flip),
        notes=["no dense CRF (segment --checkpoint --crf): not a graph operation"],
        source={"checkpoint": str(checkpoint), "network": "WeCLIP (CLIP image tower + decoder)",
                "clip_fingerprint": getattr(seg.model.clip, "fingerprint", None)})
