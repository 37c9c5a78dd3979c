"""CLIP-ES (Lin et al., CVPR 2023): training-free pseudo-masks from image-level labels.

Pipeline per image, as the official ``generate_cams_voc12.py`` / ``generate_cams_coco14.py`` compute it:

1. resize up to multiples of 16 (PIL bicubic), CLIP normalisation;
2. frozen blocks 1..L-1 (no grad), keeping their head-averaged attention;
3. the shared CAM pipeline (:mod:`tag2mask.localization.cam_pipeline`): softmax-GradCAM on the last
   block over [the image's classes + background words], class-aware attention affinity (mean of the
   last 8 maps, Sinkhorn x3, symmetrise, square), per-class box masks from the CAM, propagation,
   min-max at low resolution, bilinear resize to the image; float16 (= the official ``attn_highres``);
4. (stage 2, :mod:`tag2mask.methods.clip_es.label_maps`) background ``(1 - max)^p``, dense CRF or PAMR,
   confidence masking.

A preset (:data:`PRESETS`) carries everything that differs between the papers' settings: the
vocabulary (class prompts and background words), the box threshold, the prompt template, the
numerics the official code runs with (:class:`~tag2mask.clip.numerics.Numerics`, applied by
:class:`ClipES` to the model it is given) and the mIoU rule of the official evaluation.
Multi-scale/flip averaging is an extension (off by default; the official code runs one scale).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from tag2mask.clip.model import CLIP, CLIP_MEAN, CLIP_STD
from tag2mask.clip.numerics import NUMERICS, Numerics
from tag2mask.clip.text_embed import TextEmbeddings, embed_vocabulary
from tag2mask.config import DictConfig
from tag2mask.data.transforms import resize_pil, size_to_multiple, to_normalized_tensor
from tag2mask.evaluation.miou import MIOU_RULES
from tag2mask.localization.cam_pipeline import CAMSettings, run_cam_pipeline, scale_to_size
from tag2mask.runtime import resolve_dtype
from tag2mask.vocab.templates import CLIP_ES as CLIP_ES_TEMPLATES
from tag2mask.vocab.vocabulary import Vocabulary, get_vocabulary

__all__ = ["ClipESConfig", "PRESETS", "ClipESResult", "ClipES", "preset_for"]


@dataclass(frozen=True)
class ClipESConfig(DictConfig):
    """Settings of the CLIP-ES localisation stage.

    vocabulary: preset vocabulary (``voc``, ``coco``, ``synth``) used when :class:`ClipES` is given none.
    box_threshold: lambda of the CAM box mask (0.4 VOC, 0.7 COCO).
    attention_layers: how many final attention maps form the affinity (8).
    sinkhorn_rounds: column/row normalisation rounds (3).
    templates: prompt templates for the class and background names.
    scales / flip: test-time augmentation (official: (1.0,), no flip).
    precision: ``fp32`` | ``bf16`` | ``fp16`` autocast for the CLIP passes.
    exact_resize: reproduce OpenCV's bilinear upsampling bit for bit (else torch's interpolate).
    numerics: weight / positional-embedding rounding and TF32 policy, applied by :class:`ClipES`.
    miou_rule: how the official evaluation averages IoUs (see :data:`tag2mask.evaluation.miou.MIOU_RULES`).
    """

    vocabulary: str = "voc"
    box_threshold: float = 0.4
    attention_layers: int = 8
    sinkhorn_rounds: int = 3
    templates: tuple[str, ...] = CLIP_ES_TEMPLATES
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    precision: str = "fp32"
    exact_resize: bool = True
    numerics: Numerics = NUMERICS["clip_es"]
    miou_rule: str = "gt_or_pred"

    def __post_init__(self) -> None:
        if self.miou_rule not in MIOU_RULES:
            raise ValueError(f"miou_rule must be one of {sorted(MIOU_RULES)}, got {self.miou_rule!r}")

    @property
    def cam_settings(self) -> CAMSettings:
        """The shared CAM pipeline's settings for CLIP-ES (boxes and propagation from the GradCAM maps)."""
        return CAMSettings(attention_layers=self.attention_layers, sinkhorn_rounds=self.sinkhorn_rounds,
                           box_threshold=self.box_threshold, exact_resize=self.exact_resize)


PRESETS: dict[str, ClipESConfig] = {
    # generate_cams_voc12.py: 20 classes with synonyms, 25 background words, lambda 0.4
    "voc": ClipESConfig(vocabulary="voc", box_threshold=0.4),
    # generate_cams_coco14.py: 80 classes with synonyms ('sknowboard' kept), 23 background words, lambda 0.7
    "coco": ClipESConfig(vocabulary="coco", box_threshold=0.7),
    # the shipped tiny CLIP's world: it was trained with 'a photo of a {}.' in float32 (no official numerics)
    "synth": ClipESConfig(vocabulary="synth", templates=("a photo of a {}.",), numerics=NUMERICS["float32"]),
}


@dataclass
class ClipESResult:
    """CAMs of one image.

    keys: (K,) int64 class ids (vocabulary indices) in the order of ``cams``.
    cams: (K, H, W) float16 refined CAMs at the image size (official ``attn_highres``).
    arrays: intermediates of the first scale when requested (names as in the golden fixtures).
    """

    keys: np.ndarray
    cams: np.ndarray
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class ClipES:
    """Training-free CAMs for images with known image-level labels.

    >>> cam_maker = ClipES(model, config=PRESETS["voc"])      # the preset's vocabulary and numerics
    >>> result = cam_maker(image, label_ids=[14, 11])         # person, dog

    The preset's :class:`~tag2mask.clip.numerics.Numerics` are applied to ``model`` on every call
    (official CLIP-ES: fp16-rounded weights and positional embeddings, TF32 off). A model loaded with
    ``round_fp16_weights=True`` is used as is; otherwise ClipES keeps rounded copies of the affected
    weights and swaps them in only while it runs, so other code sharing ``model`` is not affected.
    """

    def __init__(
        self,
        model: CLIP,
        vocab: Optional[Vocabulary] = None,
        config: ClipESConfig = PRESETS["voc"],
        text_cache_dir=None,
    ):
        if not model.is_vit:
            raise ValueError("CLIP-ES needs a ViT image tower (GradCAM and attention affinity act on its tokens)")
        self.model = model.eval()
        self.config = config
        self.vocab = vocab if vocab is not None else get_vocabulary(config.vocabulary)
        self.device = next(model.parameters()).device
        self.numerics = config.numerics.bind(model)
        with self.numerics:
            fg, bg = embed_vocabulary(model, self.vocab, config.templates, cache_dir=text_cache_dir)
        self.fg: TextEmbeddings = fg.to(self.device)
        self.bg: Optional[TextEmbeddings] = bg.to(self.device) if bg is not None else None
        self.logit_scale = float(model.logit_scale.detach().exp())

    def _autocast(self):
        dtype = resolve_dtype(self.config.precision)
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def lowres(self, image: Image.Image, label_ids: Sequence[int], keep_arrays: bool = False):
        """Steps 1-3 at the image's own scale, before upsampling.

        Returns (refined (K, h, w) float32, cams (K, h, w) float32, arrays dict).
        """
        return self.lowres_batch([image], [label_ids], keep_arrays)[0]

    def lowres_batch(
        self, images: Sequence[Image.Image], label_lists: Sequence[Sequence[int]], keep_arrays: bool = False
    ) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]]:
        """:meth:`lowres` for several images of the same size: one batched pass of the frozen blocks.

        GradCAM and the affinity stay per image (each has its own classes); on a GPU the batched
        encoder is where the time goes, so equal-size batches raise throughput.
        """
        cfg = self.config
        sizes = {im.size for im in images}
        if len(sizes) != 1:
            raise ValueError(f"lowres_batch needs images of one size, got {sorted(sizes)}")
        width, height = images[0].size
        h16, w16 = size_to_multiple(height, width, 16, "ceil")
        # resize before the RGB conversion, as the official code (grayscale COCO images stay 1-channel here)
        x = torch.cat([to_normalized_tensor(resize_pil(im, h16, w16), CLIP_MEAN, CLIP_STD) for im in images]).to(self.device)
        visual = self.model.visual
        settings = cfg.cam_settings
        out = []
        with self.numerics:
            with self._autocast(), torch.no_grad():
                # only the last ``attention_layers`` maps are used (the last block's comes from GradCAM)
                first = max(0, visual.num_blocks - cfg.attention_layers)
                inter = visual.forward_intermediates(
                    x, visual.num_blocks - 1, return_attention=True, keep_tokens=False, attention_from=first
                )
            bg = self.bg.features if self.bg is not None else None
            for b, label_ids in enumerate(label_lists):
                text, targets = self.fg.select(label_ids, append=bg)
                res = run_cam_pipeline(
                    visual, inter.last[b : b + 1], inter.grid, text, targets, self.logit_scale,
                    [a[b] for a in inter.attentions], settings, autocast_dtype=resolve_dtype(cfg.precision),
                )
                cams, ref = res.gradcam.cams.float(), res.refined
                arrays: dict[str, np.ndarray] = {}
                if keep_arrays:
                    arrays = {
                        "input": x[b : b + 1].cpu().numpy(),
                        "probs": res.gradcam.probs.float().cpu().numpy()[None].repeat(len(label_ids), 0),
                        "cam_lowres": cams.cpu().numpy(),
                        "attn_mean8": ref.affinity.cpu().numpy(),
                        "trans_mat": ref.trans.cpu().numpy(),
                        "box_mask": ref.box_masks.cpu().numpy(),
                        "refined_lowres": ref.refined_lowres.cpu().numpy(),
                    }
                out.append((ref.refined_lowres, cams, arrays))
        return out

    def _check_labels(self, label_ids: Sequence[int]) -> list[int]:
        label_ids = list(dict.fromkeys(int(i) for i in label_ids))
        if not label_ids:
            raise ValueError("CLIP-ES needs at least one image-level label per image")
        for i in label_ids:
            if not 0 <= i < self.fg.num_classes:
                raise ValueError(f"label id {i} is outside the vocabulary (0..{self.fg.num_classes - 1})")
        return label_ids

    def __call__(self, image: Image.Image, label_ids: Sequence[int], keep_arrays: bool = False) -> ClipESResult:
        """Refined CAMs of ``image`` for its classes ``label_ids`` -> :class:`ClipESResult`.

        ``label_ids`` are used in the order given (they fix the order of ``keys`` and of the
        softmax rows); repeats are dropped.
        """
        return self.batch([image], [label_ids], keep_arrays)[0]

    def _views(self) -> list[tuple[float, bool]]:
        """(scale, flipped) of every test-time view, the unflipped scale-1 view first."""
        return [(s, f) for s in self.config.scales for f in ((False, True) if self.config.flip else (False,))]

    def batch(
        self, images: Sequence[Image.Image], label_lists: Sequence[Sequence[int]], keep_arrays: bool = False
    ) -> list[ClipESResult]:
        """CAMs for several images; images of equal size share batched encoder passes.

        Results are identical to calling the object on each image (up to float summation order).
        With ``flip`` every view is also run mirrored and its maps mirrored back before averaging.
        """
        if len(images) != len(label_lists):
            raise ValueError(f"{len(images)} images but {len(label_lists)} label lists")
        labels = [self._check_labels(ids) for ids in label_lists]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(im.size, []).append(i)
        results: list[Optional[ClipESResult]] = [None] * len(images)
        views = self._views()
        for (width, height), idx in groups.items():
            totals: list[Optional[np.ndarray]] = [None] * len(idx)
            arrays: list[dict[str, np.ndarray]] = [{} for _ in idx]
            for n, (scale, flip) in enumerate(views):
                batch_views = []
                for i in idx:
                    view = images[i]
                    if scale != 1.0:
                        view = view.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
                    if flip:
                        view = view.transpose(Image.FLIP_LEFT_RIGHT)
                    batch_views.append(view)
                outs = self.lowres_batch(batch_views, [labels[i] for i in idx], keep_arrays and n == 0)
                for j, (refined, _, view_arrays) in enumerate(outs):
                    high = self._upsample(refined, (height, width))
                    if flip:
                        high = high[:, :, ::-1]
                    totals[j] = high if totals[j] is None else totals[j] + high
                    arrays[j] = arrays[j] or view_arrays
            for j, i in enumerate(idx):
                cams = (totals[j] / len(views) if len(views) > 1 else totals[j]).astype(np.float16)
                result = ClipESResult(keys=np.asarray(labels[i], dtype=np.int64), cams=cams, arrays=arrays[j])
                if keep_arrays:
                    result.arrays["attn_highres"] = cams
                    result.arrays["keys"] = result.keys
                results[i] = result
        return results  # type: ignore[return-value]

    def _upsample(self, refined: torch.Tensor, size_hw: tuple[int, int]) -> np.ndarray:
        """Official order: min-max at low resolution (eps 1e-7), then bilinear to the image size (float32)."""
        return scale_to_size(refined, size_hw, self.config.exact_resize).cpu().numpy()


def preset_for(name: str, **overrides) -> ClipESConfig:
    """A preset (``voc``/``coco``/``synth``) with fields overridden, e.g. ``preset_for('voc', flip=True)``."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise ValueError(f"unknown CLIP-ES preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[key], **overrides)
