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

__all__ = ["PromptSettings", "CAASettings", "AugmentSettings", "StageSettings", "PRESETS", "preset", "cam_score", "caa_stages", "caa_refine",
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
class AugmentSettings:
    """Training augmentation (official ``VOC2Auger`` with ``rand_range``), in this order: colour
    jitter; rescale so that the long side is a random integer in ``long_side`` unless the short side
    would then fall below ``short_side_min`` (then the short side becomes ``short_side_min``), PIL
    bicubic; a random ``crop`` x ``crop`` window; horizontal flip with p = 0.5; CLIP normalisation."""

    long_side: tuple[int, int] = (288, 480)
    short_side_min: int = 224
    crop: int = 224
    color_jitter: bool = True
    hflip: bool = True

    def __post_init__(self) -> None:
        lo, hi = self.long_side
        if not 0 < lo <= hi or self.short_side_min < self.crop or self.crop < 1:
            raise ValueError(f"need 0 < long_side[0] <= long_side[1] and short_side_min >= crop, got "
                             f"{self.long_side}, {self.short_side_min}, {self.crop}")


@dataclass(frozen=True)
class StageSettings:
    """One prompt-training stage and the seeds made from it.

    loss_weights: contrastive loss, CAM-loss foreground term, CAM-loss background term.
    caa: None = the raw CAM is used (official COCO seg stage).
    bg_alpha: SAMS background exponent; published_alpha_grid: the official grid when it was chosen
    with ground truth (documented, never searched by tag2mask).
    batch_size: images per optimiser step; grad_accumulation: split into that many sub-batches
        (official ``sub_iter_num``: the loss of each is divided by it).
    labels_from_crop: positives of a training crop = the classes present in its cropped seed
        (official ``ol_cls_lb``, VOC segmentation stage); else the image-level labels.
    label_source: image-level labels from the data set's ground-truth masks (``gt_mask``: the
        official ``seg_cls_labels``) or from its annotations / label file (``dataset``).
    numerics: key of :data:`tag2mask.clip.numerics.NUMERICS` the CLIP runs with.
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
    augment: AugmentSettings = AugmentSettings()
    labels_from_crop: bool = False
    label_source: str = "gt_mask"
    numerics: str = "fma"
    published_alpha_grid: tuple[float, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.label_source not in ("gt_mask", "dataset"):
            raise ValueError(f"label_source must be 'gt_mask' or 'dataset', got {self.label_source!r}")
        if not 0 <= self.warmup_iters < self.max_iters:
            raise ValueError(f"need 0 <= warmup iterations ({self.warmup_iters}) < iterations ({self.max_iters})")
        if self.batch_size < 1 or self.grad_accumulation < 1 or self.batch_size % self.grad_accumulation:
            raise ValueError(f"batch_size {self.batch_size} must be a positive multiple of grad_accumulation "
                             f"{self.grad_accumulation}")

    @property
    def crop_size(self) -> int:
        return self.augment.crop


#: COCO's scale range: long side from round(224 * 1.42) up to that x 5/3 (cls) or x 1.67 (seg)
_COCO_CLS_AUG = AugmentSettings(long_side=(318, 530), short_side_min=224, crop=224)
_COCO_SEG_AUG = AugmentSettings(long_side=(318, 531), short_side_min=224, crop=224)

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
            bg_alpha=0.7, loss_weights=(0.0, 1.0, 1.0), max_iters=17000, labels_from_crop=True,
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
            augment=_COCO_CLS_AUG,
        ),
        "seg": StageSettings(
            prompts=PromptSettings(class_specific=False, name_position="end", named_background=True,
                                   ctx_std=0.015, seed="真"),
            caa=None,
            # official: 75000 iterations, checkpoint 45000 picked with GT validation; image-level
            # labels, not the crop's seed classes ("prevents all-background errors")
            bg_alpha=1.0, loss_weights=(0.0, 1.0, 1.0), max_iters=75000, warmup_iters=1000, grad_accumulation=8,
            augment=_COCO_SEG_AUG,
        ),
    },
    # the shipped tiny CLIP's synthetic world (float32 model, 224 px scenes, 6 stuff words as named
    # background); a CPU-sized schedule, the rest as VOC (docs/fma.md, docs/benchmarks.md)
    "synth": {
        "cls": StageSettings(
            prompts=PromptSettings(class_specific=False, name_position="end", named_background=True,
                                   ctx_std=0.015, seed="真"),
            caa=CAASettings(rounds=1, power=2, threshold=0.4, refine="score"),
            bg_alpha=0.6, loss_weights=(1.0, 0.0, 0.0), max_iters=300, warmup_iters=50, batch_size=8,
            augment=AugmentSettings(long_side=(224, 320), short_side_min=224, crop=224),
            label_source="dataset", numerics="float32",
        ),
        "seg": StageSettings(
            prompts=PromptSettings(class_specific=True, name_position="front", named_background=False,
                                   ctx_std=0.0125, seed="机"),
            caa=CAASettings(rounds=1, power=2, threshold=0.5, refine="cam"),
            bg_alpha=0.7, loss_weights=(0.0, 1.0, 1.0), max_iters=300, warmup_iters=50, batch_size=8,
            augment=AugmentSettings(long_side=(224, 320), short_side_min=224, crop=224),
            labels_from_crop=True, label_source="dataset", numerics="float32",
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
