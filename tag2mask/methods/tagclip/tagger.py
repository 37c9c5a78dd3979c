"""The TagCLIP tagger: per-image class scores and tags from a frozen CLIP (spec section 4).

>>> tagger = TagCLIP(model, preset_for("voc"))
>>> result = tagger(image)           # PIL image
>>> result.tags, result.scores       # ascending class ids, (K,) float32 scores

The model must hold float32 weights as stored in the checkpoint (the official tagger never rounds
them, unlike CLIP-ES's loader); :class:`TagCLIP` refuses a model loaded with fp16-rounded weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from tag2mask.clip.model import CLIP_MEAN, CLIP_STD
from tag2mask.clip.numerics import tf32_disabled
from tag2mask.data.images import to_rgb
from tag2mask.data.transforms import resize_pil, size_to_multiple, to_normalized_tensor
from tag2mask.methods.tagclip import cwr as _cwr
from tag2mask.methods.tagclip import local as _local
from tag2mask.methods.tagclip.encoder import encode_crops, encode_full_image, normalized, text_softmax
from tag2mask.methods.tagclip.presets import TagCLIPConfig

__all__ = ["TagResult", "TagCLIP", "preprocess", "text_matrix"]


@dataclass
class TagResult:
    """Tags of one image.

    scores: ``(K,)`` float32 final scores (what the tags and the metrics use).
    tags: predicted class ids, ascending.
    argmax_fallback: no score was above the threshold, so the best class was taken.
    info: JSON-able decisions (grid, CWR candidates, crops, early exit, threshold).
    arrays: intermediates when requested (names of the golden fixtures without ``cls.``).
    """

    scores: np.ndarray
    tags: list[int]
    argmax_fallback: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def preprocess(image: Image.Image, patch: int = 16) -> torch.Tensor:
    """``(1, 3, H16, W16)`` float32: sides rounded up to multiples of ``patch``, PIL bicubic, CLIP normalisation.

    Grey images are replicated to three channels before resizing (as the official tagger does).
    """
    rgb = to_rgb(image)
    width, height = rgb.size
    h16, w16 = size_to_multiple(height, width, patch, "ceil")
    return to_normalized_tensor(resize_pil(rgb, h16, w16), CLIP_MEAN, CLIP_STD)


def text_matrix(model, texts: Sequence[str], templates: Sequence[str], cache_dir=None) -> torch.Tensor:
    """``(C, D)`` float32 text matrix: template-averaged, normalised per prompt and per text, normalised again."""
    from tag2mask.clip.text_embed import embed_names

    feats = embed_names(model, list(texts), list(templates), cache_dir=cache_dir)
    return normalized(feats)  # classify() normalises the stacked matrix once more


#: depth of the ViT-B/16 the official block indices refer to
OFFICIAL_BLOCKS = 12


def resolve_layers(layers: Sequence[int], num_blocks: int) -> tuple[int, ...]:
    """The official 0-based block indices for a model with ``num_blocks`` blocks.

    The indices refer to ViT-B/16's 12 blocks; for another depth they keep their distance from the
    last block (blocks 9-11 of 12 -> the three blocks before the last one; indices that would fall
    before the first block are dropped). Raises when none is left.
    """
    shifted = tuple(i - OFFICIAL_BLOCKS + num_blocks for i in layers)
    kept = tuple(i for i in shifted if 0 <= i < num_blocks)
    if not kept:
        raise ValueError(f"attention layers {tuple(layers)} select no block of a {num_blocks}-block model")
    return kept


class TagCLIP:
    """Training-free multi-label classifier (TagCLIP, AAAI 2024) on a frozen CLIP ViT.

    Args:
        model: tag2mask CLIP with a ViT image tower and float32 (unrounded) weights.
        config: :class:`~tag2mask.methods.tagclip.presets.TagCLIPConfig` (see ``preset_for``).
        text_cache_dir: text-embedding cache folder (``None`` default, ``False`` off).
    """

    def __init__(self, model, config: TagCLIPConfig, text_cache_dir=None) -> None:
        if not model.is_vit:
            raise ValueError("TagCLIP needs a ViT image tower (it votes with the attention maps of its blocks)")
        if str(getattr(model, "fingerprint", "")).endswith(":fp16r"):
            raise ValueError("TagCLIP runs the checkpoint's weights unrounded; load the model without "
                             "fp16 weight rounding (CLIP-ES's official rounding)")
        self.mean_layers = resolve_layers(config.attn_mean_layers, model.visual.num_blocks)
        self.model = model.eval()
        self.config = config
        self.device = next(model.parameters()).device
        with tf32_disabled():
            self.text = text_matrix(model, config.texts, config.templates, text_cache_dir).to(self.device)
        self.logit_scale = float(model.logit_scale.detach().float().exp())

    def with_config(self, config: TagCLIPConfig) -> "TagCLIP":
        """A tagger on the same model with other settings; the text matrix is reused when texts and templates agree."""
        if (config.texts, config.templates) != (self.config.texts, self.config.templates):
            return TagCLIP(self.model, config)
        other = object.__new__(TagCLIP)
        other.__dict__.update(self.__dict__)
        other.config = config
        return other

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    def __call__(self, image: Image.Image, keep_arrays: bool = False) -> TagResult:
        """Scores and tags of one PIL image."""
        x = preprocess(image, self.model.visual.patch_size).to(self.device)
        with tf32_disabled():
            return self.tag_tensor(x, keep_arrays)

    def batch(self, images: Sequence[Image.Image], keep_arrays: bool = False) -> list[TagResult]:
        """:meth:`__call__` for several images (each has its own grid; crops are batched per image)."""
        return [self(im, keep_arrays) for im in images]

    def tag_tensor(self, x: torch.Tensor, keep_arrays: bool = False) -> TagResult:
        """Scores and tags of a preprocessed ``(1, 3, H16, W16)`` image (:func:`preprocess`)."""
        cfg, visual = self.config, self.model.visual
        full = encode_full_image(visual, x, cfg.last_block_mask, cfg.round_pos_embed_fp16)
        coarse = _local.coarse_scores(full.tokens, self.text, self.logit_scale)
        vote = _local.attention_vote(full.attentions, self.mean_layers, cfg.attn_vote_min_count)
        attn = vote.weight @ coarse
        cm = _local.class_box_masks(attn, full.grid, cfg.quirks.box_edge_quirk)
        refined = _local.refined_scores(vote.weight, coarse, attn, cm.masks, cm.processed)
        local = refined.max(dim=0).values
        k = cfg.num_classes
        plan, crops, crop_masks, crop_cls, crop_probs = None, None, None, None, None
        scores = local[:k].clone()
        if cfg.cwr:
            plan = _cwr.plan_crops(refined, local, k, full.grid, cfg.theta, cfg.quirks.box_edge_quirk,
                                   cfg.quirks.cwr_early_exit)
            if plan.crops:
                crops, crop_masks = _cwr.crop_inputs(x, plan, visual.patch_size, visual.image_size)
                crop_cls = encode_crops(visual, crops, crop_masks, cfg.crop_cls_mask_value)
                crop_probs = text_softmax(crop_cls, self.text, self.logit_scale)
                scores = _cwr.fuse(local, crop_probs, plan, k, cfg.cwr_fuse_weight)
        tags, fallback = _cwr.tags_from_scores(scores, cfg.theta)
        info = self._info(full.grid, plan, scores, tags, fallback)
        result = TagResult(scores.detach().cpu().numpy().astype(np.float32), tags, fallback, info)
        if keep_arrays:
            result.arrays = _arrays(x, full, vote, coarse, attn, cm, refined, local, scores,
                                    crops, crop_masks, crop_cls, crop_probs,
                                    visual.image_size // visual.patch_size, tuple(self.text.shape[::-1]))
        return result

    def _info(self, grid, plan: Optional[_cwr.CropPlan], scores, tags, fallback) -> dict[str, Any]:
        info: dict[str, Any] = {"grid_hw": list(grid), "threshold": float(_cwr.relative_threshold(scores, self.config.theta)),
                                "tags": tags, "argmax_fallback": fallback}
        if plan is not None:
            info["cwr"] = {"threshold": plan.threshold, "candidates": plan.candidates,
                           "processed": [{"cls": c, "box_y1y2x1x2": list(b)} for c, b, _ in plan.crops],
                           "early_return": plan.early_return, "skipped": plan.skipped}
        return info


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _arrays(x, full, vote, coarse, attn, cm, refined, local, scores, crops, crop_masks, crop_cls, crop_probs,
            grid_of_crops: int, dims: tuple[int, int]) -> dict:
    """Every intermediate under the golden fixtures' names (without the ``cls.`` prefix)."""
    out = {
        "input": _np(x), "pos_emb_new": _np(full.pos_table), "image_features": _np(normalized(full.tokens)),
        "attn_layers": _np(full.attentions[:, 1:, 1:]), "attn_layer_mean": _np(vote.layer_mean),
        "attn_vote_count": vote.count.cpu().numpy().astype(np.uint8), "attn_sel_mean": _np(vote.sel_mean),
        "attn_weight": _np(vote.weight), "logits_coarse": _np(coarse), "logits_attn": _np(attn),
        "mask_attn_box_mask": cm.masks, "logits_refined": _np(refined), "logits_max": _np(local),
        "cwr_scores": _np(scores),
    }
    if crops is not None:
        c = crops.shape[-1] // 2
        out.update({
            "crop_mask14": crop_masks.cpu().numpy().astype(np.uint8),
            "crop_input_center": _np(crops[:, :, c - 16 : c + 16, c - 16 : c + 16]),
            "crop_cls_feature": _np(normalized(crop_cls)), "crop_probs": _np(crop_probs),
        })
    else:  # no crop encoded: empty arrays of the same layout, as the fixtures store them
        g = grid_of_crops
        out.update({"crop_mask14": np.zeros((0, g, g), np.uint8),
                    "crop_input_center": np.zeros((0, 3, 32, 32), np.float32),
                    "crop_cls_feature": np.zeros((0, dims[0]), np.float32),
                    "crop_probs": np.zeros((0, dims[1]), np.float32)})
    return out

