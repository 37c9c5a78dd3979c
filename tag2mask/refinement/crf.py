"""Fully connected CRF (dense CRF) inference, method-agnostic.

Thin wrapper over ``pydensecrf`` (optional extra ``crf``: ``pip install 'tag2mask[crf]'``),
imported lazily so the rest of tag2mask works without it. The parameter sets of the papers are
named here (:data:`CLIP_ES_CRF`, :data:`WECLIP_CRF`); what a method feeds the CRF (CLIP-ES's
wrapped BGR image and float16 probability map) lives with the method
(:mod:`tag2mask.methods.clip_es.label_maps`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CRFParams", "CLIP_ES_CRF", "WECLIP_CRF", "unary_from_probs", "dense_crf"]

_INSTALL_HINT = "pydensecrf is required for dense CRF refinement: pip install 'tag2mask[crf]'"


def import_densecrf():
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
            (CLIP-ES: :func:`tag2mask.methods.clip_es.label_maps.clip_es_crf_image`).
        params: kernel parameters (:data:`CLIP_ES_CRF`, :data:`WECLIP_CRF`, ...).
        unary_fp16: evaluate the unary in float16 as CLIP-ES does.

    Returns:
        ``Q``: ``(C, H, W)`` float32 marginals.

    Raises:
        ImportError: pydensecrf is not installed.
    """
    dcrf = import_densecrf()
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
