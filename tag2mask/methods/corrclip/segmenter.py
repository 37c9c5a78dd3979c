"""CorrCLIP (Zhang et al., ICCV 2025) in the shared open-vocabulary pipeline.

:class:`CorrClipSegmenter` resizes and normalises like the other training-free segmenters, slides
windows (crop 336 / stride 112 published), zero-pads each window to a multiple of 56 (its region map
with id 10000), runs :func:`~tag2mask.methods.corrclip.model.corrclip_window`, upsamples the
DINO-grid logits to the padded window, crops, stitches (sum / count), resizes to the image, decides
as SCLIP (no renormalisation) and finally applies map correction
(:func:`~tag2mask.methods.corrclip.regions.correct_labels`) with the image-size region map.

Needs a DINO (:func:`tag2mask.models.dino.load_dino`) and a region source (a folder of
pre-generated maps, SAM, or superpixels: :mod:`tag2mask.methods.corrclip.regions`), or a region
map per call.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tag2mask.clip.model import CLIP
from tag2mask.methods.corrclip.model import corrclip_window
from tag2mask.methods.corrclip.regions import PAD_ID, correct_labels
from tag2mask.methods.ovss.numerics import HARNESS_POS_OFFSET
from tag2mask.methods.ovss.segmenter import SegmentationResult
from tag2mask.methods.ovss.windows import centre_padding, window_boxes
from tag2mask.methods.ovss2.segmenter import NewerOvssSegmenter
from tag2mask.models.dino import DinoViT
from tag2mask.vocab.vocabulary import Vocabulary

__all__ = ["CorrClipSegmenter", "WINDOW_MULTIPLE", "corrclip_predictor", "region_source"]

WINDOW_MULTIPLE = 56  # official: windows padded to a multiple of 56 (lcm of the patch sizes 8 and 14, x4)

RegionSource = Callable[[np.ndarray, str], np.ndarray]


class CorrClipSegmenter(NewerOvssSegmenter):
    """Segment images with CorrCLIP: a frozen CLIP ViT, a DINO ViT and class-agnostic region maps.

    Args:
        model: a ViT CLIP (published: MetaCLIP ``ViT-B-16-quickgelu`` / ``metaclip_fullcc``).
        vocab: a :class:`~tag2mask.vocab.vocabulary.Vocabulary` or spec (CorrCLIP's ``"; "`` name
            files: :func:`tag2mask.methods.corrclip.names.read_corrclip_names`).
        dino: a :class:`~tag2mask.models.dino.DinoViT` (published: ``dino_vitb8``).
        regions: ``(rgb (H, W, 3) uint8, key) -> (H', W') int`` region source, used when
            :meth:`predict` gets no ``region_map``.
        preset, templates, device, text_cache, overrides: as
            :class:`~tag2mask.methods.ovss2.segmenter.NewerOvssSegmenter` (method ``corrclip``).
            Windows run one at a time (each has its own region tokens): ``crop_batch`` is refused.
    """

    wants_key = True  # the command passes the file stem (region folders are keyed by it)

    def __init__(self, model: CLIP, vocab: Union[Vocabulary, str], dino: DinoViT, *,
                 regions: Optional[RegionSource] = None, **kwargs: Any):
        if "crop_batch" in kwargs:
            raise TypeError("CorrCLIP runs one window at a time (each window has its own region tokens); "
                            "crop_batch does not apply")
        super().__init__(model, vocab, "corrclip", **kwargs)
        self.dino = dino.to(self.device).eval()
        self.regions = regions

    def _region_map(self, rgb: np.ndarray, region_map: Optional[np.ndarray], key: Optional[str]) -> torch.Tensor:
        if region_map is None:
            if self.regions is None:
                raise ValueError("CorrCLIP needs region maps: give regions= or region_map=")
            region_map = self.regions(rgb, key or "")
        region = torch.as_tensor(np.asarray(region_map).astype(np.int64), device=self.device)
        if region.ndim != 2:
            raise ValueError(f"a region map is (H, W), got shape {tuple(region.shape)}")
        if tuple(region.shape) != rgb.shape[:2]:  # e.g. an image downscaled by --max-pixels
            region = F.interpolate(region[None, None].float(), size=rgb.shape[:2], mode="nearest")[0, 0].long()
        return region

    def _window(self, crop: torch.Tensor, region: torch.Tensor, arrays: Optional[dict]) -> torch.Tensor:
        """Logits ``(1, Q, h, w)`` of one window ``(1, 3, h, w)`` and its region ids ``(h, w)``."""
        h, w = crop.shape[-2:]
        pad = centre_padding(h, w, WINDOW_MULTIPLE)
        crop, region = F.pad(crop, pad), F.pad(region, pad, value=PAD_ID)
        record: Optional[dict] = {} if arrays is not None else None
        feats, dgrid = corrclip_window(self.visual, self.dino, crop, region, pos_mode="bicubic",
                                       pos_scale_offset=HARNESS_POS_OFFSET, record=record)
        feats = F.normalize(feats.float(), dim=-1)
        patch_logits = (feats @ self.text.T).T.reshape(1, -1, *dgrid)
        if arrays is not None:
            for name, value in (("win_feats", feats.T.reshape(1, -1, *dgrid)), ("win_patch_logits", patch_logits),
                                ("win_dino_feats", record["dino_feats"].T.reshape(1, -1, *dgrid)),
                                ("win_region_masks", region[None]), ("win_scope", record["scope"][None])):
                arrays.setdefault(name, []).append(value)
            arrays.setdefault("dbscan", []).append(record["dbscan"])
        logits = F.interpolate(patch_logits, size=crop.shape[-2:], mode="bilinear", align_corners=False)
        left, _, top, _ = pad
        return logits[..., top:top + h, left:left + w]

    def _stitched(self, x: torch.Tensor, region: torch.Tensor, out_hw: tuple[int, int],
                  arrays: Optional[dict]) -> torch.Tensor:
        _, _, h, w = x.shape
        region = F.interpolate(region[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        boxes = window_boxes(h, w, self.crop, self.stride) if self.mode == "slide" else [(0, 0, h, w)]
        total = x.new_zeros((1, self.text.shape[0], h, w))
        count = x.new_zeros((1, 1, h, w))
        for y1, x1, y2, x2 in boxes:  # windows, as every sliding-window harness
            total[..., y1:y2, x1:x2] += self._window(x[..., y1:y2, x1:x2], region[y1:y2, x1:x2], arrays)
            count[..., y1:y2, x1:x2] += 1
        if arrays is not None:
            arrays["win_boxes"] = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        return F.interpolate(total / count, size=out_hw, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict(self, image: Image.Image, keep_arrays: bool = False, region_map: Optional[np.ndarray] = None,
                key: Optional[str] = None) -> SegmentationResult:
        """Segment one PIL image; ``region_map`` ``(H, W)`` ints (0 = unsegmented) or the region source
        with ``key`` (the file stem). ``keep_arrays``: the fixtures' arrays (``label_nocorr`` = before
        map correction, ``win_dino_feats``, ``win_region_masks``, ``win_scope``, ``dbscan``)."""
        width, height = image.size
        rgb = self._rgb(image)
        region = self._region_map(rgb, region_map, key)
        arrays: Optional[dict[str, Any]] = {} if keep_arrays else None
        x = self._preprocess(image)
        logits = self._stitched(x, region, (height, width), arrays)
        label, class_logit, class_prob = self.postprocess(logits[0])
        corrected = correct_labels(label, region, len(self.class_names))
        label_np, probs_np = corrected.to(torch.uint8).cpu().numpy(), class_prob.float().cpu().numpy()
        if arrays is not None:
            arrays.update(input=x[0], logits=logits[0], label_nocorr=label.to(torch.uint8))
            for k in ("win_feats", "win_patch_logits", "win_dino_feats", "win_region_masks", "win_scope"):
                arrays[k] = torch.cat(arrays[k])
            arrays["win_region_masks"] = arrays["win_region_masks"].to(torch.int16)
            arrays = {k: (v.cpu().numpy() if v.dtype in (torch.bool, torch.uint8, torch.int16) else
                          v.float().cpu().numpy()) if torch.is_tensor(v) else v for k, v in arrays.items()}
            arrays.update(probs=probs_np, label=label_np)
        return SegmentationResult(label=label_np, logits=class_logit.float().cpu().numpy(),
                                  class_names=self.class_names, has_background=self.has_background,
                                  probs=probs_np, arrays=arrays)


def region_source(spec: Union[str, RegionSource], device: Union[str, torch.device, None] = None,
                  sam_weights: Optional[str] = None, allow_download: Optional[bool] = None) -> RegionSource:
    """A region source from ``spec``: a folder of region maps keyed by file stem, ``slic`` /
    ``felzenszwalb`` superpixels, ``sam`` (SAM with CorrCLIP's dynamic settings; needs ``sam_weights``),
    or a callable returned as it is."""
    from tag2mask.methods.corrclip.regions import ProposalRegions, RegionFolder

    if callable(spec):
        return spec
    if spec in ("slic", "felzenszwalb"):
        from tag2mask.proposals.superpixels import SuperpixelProposals

        return ProposalRegions(SuperpixelProposals(spec))
    if spec == "sam":
        if not sam_weights:
            raise ValueError("regions 'sam' need SAM weights (a Hugging Face SamModel folder or hub id)")
        from tag2mask.proposals.sam import SamGeneratorSettings, SamProposals, load_sam

        # CorrCLIP's dynamic SAM2 settings: 8 points per side, IoU and stability thresholds 0.4
        settings = SamGeneratorSettings(points_per_side=8, pred_iou_thresh=0.4, stability_score_thresh=0.4)
        sam = load_sam(sam_weights, device, allow_download=allow_download)
        return ProposalRegions(SamProposals(sam, settings, weights=str(sam_weights)))
    return RegionFolder(spec)


def corrclip_predictor(model: CLIP, vocab: Union[Vocabulary, str], method: str = "corrclip", *,
                       dino: Union[DinoViT, str] = "dino_vitb8", regions: Union[str, RegionSource, None] = None,
                       dino_heads: Optional[int] = None, sam_weights: Optional[str] = None,
                       allow_download: Optional[bool] = None, **settings: Any) -> CorrClipSegmenter:
    """The registry's predictor factory of ``corrclip``: ``dino`` a :class:`~tag2mask.models.dino.DinoViT` or
    weights for :func:`~tag2mask.models.dino.load_dino`; ``regions`` see :func:`region_source`;
    ``settings`` as :class:`CorrClipSegmenter` (``preset``, ``mode``, ``short_side`` ...)."""
    from tag2mask.models.dino import load_dino

    if method != "corrclip":
        raise ValueError(f"corrclip_predictor builds CorrCLIP, not {method!r}")
    if regions is None:
        raise ValueError("CorrCLIP needs regions: a folder of region maps, sam, slic or felzenszwalb")
    device = settings.get("device") or next(model.parameters()).device  # where CLIP is ('auto' resolved by then)
    source = region_source(regions, device, sam_weights, allow_download)
    if not isinstance(dino, DinoViT):
        dino = load_dino(dino, device, allow_download=allow_download, num_heads=dino_heads)
    return CorrClipSegmenter(model, vocab, dino, regions=source, **settings)
