"""Fully connected CRF post-processing (CLIP-ES stage 2, WeCLIP test-time CRF).

Thin wrapper over ``pydensecrf`` (optional extra ``crf``: ``pip install 'tag2mask[crf]'``),
imported lazily so the rest of tag2mask works without it.

CLIP-ES quirks reproduced in :func:`clip_es_pseudo_label` (``compat=True``):

* the bilateral kernel sees ``uint8(BGR - (104.008, 116.669, 122.675))`` where
  negative values wrap modulo 256 (x86-64 behaviour of the float->uint8 cast in
  the official code; built explicitly here, see :func:`clip_es_crf_image`);
* the probability map ``[1 - max_k cam_k; cams]`` and the unary
  ``-log(clip(P, 1e-5, 1))`` are evaluated in float16 (the CAMs are stored in
  float16) and only then converted to float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .confidence import labels_from_scores, pad_keys

__all__ = [
    "CRFParams",
    "CLIP_ES_CRF",
    "WECLIP_CRF",
    "CLIP_ES_MEAN_BGR",
    "clip_es_crf_image",
    "unary_from_probs",
    "dense_crf",
    "clip_es_pseudo_label",
]

#: Per-channel mean (B, G, R) subtracted by CLIP-ES before the CRF (Caffe ImageNet mean).
CLIP_ES_MEAN_BGR: Tuple[float, float, float] = (104.008, 116.669, 122.675)

_INSTALL_HINT = "pydensecrf is required for dense CRF refinement: pip install 'tag2mask[crf]'"


def _import_densecrf():
    try:
        import pydensecrf.densecrf as dcrf  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc
    return dcrf


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF hyper-parameters (Krähenbühl & Koltun kernels).

    Attributes:
        iterations: mean-field iterations.
        gaussian_sxy: spatial std (pixels) of the smoothness kernel.
        gaussian_compat: Potts weight of the smoothness kernel.
        bilateral_sxy: spatial std (pixels) of the appearance kernel.
        bilateral_srgb: colour std of the appearance kernel.
        bilateral_compat: Potts weight of the appearance kernel.
    """

    iterations: int
    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float


#: CLIP-ES ``eval_cam_with_crf.py`` (= deeplab-pytorch defaults).
CLIP_ES_CRF = CRFParams(10, 1, 3, 67, 3, 4)
#: WeCLIP ``test_msc_flip_voc.py`` (applied to softmax logits on the raw RGB image).
WECLIP_CRF = CRFParams(10, 3, 3, 64, 5, 4)


def clip_es_crf_image(rgb: np.ndarray) -> np.ndarray:
    """The exact bytes CLIP-ES's CRF uses as its "colour" image.

    ``BGR(float32) - (104.008, 116.669, 122.675)`` truncated toward zero and wrapped
    modulo 256 (-5.3 -> 251, 130.99 -> 130). The official code gets this from a
    C-level undefined float->uint8 cast that wraps on x86-64 (ARM saturates
    instead); it is made explicit here so the result is platform independent.

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


def unary_from_probs(probs: np.ndarray, clip: float = 1e-5, fp16: bool = False) -> np.ndarray:
    """``-log(clip(P, clip, 1))`` flattened to ``(C, H*W)`` float32.

    Args:
        probs: ``(C, H, W)`` probabilities (need not sum to 1).
        clip: lower clip value.
        fp16: evaluate the clip and the log in float16 (CLIP-ES: the clip value
            itself becomes ``float16(1e-5) = 1.0014e-05``), then convert.

    Returns:
        ``(C, H*W)`` float32, C-contiguous.
    """
    p = np.asarray(probs)
    dt = np.float16 if fp16 else np.float32
    p = p.astype(dt, copy=False)
    p = np.clip(p, dt(clip), dt(1.0))
    u = -np.log(p)
    return np.ascontiguousarray(u.reshape(p.shape[0], -1).astype(np.float32))


def dense_crf(probs: np.ndarray, image: np.ndarray, params: CRFParams = CLIP_ES_CRF,
              unary_fp16: bool = False) -> np.ndarray:
    """Mean-field inference of a fully connected CRF (pydensecrf).

    Args:
        probs: ``(C, H, W)`` per-class probabilities (float16/float32).
        image: ``(H, W, 3)`` uint8 image for the bilateral kernel, passed as is
            (use :func:`clip_es_crf_image` for CLIP-ES fidelity).
        params: kernel parameters (:data:`CLIP_ES_CRF`, :data:`WECLIP_CRF`, ...).
        unary_fp16: evaluate the unary in float16 as CLIP-ES does.

    Returns:
        ``Q``: ``(C, H, W)`` float32 marginals.

    Raises:
        ImportError: pydensecrf is not installed.
    """
    dcrf = _import_densecrf()
    p = np.asarray(probs)
    if p.ndim != 3:
        raise ValueError(f"expected (C, H, W) probabilities, got shape {p.shape}")
    C, H, W = p.shape
    img = np.array(image, dtype=np.uint8, order="C")  # a writable copy: pydensecrf refuses read-only buffers
    if img.shape != (H, W, 3):
        raise ValueError(f"image shape {img.shape} does not match probabilities {(H, W)}")
    crf = dcrf.DenseCRF2D(W, H, C)
    crf.setUnaryEnergy(unary_from_probs(p, fp16=unary_fp16))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=img,
                             compat=params.bilateral_compat)
    q = crf.inference(int(params.iterations))
    return np.asarray(q, dtype=np.float32).reshape(C, H, W)


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
        params: CRF parameters (default :data:`CLIP_ES_CRF`).

    Returns:
        ``label`` ``(H, W)`` uint8 (VOC ids, 255 = ignore), ``label_noignore``
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
    # Background score from the foreground CAMs only, power 1; in float16 when
    # compat (1 - fp16 stays fp16).
    bg = cams.dtype.type(1) - cams.max(axis=0, keepdims=True)
    probs = np.concatenate([bg, cams], axis=0)
    q = dense_crf(probs, image, params, unary_fp16=compat)
    lut = pad_keys(keys)
    label_noignore = labels_from_scores(q, lut, None)
    if confidence is None:
        label = label_noignore.copy()
    else:
        label = labels_from_scores(q, lut, confidence)
    return label, label_noignore, q
