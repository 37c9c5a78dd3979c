"""MaskCLIP+ (Zhou, Loy, Dai; ECCV 2022): a segmentation network trained on MaskCLIP's labels, then on its own.

The paper's pipeline, as the official code runs it (``chongzhou96/MaskCLIP``, an mmseg 0.20.2 fork;
``mmseg/models/decode_heads/maskclip_plus_head.py``; spec ``maskclip_fma_clipzss.md`` §1.3):

1. **Target model.** A segmentation network (DeepLab-v2 with the ``ASPPHeadV2`` head over a
   ResNet-101 v1c; DeepLab-v3+ on Pascal Context) whose classifier is the frozen CLIP text
   embeddings ``T (K, D)``: ``logit_k = <feature, T_k>`` (dot product, features not normalised), plus
   a learnable, normalised background embedding as class 0 when the label set has a background
   (:class:`~tag2mask.models.text_head.TextEmbeddingClassifier`, ``similarity='dot'``).
2. **Unlabelled pixels.** In each training crop the pixels of the unlabelled classes become -1:
   every class in the annotation-free setting, the unseen classes in the transductive zero-shot
   setting (:data:`SETTINGS`); the masks' 255 and the crop padding stay ignored.
3. **Teacher** (:class:`MaskClipTeacher`, until ``self_train_from``). The frozen MaskCLIP labels the -1
   pixels of the **same augmented crop**: dense features (:meth:`OpenVocabSegmenter.dense_features`),
   raw cosine against the text embeddings of the unlabelled categories only, optional prompt
   denoising and key smoothing (thresholds > 0), bilinear to the label size, argmax, optional
   confidence threshold (pixels below it stay unlabelled, i.e. ignored).
4. **Self-training** (from ``self_train_from``): the target model's own argmax over the unlabelled
   classes fills the -1 pixels instead (the segmenter task's hook). The switch is a function of the
   iteration, so it survives a resume; the official code counts forward calls (evaluation included)
   and restarts the count when a run is resumed.
5. **Loss.** Softmax cross-entropy, ignore 255. mmseg 0.20.2 divides the sum by *all* pixels, ignored
   ones included: the ``maskclip+`` recipe turns on the networks' ``loss_average_over_ignored`` compat
   switch (``--model-option loss_average_over_ignored=false`` gives the mean over labelled pixels).

Everything trains on the one training engine through :class:`~tag2mask.segmenter.task.SegmenterTask`;
this module supplies the network factory (text head), the teacher factory and the recipe
(:func:`maskclip_plus_config`). Official details kept on purpose: the teacher sees the student's
ImageNet-normalised, photometrically distorted crop (bottom/right zero padding included); with
MaskCLIP's numerics a ViT teacher uses LayerNorm eps 1e-6 and erf GELU; the self-training labels
come from the network in training mode (batch statistics). Differences, documented in
``docs/segmenter.md``: the confidence threshold only touches the pixels the teacher labels (the
official code also drops *labelled* pixels below it; no shipped config uses it), and mmseg's
``RandomCrop(cat_max_ratio=0.75)`` re-draws are not reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from tag2mask.methods.ovss.maskclip_refine import key_smooth, prompt_denoise
from tag2mask.segmenter.task import UNLABELED, SegmenterConfig, fill_unlabeled, segmenter_config
from tag2mask.vocab.vocabulary import Vocabulary

__all__ = ["SEGMENTER_RECIPES", "MaskClipPlusSetting", "SETTINGS", "SETTING_NAMES", "maskclip_plus_config",
           "MaskClipTeacher",
           "MaskClipPlus", "vocabulary_to_dict", "vocabulary_from_dict"]

#: recipe name -> SegmenterConfig fields; ``maskclip+:SETTING`` adds a :data:`SETTINGS` entry (docs/segmenter.md)
SEGMENTER_RECIPES: dict[str, dict[str, Any]] = {
    # MaskCLIP+ (configs/maskclip_plus, mmseg 0.20.2): DeepLab-v2 with ASPPHeadV2 (conv+BN+ReLU branches to
    # the text dim, summed) over ResNet-101 v1c (stride 8, contract_dilation, BN trained, SyncBN on several
    # GPUs), classified by the frozen text embeddings (dot product); SGD lr 0.01 on every parameter, weight
    # decay 5e-4 on every parameter, poly 0.9 with mmcv's floor 1e-4, batch 4 x 4 GPUs; Resize to fit
    # (2048, 512) x U(0.5, 2), crop 512, flip, PhotoMetricDistortion; CE divided by all pixels (mmseg 0.20).
    # maskclip_plus_config (below) adds the data set settings (splits, schedules) and the teacher.
    "maskclip+": dict(
        model="deeplab-v2",
        model_options={"aspp": "bn", "norm_eval": False, "backbone_style": "v1c", "contract_dilation": True,
                       "loss_average_over_ignored": True, "text_head": {"similarity": "dot"}},
        crop_size=512, scales=(), scale_range=(0.5, 2.0), reference_size=(2048, 512), hflip=True, photometric=True,
        batch_size=16, max_iters=2000, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4,
        head_lr_mult=1.0, head_bias_lr_mult=1.0, head_bias_weight_decay=True, poly_power=0.9, lr_step=1, min_lr=1e-4,
        sync_bn=True, test_mode="whole", test_scales=(1.0,), test_flip=False, test_reference_size=(2048, 512),
    ),
}

# the unseen classes of the transductive zero-shot splits (label values of the official configs)
_VOC20_UNSEEN = (15, 16, 17, 18, 19)  # potted plant, sheep, sofa, train, tv monitor (background ignored)
_VOC21_UNSEEN = (16, 17, 18, 19, 20)  # the same five, label 0 = background
_STUFF_UNSEEN = (19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160)
_CONTEXT60_UNSEEN = (20, 34, 49, 15, 8, 25, 7, 55, 32, 1)


@dataclass(frozen=True)
class MaskClipPlusSetting:
    """One named MaskCLIP+ setting (``--preset maskclip+:<name>``).

    Attributes:
        name, description: what ``--help`` and the docs show.
        classes: vocabulary the setting pins (``voc-maskclip``) or ``None`` (``--classes``).
        num_classes: number of classes (without background) the class list must have, or ``None``.
        background: label 0 is background (a learned embedding in the network; the teacher labels it
            only when it is unlabelled, which needs background words). ``None``: from the class list.
        reduce_zero_label: masks in the VOC layout whose background is ignored (VOC-20, Context-59).
        unseen: label values hidden from training (transductive zero-shot); ``None``: every class
            (annotation-free).
        uses_masks: the masks are read (ignore regions, seen classes); ``False``: images only.
        recipe: :class:`SegmenterConfig` fields on top of the ``maskclip+`` recipe.
    """

    name: str
    description: str
    classes: Optional[str] = None
    num_classes: Optional[int] = None
    background: Optional[bool] = None
    reduce_zero_label: bool = False
    unseen: Optional[tuple[int, ...]] = None
    uses_masks: bool = True
    recipe: dict = field(default_factory=dict)


_VOC = dict(reference_size=(2048, 512), test_reference_size=(2048, 512), crop_size=512)
_CONTEXT = dict(reference_size=(520, 520), test_reference_size=(520, 520), crop_size=480)

#: the official configs (``configs/maskclip_plus/{anno_free,zero_shot}``) and the label-free default
SETTINGS: dict[str, MaskClipPlusSetting] = {s.name: s for s in (
    MaskClipPlusSetting(
        "annotation-free", "images only: the teacher labels every pixel (background via background words)",
        uses_masks=False, recipe=dict(max_iters=2000)),
    MaskClipPlusSetting(
        "voc20", "annotation-free on VOC-20: ground-truth background ignored, the 20 classes from the teacher, 2k its",
        classes="voc-maskclip", num_classes=20, background=False, reduce_zero_label=True, recipe=dict(max_iters=2000, **_VOC)),
    MaskClipPlusSetting(
        "context59", "annotation-free on Pascal Context-59 (background ignored), 4k its, crop 480",
        num_classes=59, background=False, reduce_zero_label=True, recipe=dict(max_iters=4000, **_CONTEXT)),
    MaskClipPlusSetting(
        "coco-stuff", "annotation-free on COCO-Stuff-171, 8k its",
        num_classes=171, background=False, recipe=dict(max_iters=8000, **_VOC)),
    MaskClipPlusSetting(
        "voc20-zs", "zero-shot VOC-20: unseen potted plant, sheep, sofa, train, tv monitor; 20k its, self-training "
                    "from the 2000th", classes="voc-maskclip", num_classes=20, background=False, reduce_zero_label=True,
        unseen=_VOC20_UNSEEN, recipe=dict(max_iters=20000, self_train_from=1999, **_VOC)),
    MaskClipPlusSetting(
        "voc21-zs", "zero-shot VOC-21 (learned background): the same five unseen; 20k its, self-training from the "
                    "2000th", classes="voc-maskclip", num_classes=20, background=True, unseen=_VOC21_UNSEEN,
        recipe=dict(max_iters=20000, self_train_from=1999, **_VOC)),
    MaskClipPlusSetting(
        "coco-stuff-zs", "zero-shot COCO-Stuff-171: 15 unseen (ZegCLIP's split); 80k its, self-training from the 8000th",
        num_classes=171, background=False, unseen=_STUFF_UNSEEN,
        recipe=dict(max_iters=80000, self_train_from=7999, **_VOC)),
    MaskClipPlusSetting(
        "context60-zs", "zero-shot Pascal Context-60 (learned background), DeepLab-v3+: 10 unseen; 40k its, "
                        "self-training from the 4000th, lr 0.004, weight decay 1e-4",
        num_classes=59, background=True, unseen=_CONTEXT60_UNSEEN,
        recipe=dict(max_iters=40000, self_train_from=3999, lr=0.004, weight_decay=1e-4, model="deeplab-v3plus",
                    model_options={"dropout": 0.0, "contract_dilation": True, "norm_eval": False}, **_CONTEXT)),
)}
SETTING_NAMES = tuple(SETTINGS)

#: what the teacher's settings hold besides the vocabulary (SegmenterConfig.teacher)
_TEACHER_DEFAULTS = {"method": "maskclip", "preset": "published", "templates": None, "prompt_denoising": 0.0,
                     "key_smoothing": 0.0, "ks_paper_form": False, "confidence": 0.0}


def vocabulary_to_dict(vocab: Vocabulary) -> dict[str, Any]:
    """A :class:`Vocabulary` as plain JSON (stored in the recipe, so a resumed run prompts the same)."""
    return {"names": list(vocab.names), "synonyms": [list(s) for s in vocab.synonyms],
            "background": list(vocab.background), "mode": vocab.mode,
            "allow_background_overlap": vocab.allow_background_overlap}


def vocabulary_from_dict(d: dict[str, Any]) -> Vocabulary:
    return Vocabulary(tuple(d["names"]), tuple(tuple(s) for s in d["synonyms"]), tuple(d.get("background", ())),
                      d.get("mode", "max"), bool(d.get("allow_background_overlap", False)))


def maskclip_plus_config(
    setting: str = "annotation-free",
    vocabulary: Optional[Vocabulary] = None,
    *,
    background: Optional[bool] = None,
    unseen: Optional[Sequence[Union[int, str]]] = None,
    clip_weights: Optional[str] = None,
    clip_fingerprint: Optional[str] = None,
    teacher: Optional[dict[str, Any]] = None,
    **overrides: Any,
) -> SegmenterConfig:
    """The :class:`SegmenterConfig` of a MaskCLIP+ run: the ``maskclip+`` recipe, the setting, then ``overrides``.

    Args:
        setting: one of :data:`SETTINGS`.
        vocabulary: the classes (and background words); ``None``: the setting's (``voc-maskclip``).
        background: label 0 is background; ``None``: the setting's, else whether the vocabulary has
            background words.
        unseen: a custom zero-shot split for the ``annotation-free`` setting (class names or label
            values): only these classes are unlabelled and taught; the others are read from the masks.
        clip_weights, clip_fingerprint: the teacher's CLIP (recorded; a resume checks the fingerprint).
        teacher: teacher settings (``preset``, ``templates``, ``prompt_denoising``, ``key_smoothing``,
            ``ks_paper_form``, ``confidence``) over the defaults (MaskCLIP's published numerics).
        **overrides: any :class:`SegmenterConfig` field (``max_iters``, ``lr``, ``model_options``, ...).
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown MaskCLIP+ setting {setting!r}; choose from {list(SETTINGS)}")
    s = SETTINGS[setting]
    if vocabulary is None:
        if s.classes is None:
            raise ValueError(f"maskclip+:{setting} needs the class names (--classes)")
        from tag2mask.vocab.vocabulary import get_vocabulary

        vocabulary = get_vocabulary(s.classes)
    if s.num_classes is not None and len(vocabulary) != s.num_classes:
        raise ValueError(f"maskclip+:{setting} has {s.num_classes} classes (without background), the class list gives "
                         f"{len(vocabulary)}")
    bg = s.background if s.background is not None else (background if background is not None else bool(vocabulary.background))
    if background is not None and s.background is not None and background != s.background:
        raise ValueError(f"maskclip+:{setting} {'has' if s.background else 'has no'} background class")
    num_labels = len(vocabulary) + int(bg)
    if unseen is not None:
        if s.unseen is not None or s.name != "annotation-free":
            raise ValueError(f"maskclip+:{setting} fixes its split; a custom unseen list needs maskclip+ (annotation-free)")
        hidden = tuple(sorted({_label_of(u, vocabulary, bg) for u in unseen}))
    elif s.unseen is not None:
        hidden = s.unseen
    else:
        hidden = tuple(range(num_labels))
    recipe = {k: v for k, v in s.recipe.items() if k != "model_options"}
    model = overrides.pop("model", recipe.pop("model", "deeplab-v2"))
    if model == "deeplab-v2":
        options = dict(SEGMENTER_RECIPES["maskclip+"]["model_options"])
    else:  # another network keeps the recipe's loss and head; the setting's network options are for its own
        options = {"loss_average_over_ignored": True, "text_head": {"similarity": "dot"}}
        if model.startswith("deeplab"):
            options["backbone_style"] = "v1c"
    if model == s.recipe.get("model", "deeplab-v2"):
        options.update(s.recipe.get("model_options", {}))
    options.update(overrides.pop("model_options", None) or {})
    teacher_settings = {**_TEACHER_DEFAULTS, **(teacher or {})}
    unknown = sorted(set(teacher_settings) - set(_TEACHER_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown teacher settings {unknown}; valid: {sorted(_TEACHER_DEFAULTS)}")
    teacher_settings.update(vocabulary=vocabulary_to_dict(vocabulary), clip_weights=clip_weights,
                            clip_fingerprint=clip_fingerprint, setting=setting)
    config = segmenter_config(
        SEGMENTER_RECIPES["maskclip+"], **{**recipe, **overrides}, model=model, classes=tuple(vocabulary.names), background=bg,
        reduce_zero_label=s.reduce_zero_label, unlabeled_classes=hidden, teacher=teacher_settings,
    )
    config.model_options = options  # not merged with the DeepLab-v2 options of the base recipe
    return config


def _label_of(item: Union[int, str], vocab: Vocabulary, background: bool) -> int:
    if isinstance(item, int) or (isinstance(item, str) and item.strip().isdigit()):
        value = int(item)
        if not 0 <= value < len(vocab) + int(background):
            raise ValueError(f"unseen label {value} is not a label value 0..{len(vocab) + int(background) - 1}")
        return value
    if background and item.strip().lower() == "background":
        return 0
    try:
        return vocab.index_of(item) + int(background)
    except KeyError as exc:
        raise ValueError(str(exc.args[0])) from None


class MaskClipTeacher:
    """The frozen MaskCLIP that labels the unlabelled pixels of a training crop (official ``assign_label``).

    ``teacher(images, target, iteration) -> target``: ``images`` are the student's normalised crops
    ``(B, 3, S, S)``, ``target (B, S, S)`` int64 with -1 where a label is wanted. Only those pixels
    change: they get the category (a label value of ``categories``) with the largest raw cosine between
    the teacher's dense feature and the category's text embedding (max over the category's prompts
    when it has synonyms), after optional prompt denoising / key smoothing at feature resolution and
    a bilinear resize to the label size; below ``confidence`` they stay -1.

    Args:
        segmenter: the MaskCLIP :class:`~tag2mask.methods.ovss.segmenter.OpenVocabSegmenter`
            (its image numerics and text embeddings).
        categories: label values the teacher may assign.
        student_normalization: mean/std (on 0..1 RGB) of ``images``; re-normalised to the teacher's
            when they differ.
        background: label 0 of the targets is background (the segmenter's background words label it).
    """

    def __init__(self, segmenter: Any, categories: Sequence[int], student_normalization: Any, background: bool, *,
                 prompt_denoising: float = 0.0, key_smoothing: float = 0.0, ks_paper_form: bool = False,
                 confidence: float = 0.0) -> None:
        self.segmenter = segmenter
        self.prompt_denoising, self.key_smoothing = float(prompt_denoising), float(key_smoothing)
        self.ks_paper_form, self.confidence = bool(ks_paper_form), float(confidence)
        device = segmenter.device
        labels = segmenter.prompt_label.to(device)
        if segmenter.has_background:  # rows of background words
            row_label = torch.where(labels == 0, torch.full_like(labels, 0 if background else -1),
                                    labels - 1 + int(background))
        else:
            row_label = labels + int(background)
        cats = sorted({int(c) for c in categories})
        rows = torch.nonzero(torch.isin(row_label, torch.tensor(cats, device=device))).flatten()
        missing = sorted(set(cats) - set(row_label[rows].tolist()))
        if missing:
            what = "background (label 0) needs background words" if missing == [0] and background else \
                f"labels {missing} have no prompt"
            raise ValueError(f"the MaskCLIP teacher cannot label {what}")
        self.categories = torch.tensor(cats, dtype=torch.int64, device=device)
        self.text = segmenter.text[rows]  # (R, D) unit rows
        # category index of each row (0..len(cats)-1)
        self.row_category = torch.searchsorted(self.categories, row_label[rows])
        mean = torch.tensor(student_normalization.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(student_normalization.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        same = torch.allclose(mean * 255.0, segmenter._mean, atol=1e-3) and torch.allclose(std * 255.0, segmenter._std, atol=1e-3)
        self._renorm = None if same else (mean, std)

    @property
    def device(self) -> torch.device:
        return self.segmenter.device

    def teacher_input(self, images: torch.Tensor) -> torch.Tensor:
        """The student's normalised crops in the teacher's normalisation (unchanged when they agree)."""
        images = images.to(self.device, torch.float32)
        if self._renorm is None:
            return images
        mean, std = self._renorm
        return ((images * std + mean) * 255.0 - self.segmenter._mean) / self.segmenter._std

    @torch.no_grad()
    def category_scores(self, images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``(B, len(categories), *size)`` float32 teacher scores (raw cosine, or PD/KS output) at label size."""
        feats, keys = self.segmenter.dense_features(self.teacher_input(images), with_keys=self.key_smoothing > 0)
        n, _, gh, gw = feats.shape
        logits = (feats.flatten(2).transpose(1, 2) @ self.text.T).transpose(1, 2).reshape(n, -1, gh, gw)
        if self.prompt_denoising > 0:
            logits = prompt_denoise(logits, self.prompt_denoising)
        if self.key_smoothing > 0:
            logits = key_smooth(logits, keys, self.key_smoothing, paper_form=self.ks_paper_form)
        # the feature grid (of the padded input) is stretched over the label, as mmseg's resize does
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        if logits.shape[1] == self.categories.numel() and bool(
                (self.row_category == torch.arange(self.categories.numel(), device=self.device)).all()):
            return logits
        index = self.row_category.view(1, -1, 1, 1).expand_as(logits)
        out = logits.new_full((n, self.categories.numel(), *logits.shape[-2:]), float("-inf"))
        return out.scatter_reduce(1, index, logits, "amax")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, target: torch.Tensor, iteration: int) -> torch.Tensor:
        unlabeled = target == UNLABELED
        if not bool(unlabeled.any()):
            return target
        scores = self.category_scores(images, target.shape[-2:])
        best, index = scores.max(dim=1)
        labels = self.categories[index].to(target.device)
        if self.confidence > 0:
            labels = torch.where(best.to(target.device) < self.confidence, torch.full_like(labels, UNLABELED), labels)
        return fill_unlabeled(target, labels)


class MaskClipPlus:
    """The network factory and the teacher factory of a MaskCLIP+ run, over one loaded CLIP.

    ``SegmenterTask(config, source, model_factory=mcp.network, teacher_factory=mcp.teacher)``; both
    read the recipe they are given (after a resume: the stored one). The network's text embeddings
    are the teacher's (same templates), one per class (the normalised mean over a class's synonyms).

    Args:
        clip: a loaded :class:`~tag2mask.clip.model.CLIP` (ViT or ResNet); shared with a ``clip-decoder``
            network when that is the student.
        text_cache: text-embedding cache folder (``None`` default, ``False`` off).
    """

    def __init__(self, clip: nn.Module, text_cache: Any = None) -> None:
        self.clip = clip
        self.text_cache = text_cache

    def _check(self, config: SegmenterConfig) -> dict[str, Any]:
        t = config.teacher
        if t.get("method", "maskclip") != "maskclip" or "vocabulary" not in t:
            raise ValueError("this recipe has no MaskCLIP teacher settings (build it with maskclip_plus_config)")
        want, have = t.get("clip_fingerprint"), getattr(self.clip, "fingerprint", None)
        if want and have and want != have:
            raise ValueError(f"the CLIP weights given ({getattr(self.clip, 'source_path', '?')}, fingerprint {have}) are "
                             f"not the teacher this run was started with ({t.get('clip_weights')}, {want})")
        return t

    def _templates(self, t: dict[str, Any]) -> Any:
        from tag2mask.methods.ovss.presets import get_preset

        return t.get("templates") or get_preset("maskclip", t.get("preset", "published")).templates

    def class_embeddings(self, config: SegmenterConfig, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """``(K, D)`` float32: one L2-normalised text embedding per class (mean over its prompts)."""
        from tag2mask.clip.text_embed import embed_vocabulary

        t = self._check(config)
        vocab = vocabulary_from_dict(t["vocabulary"])
        fg, _ = embed_vocabulary(self.clip, vocab.with_background(()), self._templates(t), self.text_cache,
                                 device=device)
        feats, index = fg.features.float(), fg.class_index.to(fg.features.device)
        sums = feats.new_zeros(fg.num_classes, feats.shape[1]).index_add_(0, index, feats)
        return F.normalize(sums, dim=-1).cpu()

    def network(self, config: SegmenterConfig) -> nn.Module:
        """The target model: ``config.model`` with a dot-product text head over the class embeddings."""
        from tag2mask.models import build_segmenter

        text = self.class_embeddings(config)
        options = dict(config.model_options)
        head = dict(options.get("text_head") or {})
        head.setdefault("similarity", "dot")
        head["learned_background"] = bool(config.background)
        options["text_head"] = head
        dim = int(text.shape[1])
        if config.model == "deeplab-v2" and options.get("aspp", "sum") == "bn":
            options.setdefault("aspp_channels", dim)  # ASPPHeadV2 outputs the text dim
        elif config.model == "deeplab-v3plus":
            options.setdefault("channels", dim)
        extra = {"clip_model": self.clip} if config.model == "clip-decoder" and "clip_weights" not in options else {}
        return build_segmenter(config.model, config.num_classes, text_embeddings=text, **extra, **options)

    def teacher(self, config: SegmenterConfig, ctx: Any, model: nn.Module) -> MaskClipTeacher:
        """The frozen MaskCLIP teacher on the run's device, for ``model``'s input normalisation."""
        from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter

        t = self._check(config)
        segmenter = OpenVocabSegmenter(
            self.clip, vocabulary_from_dict(t["vocabulary"]), "maskclip", preset=t.get("preset", "published"),
            templates=t.get("templates"), prob_threshold=0.0, area_threshold=None, pamr=False, mode="whole",
            device=ctx.device, text_cache=self.text_cache,
        )
        return MaskClipTeacher(segmenter, config.unlabeled_classes, model.normalization, config.background,
                               prompt_denoising=t.get("prompt_denoising", 0.0), key_smoothing=t.get("key_smoothing", 0.0),
                               ks_paper_form=t.get("ks_paper_form", False), confidence=t.get("confidence", 0.0))
