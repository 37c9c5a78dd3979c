"""CLIP-ES stage 2: from refined CAMs to a pseudo-mask (background score, CRF or PAMR, confidence mask).

Label values follow VOC: 0 background, class id + 1 for a class, 255 ignore.

CLIP-ES quirks reproduced by :func:`clip_es_pseudo_label` (``compat=True``, the official
``eval_cam_with_crf.py``):

* the CRF's bilateral kernel sees ``uint8(BGR - (104.008, 116.669, 122.675))`` where negative values
  wrap modulo 256 (the x86-64 behaviour of the official float->uint8 cast, built explicitly here so
  the result is platform independent, see :func:`clip_es_crf_image`);
* the probability map ``[1 - max_k cam_k; cams]`` and the unary ``-log(clip(P, 1e-5, 1))`` are
  evaluated in float16 (the CAMs are stored in float16) and only then converted to float32.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from tag2mask.localization.labels import cams_to_labels, labels_from_scores, with_background
from tag2mask.refinement.crf import CLIP_ES_CRF, CRFParams, dense_crf

__all__ = ["CLIP_ES_MEAN_BGR", "clip_es_crf_image", "clip_es_pseudo_label", "LabelRefiner"]

#: Per-channel mean (B, G, R) subtracted by CLIP-ES before the CRF (Caffe ImageNet mean).
CLIP_ES_MEAN_BGR: Tuple[float, float, float] = (104.008, 116.669, 122.675)


def clip_es_crf_image(rgb: np.ndarray) -> np.ndarray:
    """The exact bytes CLIP-ES's CRF uses as its "colour" image.

    ``BGR(float32) - (104.008, 116.669, 122.675)`` truncated toward zero and wrapped
    modulo 256 (-5.3 -> 251, 130.99 -> 130). The official code gets this from a
    C-level undefined float->uint8 cast that wraps on x86-64 (ARM saturates
    instead); it is made explicit here.

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB image.

    Returns:
        ``(H, W, 3)`` uint8, C-contiguous, channel order **BGR**.
    """
    img = np.asarray(rgb)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {img.shape} {img.dtype}")
    bgr = img[:, :, ::-1].astype(np.float32)
    # Official: float32 image minus a float64 tuple, stored back into float32.
    shifted = (bgr.astype(np.float64) - np.asarray(CLIP_ES_MEAN_BGR, dtype=np.float64)).astype(np.float32)
    wrapped = np.trunc(shifted).astype(np.int64) & 255
    return np.ascontiguousarray(wrapped.astype(np.uint8))


def clip_es_pseudo_label(
    attn_highres: np.ndarray,
    keys: Union[Sequence[int], np.ndarray],
    rgb: np.ndarray,
    compat: bool = True,
    confidence: Optional[float] = 0.95,
    params: CRFParams = CLIP_ES_CRF,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CLIP-ES stage 2: CRF on the refined CAMs and the confidence-masked pseudo label.

    Args:
        attn_highres: ``(K, H, W)`` float16 refined CAMs at image size (stage 1 output).
        keys: ``(K,)`` 0-based class ids of the CAM channels.
        rgb: ``(H, W, 3)`` uint8 RGB image.
        compat: ``True`` reproduces the official numerics (BGR mean-subtracted
            wrapped image, float16 probability map and unary). ``False`` is the
            "intended" variant: plain RGB image for the bilateral kernel and a
            float32 probability map / unary (different masks on a few pixels).
        confidence: pixels whose max marginal is below it become 255 in ``label``
            (``None`` disables the mask).
        params: CRF parameters (default :data:`~tag2mask.refinement.crf.CLIP_ES_CRF`).

    Returns:
        ``label`` ``(H, W)`` uint8 (ids + 1, 255 = ignore), ``label_noignore``
        ``(H, W)`` uint8 (the ``--eval_only`` variant), ``Q`` ``(K+1, H, W)``
        float32 marginals (channel 0 = background).
    """
    cams = np.asarray(attn_highres)
    if compat:
        cams = cams.astype(np.float16, copy=False)
        image = clip_es_crf_image(rgb)
    else:
        cams = cams.astype(np.float32, copy=False)
        image = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    # background from the foreground CAMs only, power 1, in float16 under compat
    q = dense_crf(with_background(cams, 1.0), image, params, unary_fp16=compat)
    label_noignore = labels_from_scores(q, keys)
    label = label_noignore.copy() if confidence is None else labels_from_scores(q, keys, confidence)
    return label, label_noignore, q


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
            from tag2mask.refinement.crf import import_densecrf

            import_densecrf()  # fail at start-up, not on the first image, when the extra is missing
        self._pamr = None
        if mode == "pamr":
            from tag2mask.refinement.pamr import PAMR

            self._pamr = PAMR(pamr_iterations, pamr_dilations).to(self.device)

    def __call__(self, cams: np.ndarray, keys: np.ndarray, rgb: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """cams (K, H, W) float16, keys (K,), rgb (H, W, 3) uint8 -> (label (H, W) uint8, extra arrays)."""
        if self.mode == "none":
            return cams_to_labels(np.asarray(cams), keys, bg_power=self.bg_power), {}
        if self.mode == "crf":
            label, label_noignore, _ = clip_es_pseudo_label(cams, keys, rgb, compat=self.compat, confidence=self.confidence)
            return label, {"crf_label": label, "crf_label_noignore": label_noignore}
        return self._pamr_label(cams, keys, rgb), {}

    def _pamr_label(self, cams: np.ndarray, keys: np.ndarray, rgb: np.ndarray) -> np.ndarray:
        c = torch.from_numpy(np.asarray(cams, dtype=np.float32)).to(self.device)
        scores = with_background(c, self.bg_power).clamp_min(0)
        image = torch.from_numpy(np.array(rgb, dtype=np.uint8)).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        with torch.no_grad():
            refined = self._pamr(image, scores[None])[0]
        return labels_from_scores(refined.cpu().numpy(), keys)
