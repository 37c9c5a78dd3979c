"""Training-free open-vocabulary segmentation with a frozen CLIP (MaskCLIP, SCLIP, ClearCLIP, NACLIP).

Pipeline of :meth:`OpenVocabSegmenter.predict` (the SCLIP-family harness, MaskCLIP as a special case);
every setting comes from an :class:`~tag2mask.methods.ovss.presets.OvssPreset` (``default`` or
``published``) that the segmenter applies itself:

1. keep-ratio resize so the short side is ``short_side`` (long side at most ``max_long_side``) with
   OpenCV's uint8 bilinear kernel (bit-exact replica), then normalisation;
2. dense patch features from the image tower with the method's last block
   (:mod:`tag2mask.methods.ovss.last_block`), over the whole image or over sliding windows
   (ClearCLIP zero-pads each window to a multiple of the patch size);
3. cosine logits against L2-normalised, template-averaged text embeddings, one row per prompt
   (background words first, then the class synonyms); MaskCLIP's optional prompt denoising and
   key smoothing (:mod:`tag2mask.methods.ovss.maskclip_refine`) at feature resolution;
4. bilinear upsampling to the window size, averaging of overlapping windows, upsampling to the
   image size; optional PAMR;
5. ``softmax(logit_scale · logits)`` over *all* prompts, class probability = max over its prompts,
   optional area threshold, argmax, pixels below ``prob_threshold`` become background.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tag2mask.clip.model import CLIP
from tag2mask.clip.text_embed import CacheDir, embed_vocabulary
from tag2mask.clip.vision import VisionTransformer
from tag2mask.inference import slide_logits
from tag2mask.methods.ovss.last_block import get_last_block, maskclip_keys
from tag2mask.methods.ovss.maskclip_refine import key_smooth, prompt_denoise
from tag2mask.methods.ovss.numerics import fp16_rounded, input_mean_std, maskclip_numerics
from tag2mask.methods.ovss.presets import OvssPreset, get_preset, published_settings
from tag2mask.methods.ovss.windows import centre_padding, resize_like_mmcv, window_boxes
from tag2mask.vocab.vocabulary import Vocabulary, load_vocabulary

__all__ = ["METHODS", "PUBLISHED_SETTINGS", "SegmentationResult", "OpenVocabSegmenter", "resolve_settings"]

METHODS = ("maskclip", "sclip", "clearclip", "naclip", "clip")

#: method -> every field of its ``published`` preset (docs, CLI help)
PUBLISHED_SETTINGS: dict[str, dict[str, object]] = published_settings()

_BACKGROUND_NAME = "background"

#: fields of OvssPreset that a segmenter exposes as attributes too (``seg.mode``, ``seg.crop`` ...)
_SETTING_NAMES = frozenset(f.name for f in dataclasses.fields(OvssPreset))

_HARNESS_POS_OFFSET = 0.1  # interpolate_pos_encoding: scale_factor = (n + 0.1) / 14


@dataclass
class SegmentationResult:
    """What :meth:`OpenVocabSegmenter.predict` returns.

    Attributes:
        label: ``(H, W)`` uint8; ``class_names[label]`` names every pixel. With ``has_background``
            0 is background and the vocabulary's classes are 1..K, otherwise classes are 0..K-1.
        logits: ``(len(class_names), H, W)`` float32, per class the max over its prompts of the
            temperature-scaled logits that are softmaxed (``logit_scale · cosine``; smoothed scores
            when key smoothing is on). A background row without background words is ``-inf``.
        class_names: display name per label value.
        has_background: whether label 0 means background.
        probs: ``(len(class_names), H, W)`` float32 class probabilities as the official harness
            returns them (``seg_logits``): max over each class's prompts of the softmax over all
            prompts, after the area threshold; renormalised per pixel for NACLIP. ``None`` when
            the producer has none.
        arrays: with ``predict(..., keep_arrays=True)`` the intermediate arrays, named as in the
            golden fixtures: ``input`` (3, h, w), ``win_boxes`` (N, 4) int64 (y1, x1, y2, x2),
            ``win_feats`` (N, D, gh, gw), ``win_patch_logits`` (N, S, gh, gw), ``logits`` (S, H, W)
            before PAMR, ``logits_pamr`` (S, H, W) with PAMR, ``probs``, ``label``.
    """

    label: np.ndarray
    logits: np.ndarray
    class_names: tuple[str, ...]
    has_background: bool
    probs: Optional[np.ndarray] = None
    arrays: Optional[dict[str, np.ndarray]] = None

    def present(self) -> list[int]:
        """Label values that occur in ``label``, sorted."""
        return [int(v) for v in np.unique(self.label)]


def resolve_settings(method: str, preset: Union[str, OvssPreset] = "default",
                     templates: Union[str, Sequence[str], None] = None, compat: Optional[bool] = None,
                     overrides: Optional[dict[str, Any]] = None) -> OvssPreset:
    """The settings a segmenter runs with: ``preset`` of ``method`` with ``overrides`` (any
    :class:`~tag2mask.methods.ovss.presets.OvssPreset` field; an unknown one is an error naming the
    field), custom ``templates`` and ``compat`` (``True``: the method's official numerics, ``False``:
    the model's, ``None``: the preset's) applied. Unknown methods and last blocks fail here."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    overrides = dict(overrides or {})
    if templates is not None:
        overrides["templates"] = templates if isinstance(templates, str) else "custom"
    if compat is not None:
        overrides["numerics"] = ("maskclip" if method == "maskclip" else "harness") if compat else "model"
        if compat and method == "maskclip":
            overrides.setdefault("logit_scale", None)  # MaskCLIP's raw cosine logits unless one is given
    settings = get_preset(method, preset).replace(**overrides)
    get_last_block(settings.last_block)  # unknown names fail here, before any work
    return settings


class OpenVocabSegmenter:
    """Segment images into a free-form vocabulary with a frozen CLIP.

    Args:
        model: a :class:`~tag2mask.clip.model.CLIP` (ViT for every method; ResNets for ``maskclip``).
        vocab: a :class:`~tag2mask.vocab.vocabulary.Vocabulary` or a spec for ``load_vocabulary``
            (``"cat, dog; background: sky, grass"``, a name-set file, or an official ``cls_*.txt``).
        method: ``maskclip`` | ``sclip`` | ``clearclip`` | ``naclip`` | ``clip`` (unchanged last block).
        preset: ``default``, ``published``, ``published:<dataset>`` or an
            :class:`~tag2mask.methods.ovss.presets.OvssPreset`; ``overrides`` replace single fields.
        templates: template set name or list (preset: ``maskclip85`` for MaskCLIP, else ``imagenet80``).
        compat: ``True``: the method's official numerics (MaskCLIP: its mmseg ViT with LayerNorm eps
            1e-6, erf GELU, ImageNet mean/std, bicubic positional interpolation, bottom/right zero
            padding, raw cosine logits; others: the SCLIP-family harness numerics, which every
            preset already uses). ``False``: the loaded model as it is (CLIP mean/std, the model's
            own positional interpolation). ``None``: the preset's.
        **overrides: any field of :class:`~tag2mask.methods.ovss.presets.OvssPreset`, declared there once
            (``mode``, ``short_side``, ``crop``, ``stride``, ``logit_scale``, ``prob_threshold``,
            ``area_threshold``, ``pamr``, ``last_block``, ``naclip_std`` ...): replaces the preset's value
            (``self.settings`` holds the result; an unknown name is a ``TypeError`` naming it).
        prompt_denoising, key_smoothing: MaskCLIP PD / KS thresholds (0 = off, the official default);
            ``ks_paper_form`` switches KS to the paper's cosine affinity.
        crop_batch: windows per forward pass in slide mode.
        device: where to run; the model is moved there (default: where the model already is).
        text_cache: text-embedding cache folder (``None`` default, ``False`` off).
    """

    def __init__(
        self,
        model: CLIP,
        vocab: Union[Vocabulary, str],
        method: str = "maskclip",
        *,
        preset: Union[str, OvssPreset] = "default",
        templates: Union[str, Sequence[str], None] = None,
        compat: Optional[bool] = None,
        prompt_denoising: float = 0.0,
        key_smoothing: float = 0.0,
        ks_paper_form: bool = False,
        crop_batch: int = 8,
        device: Union[str, torch.device, None] = None,
        text_cache: CacheDir = None,
        **overrides: Any,
    ):
        method = method.strip().lower()
        settings = resolve_settings(method, preset, templates, compat, overrides)
        if crop_batch <= 0:
            raise ValueError(f"crop_batch must be positive, got {crop_batch}")
        self.is_vit = isinstance(model.visual, VisionTransformer)
        if not self.is_vit and method != "maskclip":
            raise ValueError(f"method {method!r} needs a ViT image tower; ResNet CLIPs support only 'maskclip'")
        if (prompt_denoising > 0 or key_smoothing > 0) and method != "maskclip":
            raise ValueError("prompt denoising and key smoothing are MaskCLIP refinements; use method='maskclip'")

        self.settings: OvssPreset = settings
        self.vocab = load_vocabulary(vocab) if isinstance(vocab, str) else vocab
        self.method = method
        self.compat = settings.numerics != "model"
        self.maskclip_compat = settings.numerics == "maskclip"
        self.crop_batch = crop_batch
        self.prompt_denoising, self.key_smoothing, self.ks_paper_form = prompt_denoising, key_smoothing, ks_paper_form
        self.logit_scale = settings.effective_logit_scale

        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if settings.round_fp16_weights:
            model = fp16_rounded(model)
        self.model = model.to(self.device).eval()
        self.visual = self.model.visual
        mean, std = input_mean_std(settings.numerics)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._last_block = get_last_block(settings.last_block, **(
            {"std": settings.naclip_std} if settings.last_block == "naclip" else {}))
        self.templates = templates if templates is not None and not isinstance(templates, str) else settings.templates
        self._build_text(text_cache)

        self._pamr = None
        if settings.pamr:
            from tag2mask.refinement.pamr import PAMR

            self._pamr = PAMR(settings.pamr_steps, dilations=settings.pamr_dilations).to(self.device)

    def __getattr__(self, name: str) -> Any:
        """The settings read as attributes (``seg.mode`` is ``seg.settings.mode``): declared once, in
        :class:`~tag2mask.methods.ovss.presets.OvssPreset`. Only called for names not found otherwise."""
        settings = self.__dict__.get("settings")
        if settings is not None and name in _SETTING_NAMES:
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ----------------------------------------------------------------------------------------------
    # text side

    def _build_text(self, cache: CacheDir) -> None:
        """Prompt embeddings ``(S, D)`` and the output label of every prompt ``(S,)``, background rows first."""
        fg, bg = embed_vocabulary(self.model, self.vocab, self.templates, cache, device=self.device)
        # label 0 is background when background words exist or low-confidence pixels need a home
        self.has_background = bg is not None or self.settings.prob_threshold > 0
        offset = 1 if self.has_background else 0
        feats, labels = [], []
        if bg is not None:  # the official name sets put the background on line 0: same prompt order
            feats.append(bg.features)
            labels.append(torch.zeros(bg.features.shape[0], dtype=torch.long))
        feats.append(fg.features)
        labels.append(fg.class_index + offset)
        names = ((_BACKGROUND_NAME,) if self.has_background else ()) + tuple(self.vocab.names)
        if len(names) > 256:
            raise ValueError(f"{len(names)} labels do not fit an 8-bit label map (at most 256 incl. background)")
        self.class_names: tuple[str, ...] = names
        self.text = torch.cat(feats).to(self.device, torch.float32)  # (S, D), rows unit norm
        self.prompt_label = torch.cat(labels).to(self.device)  # (S,) values in 0..len(names)-1

    # ----------------------------------------------------------------------------------------------
    # image side

    def _rgb(self, image: Image.Image) -> np.ndarray:
        from tag2mask.data.images import to_rgb

        return np.array(to_rgb(image), dtype=np.uint8)

    def _normalise_uint8(self, rgb: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """``(h, w, 3)`` uint8 -> ``(1, 3, h, w)`` float32 ``(x - mean) / std`` on the device."""
        if isinstance(rgb, np.ndarray):
            rgb = torch.from_numpy(np.ascontiguousarray(rgb))
        x = rgb.to(self.device).permute(2, 0, 1)[None].float()
        return (x - self._mean) / self._std

    def _preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> resized (OpenCV-exact keep-ratio resize, on the device), normalised ``(1, 3, h, w)`` float32."""
        rgb = torch.from_numpy(self._rgb(image)).to(self.device)
        if self.settings.short_side is not None:
            rgb = resize_like_mmcv(rgb, self.settings.short_side, self.settings.max_long_side)
        return self._normalise_uint8(rgb)

    def _forward_dense(self, images: torch.Tensor, block_fn) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.maskclip_compat:
            with maskclip_numerics(self.visual):
                return self.visual.forward_dense(images, last_block=block_fn)
        if self.settings.numerics == "harness":
            return self.visual.forward_dense(images, last_block=block_fn, pos_mode="bicubic",
                                             pos_scale_offset=_HARNESS_POS_OFFSET)
        return self.visual.forward_dense(images, last_block=block_fn)

    def dense_features(self, images: torch.Tensor, with_keys: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The method's dense features of normalised ``(n, 3, h, w)`` images (in this segmenter's mean/std).

        Returns ``(features (n, D, gh, gw) float32 L2-normalised over D, keys)``; ``keys`` are the
        last block's keys ``(n, gh*gw, C)`` in row-major grid order (what key smoothing uses) when
        ``with_keys``, else ``None``. With MaskCLIP numerics a ViT input is zero-padded bottom/right
        to a multiple of the patch size first (mmseg ``PatchEmbed(padding='corner')``); otherwise
        the patch grid floors.
        """
        keys = None
        if self.is_vit:
            if self.maskclip_compat:
                p = self.visual.patch_size
                h, w = images.shape[-2:]
                images = F.pad(images, (0, (-w) % p, 0, (-h) % p))
            captured: dict[str, torch.Tensor] = {}
            block_fn = self._last_block
            if with_keys:
                def capturing_block(block, x, grid):  # noqa: E306 - capture the keys on the way through
                    captured["keys"] = maskclip_keys(block, x)[:, 1:]
                    return self._last_block(block, x, grid)

                block_fn = capturing_block
            tokens, (gh, gw) = self._forward_dense(images, block_fn)
            keys = captured.get("keys")
        else:
            fmap = self.visual.forward_features(images)
            gh, gw = fmap.shape[-2:]
            tokens = self.visual.attnpool.dense_values(fmap).flatten(2).transpose(1, 2)  # (n, hw, D)
            if with_keys:
                keys = self.visual.attnpool.dense_keys(fmap)
        feats = F.normalize(tokens.float(), dim=-1)
        n = feats.shape[0]
        return feats.transpose(1, 2).reshape(n, -1, gh, gw), (keys.float() if keys is not None else None)

    def _dense(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``(n, 3, h, w)`` -> (features ``(n, D, gh, gw)`` unit norm, prompt logits ``(n, S, gh, gw)``).

        Logits are cosine similarities (PD sets removed prompts to -100; KS turns them into
        smoothed scores); see :meth:`dense_features` for the input padding.
        """
        feats, keys = self.dense_features(images, with_keys=self.key_smoothing > 0)
        n, _, gh, gw = feats.shape
        logits = (feats.flatten(2).transpose(1, 2) @ self.text.T).transpose(1, 2).reshape(n, -1, gh, gw)
        if self.prompt_denoising > 0:
            logits = prompt_denoise(logits, self.prompt_denoising)
        if self.key_smoothing > 0 and keys is not None:
            logits = key_smooth(logits, keys, self.key_smoothing, paper_form=self.ks_paper_form)
        return feats, logits

    @torch.no_grad()
    def dense_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Prompt logits at feature resolution: normalised ``(n, 3, h, w)`` -> ``(n, S, h', w')`` float32."""
        return self._dense(images)[1]

    @staticmethod
    def _record(arrays: Optional[dict], feats: torch.Tensor, patch_logits: torch.Tensor) -> None:
        if arrays is not None:
            arrays.setdefault("win_feats", []).append(feats)
            arrays.setdefault("win_patch_logits", []).append(patch_logits)

    def _pad_to_one_patch(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-pad (the mean colour after normalisation) bottom/right so both sides hold one patch.

        A side shorter than one patch (a 1x300 strip resized under the long-side cap) has no patch
        grid at all; callers crop the padding off their logits again.
        """
        h, w = images.shape[-2:]
        least = self.visual.patch_size if self.is_vit else 32  # ResNet towers downsample by 32
        if h < least or w < least:
            images = F.pad(images, (0, max(0, least - w), 0, max(0, least - h)))
        return images

    def _window_logits(self, crops: torch.Tensor, arrays: Optional[dict]) -> torch.Tensor:
        """Prompt logits of equally sized windows ``(n, 3, h, w)`` at window size ``(n, S, h, w)``."""
        h, w = crops.shape[-2:]
        pad = (0, 0, 0, 0)
        if self.settings.window_padding == "centre" and self.is_vit:
            pad = centre_padding(h, w, self.visual.patch_size)
            if any(pad):
                crops = F.pad(crops, pad)  # zeros in normalised space, as ClearCLIP
        crops = self._pad_to_one_patch(crops)
        feats, patch_logits = self._dense(crops)
        self._record(arrays, feats, patch_logits)
        # the patch grid (floored, or padded) is stretched over the whole (padded) window
        logits = F.interpolate(patch_logits, size=crops.shape[-2:], mode="bilinear", align_corners=False)
        left, _, top, _ = pad
        return logits[..., top : top + h, left : left + w]

    def _prompt_logits(self, x: torch.Tensor, out_hw: tuple[int, int], arrays: Optional[dict]) -> torch.Tensor:
        """Prompt logits ``(1, S, H, W)`` of a preprocessed input ``(1, 3, h, w)`` at the image size."""
        _, _, h, w = x.shape
        if self.settings.mode == "whole":  # no window padding: the official whole-image paths feed the input as is
            boxes = [(0, 0, h, w)]
            padded = self._pad_to_one_patch(x)
            feats, logits = self._dense(padded)
            self._record(arrays, feats, logits)
            if padded is not x:
                logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)[..., :h, :w]
            elif self.settings.whole_upsample == "input":
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        else:
            boxes = window_boxes(h, w, self.settings.crop, self.settings.stride)
            logits = slide_logits(lambda crops: self._window_logits(crops, arrays), x, self.settings.crop,
                                  self.settings.stride,
                                  self.crop_batch)
        if arrays is not None:
            arrays["win_boxes"] = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        return F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)

    def _pamr_guide(self, image: Image.Image, x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        if self.settings.pamr_guide == "input":
            # the official code guides PAMR with the network input resized back to the image size
            return F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False)
        return self._normalise_uint8(self._rgb(image))

    # ----------------------------------------------------------------------------------------------
    # decision

    def postprocess(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt logits ``(S, H, W)`` -> (label ``(H, W)`` int64, class logits ``(C, H, W)``, class probs ``(C, H, W)``).

        Softmax of ``logit_scale · logits`` over all prompts; class probability = max over its
        prompts; SCLIP's area threshold zeroes the foreground classes whose argmax area is not above
        ``area_threshold`` × the foreground argmax area; then the argmax, and pixels whose best
        probability is below ``prob_threshold`` become background. With ``renormalise_probs`` the
        returned probabilities are divided by their per-pixel sum afterwards (NACLIP).
        """
        scaled = logits * self.logit_scale
        probs = scaled.softmax(dim=0)
        n_out = len(self.class_names)
        index = self.prompt_label.view(-1, 1, 1).expand_as(probs)
        class_prob = probs.new_zeros((n_out, *probs.shape[1:])).scatter_reduce(0, index, probs, "amax")
        class_logit = scaled.new_full((n_out, *scaled.shape[1:]), float("-inf")).scatter_reduce(0, index, scaled, "amax")
        if self.settings.area_threshold is not None:
            first = 1 if self.has_background else 0  # the background class is never suppressed
            pred = class_prob.argmax(dim=0)
            area = torch.bincount(pred.flatten(), minlength=n_out)[first:].to(class_prob.dtype)
            keep = (area > self.settings.area_threshold * area.sum()).to(class_prob.dtype)
            class_prob = torch.cat([class_prob[:first], class_prob[first:] * keep.view(-1, 1, 1)])
        label = class_prob.argmax(dim=0)
        if self.settings.prob_threshold > 0:
            label = torch.where(class_prob.amax(dim=0) < self.settings.prob_threshold, torch.zeros_like(label), label)
        if self.settings.renormalise_probs:
            class_prob = class_prob / class_prob.sum(dim=0, keepdim=True)
        return label, class_logit, class_prob

    def _decide(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(label, class logits) of :meth:`postprocess`."""
        label, class_logit, _ = self.postprocess(logits)
        return label, class_logit

    @torch.no_grad()
    def predict(self, image: Image.Image, keep_arrays: bool = False) -> SegmentationResult:
        """Segment one PIL image (any mode; converted to RGB) -> :class:`SegmentationResult` at its size.

        ``keep_arrays=True`` also returns the intermediate arrays (``result.arrays``).
        """
        width, height = image.size
        arrays: Optional[dict[str, Any]] = {} if keep_arrays else None
        x = self._preprocess(image)
        logits = self._prompt_logits(x, (height, width), arrays)
        if arrays is not None:
            arrays["logits"] = logits[0]
        if self._pamr is not None:
            logits = self._pamr(self._pamr_guide(image, x, (height, width)), logits)
            if arrays is not None:
                arrays["logits_pamr"] = logits[0]
        label, class_logit, class_prob = self.postprocess(logits[0])
        label_np = label.to(torch.uint8).cpu().numpy()
        probs_np = class_prob.float().cpu().numpy()
        if arrays is not None:
            arrays["input"] = x[0]
            for key in ("win_feats", "win_patch_logits"):
                arrays[key] = torch.cat(arrays[key])
            arrays = {k: (v.float().cpu().numpy() if torch.is_tensor(v) else v) for k, v in arrays.items()}
            arrays.update(probs=probs_np, label=label_np)
        return SegmentationResult(
            label=label_np,
            logits=class_logit.float().cpu().numpy(),
            class_names=self.class_names,
            has_background=self.has_background,
            probs=probs_np,
            arrays=arrays,
        )

    def __repr__(self) -> str:
        return (
            f"OpenVocabSegmenter(method={self.method!r}, preset={self.settings.name!r}, mode={self.settings.mode!r}, "
            f"last_block={self.settings.last_block!r}, numerics={self.settings.numerics!r}, "
            f"classes={len(self.vocab)}, background={self.has_background}, logit_scale={self.logit_scale})"
        )
