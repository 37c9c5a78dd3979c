"""FMA-WSSS settings: the official two stages (classification prompts -> coarse seeds,
segmentation prompts -> fine seeds) for VOC and COCO, as the official configs set them.

Everything here is data; the pipeline pieces take these values as arguments. Where the official
run chose a value with ground-truth masks (COCO's coarse alpha, checkpoints), the preset keeps the
published value and says so (``docs/fma.md``); nothing in tag2mask selects with ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from tag2mask.localization.cam_pipeline import CAMSettings, RefinedCAMs, refine_with_affinity, score_maps
from tag2mask.vocab.classes import COCO_BACKGROUND_WORDS, VOC_BACKGROUND_WORDS

__all__ = ["PromptSettings", "CAASettings", "StageSettings", "PRESETS", "preset", "cam_score", "caa_stages", "caa_refine",
           "VOC_BACKGROUND", "COCO_BACKGROUND"]

#: FMA-WSSS's named background prompts (= CLIP-ES's words: 25 on VOC, 23 on COCO)
VOC_BACKGROUND: tuple[str, ...] = VOC_BACKGROUND_WORDS
COCO_BACKGROUND: tuple[str, ...] = COCO_BACKGROUND_WORDS


@dataclass(frozen=True)
class PromptSettings:
    """CoOp prompts of one stage.

    n_ctx: context tokens; class_specific: one context per prompt; name_position: 'end'|'front';
    named_background: background prompts carry the background words (else empty names, one
    prompt per word); ctx_std / seed: initial context (string seeds as the official toolkit).
    """

    n_ctx: int = 16
    class_specific: bool = False
    name_position: str = "end"
    named_background: bool = True
    ctx_std: float = 0.015
    seed: str = "真"


@dataclass(frozen=True)
class CAASettings:
    """Class-aware attention affinity as FMA-WSSS configures it per stage.

    rounds: Sinkhorn (column, row) rounds (``n_iter``); power: matrix power (``n_iters``);
    threshold: box threshold on the score; refine: propagate the ``'score'`` (clamped, min-max
    normalised CAM) or the raw ``'cam'``; attention_layers: final attention maps averaged.
    """

    rounds: int = 1
    power: int = 2
    threshold: float = 0.4
    refine: str = "score"
    attention_layers: int = 8

    def __post_init__(self) -> None:
        if self.refine not in ("score", "cam"):
            raise ValueError(f"refine must be 'score' or 'cam', got {self.refine!r}")

    @property
    def cam_settings(self) -> CAMSettings:
        """The shared CAM pipeline's settings for this stage (official names in brackets): rounds
        (``n_iter``) -> sinkhorn_rounds, power (``n_iters``) -> affinity_power, threshold
        (``thresh``) -> box_threshold, refine (``aff_at``) -> propagate; FMA's CAMs are raw, so
        the score is ``clamp_minmax``; the attention is the saved float16 mean."""
        return CAMSettings(attention_layers=self.attention_layers, attention_dtype="float16",
                           sinkhorn_rounds=self.rounds, affinity_power=self.power, box_threshold=self.threshold,
                           score="clamp_minmax", propagate=self.refine)


@dataclass(frozen=True)
class StageSettings:
    """One prompt-training stage and the seeds made from it.

    loss_weights: contrastive loss, CAM-loss foreground term, CAM-loss background term.
    caa: None = the raw CAM is used (official COCO seg stage).
    bg_alpha: SAMS background exponent; published_alpha_grid: the official grid when it was chosen
    with ground truth (documented, never searched by tag2mask).
    """

    prompts: PromptSettings
    caa: Optional[CAASettings]
    bg_alpha: float
    loss_weights: tuple[float, float, float]
    max_iters: int
    warmup_iters: int = 500
    base_lr: float = 1e-3
    warmup_factor: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 16
    grad_accumulation: int = 1
    crop_size: int = 224
    published_alpha_grid: tuple[float, ...] = field(default_factory=tuple)


PRESETS: dict[str, dict[str, StageSettings]] = {
    "voc": {
        "cls": StageSettings(
            prompts=PromptSettings(class_specific=False, name_position="end", named_background=True,
                                   ctx_std=0.015, seed="真"),
            caa=CAASettings(rounds=1, power=2, threshold=0.4, refine="score"),
            bg_alpha=0.6, loss_weights=(1.0, 0.0, 0.0), max_iters=1800,
        ),
        "seg": StageSettings(
            # the official run loads an unpublished random context file instead of this seed
            prompts=PromptSettings(class_specific=True, name_position="front", named_background=False,
                                   ctx_std=0.0125, seed="机"),
            caa=CAASettings(rounds=1, power=2, threshold=0.5, refine="cam"),
            bg_alpha=0.7, loss_weights=(0.0, 1.0, 1.0), max_iters=17000,
        ),
    },
    "coco": {
        "cls": StageSettings(
            prompts=PromptSettings(class_specific=False, name_position="end", named_background=True,
                                   ctx_std=0.015, seed="真"),
            caa=CAASettings(rounds=1, power=2, threshold=0.6, refine="cam"),
            # official: the best of (0.3, 0.4, 0.5) against training-set ground truth (which one is
            # not published); tag2mask takes the middle value and never searches with ground truth
            bg_alpha=0.4, published_alpha_grid=(0.3, 0.4, 0.5),
            # official: 500 + 4 x 5000 iterations, checkpoint 6150 picked with GT validation
            loss_weights=(1.0, 0.0, 0.0), max_iters=20500, warmup_iters=1000, grad_accumulation=4,
        ),
        "seg": StageSettings(
            prompts=PromptSettings(class_specific=False, name_position="end", named_background=True,
                                   ctx_std=0.015, seed="真"),
            caa=None,
            # official: 75000 iterations, checkpoint 45000 picked with GT validation
            bg_alpha=1.0, loss_weights=(0.0, 1.0, 1.0), max_iters=75000, warmup_iters=1000, grad_accumulation=8,
        ),
    },
}


def preset(dataset: str, stage: str) -> StageSettings:
    """``preset('voc', 'cls')`` etc."""
    if dataset not in PRESETS or stage not in PRESETS[dataset]:
        choices = [f"{d}/{s}" for d in PRESETS for s in PRESETS[d]]
        raise ValueError(f"unknown FMA-WSSS preset {dataset}/{stage}; choose from {choices}")
    return PRESETS[dataset][stage]


def cam_score(cams: torch.Tensor) -> torch.Tensor:
    """CAM -> score: clamp at 0, per-map min-max with an absolute 1e-7 (official ``cam2score``).

    (K, h, w) -> (K, h, w). In float32 the epsilon is absorbed when a map's range is >= 2, so its
    maximum is then exactly 1.0 (which moves the box threshold by one uint8 step).
    """
    return score_maps(cams, "clamp_minmax")


def caa_stages(attention: torch.Tensor, cams: torch.Tensor, settings: CAASettings) -> RefinedCAMs:
    """FMA-WSSS's CAA through the shared CAM pipeline, with every intermediate.

    attention: (hw, hw) mean of the last ``attention_layers`` head-averaged maps without CLS (float32
    or the saved float16; it is rounded to float16 as the official code saves it).
    cams: (K, h, w) raw GradCAMs. Boxes always come from the score; ``settings.refine`` picks
    which map is propagated.
    """
    cam_settings = settings.cam_settings
    affinity = attention.float()
    if cam_settings.attention_dtype == "float16":
        affinity = affinity.half().float()
    return refine_with_affinity(cams, affinity, cam_settings)


def caa_refine(attention: torch.Tensor, cams: torch.Tensor, settings: CAASettings) -> torch.Tensor:
    """:func:`caa_stages`' refined maps: (hw, hw) attention, (K, h, w) raw CAMs -> (K, h, w) float32."""
    return caa_stages(attention, cams, settings).refined_lowres
