"""CLIP-ES (Lin et al., CVPR 2023): training-free pseudo-masks from image-level labels.

Pipeline per image, as the official ``generate_cams_voc12.py`` computes it:

1. resize up to multiples of 16 (PIL bicubic), CLIP normalisation;
2. frozen blocks 1..L-1 (no grad), keeping their head-averaged attention;
3. softmax-GradCAM on the last block over [the image's classes + background words]
   (all classes in one batched backward, see :mod:`tag2mask.localization.gradcam`);
4. class-aware attention affinity (CAA): mean of the last 8 attention maps, Sinkhorn x3,
   symmetrise, square; per-class box masks from the CAM; propagate; min-max at low resolution,
   bilinear resize to the image; float16 (= the official ``attn_highres``);
5. (outside this class) background ``(1 - max)^p``, dense CRF or PAMR, confidence masking.

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
from tag2mask.clip.text_embed import TextEmbeddings, embed_vocabulary
from tag2mask.data.transforms import resize_pil, size_to_multiple, to_normalized_tensor
from tag2mask.localization.affinity import mean_attention, refine_cams, transition_matrix
from tag2mask.localization.boxes import cam_box_masks
from tag2mask.localization.gradcam import softmax_gradcam
from tag2mask.localization.scaling import minmax_scale, resize_bilinear, resize_bilinear_like_cv2
from tag2mask.runtime import resolve_dtype
from tag2mask.vocab.templates import CLIP_ES as CLIP_ES_TEMPLATES
from tag2mask.vocab.vocabulary import Vocabulary


@dataclass(frozen=True)
class ClipESConfig:
    """Settings of the CLIP-ES localisation stage.

    box_threshold: lambda of the CAM box mask (0.4 VOC, 0.7 COCO).
    attention_layers: how many final attention maps form the affinity (8).
    sinkhorn_rounds: column/row normalisation rounds (3).
    templates: prompt templates for the class and background names.
    scales / flip: test-time augmentation (official: (1.0,), no flip).
    precision: ``fp32`` | ``bf16`` | ``fp16`` autocast for the CLIP passes.
    exact_resize: reproduce OpenCV's bilinear upsampling bit for bit (else torch's interpolate).
    """

    box_threshold: float = 0.4
    attention_layers: int = 8
    sinkhorn_rounds: int = 3
    templates: tuple[str, ...] = CLIP_ES_TEMPLATES
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    precision: str = "fp32"
    exact_resize: bool = True


PRESETS: dict[str, ClipESConfig] = {
    "voc": ClipESConfig(box_threshold=0.4),
    "coco": ClipESConfig(box_threshold=0.7),
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

    >>> cam_maker = ClipES(model, get_vocabulary("voc"), PRESETS["voc"])
    >>> result = cam_maker(image, label_ids=[14, 11])   # person, dog
    """

    def __init__(
        self,
        model: CLIP,
        vocab: Vocabulary,
        config: ClipESConfig = ClipESConfig(),
        text_cache_dir=None,
    ):
        if not model.is_vit:
            raise ValueError("CLIP-ES needs a ViT image tower (GradCAM and attention affinity act on its tokens)")
        self.model = model.eval()
        self.vocab = vocab
        self.config = config
        self.device = next(model.parameters()).device
        fg, bg = embed_vocabulary(model, vocab, config.templates, cache_dir=text_cache_dir)
        self.fg: TextEmbeddings = fg.to(self.device)
        self.bg: Optional[TextEmbeddings] = bg.to(self.device) if bg is not None else None
        self.logit_scale = float(model.logit_scale.detach().exp())

    # ------------------------------------------------------------------------------------------
    def _text_rows(self, label_ids: Sequence[int]) -> tuple[torch.Tensor, list[list[int]]]:
        """[rows of the image's classes (their synonyms), background rows] and each class's row indices."""
        rows, targets = [], []
        for cid in label_ids:
            own = torch.nonzero(self.fg.class_index == cid).flatten()
            targets.append(list(range(len(rows), len(rows) + len(own))))
            rows.extend(own.tolist())
        text = self.fg.features[rows]
        if self.bg is not None:
            text = torch.cat([text, self.bg.features], dim=0)
        return text, targets

    def _autocast(self):
        dtype = resolve_dtype(self.config.precision)
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def lowres(self, image: Image.Image, label_ids: Sequence[int], keep_arrays: bool = False):
        """Steps 1-4 at the image's own scale, before upsampling.

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
        x = torch.cat([to_normalized_tensor(resize_pil(im, h16, w16), CLIP_MEAN, CLIP_STD) for im in images]).to(self.device)
        visual = self.model.visual
        with self._autocast():
            with torch.no_grad():
                # only the last ``attention_layers`` maps are used (the last block's comes from GradCAM)
                first = max(0, visual.num_blocks - cfg.attention_layers)
                inter = visual.forward_intermediates(
                    x, visual.num_blocks - 1, return_attention=True, keep_tokens=False, attention_from=first
                )
        out = []
        for b, label_ids in enumerate(label_lists):
            text, targets = self._text_rows(label_ids)
            with self._autocast():
                gc = softmax_gradcam(visual, inter.last[b : b + 1], inter.grid, text, targets, self.logit_scale)
            attn = [a[b].float() for a in inter.attentions] + [gc.last_attention.float()]
            w_mean = mean_attention(attn, last=cfg.attention_layers)
            trans = transition_matrix(w_mean, rounds=cfg.sinkhorn_rounds)
            cams = gc.cams.float()
            boxes = cam_box_masks(cams, cfg.box_threshold)
            refined = refine_cams(trans, cams, boxes)
            arrays: dict[str, np.ndarray] = {}
            if keep_arrays:
                arrays = {
                    "input": x[b : b + 1].cpu().numpy(),
                    "probs": gc.probs.float().cpu().numpy()[None].repeat(len(label_ids), 0),
                    "cam_lowres": cams.cpu().numpy(),
                    "attn_mean8": w_mean.cpu().numpy(),
                    "trans_mat": trans.cpu().numpy(),
                    "box_mask": boxes.cpu().numpy() if isinstance(boxes, torch.Tensor) else boxes,
                    "refined_lowres": refined.cpu().numpy(),
                }
            out.append((refined, cams, arrays))
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
        """Refined CAMs of ``image`` for its classes ``label_ids`` -> :class:`ClipESResult`."""
        return self.batch([image], [label_ids], keep_arrays)[0]

    def batch(
        self, images: Sequence[Image.Image], label_lists: Sequence[Sequence[int]], keep_arrays: bool = False
    ) -> list[ClipESResult]:
        """CAMs for several images; images of equal size share batched encoder passes.

        Results are identical to calling the object on each image (up to float summation order).
        """
        if len(images) != len(label_lists):
            raise ValueError(f"{len(images)} images but {len(label_lists)} label lists")
        labels = [self._check_labels(ids) for ids in label_lists]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(im.size, []).append(i)
        results: list[Optional[ClipESResult]] = [None] * len(images)
        views = [(s, f) for s in self.config.scales for f in ((False, True) if self.config.flip else (False,))]
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
        low = minmax_scale(refined.detach().float().cpu().numpy())
        if self.config.exact_resize:
            return resize_bilinear_like_cv2(np.ascontiguousarray(low, dtype=np.float32), size_hw)
        return resize_bilinear(torch.from_numpy(np.ascontiguousarray(low)), size_hw).numpy()


def preset_for(name: str, **overrides) -> ClipESConfig:
    """A preset (``voc``/``coco``) with fields overridden, e.g. ``preset_for('voc', flip=True)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown CLIP-ES preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def background_scores(cams: np.ndarray, power: float = 1.0) -> np.ndarray:
    """Background score ``(1 - max_k cam_k) ** power`` computed in float16 as the official evaluation.

    cams: (K, H, W) float16 -> (H, W) float16.
    """
    cams16 = np.asarray(cams, dtype=np.float16)
    return ((np.float16(1) - cams16.max(axis=0)) ** np.float16(power)).astype(np.float16)
