"""One CAM pipeline for CLIP-ES, WeCLIP and FMA: GradCAM → attention affinity → boxes → propagate → scale.

The stages (each a function of this module or of the low-level modules it composes):

1. **GradCAM** (:func:`~tag2mask.localization.gradcam.softmax_gradcam`): softmax-GradCAM of the
   image's classes on the last block; its maps are the normalised CAMs (ReLU + min-max twice).
2. **Affinity** (:func:`attention_affinity`): mean of the last ``attention_layers`` head-averaged
   attention maps with the CLS row/column dropped (optionally rounded to float16, as FMA stores it).
   WeCLIP's RFM replaces this stage by its own affinity (``affinity_fn``).
3. **Transition matrix** (:func:`~tag2mask.localization.affinity.transition_matrix`):
   ``sinkhorn_rounds`` column/row normalisations, symmetrisation, matrix power ``affinity_power``.
4. **Boxes** (:func:`~tag2mask.localization.boxes.cam_box_masks`) from the *score* maps with
   relative threshold ``box_threshold``.
5. **Propagation** (:func:`~tag2mask.localization.affinity.refine_cams`) of the score maps or of
   the raw CAMs (``propagate``), the box mask selecting source patches.
6. **Scale** (:func:`scale_to_size`): min-max at patch resolution, bilinear to the output size.

What the three methods set (everything else is shared):

=================  ==================  ============  ==========================================
setting            CLIP-ES             WeCLIP        FMA-WSSS (CAA configs)
=================  ==================  ============  ==========================================
score              ``as_is``           ``as_is``     ``clamp_minmax`` (its CAMs are raw)
sinkhorn_rounds    3                   3             1
affinity_power     2                   2             2
box_threshold      0.4 VOC / 0.7 COCO  0.4 / 0.7     per config
propagate          ``score``           ``score``     ``score`` or ``cam`` (``aff_at``)
attention_dtype    float32             float32       ``float16`` (the saved attention)
=================  ==================  ============  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from tag2mask.localization.affinity import mean_attention, refine_cams, transition_matrix
from tag2mask.localization.boxes import cam_box_masks
from tag2mask.localization.gradcam import GradCAMOutput, TargetRows, softmax_gradcam
from tag2mask.localization.scaling import minmax_scale, resize_bilinear, resize_bilinear_like_cv2

__all__ = ["CAMSettings", "RefinedCAMs", "CAMPipelineOutput", "attention_affinity", "score_maps",
           "refine_with_affinity", "scale_to_size", "run_cam_pipeline"]

SCORE_MODES = ("as_is", "clamp_minmax")
PROPAGATE_MODES = ("score", "cam")


@dataclass(frozen=True)
class CAMSettings:
    """Settings of the shared CAM pipeline (see the module docstring for each method's values).

    Attributes:
        attention_layers: how many final attention maps are averaged into the affinity.
        attention_dtype: ``None`` (float32) or ``"float16"`` to round the averaged attention.
        sinkhorn_rounds: column/row normalisation rounds of the transition matrix.
        affinity_power: matrix power of the symmetrised matrix.
        box_threshold: relative box threshold lambda (uint8 CAM > int(lambda * max)).
        box_edge_quirk: the official right/bottom box clipping (see :mod:`.boxes`).
        score: how the box/propagation score is made from the CAM: ``as_is`` (already normalised,
            softmax-GradCAM output) or ``clamp_minmax`` (clamp at 0, min-max with +1e-7).
        propagate: propagate the ``score`` maps or the raw ``cam`` maps.
        exact_resize: bit-exact OpenCV bilinear replica (numpy) instead of torch's interpolate.
        fp16_gradcam: the official float16 GradCAM arithmetic on a float16 last block (WeCLIP's
            numerics; :func:`~tag2mask.localization.gradcam.softmax_gradcam`).
    """

    attention_layers: int = 8
    attention_dtype: Optional[str] = None
    sinkhorn_rounds: int = 3
    affinity_power: int = 2
    box_threshold: float = 0.4
    box_edge_quirk: bool = True
    score: str = "as_is"
    propagate: str = "score"
    exact_resize: bool = True
    fp16_gradcam: bool = False

    def __post_init__(self) -> None:
        if self.score not in SCORE_MODES:
            raise ValueError(f"score must be one of {SCORE_MODES}, got {self.score!r}")
        if self.propagate not in PROPAGATE_MODES:
            raise ValueError(f"propagate must be one of {PROPAGATE_MODES}, got {self.propagate!r}")
        if self.attention_dtype not in (None, "float16"):
            raise ValueError(f"attention_dtype must be None or 'float16', got {self.attention_dtype!r}")


class RefinedCAMs(NamedTuple):
    """Outputs of :func:`refine_with_affinity` (all ``(K, h, w)`` maps on the affinity's device).

    Attributes:
        score: the maps boxes are taken from.
        affinity: ``(hw, hw)`` the affinity given to the transition step.
        trans: ``(hw, hw)`` transition matrix.
        box_masks: ``(K, h, w)`` float32 0/1 box masks.
        refined_lowres: ``(K, h, w)`` propagated maps at patch resolution.
    """

    score: Tensor
    affinity: Tensor
    trans: Tensor
    box_masks: Tensor
    refined_lowres: Tensor


class CAMPipelineOutput(NamedTuple):
    """:func:`run_cam_pipeline` result: the GradCAM pass, the attention maps used and the refinement."""

    gradcam: GradCAMOutput
    attention_maps: Tensor
    refined: RefinedCAMs


def attention_affinity(attn_maps: Union[Sequence[Tensor], Tensor], settings: CAMSettings) -> Tensor:
    """Mean of the last ``settings.attention_layers`` maps, CLS dropped: ``(n, L, L)`` → ``(L-1, L-1)``."""
    aff = mean_attention(attn_maps, last=settings.attention_layers)
    if settings.attention_dtype == "float16":
        aff = aff.half().float()
    return aff


def score_maps(cams: Tensor, mode: str = "as_is") -> Tensor:
    """The maps boxes are taken from: ``cams`` themselves or ``minmax(clamp(cams, 0))`` (eps 1e-7)."""
    if mode == "as_is":
        return cams
    if mode == "clamp_minmax":
        return minmax_scale(cams.clamp(min=0))
    raise ValueError(f"unknown score mode {mode!r}")


def refine_with_affinity(cams: Union[Tensor, np.ndarray], affinity: Tensor, settings: CAMSettings) -> RefinedCAMs:
    """Stages 3-5 for one image: transition matrix, boxes from the score maps, propagation.

    Args:
        cams: ``(K, h, w)`` CAMs (normalised for ``score='as_is'``).
        affinity: ``(hw, hw)`` attention (or RFM) affinity.
        settings: :class:`CAMSettings`.
    """
    cams_t = torch.as_tensor(cams, dtype=torch.float32, device=affinity.device)
    score = score_maps(cams_t, settings.score)
    trans = transition_matrix(affinity.float(), rounds=settings.sinkhorn_rounds, power=settings.affinity_power)
    # boxes are numpy/scipy work on the CPU copy of the score
    masks = torch.from_numpy(cam_box_masks(score.detach().cpu().numpy(), settings.box_threshold,
                                           settings.box_edge_quirk)).to(cams_t.device)
    source = score if settings.propagate == "score" else cams_t
    refined = refine_cams(trans, source, masks)
    return RefinedCAMs(score, affinity, trans, masks, refined)


def scale_to_size(refined_lowres: Tensor, size_hw: Sequence[int], exact_resize: bool = True) -> Tensor:
    """Stage 6: min-max (eps 1e-7) at patch resolution, then bilinear to ``size_hw``.

    ``(K, h, w)`` → ``(K, H, W)`` float32 on the input's device (the official ``scale_cam_image``).
    """
    size = (int(size_hw[0]), int(size_hw[1]))
    if exact_resize:
        low = minmax_scale(refined_lowres.detach().float().cpu().numpy())
        high = resize_bilinear_like_cv2(np.ascontiguousarray(low, dtype=np.float32), size)
        return torch.from_numpy(high).to(refined_lowres.device)
    return resize_bilinear(minmax_scale(refined_lowres.detach().float()), size)


AffinityFn = Callable[[Tensor], Tensor]


def run_cam_pipeline(
    visual,
    last_input: Tensor,
    grid: tuple[int, int],
    text_features: Tensor,
    targets: TargetRows,
    logit_scale: float,
    encoder_attentions: Union[Sequence[Tensor], Tensor],
    settings: CAMSettings,
    affinity_fn: Optional[AffinityFn] = None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> CAMPipelineOutput:
    """Stages 1-5 for one image (scale with :func:`scale_to_size` at the size the method needs).

    Args:
        visual: the CLIP ViT image tower.
        last_input: ``(1, L, C)`` residual stream entering the last block.
        grid: ``(h, w)`` patch grid.
        text_features: ``(T, D)`` [the image's class rows, background rows].
        targets: per class, its text rows (synonyms).
        logit_scale: ``exp(logit_scale)`` of the CLIP.
        encoder_attentions: head-averaged ``(L, L)`` maps of the frozen blocks in block order (at
            least the last ``attention_layers - 1``); the last block's map is added from GradCAM.
        settings: :class:`CAMSettings`.
        affinity_fn: replaces :func:`attention_affinity` (``(n, L, L)`` maps → ``(hw, hw)``), e.g. RFM.
        autocast_dtype: autocast dtype for the GradCAM pass (``None`` = float32).
    """
    ctx = torch.autocast(last_input.device.type, dtype=autocast_dtype) if autocast_dtype else None
    if ctx is None:
        gc = softmax_gradcam(visual, last_input, grid, text_features, targets, logit_scale,
                             fp16_arithmetic=settings.fp16_gradcam)
    else:
        with ctx:
            gc = softmax_gradcam(visual, last_input, grid, text_features, targets, logit_scale,
                                 fp16_arithmetic=settings.fp16_gradcam)
    maps = torch.cat([torch.stack([a.reshape(a.shape[-2:]).float() for a in encoder_attentions]),
                      gc.last_attention[None].float()])
    affinity = affinity_fn(maps) if affinity_fn is not None else attention_affinity(maps, settings)
    return CAMPipelineOutput(gc, maps, refine_with_affinity(gc.cams.float(), affinity, settings))
