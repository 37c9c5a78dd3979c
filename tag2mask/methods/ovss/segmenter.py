"""Training-free open-vocabulary segmentation with a frozen CLIP (MaskCLIP, SCLIP, ClearCLIP, NACLIP).

Pipeline of :meth:`OpenVocabSegmenter.predict` (the SCLIP-family harness, MaskCLIP as a special case):

1. resize so the short side is ``short_side`` (long side at most ``max_long_side``), like mmcv's
   ``Resize(keep_ratio=True)``; normalise (CLIP mean/std, or ImageNet's in MaskCLIP compat mode);
2. dense patch features from the image tower with the method's last block
   (:mod:`tag2mask.methods.ovss.last_block`), over the whole image or over sliding crops;
3. cosine logits against L2-normalised, template-averaged text embeddings, one row per prompt
   (class synonyms and background words are separate prompts); MaskCLIP's optional prompt
   denoising and key smoothing (:mod:`tag2mask.methods.ovss.maskclip_refine`) at feature resolution;
4. bilinear upsampling to the crop / input size, averaging of overlapping crops, upsampling to the
   image size; optional PAMR;
5. ``softmax(logit_scale · logits)`` over prompts, class probability = max over its prompts,
   optional area threshold, argmax, pixels below ``prob_threshold`` become background.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tag2mask.clip.layers import ResidualAttentionBlock, set_numerics
from tag2mask.clip.model import CLIP, CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from tag2mask.clip.text_embed import CacheDir, embed_vocabulary
from tag2mask.clip.vision import VisionTransformer
from tag2mask.inference import slide_logits
from tag2mask.methods.ovss.last_block import get_last_block, maskclip_keys
from tag2mask.methods.ovss.maskclip_refine import key_smooth, prompt_denoise
from tag2mask.vocab.vocabulary import Vocabulary, load_vocabulary

__all__ = ["METHODS", "PUBLISHED_SETTINGS", "SegmentationResult", "OpenVocabSegmenter", "maskclip_numerics"]

METHODS = ("maskclip", "sclip", "clearclip", "naclip", "clip")

#: settings of each method's official harness, for orientation (docs, CLI help); the segmenter's
#: own defaults are the shared ones in its signature.
PUBLISHED_SETTINGS: dict[str, dict[str, object]] = {
    "maskclip": {"templates": "maskclip85", "short_side": 512, "mode": "whole", "logit_scale": 1.0},
    "sclip": {"templates": "imagenet80", "short_side": 336, "mode": "slide", "crop": 224, "stride": 112, "logit_scale": 40.0},
    "clearclip": {"templates": "imagenet80", "short_side": 448, "mode": "slide", "crop": 448, "stride": 224, "logit_scale": 50.0},
    "naclip": {"templates": "imagenet80", "short_side": 336, "mode": "slide", "crop": 224, "stride": 112, "logit_scale": 40.0,
               "gaussian_std": 5.0, "pamr": "10 steps, dilations (8, 16)"},
    "clip": {"templates": "imagenet80", "logit_scale": 40.0},
}

_DEFAULT_TEMPLATES = {"maskclip": "maskclip85"}  # everything else: the 80 ImageNet templates
_NATIVE_LOGIT_SCALE = {"clearclip": 50.0}  # everything else: 40, the SCLIP harness default
_BACKGROUND_NAME = "background"


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
    """

    label: np.ndarray
    logits: np.ndarray
    class_names: tuple[str, ...]
    has_background: bool

    def present(self) -> list[int]:
        """Label values that occur in ``label``, sorted."""
        return [int(v) for v in np.unique(self.label)]


@contextlib.contextmanager
def maskclip_numerics(visual: nn.Module) -> Iterator[None]:
    """Temporarily give a ViT image tower MaskCLIP's official numerics; restored on exit.

    The official model runs CLIP weights as an mmseg ViT with LayerNorm eps 1e-6 (CLIP: 1e-5),
    exact erf GELU (CLIP: QuickGELU) and bicubic positional interpolation. ResNets are unchanged.
    """
    if not isinstance(visual, VisionTransformer):
        yield
        return
    eps = [(m, m.eps) for m in visual.modules() if isinstance(m, nn.LayerNorm)]
    acts = [(b, b.mlp.gelu) for b in visual.modules() if isinstance(b, ResidualAttentionBlock)]
    interpolation = visual.pos_interpolation
    try:
        set_numerics(visual, ln_eps=1e-6, activation="gelu")
        visual.pos_interpolation = "bicubic"
        yield
    finally:
        for m, e in eps:
            m.eps = e
        for b, act in acts:
            b.mlp.gelu = act
        visual.pos_interpolation = interpolation


@contextlib.contextmanager
def _pos_interpolation(visual: nn.Module, mode: str) -> Iterator[None]:
    """Temporarily set a ViT's positional-embedding interpolation mode."""
    if not isinstance(visual, VisionTransformer):
        yield
        return
    before = visual.pos_interpolation
    try:
        visual.pos_interpolation = mode
        yield
    finally:
        visual.pos_interpolation = before


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class OpenVocabSegmenter:
    """Segment images into a free-form vocabulary with a frozen CLIP.

    Args:
        model: a :class:`~tag2mask.clip.model.CLIP` (ViT for every method; ResNets for ``maskclip``).
        vocab: a :class:`~tag2mask.vocab.vocabulary.Vocabulary` or a spec for ``load_vocabulary``
            (``"cat, dog; background: sky, grass"`` or a name-set file).
        method: ``maskclip`` | ``sclip`` | ``clearclip`` | ``naclip`` | ``clip`` (unchanged last block).
        templates: template set name or list; default ``maskclip85`` for MaskCLIP, else ``imagenet80``.
        compat: official numerics of the method. MaskCLIP: LayerNorm eps 1e-6, erf GELU, ImageNet
            normalisation, bicubic positional interpolation, bottom/right zero padding to the patch
            size, raw cosine logits (``logit_scale`` 1). SCLIP family: bicubic positional
            interpolation (their ``interpolate_pos_encoding``); everything else is already native.
        mode: ``whole`` (one pass) or ``slide`` (crops of ``crop`` every ``stride`` pixels, logits averaged).
        short_side, max_long_side: input rescaling (``short_side=None`` keeps the image size).
        logit_scale: softmax temperature over prompts; default 1 in MaskCLIP compat mode, else 40
            (50 for ClearCLIP), the official harness values.
        prob_threshold: pixels whose best class probability is below it become background.
        area_threshold: SCLIP's optional rule: classes covering less than this fraction of the
            predicted (foreground) area are suppressed before the argmax.
        pamr: refine the upsampled logits with PAMR (``pamr_steps`` iterations, ``pamr_dilations``).
        prompt_denoising, key_smoothing: MaskCLIP PD / KS thresholds (0 = off, the official default);
            ``ks_paper_form`` switches KS to the paper's cosine affinity.
        naclip_std: NACLIP's Gaussian σ in patches.
        crop_batch: crops per forward pass in slide mode.
        device: where to run; the model is moved there (default: where the model already is).
        text_cache: text-embedding cache folder (``None`` default, ``False`` off).
    """

    def __init__(
        self,
        model: CLIP,
        vocab: Union[Vocabulary, str],
        method: str = "maskclip",
        *,
        templates: Union[str, Sequence[str], None] = None,
        compat: bool = False,
        mode: str = "whole",
        short_side: Optional[int] = 448,
        max_long_side: int = 2048,
        crop: int = 224,
        stride: int = 112,
        logit_scale: Optional[float] = None,
        prob_threshold: float = 0.0,
        area_threshold: Optional[float] = None,
        pamr: bool = False,
        pamr_steps: int = 10,
        pamr_dilations: Sequence[int] = (8, 16),
        prompt_denoising: float = 0.0,
        key_smoothing: float = 0.0,
        ks_paper_form: bool = False,
        naclip_std: float = 5.0,
        crop_batch: int = 8,
        device: Union[str, torch.device, None] = None,
        text_cache: CacheDir = None,
    ):
        method = method.strip().lower()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
        if mode not in ("whole", "slide"):
            raise ValueError(f"unknown mode {mode!r}; choose 'whole' or 'slide'")
        if not 0.0 <= prob_threshold <= 1.0:
            raise ValueError(f"prob_threshold must be in [0, 1], got {prob_threshold}")
        if area_threshold is not None and not 0.0 <= area_threshold < 1.0:
            raise ValueError(f"area_threshold must be in [0, 1), got {area_threshold}")
        if crop <= 0 or stride <= 0 or crop_batch <= 0:
            raise ValueError(f"crop, stride and crop_batch must be positive, got {crop}, {stride}, {crop_batch}")
        if short_side is not None and short_side <= 0:
            raise ValueError(f"short_side must be positive or None, got {short_side}")
        self.is_vit = isinstance(model.visual, VisionTransformer)
        if not self.is_vit and method != "maskclip":
            raise ValueError(f"method {method!r} needs a ViT image tower; ResNet CLIPs support only 'maskclip'")
        if (prompt_denoising > 0 or key_smoothing > 0) and method != "maskclip":
            raise ValueError("prompt denoising and key smoothing are MaskCLIP refinements; use method='maskclip'")

        self.vocab = load_vocabulary(vocab) if isinstance(vocab, str) else vocab
        self.method = method
        self.compat = compat
        self.mode = mode
        self.short_side, self.max_long_side = short_side, max_long_side
        self.crop, self.stride, self.crop_batch = crop, stride, crop_batch
        self.prob_threshold, self.area_threshold = prob_threshold, area_threshold
        self.prompt_denoising, self.key_smoothing, self.ks_paper_form = prompt_denoising, key_smoothing, ks_paper_form
        self.maskclip_compat = compat and method == "maskclip"
        if logit_scale is None:
            logit_scale = 1.0 if self.maskclip_compat else _NATIVE_LOGIT_SCALE.get(method, 40.0)
        self.logit_scale = float(logit_scale)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.maskclip_compat else (CLIP_MEAN, CLIP_STD)

        self.device = torch.device(device) if device is not None else _model_device(model)
        self.model = model.to(self.device).eval()
        self.visual = self.model.visual
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self._last_block = get_last_block(method, std=naclip_std) if method == "naclip" else get_last_block(method)
        self.templates = templates if templates is not None else _DEFAULT_TEMPLATES.get(method, "imagenet80")
        self._build_text(text_cache)

        self._pamr = None
        if pamr:
            try:
                from tag2mask.refinement.pamr import PAMR
            except ImportError as exc:  # the module ships with tag2mask; this only guards partial installs
                raise ImportError(f"PAMR post-processing is unavailable: {exc}") from exc
            self._pamr = PAMR(pamr_steps, dilations=tuple(pamr_dilations)).to(self.device)

    # ----------------------------------------------------------------------------------------------
    # text side

    def _build_text(self, cache: CacheDir) -> None:
        """Prompt embeddings ``(S, D)`` and the output label of every prompt ``(S,)``."""
        fg, bg = embed_vocabulary(self.model, self.vocab, self.templates, cache, device=self.device)
        # label 0 is background when background words exist or low-confidence pixels need a home
        self.has_background = bg is not None or self.prob_threshold > 0
        offset = 1 if self.has_background else 0
        feats = [fg.features]
        labels = [fg.class_index + offset]
        if bg is not None:
            feats.append(bg.features)
            labels.append(torch.zeros(bg.features.shape[0], dtype=torch.long))
        names = ((_BACKGROUND_NAME,) if self.has_background else ()) + tuple(self.vocab.names)
        if len(names) > 256:
            raise ValueError(f"{len(names)} labels do not fit an 8-bit label map (at most 256 incl. background)")
        self.class_names: tuple[str, ...] = names
        self.text = torch.cat(feats).to(self.device, torch.float32)  # (S, D), rows unit norm
        self.prompt_label = torch.cat(labels).to(self.device)  # (S,) values in 0..len(names)-1

    # ----------------------------------------------------------------------------------------------
    # image side

    def _numerics(self) -> contextlib.AbstractContextManager:
        if self.maskclip_compat:
            return maskclip_numerics(self.visual)
        if self.compat:
            return _pos_interpolation(self.visual, "bicubic")
        return contextlib.nullcontext()

    def _preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> resized, normalised ``(1, 3, h, w)`` float32 on the device."""
        x = self._to_tensor(image)  # 0..255
        h, w = x.shape[-2:]
        if self.short_side is not None:
            # mmcv keep-ratio rule: the largest scale with short side <= S and long side <= max
            scale = min(self.max_long_side / max(h, w), self.short_side / min(h, w))
            size = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
            if size != (h, w):
                # the official pipelines resize uint8 images, so round back to integers
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
        return self._normalise(x)

    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> ``(1, 3, H, W)`` float32 RGB in 0..255 on the device."""
        from tag2mask.data.images import to_rgb

        arr = np.array(to_rgb(image), dtype=np.uint8)  # a writable copy for torch.from_numpy
        return torch.from_numpy(arr).to(self.device).permute(2, 0, 1)[None].float()

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x / 255.0 - self._mean) / self._std

    @torch.no_grad()
    def dense_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Prompt logits at feature resolution: normalised ``(n, 3, h, w)`` -> ``(n, S, h', w')`` float32.

        Cosine similarities (PD sets removed prompts to -100; KS turns them into smoothed scores).
        In MaskCLIP compat mode a ViT input is zero-padded bottom/right to a multiple of the patch
        size first (mmseg ``PatchEmbed(padding='corner')``); otherwise the patch grid floors.
        """
        keys = None
        if self.is_vit:
            if self.maskclip_compat:
                p = self.visual.patch_size
                h, w = images.shape[-2:]
                images = F.pad(images, (0, (-w) % p, 0, (-h) % p))
            captured: dict[str, torch.Tensor] = {}
            block_fn = self._last_block
            if self.key_smoothing > 0:
                def capturing_block(block, x, grid):  # noqa: E306 - capture the keys on the way through
                    captured["keys"] = maskclip_keys(block, x)[:, 1:]
                    return self._last_block(block, x, grid)

                block_fn = capturing_block
            with self._numerics():
                feats, (gh, gw) = self.visual.forward_dense(images, last_block=block_fn)
            keys = captured.get("keys")
        else:
            fmap = self.visual.forward_features(images)
            gh, gw = fmap.shape[-2:]
            feats = self.visual.attnpool.dense_values(fmap).flatten(2).transpose(1, 2)  # (n, hw, D)
            if self.key_smoothing > 0:
                keys = self.visual.attnpool.dense_keys(fmap)
        feats = F.normalize(feats.float(), dim=-1)
        logits = (feats @ self.text.T).transpose(1, 2).reshape(feats.shape[0], -1, gh, gw)
        if self.prompt_denoising > 0:
            logits = prompt_denoise(logits, self.prompt_denoising)
        if self.key_smoothing > 0 and keys is not None:
            logits = key_smooth(logits, keys.float(), self.key_smoothing, paper_form=self.ks_paper_form)
        return logits

    def _logits_at(self, images: torch.Tensor) -> torch.Tensor:
        """Prompt logits bilinearly resized to the (unpadded) input size: ``(n, S, h, w)``.

        A side shorter than one patch (a 1x300 strip resized under the long-side cap) is zero-padded
        (the mean colour after normalisation) to one patch, and the padding is cropped off again.
        """
        h, w = images.shape[-2:]
        least = self.visual.patch_size if self.is_vit else 32  # ResNet towers downsample by 32
        if h < least or w < least:
            images = F.pad(images, (0, max(0, least - w), 0, max(0, least - h)))
        out = self.dense_logits(images)
        out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return out[..., :h, :w]

    def _slide(self, x: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits ``(1, S, h, w)``: crops averaged where they overlap (SCLIP harness)."""
        return slide_logits(self._logits_at, x, self.crop, self.stride, self.crop_batch)

    # ----------------------------------------------------------------------------------------------
    # decision

    def _decide(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt logits ``(S, H, W)`` -> (label ``(H, W)`` int64, class logits ``(C, H, W)``)."""
        scaled = logits * self.logit_scale
        probs = scaled.softmax(dim=0)
        n_out = len(self.class_names)
        index = self.prompt_label.view(-1, 1, 1).expand_as(probs)
        # class score = max over its prompts (synonyms, background words)
        class_prob = probs.new_zeros((n_out, *probs.shape[1:])).scatter_reduce(0, index, probs, "amax")
        class_logit = scaled.new_full((n_out, *scaled.shape[1:]), float("-inf")).scatter_reduce(0, index, scaled, "amax")
        if self.area_threshold is not None:
            first = 1 if self.has_background else 0  # SCLIP never suppresses the background class
            pred = class_prob.argmax(dim=0)
            area = torch.bincount(pred.flatten(), minlength=n_out)[first:].to(class_prob.dtype)
            keep = (area > self.area_threshold * area.sum()).to(class_prob.dtype)
            class_prob = torch.cat([class_prob[:first], class_prob[first:] * keep.view(-1, 1, 1)])
        best, label = class_prob.max(dim=0)
        if self.prob_threshold > 0:
            label = torch.where(best < self.prob_threshold, torch.zeros_like(label), label)
        return label, class_logit

    @torch.no_grad()
    def predict(self, image: Image.Image) -> SegmentationResult:
        """Segment one PIL image (any mode; converted to RGB) -> :class:`SegmentationResult` at its size."""
        width, height = image.size
        x = self._preprocess(image)
        logits = self._slide(x) if self.mode == "slide" else self._logits_at(x)
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        if self._pamr is not None:
            # PAMR follows colour affinities of the image at output resolution (as NACLIP/SCLIP do)
            rgb = self._normalise(self._to_tensor(image))
            logits = self._pamr(rgb, logits)
        label, class_logit = self._decide(logits[0])
        return SegmentationResult(
            label=label.to(torch.uint8).cpu().numpy(),
            logits=class_logit.float().cpu().numpy(),
            class_names=self.class_names,
            has_background=self.has_background,
        )

    def __repr__(self) -> str:
        return (
            f"OpenVocabSegmenter(method={self.method!r}, mode={self.mode!r}, compat={self.compat}, "
            f"classes={len(self.vocab)}, background={self.has_background}, logit_scale={self.logit_scale})"
        )
