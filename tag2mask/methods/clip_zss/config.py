"""CLIP-ZSS settings: every value the paper leaves open is a named field marked in :data:`ASSUMED`.

The method has no official code and the paper's full text was not available to us (only the
abstracts and a third-party summary with the equations, see ``docs/clip_zss.md``). What is known:
the structure (GLM with a CLS bank, PLM with multi-scale K-means seeded by sliding-window means,
mask fusion by cosine similarity, a transformer-decoder synthesizer with region centroids as queries
and CLIP's CLS as keys/values, the combined prediction ``[α·RᵀT_seen, β·cos(R, P_pseudo)]``) and
the loss terms (InfoNCE, ZegCLIP's non-mutually-exclusive loss, CE, BCE). ZegCLIP's loss constants
(focal ×100 with α=0.25, γ=2, dice ×1, ignored pixels negative for every class) are read from its
code. Everything else is listed in :data:`ASSUMED` with the reason for the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tag2mask.config import DictConfig

__all__ = ["ClipZssConfig", "ASSUMED", "FROM_ZEGCLIP_CODE", "CLIP_ZSS_PRESETS", "PRESET_OF_SPLIT"]


@dataclass
class ClipZssConfig(DictConfig):
    """The CLIP-ZSS part of a run's recipe (the student's data / optimiser part is a ``SegmenterConfig``).

    Classes: ``unseen`` names classes of the data set whose pixels are ignored in training and whose
    names are never embedded before training ends. ``background``: ``class`` (label 0 is a seen class
    with a learned embedding), ``ignore`` (label 0 is ignored in training and scoring, ZegCLIP's
    VOC-20 / Context-59 protocol), ``none`` (no background label; COCO-Stuff).

    Ablations: ``use_glm=False`` drops the global module; ``use_plm=False`` drops pseudo-labels and the
    synthesizer (the pixel losses then see the seen classes only); both off with ``nel_weight=0`` is
    the plain seen-class cross-entropy baseline.
    """

    split: Optional[str] = None
    unseen: tuple[str, ...] = ()
    background: str = "class"
    templates: str = "photo"
    # teacher (frozen CLIP)
    teacher_dense: str = "maskclip"
    teacher_size: Optional[int] = None
    # GLM
    use_glm: bool = True
    glm_weight: float = 1.0
    glm_temperature: float = 0.07
    glm_bank_size: int = 1024
    glm_attention_scale: Optional[float] = None
    # PLM: pseudo-labels
    use_plm: bool = True
    kmeans_windows: tuple[float, ...] = (0.25, 0.5)
    kmeans_iters: int = 10
    fusion_threshold: float = 0.85
    max_regions: int = 8
    min_region_fraction: float = 0.005
    # PLM: synthesizer
    synth_depth: int = 2
    synth_heads: int = 8
    synth_ffn_mult: int = 4
    synth_memory: str = "cls"
    synth_lr_mult: Optional[float] = None
    # combined prediction and losses
    alpha: Optional[float] = None
    beta: float = 1.0 / 0.07
    ce_weight: float = 1.0
    nel_weight: float = 1.0
    focal_weight: float = 100.0
    dice_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    bce_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.background not in ("class", "ignore", "none"):
            raise ValueError(f"background must be class, ignore or none, got {self.background!r}")
        if self.teacher_dense not in ("maskclip", "last"):
            raise ValueError(f"teacher_dense must be 'maskclip' or 'last', got {self.teacher_dense!r}")
        if self.synth_memory not in ("cls", "cls+dense"):
            raise ValueError(f"synth_memory must be 'cls' or 'cls+dense', got {self.synth_memory!r}")
        if not self.kmeans_windows or any(not 0 < w <= 1 for w in self.kmeans_windows):
            raise ValueError(f"kmeans_windows are fractions of the token grid in (0, 1], got {self.kmeans_windows}")
        if self.glm_temperature <= 0 or self.glm_bank_size < 0 or self.max_regions < 1 or self.kmeans_iters < 0:
            raise ValueError("glm_temperature must be > 0, glm_bank_size >= 0, max_regions >= 1, kmeans_iters >= 0")
        if not -1.0 <= self.fusion_threshold <= 1.0:
            raise ValueError(f"fusion_threshold is a cosine similarity in [-1, 1], got {self.fusion_threshold}")



#: field -> why its default was chosen (none of these is stated in what we could read of the paper)
ASSUMED: dict[str, str] = {
    "templates": "single template 'a photo of a {}.' (the spec allows single- or 85-template embeddings)",
    "teacher_dense": "MaskCLIP's value-path tokens of the last block (raw last-layer tokens are spatially noisy)",
    "teacher_size": "the teacher sees the training crop at its own size",
    "glm_weight": "all loss weights 1 (the paper lists the terms, not their weights)",
    "glm_temperature": "0.07, CLIP's initial temperature",
    "glm_bank_size": "1024 past CLS embeddings, first in first out, shared by all processes",
    "glm_attention_scale": "1/sqrt(D) on unnormalised features, as the summary's formula softmax(S·R/sqrt(C))",
    "kmeans_windows": "square windows of 1/4 and 1/2 of the token grid, stride = window",
    "kmeans_iters": "10 spherical K-means iterations (cosine distance) per scale",
    "fusion_threshold": "seeds merge above cosine 0.85; overlaps of merged masks go to the most similar fused centroid",
    "max_regions": "at most 8 potential categories per image (largest first)",
    "min_region_fraction": "a region must cover 0.5 % of the crop inside the ignored area",
    "synth_depth": "2 decoder layers",
    "synth_heads": "8 heads (the joint dimension must divide by it)",
    "synth_ffn_mult": "feed-forward width 4 x D",
    "synth_memory": "keys/values = the CLS embedding only ('cls+dense' adds the dense tokens)",
    "synth_lr_mult": "the synthesizer learns at the student head's learning rate",
    "alpha": "the student head's logit scale (1/0.07, cosine)",
    "beta": "1/0.07, the same scale for the pseudo logits",
    "ce_weight": "1",
    "nel_weight": "1 (inside it, ZegCLIP's focal x100 + dice x1)",
    "bce_weight": "1; BCE of scale·cos(P_seen, T) against one-hot targets over the seen classes",
}

#: fields whose defaults come from ZegCLIP's code (the NEL loss CLIP-ZSS cites)
FROM_ZEGCLIP_CODE: dict[str, str] = {
    "focal_weight": "SegLossPlus(mask_weight=100.0) in ZegCLIP's configs",
    "dice_weight": "SegLossPlus(dice_weight=1.0)",
    "focal_alpha": "sigmoid_focal_loss(alpha=0.25)",
    "focal_gamma": "sigmoid_focal_loss(gamma=2)",
}


# The student's recipe is a SegmenterConfig (tag2mask.segmenter.task). The paper's student
# optimiser is not known to us: the benchmark presets use mmseg's SegFormer recipe (AdamW 6e-5,
# weight decay 0.01, head x10, linear warm-up 1500 iterations, poly power 1) on ZegCLIP's protocol
# (512 crops of images scaled to 2048x512 x U(0.5, 2), photometric jitter, batch 16, VOC 20k / COCO-Stuff
# 80k iterations, sliding-window test 512 / 426). Marked "assumed" in docs/clip_zss.md.
_ZEGCLIP_PROTOCOL: dict[str, Any] = dict(
    model="segformer", model_options={"variant": "b2"}, crop_size=512, scales=(), scale_range=(0.5, 2.0),
    reference_size=(2048, 512), hflip=True, photometric=True, batch_size=16, optimizer="adamw", lr=6e-5,
    weight_decay=0.01, betas=(0.9, 0.999), head_lr_mult=10.0, head_bias_lr_mult=10.0, head_bias_weight_decay=True,
    poly_power=1.0, lr_step=1, warmup_iters=1500, warmup_ratio=1e-6, min_lr=0.0,
    test_mode="slide", test_crop=512, test_stride=426, test_scales=(1.0,), test_flip=False,
)

#: ``--preset`` name -> the named split, the student's recipe (SegmenterConfig fields) and ClipZssConfig fields
CLIP_ZSS_PRESETS: dict[str, dict[str, Any]] = {
    "voc": {"split": "voc-15-5", "segmenter": {**_ZEGCLIP_PROTOCOL, "max_iters": 20000}, "zss": {}},
    "coco-stuff": {"split": "coco-stuff-156-15", "segmenter": {**_ZEGCLIP_PROTOCOL, "max_iters": 80000}, "zss": {}},
    "context": {"split": "context-49-10", "segmenter": {**_ZEGCLIP_PROTOCOL, "max_iters": 40000}, "zss": {}},
    # CPU-sized: a SegFormer-b0 from scratch on 128 px synthetic scenes, the shipped tiny CLIP as teacher
    "synth": {"split": "synth-9-3",
              "segmenter": dict(model="segformer", model_options={"variant": "b0"}, crop_size=128, scales=(),
                                scale_range=(0.75, 1.5), hflip=True, photometric=False, batch_size=8, max_iters=600,
                                optimizer="adamw", lr=6e-4, weight_decay=0.01, head_lr_mult=1.0, head_bias_lr_mult=1.0,
                                head_bias_weight_decay=True, poly_power=1.0, lr_step=1, warmup_iters=50,
                                test_mode="whole", test_scales=(1.0,), test_flip=False),
              "zss": {"glm_bank_size": 64}},
}

#: the split each preset trains on, and the preset a split name selects by default
PRESET_OF_SPLIT: dict[str, str] = {p["split"]: name for name, p in CLIP_ZSS_PRESETS.items()}
