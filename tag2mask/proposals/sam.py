"""SAM automatic mask generation on Hugging Face ``transformers`` (``SamModel`` + its PIL image
processor), with FMA-WSSS's level-aware variant, and no torchvision.

The generator follows Segment Anything's automatic mask generator: a grid of point prompts over
the image and over overlapping crops; every point gives three masks (levels 0/1/2 = sub-part /
part / whole); masks are kept when their predicted IoU and stability score pass thresholds and
they do not touch an inner crop edge; box NMS within each crop, then across crops (masks of
smaller crops win); optional clean-up of small holes and islands. FMA-WSSS adds per-level offsets
to the IoU threshold and to the NMS scores (so whole-object masks survive) and the level-overlap
filter (:func:`tag2mask.proposals.filters.level_overlap_filter`). ``SAM_PRESETS['fma']`` is its
``l2_nmsf_s1_rsw3`` setting (the official fork itself is unpublished; crop NMS and clean-up are
upstream SAM's).

Weights: a local Hugging Face folder (``config.json`` + weights), or a hub id (``facebook/sam-vit-huge``)
that is read from the local Hugging Face cache and downloaded only when allowed
(``allow_download=True`` or ``TAG2MASK_ALLOW_DOWNLOAD=1``).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from tag2mask.clip.loading import WeightsError, WeightsNotFoundError
from tag2mask.proposals.base import MaskProposals
from tag2mask.proposals.filters import level_overlap_filter, remove_small_regions
from tag2mask.proposals.nms import batched_nms, masks_to_boxes

__all__ = ["SamGeneratorSettings", "SAM_PRESETS", "SamMaskGenerator", "SamProposals", "load_sam",
           "crop_boxes", "point_grid", "stability_scores"]

Levels3 = tuple[float, float, float]


@dataclass(frozen=True)
class SamGeneratorSettings:
    """Automatic-mask settings (SAM's names). The three-tuples are per level (0, 1, 2).

    score_thresh_offset: added to the predicted IoU before the ``pred_iou_thresh`` test.
    score_nms_offset: added to the predicted IoU as the within-crop NMS score.
    stability_score_bias: added to the stability score before its test.
    level_overlap_thresh: FMA-WSSS's level-overlap filter threshold (None = off).
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    score_thresh_offset: Levels3 = (0.0, 0.0, 0.0)
    score_nms_offset: Levels3 = (0.0, 0.0, 0.0)
    stability_score_bias: Levels3 = (0.0, 0.0, 0.0)
    level_overlap_thresh: Optional[float] = None

    def __post_init__(self) -> None:
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ValueError("points_per_side and points_per_batch must be >= 1")
        for name in ("score_thresh_offset", "score_nms_offset", "stability_score_bias"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs one value per level (3)")


SAM_PRESETS: dict[str, SamGeneratorSettings] = {
    # Segment Anything's SamAutomaticMaskGenerator defaults
    "sam": SamGeneratorSettings(),
    # FMA-WSSS, pattern l2_nmsf_s1_rsw3 (configs/sam_auto_seg/patterns/mask_gen_ini.py)
    "fma": SamGeneratorSettings(
        points_per_side=32, pred_iou_thresh=0.86, stability_score_thresh=0.92, stability_score_offset=1.0,
        box_nms_thresh=0.7, crop_n_layers=1, crop_nms_thresh=0.7, crop_overlap_ratio=512 / 1500,
        crop_n_points_downscale_factor=2, min_mask_region_area=100,
        score_thresh_offset=(0.0, 0.0, 0.1), score_nms_offset=(0.0, 0.0, 1.0), stability_score_bias=(0.0, 0.0, 0.0),
        level_overlap_thresh=0.3,
    ),
}


# ---------------------------------------------------------------------------------------- geometry


def crop_boxes(height: int, width: int, n_layers: int, overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
    """SAM's crop pyramid: the whole image, then 2^i x 2^i overlapping crops per layer i.

    Returns (boxes ``[x0, y0, x1, y1]`` (exclusive ends), layer of each box).
    """
    boxes, layers = [[0, 0, width, height]], [0]
    short = min(height, width)
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short * (2 / per_side))
        crop_w = int(math.ceil((overlap * (per_side - 1) + width) / per_side))
        crop_h = int(math.ceil((overlap * (per_side - 1) + height) / per_side))
        xs = [int((crop_w - overlap) * i) for i in range(per_side)]
        ys = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0, y0 in product(xs, ys):
            boxes.append([x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)])
            layers.append(layer)
    return boxes, layers


def point_grid(per_side: int) -> np.ndarray:
    """(per_side**2, 2) float64 (x, y) points in [0, 1], cell centres, row-major in y."""
    offset = 1 / (2 * per_side)
    side = np.linspace(offset, 1 - offset, per_side)
    xs = np.tile(side[None, :], (per_side, 1))
    ys = np.tile(side[:, None], (1, per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def stability_scores(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU between the masks thresholded at ``t + offset`` and ``t - offset``: (N, H, W) -> (N,)."""
    inter = (logits > (mask_threshold + offset)).flatten(1).sum(1, dtype=torch.int32)
    union = (logits > (mask_threshold - offset)).flatten(1).sum(1, dtype=torch.int32)
    return torch.where(union > 0, inter.float() / union.clamp(min=1).float(), torch.zeros_like(inter, dtype=torch.float))


def _near_crop_edge(boxes: torch.Tensor, crop: list[int], image: list[int], atol: float = 20.0) -> torch.Tensor:
    """Boxes (crop coordinates) within ``atol`` of an edge of the crop that is not an image edge."""
    crop_t = torch.as_tensor(crop, dtype=torch.float, device=boxes.device)
    image_t = torch.as_tensor(image, dtype=torch.float, device=boxes.device)
    uncropped = boxes.float() + torch.tensor([crop[0], crop[1], crop[0], crop[1]], device=boxes.device)
    near_crop = torch.isclose(uncropped, crop_t[None], atol=atol, rtol=0)
    near_image = torch.isclose(uncropped, image_t[None], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


# ---------------------------------------------------------------------------------------- loading


def _downloads_allowed(flag: Optional[bool]) -> bool:
    if flag is not None:
        return flag
    return os.environ.get("TAG2MASK_ALLOW_DOWNLOAD", "").strip().lower() in ("1", "true", "yes")


def _import_sam():
    try:
        from transformers import SamModel
        from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "SAM proposals need Hugging Face transformers (pip install 'tag2mask[sam]'); "
            f"importing it failed: {e}"
        ) from e
    return SamModel, SamImageProcessorPil


def load_sam(source: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
             allow_download: Optional[bool] = None):
    """A Hugging Face ``SamModel`` (eval, frozen) from a local folder or a hub id.

    A folder must hold ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``).
    A hub id is looked up in the local Hugging Face cache; it is downloaded only when
    ``allow_download`` (or ``TAG2MASK_ALLOW_DOWNLOAD=1``). Meta's original ``sam_vit_*.pth`` files
    are a different layout: convert them first (see docs/fma.md).
    """
    SamModel, _ = _import_sam()
    src = str(source)
    path = Path(src).expanduser()
    if path.is_file():
        raise WeightsError(
            f"{path}: SAM weights must be a Hugging Face folder (config.json + model.safetensors); "
            "Meta's sam_vit_*.pth checkpoints must be converted first (docs/fma.md)"
        )
    try:
        if path.is_dir():
            if not (path / "config.json").exists():
                raise WeightsError(f"{path}: no config.json (expected a Hugging Face SamModel folder)")
            model = SamModel.from_pretrained(str(path), local_files_only=True)
        elif _downloads_allowed(allow_download):
            model = SamModel.from_pretrained(src)
        else:
            try:
                model = SamModel.from_pretrained(src, local_files_only=True)
            except (OSError, ValueError) as e:
                raise WeightsNotFoundError(
                    f"SAM weights {src!r} are not on this machine (not a folder, not in the Hugging Face cache). "
                    "Pass a local SamModel folder with --sam-weights, or allow a download from the Hugging Face hub "
                    "with --allow-download or TAG2MASK_ALLOW_DOWNLOAD=1."
                ) from e
    except WeightsError:
        raise
    except OSError as e:
        raise WeightsNotFoundError(f"could not load SAM weights {src!r}: {e}. Are you offline?") from e
    except Exception as e:
        raise WeightsError(f"{src}: not a readable SamModel ({type(e).__name__}: {e})") from e
    model.requires_grad_(False)
    return model.to(device).eval()


# -------------------------------------------------------------------------------------- generator


@dataclass
class _CropMasks:
    """Masks kept in one crop, at crop size (uncropped only when kept at the end)."""

    box: list[int]
    masks: torch.Tensor  # (n, ch, cw) bool
    boxes: torch.Tensor  # (n, 4) float, image coordinates (inclusive max)
    iou: torch.Tensor  # (n,)
    stability: torch.Tensor  # (n,)
    levels: torch.Tensor  # (n,) long


class SamMaskGenerator:
    """Automatic masks of an image with a ``SamModel`` (see the module docstring).

    >>> gen = SamMaskGenerator(load_sam("/weights/sam-vit-huge"), SAM_PRESETS["fma"])
    >>> proposals = gen.generate(rgb_uint8)
    """

    def __init__(self, model, settings: SamGeneratorSettings = SAM_PRESETS["sam"]):
        _, processor_cls = _import_sam()
        self.model = model.eval()
        self.settings = settings
        size = int(model.config.vision_config.image_size)
        self.input_size = size
        self.processor = processor_cls(size={"longest_edge": size}, pad_size={"height": size, "width": size})
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> MaskProposals:
        """(H, W, 3) uint8 RGB -> :class:`MaskProposals` (levels = SAM's multimask index, scores = predicted IoU)."""
        image = np.ascontiguousarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        s = self.settings
        height, width = image.shape[:2]
        boxes, layers = crop_boxes(height, width, s.crop_n_layers, s.crop_overlap_ratio)
        crops = [self._process_crop(image, box, layer) for box, layer in zip(boxes, layers)]
        crops = [c for c in crops if c.masks.shape[0]]
        if not crops:
            return MaskProposals.empty(height, width)
        owner = torch.cat([torch.full((c.masks.shape[0],), k, dtype=torch.long) for k, c in enumerate(crops)])
        local = torch.cat([torch.arange(c.masks.shape[0]) for c in crops])
        if len(boxes) > 1:
            # masks of smaller crops win (score = 1 / crop area)
            all_boxes = torch.cat([c.boxes for c in crops]).cpu()
            crop_area = torch.tensor([float((c.box[2] - c.box[0]) * (c.box[3] - c.box[1])) for c in crops])[owner]
            keep = batched_nms(all_boxes, 1.0 / crop_area, torch.zeros_like(owner), s.crop_nms_thresh)
            owner, local = owner[keep], local[keep]
        masks = torch.zeros((owner.numel(), height, width), dtype=torch.bool)
        fields = {"iou": [], "stability": [], "levels": []}
        for n, (k, i) in enumerate(zip(owner.tolist(), local.tolist())):
            c = crops[k]
            masks[n, c.box[1] : c.box[3], c.box[0] : c.box[2]] = c.masks[i].cpu()
            fields["iou"].append(float(c.iou[i]))
            fields["stability"].append(float(c.stability[i]))
            fields["levels"].append(int(c.levels[i]))
        proposals = MaskProposals.from_masks(masks.numpy(), np.asarray(fields["levels"]), np.asarray(fields["iou"]))
        proposals = proposals.select(proposals.areas > 0)
        if s.min_mask_region_area > 0 and len(proposals):
            proposals = self._clean_small_regions(proposals)
        if s.level_overlap_thresh is not None and len(proposals):
            proposals = proposals.select(level_overlap_filter(proposals, s.level_overlap_thresh))
        return proposals

    def _process_crop(self, image: np.ndarray, box: list[int], layer: int) -> _CropMasks:
        s = self.settings
        x0, y0, x1, y1 = box
        crop = np.ascontiguousarray(image[y0:y1, x0:x1])
        ch, cw = crop.shape[:2]
        inputs = self.processor(images=crop, return_tensors="pt")
        embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device))
        resized = tuple(int(v) for v in inputs["reshaped_input_sizes"][0])
        per_side = int(s.points_per_side / (s.crop_n_points_downscale_factor**layer))
        points = point_grid(max(1, per_side)) * np.array([cw, ch])[None]
        parts = [self._process_batch(embeddings, points[i : i + s.points_per_batch], (ch, cw), resized, box,
                                     [0, 0, image.shape[1], image.shape[0]])
                 for i in range(0, len(points), s.points_per_batch)]
        masks = torch.cat([p[0] for p in parts])
        if masks.shape[0] == 0:
            return _CropMasks(box, masks, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long))
        boxes, iou, stab, levels = (torch.cat([p[k] for p in parts]) for k in range(1, 5))
        offsets = torch.tensor(s.score_nms_offset, dtype=iou.dtype, device=iou.device)[levels]
        keep = batched_nms(boxes.float(), iou + offsets, torch.zeros_like(levels), s.box_nms_thresh)
        shift = torch.tensor([x0, y0, x0, y0], dtype=torch.float, device=boxes.device)
        return _CropMasks(box, masks[keep].cpu(), (boxes[keep].float() + shift).cpu(), iou[keep].cpu(),
                          stab[keep].cpu(), levels[keep].cpu())

    def _process_batch(self, embeddings, points: np.ndarray, crop_hw, resized, box, image_box):
        s = self.settings
        ch, cw = crop_hw
        # prompts live in the resized (longest side = input size) frame, like SAM's ResizeLongestSide
        scale = torch.tensor([resized[1] / cw, resized[0] / ch], dtype=torch.float)
        pts = torch.as_tensor(points, dtype=torch.float) * scale
        n = pts.shape[0]
        out = self.model(
            image_embeddings=embeddings,
            input_points=pts.to(self.device)[None, :, None, :],
            input_labels=torch.ones(1, n, 1, dtype=torch.long, device=self.device),
            multimask_output=True,
        )
        low_res = out.pred_masks[0]  # (n, 3, h', w')
        k = low_res.shape[1]
        if k != 3:
            raise ValueError(f"the SAM mask decoder gives {k} masks per point; level-aware generation needs 3")
        # upsampling and filtering stay on the model's device; only kept masks go to the CPU
        logits = self.processor.post_process_masks(
            [low_res.float()], [crop_hw], [resized], binarize=False,
            pad_size={"height": self.input_size, "width": self.input_size},
        )[0].flatten(0, 1)  # (3n, ch, cw)
        iou = out.iou_scores[0].float().flatten()  # (3n,) point-major, as the masks
        dev = iou.device
        levels = torch.arange(k, device=dev).repeat(n)
        keep = torch.ones_like(iou, dtype=torch.bool)
        if s.pred_iou_thresh > 0:
            keep &= (iou + torch.tensor(s.score_thresh_offset, device=dev)[levels]) > s.pred_iou_thresh
        stab = stability_scores(logits, s.mask_threshold, s.stability_score_offset)
        if s.stability_score_thresh > 0:
            keep &= (stab + torch.tensor(s.stability_score_bias, device=dev)[levels]) >= s.stability_score_thresh
        masks = logits[keep] > s.mask_threshold
        iou, stab, levels = iou[keep], stab[keep], levels[keep]
        boxes = masks_to_boxes(masks)
        inner = ~_near_crop_edge(boxes, box, image_box)
        return masks[inner], boxes[inner], iou[inner], stab[inner], levels[inner]

    def _clean_small_regions(self, proposals: MaskProposals) -> MaskProposals:
        """SAM's post-processing: fill small holes, drop small islands, then NMS preferring unchanged masks."""
        s = self.settings
        masks, unchanged = [], []
        for m in proposals.masks:
            m, changed_holes = remove_small_regions(m, s.min_mask_region_area, "holes")
            m, changed_islands = remove_small_regions(m, s.min_mask_region_area, "islands")
            masks.append(m)
            unchanged.append(not (changed_holes or changed_islands))
        cleaned = MaskProposals.from_masks(np.stack(masks), proposals.levels, proposals.scores)
        boxes = masks_to_boxes(torch.from_numpy(cleaned.masks)).float()
        scores = torch.tensor(unchanged, dtype=torch.float)
        keep = batched_nms(boxes, scores, torch.zeros(len(cleaned), dtype=torch.long), s.box_nms_thresh)
        return cleaned.select(keep.numpy())  # NMS order (unchanged masks first), as SAM


class SamProposals:
    """:class:`tag2mask.proposals.base.ProposalSource` backed by a :class:`SamMaskGenerator`."""

    name = "sam"

    def __init__(self, model, settings: SamGeneratorSettings = SAM_PRESETS["fma"], weights: str = ""):
        self.generator = SamMaskGenerator(model, settings)
        self.weights = weights

    def __call__(self, image: np.ndarray, key: str) -> MaskProposals:
        return self.generator.generate(image)

    def describe(self) -> dict:
        return {"source": "sam", "weights": self.weights, "settings": asdict(self.generator.settings)}

