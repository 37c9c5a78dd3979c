"""From refined CAMs to a pseudo-mask: background score, CRF or PAMR, confidence masking.

Label values follow VOC: 0 background, class id + 1 for a class, 255 ignore.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from tag2mask.evaluation.cam_eval import cam_to_label
from tag2mask.refinement.confidence import labels_from_scores, pad_keys


class LabelRefiner:
    """Turns (K, H, W) float16 CAMs + keys into a label map.

    mode ``crf``: CLIP-ES stage 2 (dense CRF with the official parameters; compat reproduces the
    official BGR / mean-subtracted / wrapped uint8 CRF image); pixels whose max marginal is below
    ``confidence`` become 255 (the "confidence-guided loss" of the paper, as the code implements it).
    mode ``pamr``: PAMR (pure torch, no compiler needed) on [bg; CAMs], then argmax (no ignore
    region: PAMR scores are not calibrated probabilities, so a 0.95 cut would not mean the same).
    mode ``none``: argmax of [(1 - max)^p; CAMs] with the official float16 tie rules.
    """

    def __init__(
        self,
        mode: str = "pamr",
        bg_power: float = 1.0,
        confidence: Optional[float] = 0.95,
        compat: bool = True,
        device: torch.device | str = "cpu",
        pamr_iterations: int = 10,
        pamr_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24),
    ):
        if mode not in ("crf", "pamr", "none"):
            raise ValueError(f"unknown refinement {mode!r}; choose crf, pamr or none")
        self.mode = mode
        self.bg_power = bg_power
        self.confidence = confidence if confidence else None
        self.compat = compat
        self.device = torch.device(device)
        if mode == "crf":
            from tag2mask.refinement.crf import _import_densecrf

            _import_densecrf()  # fail at start-up, not on the first image, when the extra is missing
        self._pamr = None
        if mode == "pamr":
            from tag2mask.refinement.pamr import PAMR

            self._pamr = PAMR(pamr_iterations, pamr_dilations).to(self.device)

    def __call__(self, cams: np.ndarray, keys: np.ndarray, rgb: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """cams (K, H, W) float16, keys (K,), rgb (H, W, 3) uint8 -> (label (H, W) uint8, extra arrays)."""
        if self.mode == "none":
            return cam_to_label(cams, keys, bg_power=self.bg_power), {}
        if self.mode == "crf":
            from tag2mask.refinement.crf import clip_es_pseudo_label

            label, label_noignore, _ = clip_es_pseudo_label(cams, keys, rgb, compat=self.compat, confidence=self.confidence)
            return label, {"crf_label": label, "crf_label_noignore": label_noignore}
        return self._pamr_label(cams, keys, rgb), {}

    def _pamr_label(self, cams: np.ndarray, keys: np.ndarray, rgb: np.ndarray) -> np.ndarray:
        c = torch.from_numpy(np.asarray(cams, dtype=np.float32)).to(self.device)
        bg = (1 - c.max(dim=0, keepdim=True).values).clamp_min(0) ** self.bg_power
        scores = torch.cat([bg, c], dim=0)[None]
        image = torch.from_numpy(np.array(rgb, dtype=np.uint8)).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        with torch.no_grad():
            refined = self._pamr(image, scores)[0]
        return labels_from_scores(refined.cpu().numpy(), pad_keys(keys), None)
