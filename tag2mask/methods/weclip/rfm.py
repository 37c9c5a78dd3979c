"""WeCLIP's refinement module (RFM) and the per-image CAM refinement around it.

Before RFM is active WeCLIP refines its GradCAMs exactly like CLIP-ES (CAA): the mean of the last 8
CLIP attention maps (CLS row/column dropped) is turned into a transition matrix. With RFM the
affinity becomes::

    S_l = attention maps of the last 6 (VOC) / 10 (COCO) blocks, CLS dropped      (n, hw, hw)
    keep_l = Σ S_l >= mean_l Σ S_l                    # official: Σ(A_f − S_l) <= mean, A_f cancels
    R = (Σ_l keep_l S_l) / (Σ_l keep_l + 1e-5) ⊙ A_f  # A_f = decoder affinity sigmoid(F_uᵀF_u), detached

Both affinities then go through the same transition step as CLIP-ES (``compute_trans_mat`` in the
original is identical to :func:`tag2mask.localization.affinity.transition_matrix`: 3 column/row
rounds without epsilon, symmetrisation, one square), and each class's CAM is propagated with its
box mask applied to the *columns*: ``r_k = (T ⊙ B_k[None, :]) @ vec(cam_k)``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from tag2mask.localization.affinity import mean_attention, transition_matrix
from tag2mask.localization.cam_pipeline import CAMSettings, scale_to_size
from tag2mask.localization.cam_pipeline import refine_with_affinity as pipeline_refine

__all__ = [
    "RFM_LAYERS",
    "CAA_LAYERS",
    "BOX_THRESHOLD",
    "attention_mass",
    "rfm_keep_mask",
    "rfm_keep_from_mass",
    "rfm_affinity",
    "caa_affinity",
    "batched_transition_matrix",
    "RefinedCams",
    "refine_with_affinity",
    "refine_image_cams",
]

RFM_LAYERS = {"voc": 6, "coco": 10}
CAA_LAYERS = 8
BOX_THRESHOLD = {"voc": 0.4, "coco": 0.7}


def _patch_maps(attn_maps: Tensor, has_cls: bool) -> Tensor:
    """Drop the CLS row/column: ``(..., L, L)`` → ``(..., L-1, L-1)`` when ``has_cls``."""
    return attn_maps[..., 1:, 1:] if has_cls else attn_maps


def attention_mass(attn_maps: Tensor, num_layers: int, has_cls: bool = True) -> Tensor:
    """Patch-to-patch attention mass of the last ``num_layers`` maps.

    Args:
        attn_maps: ``(N, L, L)`` or ``(B, N, L, L)`` head-averaged attention maps in block order.
        num_layers: how many of the last maps to use (6 VOC / 10 COCO).
        has_cls: token 0 is the CLS token and is removed first.

    Returns:
        ``(num_layers,)`` or ``(B, num_layers)`` float64 sums.
    """
    sel = _patch_maps(attn_maps[..., -num_layers:, :, :], has_cls)
    return sel.double().sum(dim=(-2, -1))


def rfm_keep_mask(attn_maps: Tensor, num_layers: int = 6, has_cls: bool = True) -> Tensor:
    """Which of the last ``num_layers`` maps RFM averages.

    The official test ``Σ(A_f − S_l) <= mean_l Σ(A_f − S_l)`` reduces to ``Σ S_l >= mean_l Σ S_l``
    (the ``Σ A_f`` term is the same for every layer), so the decoder affinity is not needed; the
    masses are compared in float64, which only matters for near-ties.

    Args:
        attn_maps: ``(N, L, L)`` or ``(B, N, L, L)`` attention maps.
        num_layers: 6 (VOC) or 10 (COCO).
        has_cls: token 0 is the CLS token.

    Returns:
        ``(num_layers,)`` or ``(B, num_layers)`` bool.
    """
    return rfm_keep_from_mass(attention_mass(attn_maps, num_layers, has_cls))


def rfm_keep_from_mass(mass: Union[Tensor, np.ndarray], num_layers: Optional[int] = None) -> Tensor:
    """Keep mask from per-layer attention masses: ``mass_l >= mean(mass)`` over the last layers.

    Args:
        mass: ``(..., N)`` patch-to-patch masses in block order (e.g. all 12 layers).
        num_layers: use only the last ``num_layers`` entries (default: all given).

    Returns:
        ``(..., num_layers)`` bool.
    """
    m = torch.as_tensor(mass, dtype=torch.float64)
    if num_layers is not None:
        m = m[..., -num_layers:]
    return m >= m.mean(dim=-1, keepdim=True)


def rfm_affinity(
    attn_maps: Tensor,
    decoder_affinity: Tensor,
    num_layers: int = 6,
    has_cls: bool = True,
) -> Tensor:
    """RFM affinity: mean of the kept static attention maps times the decoder affinity.

    Args:
        attn_maps: ``(N, L, L)`` or ``(B, N, L, L)`` attention maps (all 12 blocks in WeCLIP).
        decoder_affinity: ``(hw, hw)`` or ``(B, hw, hw)`` decoder ``sigmoid(F_uᵀF_u)``; detached.
        num_layers: 6 (VOC) or 10 (COCO).
        has_cls: token 0 is the CLS token.

    Returns:
        ``(hw, hw)`` or ``(B, hw, hw)`` affinity in the dtype of ``attn_maps``.
    """
    sel = _patch_maps(attn_maps[..., -num_layers:, :, :], has_cls)
    keep = rfm_keep_mask(attn_maps, num_layers, has_cls).to(sel.dtype)
    # Σ keep·S / (Σ keep + 1e-5) as in the original (the 1e-5 makes it slightly less than the mean).
    summed = (sel * keep[..., None, None]).sum(dim=-3)
    mean = summed / (keep.sum(dim=-1) + 1e-5)[..., None, None]
    return mean * decoder_affinity.detach().to(sel.dtype)


def caa_affinity(attn_maps: Tensor, num_layers: int = CAA_LAYERS, has_cls: bool = True) -> Tensor:
    """CAA affinity used before RFM switches on: mean of the last 8 maps, CLS dropped.

    Args:
        attn_maps: ``(N, L, L)`` or ``(B, N, L, L)`` attention maps.

    Returns:
        ``(hw, hw)`` or ``(B, hw, hw)``.
    """
    if attn_maps.dim() == 3:
        return mean_attention(attn_maps, last=num_layers, drop_cls=has_cls)
    return _patch_maps(attn_maps[:, -num_layers:], has_cls).mean(dim=1)


def batched_transition_matrix(affinity: Tensor, rounds: int = 3, power: int = 2) -> Tensor:
    """:func:`~tag2mask.localization.affinity.transition_matrix` for ``(hw, hw)`` or ``(B, hw, hw)``."""
    if affinity.dim() == 2:
        return transition_matrix(affinity, rounds=rounds, power=power)
    return torch.stack([transition_matrix(a, rounds=rounds, power=power) for a in affinity])


class RefinedCams(NamedTuple):
    """Per-image outputs of :func:`refine_image_cams`.

    Attributes:
        affinity: ``(hw, hw)`` matrix given to the transition step.
        trans: ``(hw, hw)`` transition matrix.
        box_masks: ``(K, h, w)`` float32 0/1 box masks of the CAMs.
        refined_lowres: ``(K, h, w)`` refined CAMs at patch resolution.
        refined_highres: ``(K, H, W)`` min-max normalised (1e-7) and bilinearly resized maps, or
            ``None`` when no output size was given.
    """

    affinity: Tensor
    trans: Tensor
    box_masks: Tensor
    refined_lowres: Tensor
    refined_highres: Optional[Tensor]


def refine_with_affinity(
    cams: Union[Tensor, np.ndarray],
    affinity: Tensor,
    *,
    box_threshold: float = BOX_THRESHOLD["voc"],
    out_size: Optional[Sequence[int]] = None,
    exact_cv2_resize: bool = True,
) -> RefinedCams:
    """Transition matrix, box masks, propagation and (optionally) high-res maps for one image.

    The shared CAM pipeline's stages (:mod:`tag2mask.localization.cam_pipeline`) with WeCLIP's settings.

    Args:
        cams: ``(K, h, w)`` float32 GradCAMs in [0, 1) (one per image-level class).
        affinity: ``(hw, hw)`` CAA or RFM affinity.
        box_threshold: relative box threshold (0.4 VOC / 0.7 COCO).
        out_size: ``(H, W)`` of the high-res maps (crop size in training, image size in val).
        exact_cv2_resize: bit-exact OpenCV bilinear replica (numpy) instead of torch interpolate.

    Returns:
        :class:`RefinedCams` (tensors on the device of ``affinity``; ``refined_highres`` float32).
    """
    settings = CAMSettings(box_threshold=box_threshold, exact_resize=exact_cv2_resize)
    ref = pipeline_refine(cams, affinity, settings)
    high = None if out_size is None else scale_to_size(ref.refined_lowres, out_size, exact_cv2_resize)
    return RefinedCams(ref.affinity, ref.trans, ref.box_masks, ref.refined_lowres, high)


def refine_image_cams(
    cams: Union[Tensor, np.ndarray],
    attn_maps: Tensor,
    decoder_affinity: Optional[Tensor] = None,
    *,
    use_rfm: bool = True,
    dataset: str = "voc",
    box_threshold: Optional[float] = None,
    rfm_layers: Optional[int] = None,
    out_size: Optional[Sequence[int]] = None,
    exact_cv2_resize: bool = True,
) -> RefinedCams:
    """The per-image CAM refinement of WeCLIP's online pseudo labels (one image).

    Args:
        cams: ``(K, h, w)`` float32 GradCAMs in [0, 1) (one per image-level class).
        attn_maps: ``(12, 1 + hw, 1 + hw)`` head-averaged CLIP attention maps (11 encoder blocks +
            the last block from the GradCAM pass), token 0 = CLS.
        decoder_affinity: ``(hw, hw)`` decoder affinity; required when ``use_rfm``.
        use_rfm: RFM branch (else CAA, mean of the last 8 maps).
        dataset: ``"voc"`` or ``"coco"``: picks the box threshold (0.4 / 0.7) and the number of RFM
            layers (6 / 10) unless given explicitly.
        box_threshold, rfm_layers: overrides.
        out_size, exact_cv2_resize: see :func:`refine_with_affinity`.

    Returns:
        :class:`RefinedCams`.
    """
    key = dataset.lower()
    if use_rfm:
        if decoder_affinity is None:
            raise ValueError("use_rfm=True needs the decoder affinity")
        n_layers = RFM_LAYERS[key] if rfm_layers is None else rfm_layers
        aff = rfm_affinity(attn_maps, decoder_affinity, num_layers=n_layers)
    else:
        aff = caa_affinity(attn_maps)
    return refine_with_affinity(
        cams,
        aff,
        box_threshold=BOX_THRESHOLD[key] if box_threshold is None else box_threshold,
        out_size=out_size,
        exact_cv2_resize=exact_cv2_resize,
    )
