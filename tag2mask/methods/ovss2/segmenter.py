"""SC-CLIP and PEARL in the shared open-vocabulary pipeline.

:class:`NewerOvssSegmenter` is an :class:`~tag2mask.methods.ovss.segmenter.OpenVocabSegmenter`
(resize, windows, text matching, SCLIP/NACLIP post-processing) whose dense features come from
:func:`~tag2mask.methods.ovss2.scclip.scclip_dense` (SC-CLIP) or
:class:`~tag2mask.methods.ovss2.pearl.PearlBlock` (PEARL), and, for PEARL, whose full-resolution
logits go through :func:`~tag2mask.methods.ovss2.pearl.text_laplacian_propagation` before the
decision. Settings: :mod:`tag2mask.methods.ovss2.presets`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from PIL import Image

from tag2mask.clip.model import CLIP
from tag2mask.clip.text_embed import CacheDir
from tag2mask.clip.vision import VisionTransformer
from tag2mask.methods.ovss.presets import OvssPreset
from tag2mask.methods.ovss.numerics import HARNESS_POS_OFFSET, fp16_rounded, input_mean_std
from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter, SegmentationResult
from tag2mask.methods.ovss2.pearl import PearlBlock, text_laplacian_propagation, tlp_text_matrix
from tag2mask.methods.ovss2.presets import METHODS, Ovss2Preset, get_preset
from tag2mask.methods.ovss2.scclip import SCClipConfig, check_depth, scclip_dense
from tag2mask.vocab.vocabulary import Vocabulary, load_vocabulary

__all__ = ["NewerOvssSegmenter"]

_PRESET_KEYWORDS = ("mode", "short_side", "max_long_side", "crop", "stride", "logit_scale", "prob_threshold",
                    "area_threshold", "scclip_token_map", "alpha_kk", "polar_iters", "tlp", "tlp_grid")


class NewerOvssSegmenter(OpenVocabSegmenter):
    """Segment images into a free-form vocabulary with SC-CLIP or PEARL (frozen CLIP ViT, no training).

    Args:
        model: a ViT :class:`~tag2mask.clip.model.CLIP`.
        vocab: a :class:`~tag2mask.vocab.vocabulary.Vocabulary` or a spec for ``load_vocabulary``.
        method: ``scclip`` or ``pearl`` (``corrclip``: use
            :class:`~tag2mask.methods.corrclip.segmenter.CorrClipSegmenter`, which adds DINO and regions).
        preset: ``default``, ``published``, ``published:<dataset>`` or an
            :class:`~tag2mask.methods.ovss2.presets.Ovss2Preset`; keywords left at their default take
            the preset's value (``self.settings`` holds the resolved preset).
        templates: template set name or list (preset: ``imagenet80``).
        mode, short_side, max_long_side, crop, stride, logit_scale, prob_threshold, area_threshold:
            as :class:`~tag2mask.methods.ovss.segmenter.OpenVocabSegmenter`.
        scclip_token_map, alpha_kk, polar_iters, tlp, tlp_grid: the method's own settings
            (:class:`~tag2mask.methods.ovss2.presets.Ovss2Preset`); giving one that the method does not
            use is an error.
        crop_batch, device, text_cache: as :class:`~tag2mask.methods.ovss.segmenter.OpenVocabSegmenter`.
    """

    def __init__(
        self, model: CLIP, vocab: Union[Vocabulary, str], method: str = "scclip", *,
        preset: Union[str, OvssPreset] = "default", templates: Union[str, Sequence[str], None] = None,
        crop_batch: int = 8, device: Union[str, torch.device, None] = None, text_cache: CacheDir = None,
        **overrides: Any,
    ):
        method = method.strip().lower()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
        unknown = set(overrides) - set(_PRESET_KEYWORDS)
        if unknown:
            raise TypeError(f"{method} takes no option(s) {sorted(unknown)}")
        own = {"scclip": {"scclip_token_map"}, "pearl": {"alpha_kk", "polar_iters", "tlp", "tlp_grid"},
               "corrclip": set()}[method]
        foreign = {k for k in overrides if k in {"scclip_token_map", "alpha_kk", "polar_iters", "tlp", "tlp_grid"}} - own
        if foreign:
            raise ValueError(f"option(s) {sorted(foreign)} do not apply to method {method!r}")
        if templates is not None:
            overrides["templates"] = templates if isinstance(templates, str) else "custom"
        settings: Ovss2Preset = get_preset(method, preset).replace(**overrides)
        if crop_batch <= 0:
            raise ValueError(f"crop_batch must be positive, got {crop_batch}")
        if not isinstance(model.visual, VisionTransformer):
            raise ValueError(f"method {method!r} needs a ViT image tower")
        self._setup(model, vocab, method, settings, templates, crop_batch, device)
        self._scclip = SCClipConfig(token_map=settings.scclip_token_map)
        if method == "scclip":
            check_depth(self.visual.num_blocks, self._scclip)
        self._last_block = PearlBlock(settings.alpha_kk, settings.polar_iters) if method == "pearl" else None
        self._build_text(text_cache)
        self._tlp_matrix = tlp_text_matrix(self.text) if method == "pearl" and settings.tlp else None

    def _setup(self, model: CLIP, vocab, method: str, settings: Ovss2Preset, templates, crop_batch: int,
               device) -> None:
        """The attributes the shared pipeline reads (see ``OpenVocabSegmenter.__init__``)."""
        self.is_vit, self.settings, self.method = True, settings, method
        self.vocab = load_vocabulary(vocab) if isinstance(vocab, str) else vocab
        self.compat, self.maskclip_compat = True, False
        self.mode = settings.mode
        self.short_side, self.max_long_side = settings.short_side, settings.max_long_side
        self.crop, self.stride, self.crop_batch = settings.crop, settings.stride, crop_batch
        self.prob_threshold, self.area_threshold = settings.prob_threshold, settings.area_threshold
        self.prompt_denoising, self.key_smoothing, self.ks_paper_form = 0.0, 0.0, False
        self.logit_scale = settings.effective_logit_scale
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if settings.round_fp16_weights:
            model = fp16_rounded(model)
        self.model = model.to(self.device).eval()
        self.visual = self.model.visual
        mean, std = input_mean_std("harness")
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.templates = templates if templates is not None and not isinstance(templates, str) else settings.templates
        self._pamr = None
        self._arrays: Optional[dict[str, list]] = None

    # ----------------------------------------------------------------------------------------------
    # dense features

    def dense_features(self, images: torch.Tensor, with_keys: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Normalised ``(n, 3, h, w)`` -> (features ``(n, D, gh, gw)`` float32 unit norm, ``None``).

        Harness numerics as SCLIP / NACLIP (bicubic positional embedding, ``(n + 0.1) / 14`` factors).
        """
        if with_keys:
            raise ValueError(f"{self.method} has no key smoothing")
        pos = {"pos_mode": "bicubic", "pos_scale_offset": HARNESS_POS_OFFSET}
        if self.method == "scclip":
            record: Optional[dict] = {} if self._arrays is not None else None
            tokens, (gh, gw) = scclip_dense(self.visual, images, self._scclip, record=record, **pos)
            if record is not None:
                self._keep_window_arrays(record)
        else:
            tokens, (gh, gw) = self.visual.forward_dense(images, last_block=self._last_block, **pos)
        feats = torch.nn.functional.normalize(tokens.float(), dim=-1)
        return feats.transpose(1, 2).reshape(feats.shape[0], -1, gh, gw), None

    def _keep_window_arrays(self, record: dict[str, torch.Tensor]) -> None:
        """SC-CLIP's per-window arrays (all windows) and window-0 arrays (first batch, first window)."""
        arrays = self._arrays
        arrays.setdefault("win_lof_scores", []).append(record["lof_scores"])
        arrays.setdefault("win_outliers", []).append(record["outliers"])
        if "win0_main" not in arrays:
            for name in ("mid_simi", "pre_sim_thd", "post_sim_thd", "main", "multi"):
                arrays[f"win0_{name}"] = record[name][0]

    # ----------------------------------------------------------------------------------------------
    # prediction

    @torch.no_grad()
    def predict(self, image: Image.Image, keep_arrays: bool = False) -> SegmentationResult:
        """Segment one PIL image -> :class:`~tag2mask.methods.ovss.segmenter.SegmentationResult` at its size.

        ``keep_arrays=True`` also returns the intermediate arrays named as in ``tests/data/ovss2``
        (``logits`` before TLP, ``logits_tlp``, ``tlp_*``, SC-CLIP's ``win_lof_scores`` ...).
        """
        width, height = image.size
        arrays: Optional[dict[str, Any]] = {} if keep_arrays else None
        self._arrays = arrays
        if self._last_block is not None:
            self._last_block.record = arrays
        try:
            x = self._preprocess(image)
            logits = self._prompt_logits(x, (height, width), arrays)
        finally:
            self._arrays = None
            if self._last_block is not None:
                self._last_block.record = None
        if arrays is not None:
            arrays["logits"] = logits[0]
        if self._tlp_matrix is not None:
            guide = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
            logits = text_laplacian_propagation(guide, logits, self._tlp_matrix, self.settings.tlp_grid, arrays)
            if arrays is not None:
                arrays["logits_tlp"] = logits[0]
        label, class_logit, class_prob = self.postprocess(logits[0])
        label_np, probs_np = label.to(torch.uint8).cpu().numpy(), class_prob.float().cpu().numpy()
        if arrays is not None:
            arrays["input"] = x[0]
            for key in ("win_feats", "win_patch_logits", "win_lof_scores", "win_outliers"):
                if key in arrays:
                    arrays[key] = torch.cat(arrays[key])
            if "pa_R" in arrays:
                arrays["win0_pa_R"], arrays["win0_pa_attn"] = arrays.pop("pa_R"), arrays.pop("pa_attn")
            arrays = {k: (v.cpu().numpy() if v.dtype == torch.bool else v.float().cpu().numpy())
                      if torch.is_tensor(v) else v for k, v in arrays.items()}
            arrays.update(probs=probs_np, label=label_np)
        return SegmentationResult(label=label_np, logits=class_logit.float().cpu().numpy(),
                                  class_names=self.class_names, has_background=self.has_background,
                                  probs=probs_np, arrays=arrays)

    def __repr__(self) -> str:
        return (f"NewerOvssSegmenter(method={self.method!r}, preset={self.settings.name!r}, mode={self.mode!r}, "
                f"classes={len(self.vocab)}, background={self.has_background}, logit_scale={self.logit_scale})")
