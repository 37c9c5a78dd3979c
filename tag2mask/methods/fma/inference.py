"""FMA-WSSS CAM inference with learned prompts (official ``infer_cam`` + ``aff_cam``), per image:

1. resize up to multiples of 16 (PIL bicubic; official ``scale_align`` with ``divisible_by_n``),
   CLIP normalisation, float32, one image, one scale, no flip;
2. :class:`~tag2mask.methods.fma.model.FMAClip` with the image's ground-truth labels: raw GradCAMs
   of the positive classes (ascending class order) and the float16 mean of the last 8 attention maps;
3. CAA of the stage (:func:`~tag2mask.methods.fma.config.caa_refine`, the shared CAM pipeline), or
   the raw CAM when the stage has none (official COCO segmentation stage) -> the maps SAM-based
   seeding (:func:`tag2mask.proposals.seeding.seed_from_proposals`) takes, at patch resolution;
4. the CAM "score" of the official CAM-seed evaluation: resized bilinearly to the image, clamped at
   0 and min-max normalised per class (``cam2score(resize_first=True)``), stored as float16 - the
   same layout as CLIP-ES's ``attn_highres``, so ``tag2mask eval --cams`` scores it
   (background ``(1 - max)^p``) and ``tag2mask seed`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tag2mask.clip.model import CLIP_MEAN, CLIP_STD
from tag2mask.data.transforms import resize_pil, size_to_multiple, to_normalized_tensor
from tag2mask.methods.fma.config import CAASettings, caa_stages
from tag2mask.methods.fma.model import FMAClip

__all__ = ["FMACamResult", "FMACams", "cam_scores"]

SCORE_EPS = 1e-7


def cam_scores(maps: torch.Tensor, size_hw: Sequence[int]) -> torch.Tensor:
    """Official ``cam2score(resize_first=True)``: bilinear to ``size_hw`` (align_corners=False, no-op
    at equal size), clamp at 0, per-map ``(x - min) / (max - min + 1e-7)``. (K, h, w) -> (K, H, W) float32."""
    x = maps.float()
    size = (int(size_hw[0]), int(size_hw[1]))
    if tuple(x.shape[-2:]) != size and x.shape[0]:
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    x = x.clamp_min(0)
    lo, hi = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo + SCORE_EPS)


@dataclass
class FMACamResult:
    """CAMs of one image.

    keys: (K,) int64 class ids (ascending) of the maps.
    cams: (K, H, W) float16 CAM scores at the image size (step 4 of the module docstring).
    refined: (K, h, w) float32 CAA output (or raw CAM) at patch resolution: the seeding input.
    arrays: intermediates when requested (``pos_cam``, ``attention`` float16, ``box_masks``, ``refined``).
    """

    keys: np.ndarray
    cams: np.ndarray
    refined: np.ndarray
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class FMACams:
    """CAMs of images with known labels from a trained :class:`FMAClip`.

    >>> cams = FMACams(model, caa=config.stage.caa)
    >>> result = cams(image, label_ids=[14, 11])
    """

    def __init__(self, model: FMAClip, caa: Optional[CAASettings]) -> None:
        self.model = model.eval()
        self.caa = caa
        self.device = next(model.clip.parameters()).device
        with torch.no_grad():
            self.text = model.text_features()  # the prompts are fixed: the text tower runs once

    def __call__(self, image: Image.Image, label_ids: Sequence[int], keep_arrays: bool = False) -> FMACamResult:
        ids = sorted(set(int(i) for i in label_ids))
        if not ids:
            raise ValueError("FMA-WSSS needs at least one image-level label per image")
        n_fg = self.model.n_fg
        bad = [i for i in ids if not 0 <= i < n_fg]
        if bad:
            raise ValueError(f"label ids {bad} are outside the {n_fg} classes of the prompts")
        width, height = image.size
        h16, w16 = size_to_multiple(height, width, 16, "ceil")
        x = to_normalized_tensor(resize_pil(image.convert("RGB"), h16, w16), CLIP_MEAN, CLIP_STD).to(self.device)
        labels = torch.zeros(1, n_fg, dtype=torch.long)
        labels[0, ids] = 1
        with torch.no_grad():
            out = self.model(x, labels, need_attention=self.caa is not None, text_features=self.text)
        raw = out.pos_cam.detach().float()
        arrays: dict[str, np.ndarray] = {}
        if self.caa is not None:
            stages = caa_stages(out.attention[0], raw, self.caa)
            refined = stages.refined_lowres
            if keep_arrays:
                arrays.update(attention=stages.affinity.half().cpu().numpy(),
                              box_masks=stages.box_masks.cpu().numpy().astype(np.uint8))
        else:
            refined = raw
        if keep_arrays:
            arrays.update(pos_cam=raw.cpu().numpy(), refined=refined.cpu().numpy(),
                          logits=out.logits.detach().float().cpu().numpy()[0])
        scores = cam_scores(refined, (height, width))
        return FMACamResult(keys=np.asarray(ids, dtype=np.int64), cams=scores.cpu().numpy().astype(np.float16),
                            refined=refined.cpu().numpy().astype(np.float32), arrays=arrays)
