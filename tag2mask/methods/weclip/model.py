"""WeCLIP (Zhang et al., CVPR 2024): frozen CLIP + light decoder trained on its own online pseudo labels.

One training step, as the official ``WeCLIP.forward`` composes it:

1. frozen CLIP blocks 1..L-1 (no grad) on the crop batch → their outputs (decoder input) and
   head-averaged attention maps;
2. decoder (:mod:`.decoder`) → stride-16 segmentation logits and the affinity ``sigmoid(F_uᵀF_u)``;
3. online pseudo label, per image over *its own* image-level classes:
   softmax-GradCAM on the last block against [own classes + background words]
   (:mod:`tag2mask.localization.gradcam`, shared with CLIP-ES) →
   affinity = CAA (mean of the last 8 maps) before the RFM switch, RFM (kept maps of the last
   6 / 10 ⊙ decoder affinity) after it (:mod:`.rfm`) → transition matrix, box masks, propagation →
   min-max at patch resolution, bilinear to the crop → ``bg = (1 - max)^1`` → PAR (20 iterations,
   dilations 1..24) on the normalised crop → ``[0, keys + 1][argmax]``;
4. losses (:mod:`.losses`): balanced CE + 0.1 × affinity loss (done by the trainer).

Steps 3's GradCAM → affinity → boxes → propagation → scaling is the shared CAM pipeline
(:mod:`tag2mask.localization.cam_pipeline`) that CLIP-ES uses too; RFM only supplies the affinity.

Numerics: ``compat_numerics=True`` reproduces the released code's GPU run: the CLIP computes in fp16
where it does (Conv/Linear layers, residual stream, attention out-projections; q/k/v projection and
softmax in float32 with the unrounded ``in_proj``), fp16-rounded positional embeddings, fp16
attention out-projection in the decoder, TF32 off; ``False`` is a pure float32 model (what the
``fp32ref_*`` fixture arrays hold).
:class:`WeCLIP` applies them to the CLIP it is given (:mod:`tag2mask.clip.numerics`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tag2mask.clip.model import CLIP, CLIP_MEAN, CLIP_STD
from tag2mask.clip.numerics import NUMERICS, Numerics
from tag2mask.config import DictConfig
from tag2mask.clip.text_embed import CacheDir, TextEmbeddings, embed_vocabulary
from tag2mask.evaluation.miou import check_miou_rule
from tag2mask.localization.cam_pipeline import CAMSettings, run_cam_pipeline, scale_to_size
from tag2mask.localization.labels import labels_from_scores, with_background
from tag2mask.models.weclip_decoder import WeCLIPDecoder
from tag2mask.methods.weclip.rfm import rfm_affinity, rfm_keep_mask
from tag2mask.refinement.par import PAR
from tag2mask.vocab.templates import CLIP_ES as CLIP_ES_TEMPLATES
from tag2mask.vocab.vocabulary import Vocabulary, get_vocabulary

__all__ = [
    "split_names",
    "IMAGENET_MEAN_255",
    "IMAGENET_STD_255",
    "WeCLIPConfig",
    "preset",
    "PRESET_NAMES",
    "normalize_rgb",
    "ClipFeatures",
    "WeCLIPOutput",
    "WeCLIP",
    "LABEL_SOURCES",
    "build_clip_for",
]

#: Where image-level labels come from: ``gt_mask`` = the values present in the full image's GT mask
#: (the released code reads ``SegmentationClassAug/<name>.png`` inside its forward), ``dataset`` = the
#: data set's own labels (VOC XML, COCO split list, a folder's label file, synthetic scene labels).
LABEL_SOURCES = ("gt_mask", "dataset")

#: The normalisation the official dataset code applies (ImageNet statistics on 0..255 RGB).
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class WeCLIPConfig(DictConfig):
    """Everything that defines a WeCLIP model and its training recipe (saved in every checkpoint).

    Vocabulary: ``classes`` are the foreground prompt names (CLIP-ES style, synonyms written into one
    string), ``background`` the background words used only as extra softmax competitors.

    RFM switch: RFM is used for (0-based) training iterations ``it >= rfm_start_iter``. The released
    code tests ``iter_num > 15000`` on a counter that also counts validation forwards; with its
    default validation (1,464 images every 2,000 iterations) RFM really starts at 1-based iteration
    9,145 (= ``rfm_start_iter=9144``, the VOC preset). ``15000`` gives the nominal switch. COCO has no
    in-loop validation: 40,000.

    ``label_source`` (:data:`LABEL_SOURCES`): the paper presets use ``gt_mask`` like the released code
    (image-level labels = classes present in the full image's ground-truth mask); ``dataset`` reads
    the data set's labels (needed for data without masks). ``miou_rule``: the released evaluation
    averages IoU over the classes present in the ground truth (``gt``).
    """

    dataset: str = "voc"
    classes: tuple[str, ...] = ()
    background: tuple[str, ...] = ()
    templates: tuple[str, ...] = CLIP_ES_TEMPLATES
    # online pseudo labels
    box_threshold: float = 0.4
    caa_layers: int = 8
    rfm_layers: int = 6
    rfm_start_iter: int = 9144
    bg_power: float = 1.0
    par_iters: int = 20
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    exact_cv2_resize: bool = True
    # numerics / input
    normalization: str = "imagenet"
    compat_numerics: bool = True
    label_source: str = "gt_mask"
    miou_rule: str = "gt"
    # decoder
    embed_dim: int = 256
    decoder_depth: int = 3
    decoder_heads: int = 8
    dropout: float = 0.1
    # data
    crop_size: int = 320
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    # optimisation (lr = effective decoder lr: the official config's 2e-4 × 10)
    batch_size: int = 4
    max_iters: int = 30000
    lr: float = 2e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iters: int = 50
    warmup_ratio: float = 1e-6
    power: float = 1.0
    aff_loss_weight: float = 0.1
    aff_radius: int = 8
    # inference
    test_long_side: int = 512
    test_scales: tuple[float, ...] = (1.0, 0.75)
    test_flip: bool = True

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("WeCLIPConfig needs the foreground class names (use preset('voc') etc.)")
        if self.normalization not in ("imagenet", "clip"):
            raise ValueError(f"normalization must be 'imagenet' or 'clip', got {self.normalization!r}")
        if self.crop_size % 16:
            raise ValueError(f"crop_size must be a multiple of 16, got {self.crop_size}")
        if self.label_source not in LABEL_SOURCES:
            raise ValueError(f"label_source must be one of {LABEL_SOURCES}, got {self.label_source!r}")
        check_miou_rule(self.miou_rule)

    @property
    def numerics(self) -> Numerics:
        """The CLIP numerics of this config: the released code's with ``compat_numerics``, else float32."""
        return NUMERICS["weclip"] if self.compat_numerics else NUMERICS["float32"]

    @property
    def cam_settings(self) -> CAMSettings:
        """The shared CAM pipeline's settings (the CAA branch; RFM replaces only the affinity)."""
        return CAMSettings(attention_layers=self.caa_layers, box_threshold=self.box_threshold,
                           exact_resize=self.exact_cv2_resize, fp16_gradcam=self.compat_numerics)

    @property
    def num_classes(self) -> int:
        """Output classes including background."""
        return len(self.classes) + 1

    def vocabulary(self) -> Vocabulary:
        """The prompt vocabulary (one literal prompt per class, commas kept)."""
        return Vocabulary.from_names(list(self.classes), self.background)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WeCLIPConfig":
        """The one config mechanism, after the decoder-size bound (a recipe read from a file may not ask
        for a decoder of gigabytes)."""
        _check_decoder_size(d)
        return super().from_dict(d)


#: documented maxima of a recipe's decoder (the official one is 256 wide, 3 deep, 8 heads): a run
#: recipe read from a file may not ask for a decoder of gigabytes
MAX_DECODER = {"embed_dim": 4096, "decoder_depth": 64, "decoder_heads": 64}


def _check_decoder_size(d: dict[str, Any]) -> None:
    for key, top in MAX_DECODER.items():
        value = d.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
            raise ValueError(f"WeCLIP recipe: {key} must be a whole number 1..{top}, got {value!r}")


def _voc() -> WeCLIPConfig:
    v = get_vocabulary("voc")
    return WeCLIPConfig(dataset="voc", classes=tuple(g[0] for g in v.synonyms), background=v.background)


def _coco() -> WeCLIPConfig:
    v = get_vocabulary("coco")
    return WeCLIPConfig(
        dataset="coco", classes=tuple(g[0] for g in v.synonyms), background=v.background,
        box_threshold=0.7, rfm_layers=10, rfm_start_iter=40000, max_iters=80000,
    )


def _synth() -> WeCLIPConfig:
    # The synthetic world's stuff textures play the role of CLIP-ES's background words.
    from tag2mask.synth import OBJECT_NAMES, STUFF_NAMES

    # the shipped tiny CLIP was trained with "a photo of a {}." prompts, not CLIP-ES's origami template
    return WeCLIPConfig(dataset="synth", classes=tuple(OBJECT_NAMES), background=tuple(STUFF_NAMES),
                        templates=("a photo of a {}.",), label_source="dataset",
                        crop_size=128, max_iters=2000, rfm_start_iter=1000, test_long_side=224)


_PRESETS = {"voc": _voc, "coco": _coco, "synth": _synth}
PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> WeCLIPConfig:
    """Preset config (``voc``, ``coco``, ``synth``) with fields overridden."""
    key = name.strip().lower()
    if key not in _PRESETS:
        raise ValueError(f"unknown WeCLIP preset {name!r}; choose from {list(_PRESETS)}")
    return replace(_PRESETS[key](), **overrides)


def split_names(text: str) -> tuple[str, ...]:
    """``--classes`` / ``--background`` of ``train weclip`` and ``convert weclip``: a preset name (its prompt
    names), a file (one name per line, ``#`` comments) or ``'a, b, c'``."""
    from pathlib import Path

    if text.strip().lower() in PRESET_NAMES:  # "--classes voc": the preset's prompt names
        return preset(text).classes
    from tag2mask.vocab.vocabulary import check_class_names

    path = Path(text)
    if path.is_file():
        names = tuple(ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
                      if ln.strip() and not ln.startswith("#"))
        return check_class_names(names, str(path))
    return check_class_names(tuple(n.strip() for n in text.split(",") if n.strip()), "--classes")


def normalize_rgb(rgb: np.ndarray, normalization: str = "imagenet") -> Tensor:
    """RGB uint8 ``(H, W, 3)`` or ``(B, H, W, 3)`` → float32 ``(3, H, W)`` / ``(B, 3, H, W)``.

    Evaluated in float64 and rounded once to float32 (as the official per-channel numpy code on a
    uint8 image). ``clip`` uses CLIP's statistics on the same 0..255 scale.
    """
    if normalization == "imagenet":
        mean, std = np.asarray(IMAGENET_MEAN_255), np.asarray(IMAGENET_STD_255)
    elif normalization == "clip":
        mean, std = np.asarray(CLIP_MEAN) * 255.0, np.asarray(CLIP_STD) * 255.0
    else:
        raise ValueError(f"unknown normalization {normalization!r}")
    x = ((np.asarray(rgb, dtype=np.float64) - mean) / std).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


class ClipFeatures(NamedTuple):
    """Frozen-CLIP outputs of a batch.

    Attributes:
        features: ``(n, B, C, h, w)`` outputs of blocks 1..n (n = blocks - 1), CLS dropped (decoder input).
        attentions: ``(B, n, L, L)`` their head-averaged attention maps, CLS at 0, L = 1 + hw.
        last: ``(B, L, C)`` output of block n (the GradCAM input to the last block).
        grid: ``(h, w)`` patch grid.
    """

    features: Tensor
    attentions: Tensor
    last: Tensor
    grid: tuple[int, int]


class WeCLIPOutput(NamedTuple):
    """``seg_logits (B, C, h, w)``, ``affinity (B, hw, hw)`` (decoder) and the CLIP features."""

    seg_logits: Tensor
    affinity: Tensor
    clip: ClipFeatures


class WeCLIP(nn.Module):
    """Frozen CLIP ViT + trainable :class:`WeCLIPDecoder` + online pseudo labels.

    Args:
        clip: a loaded float32 CLIP ViT (frozen here). ``config.numerics`` are applied to it on every
            call (:mod:`tag2mask.clip.numerics`): with ``compat_numerics`` fp16 copies of its
            Conv/Linear weights are swapped in while WeCLIP runs, so code sharing the CLIP is not
            affected. (A CLIP loaded with ``round_fp16_weights=True`` also has its attention
            ``in_proj`` rounded, which the official WeCLIP does not do: load it plain.)
        config: :class:`WeCLIPConfig`.
        text_cache_dir: cache folder for the prompt embeddings (``False`` disables the cache).
    """

    def __init__(self, clip: CLIP, config: WeCLIPConfig, text_cache_dir: CacheDir = None) -> None:
        super().__init__()
        if not clip.is_vit:
            raise ValueError("WeCLIP needs a ViT CLIP (GradCAM and attention affinities act on its tokens)")
        clip.requires_grad_(False)
        self.clip = clip.eval()
        self.config = config
        vis = clip.visual
        self.decoder = WeCLIPDecoder(
            in_channels=vis.width, num_classes=config.num_classes, num_layers=vis.num_blocks - 1,
            embed_dim=config.embed_dim, depth=config.decoder_depth, heads=config.decoder_heads,
            dropout=config.dropout, compat_fp16_out_proj=config.compat_numerics,
        )
        self.par = PAR(config.par_dilations, config.par_iters)
        self.numerics = config.numerics.bind(clip)
        with self.numerics:
            fg, bg = embed_vocabulary(clip, config.vocabulary(), config.templates, cache_dir=text_cache_dir)
        # Non-persistent: text features are derived from CLIP, never saved with the decoder.
        self.register_buffer("fg_text", fg.features, persistent=False)
        self.register_buffer("fg_index", fg.class_index, persistent=False)
        bg_feats = bg.features if bg is not None else torch.zeros(0, fg.features.shape[1])
        self.register_buffer("bg_text", bg_feats, persistent=False)
        self.logit_scale = float(clip.logit_scale.detach().exp())

    def train(self, mode: bool = True) -> "WeCLIP":
        """Only the decoder changes mode; the CLIP stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor) -> ClipFeatures:
        """Frozen blocks 1..n (n = blocks - 1) on normalised images ``(B, 3, H, W)``."""
        vis = self.clip.visual
        n = vis.num_blocks - 1
        with self.numerics:
            inter = vis.forward_intermediates(images, n, return_attention=True)
        h, w = inter.grid
        b, _, c = inter.last.shape
        feats = torch.stack([t[:, 1:] for t in inter.tokens])  # (n, B, hw, C), row-major patches
        feats = feats.transpose(2, 3).reshape(n, b, c, h, w)
        return ClipFeatures(feats, torch.stack(inter.attentions, dim=1), inter.last, (h, w))

    def forward(self, images: Tensor, decoder: Optional[nn.Module] = None) -> WeCLIPOutput:
        """Decoder outputs for ``images (B, 3, H, W)``; ``decoder`` may be a DDP wrapper of ``self.decoder``."""
        clip_out = self.encode(images)
        with self.numerics:  # TF32 off for the fuse / classifier convolutions too
            dec = (decoder or self.decoder)(clip_out.features)
        return WeCLIPOutput(dec.seg_logits, dec.affinity, clip_out)

    # ------------------------------------------------------------------------------------------
    def _text_rows(self, keys: Sequence[int]) -> tuple[Tensor, list[list[int]]]:
        """[rows of the image's classes, background rows] and each class's row indices."""
        fg = TextEmbeddings(self.fg_text, self.fg_index, self.config.num_classes - 1)
        return fg.select(keys, append=self.bg_text)

    def image_cams(
        self,
        clip_out: ClipFeatures,
        index: int,
        keys: Sequence[int],
        use_rfm: bool,
        decoder_affinity: Optional[Tensor] = None,
        autocast_dtype: Optional[torch.dtype] = None,
    ) -> dict[str, Tensor]:
        """GradCAM + CAA/RFM refinement of one image at patch resolution.

        Returns a dict with ``gradcam (K, h, w)``, ``probs (K+M,)``, ``affinity (hw, hw)``,
        ``box_masks (K, h, w)``, ``refined_lowres (K, h, w)`` and, for RFM, ``keep (rfm_layers,)``.
        """
        cfg = self.config
        text, targets = self._text_rows(keys)
        affinity_fn = None
        if use_rfm:
            if decoder_affinity is None:
                raise ValueError("the RFM branch needs the decoder affinity")
            a_f = decoder_affinity[index].float()
            affinity_fn = lambda maps: rfm_affinity(maps, a_f, num_layers=cfg.rfm_layers)  # noqa: E731
        with self.numerics:
            res = run_cam_pipeline(self.clip.visual, clip_out.last[index : index + 1], clip_out.grid, text, targets,
                                   self.logit_scale, clip_out.attentions[index], cfg.cam_settings,
                                   affinity_fn=affinity_fn, autocast_dtype=autocast_dtype)
        ref = res.refined
        out = {"gradcam": res.gradcam.cams.float(), "probs": res.gradcam.probs.float(), "affinity": ref.affinity,
               "box_masks": ref.box_masks, "refined_lowres": ref.refined_lowres}
        if use_rfm:
            out["keep"] = rfm_keep_mask(res.attention_maps, cfg.rfm_layers)
        return out

    @torch.no_grad()
    def refine_to_label(self, image: Tensor, refined_lowres: Tensor, keys: Sequence[int]) -> dict[str, Tensor]:
        """Patch-resolution CAMs → crop-size maps → PAR → label, for one normalised image ``(3, H, W)``.

        Returns ``cams_before_par (K+1, H, W)``, ``cams_after_par (K+1, H, W)``, ``label (H, W)`` int64.
        """
        size = image.shape[-2:]
        before = with_background(scale_to_size(refined_lowres, size, self.config.exact_cv2_resize),
                                 self.config.bg_power)
        after = self.par(image[None].float(), before[None])[0]
        return {"cams_before_par": before, "cams_after_par": after, "label": labels_from_scores(after, keys)}

    def online_pseudo_labels(
        self,
        images: Tensor,
        label_ids: Sequence[Sequence[int]],
        *,
        use_rfm: bool,
        output: Optional[WeCLIPOutput] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        details: Optional[list[dict[str, Tensor]]] = None,
    ) -> Tensor:
        """Online pseudo labels of a batch.

        Args:
            images: ``(B, 3, H, W)`` normalised crops (the decoder's input).
            label_ids: per image, its 0-based foreground class ids (image-level labels of the data set).
            use_rfm: RFM branch (after the switch iteration) instead of CAA.
            output: the decoder forward of these images (CLIP features + affinity); computed if omitted.
            autocast_dtype: autocast dtype for the GradCAM pass (``None`` = float32).
            details: if a list is given, per-image intermediates are appended to it.

        Returns:
            ``(B, H, W)`` int64 labels in ``[0, num_classes)``; an image without labels is all background.
        """
        if output is None:
            with torch.no_grad():
                output = self.forward(images)
        if len(label_ids) != images.shape[0]:
            raise ValueError(f"{len(label_ids)} label lists for a batch of {images.shape[0]}")
        labels = []
        for i, ids in enumerate(label_ids):
            keys = sorted({int(k) for k in ids})  # the official keys come sorted (np.unique)
            bad = [k for k in keys if not 0 <= k < self.config.num_classes - 1]
            if bad:
                raise ValueError(f"label ids {bad} outside the {self.config.num_classes - 1} foreground classes")
            if not keys:
                labels.append(torch.zeros(images.shape[-2:], dtype=torch.long, device=images.device))
                continue
            cams = self.image_cams(output.clip, i, keys, use_rfm, output.affinity.detach(), autocast_dtype)
            res = self.refine_to_label(images[i], cams["refined_lowres"], keys)
            labels.append(res["label"])
            if details is not None:
                details.append({**cams, **res, "keys": torch.tensor(keys)})
        return torch.stack(labels)

    def use_rfm_at(self, iteration: int) -> bool:
        """Whether the 0-based training ``iteration`` uses RFM (``iteration >= rfm_start_iter``)."""
        return iteration >= self.config.rfm_start_iter


def build_clip_for(config: WeCLIPConfig, weights: Any, device: Any = "cpu") -> CLIP:
    """Load CLIP ``weights`` for ``config`` (frozen, eval), in float32: WeCLIP's numerics convert
    what the official loader converts themselves and keep the attention ``in_proj`` as loaded."""
    from tag2mask.clip.loading import load_clip

    return load_clip(weights, device=device, round_fp16_weights=config.numerics.round_weights_fp16)

