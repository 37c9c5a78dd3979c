"""The interface every segmentation network in :mod:`tag2mask.models` implements.

``Segmenter`` (an ``nn.Module``):

* ``forward(images)``: normalised ``(B, 3, H, W)`` float -> semantic logits ``(B, C, h, w)`` at the
  model's ``output_stride`` (``h = ceil(H / stride)`` or close to it, depending on the network);
* ``training_loss(images, target)``: ``target (B, H, W)`` int64, 255 = ignore -> ``dict`` of scalar
  tensors with a ``"loss"`` key (the sum to back-propagate) and its named terms; ``forward(images,
  target)`` returns the same (for ``DistributedDataParallel``);
* ``normalization``: the mean/std (on 0..1 RGB) the backbone expects; ``output_stride``: int;
* ``predict(image)``: one RGB image -> ``(H, W)`` int64 label map, optional sliding window and
  multi-scale + flip (:mod:`tag2mask.inference`);
* ``parameter_groups()``: trainable parameters split into ``backbone`` / ``head`` / ``head_bias``,
  for recipes that give the head a larger learning rate (DeepLab: ×10 weights, ×20 biases);
* ``export_config()``: the JSON config that rebuilds the architecture (see :mod:`.serialization`).

Per-pixel networks compute softmax cross-entropy with ``ignore_index=255``: logits are bilinearly
upsampled (``align_corners=False``) to the target and the loss is averaged over the labelled pixels.
Two documented switches reproduce official recipes: ``loss_at_logit_resolution`` (deeplab-pytorch,
used by CLIP-ES: the target is downsampled to the logits with PIL-style nearest neighbour) and
``loss_average_over_ignored`` (mmseg 0.20, used by MaskCLIP+: the mean runs over all pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tag2mask.clip.model import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from tag2mask.config import config_to_dict

if TYPE_CHECKING:  # PIL is imported lazily at run time
    import PIL.Image
from tag2mask.inference import multiscale_flip_logits, slide_logits
from tag2mask.models.text_head import TextEmbeddingClassifier

__all__ = [
    "IGNORE_INDEX",
    "Normalization",
    "IMAGENET_NORMALIZATION",
    "CLIP_NORMALIZATION",
    "CAFFE_NORMALIZATION",
    "segmentation_cross_entropy",
    "Segmenter",
]

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` on RGB images scaled to 0..1."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` RGB in 0..1 -> normalised float32."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        return (images.float() - mean) / std

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


IMAGENET_NORMALIZATION = Normalization(IMAGENET_MEAN, IMAGENET_STD)
CLIP_NORMALIZATION = Normalization(CLIP_MEAN, CLIP_STD)
#: Caffe ResNets (DeepLab's init): 0..255 RGB minus the BGR means (104.008, 116.669, 122.675), no scaling;
#: the loader flips the first convolution from BGR to RGB, so inputs stay RGB.
CAFFE_NORMALIZATION = Normalization((122.675 / 255, 116.669 / 255, 104.008 / 255), (1 / 255, 1 / 255, 1 / 255))


def check_target(target: Tensor, num_classes: int, ignore_index: int) -> None:
    if target.dtype != torch.long:
        raise TypeError(f"target must be int64 (B, H, W), got {target.dtype}")
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        values = sorted({int(v) for v in target[bad].unique()[:8]})
        raise ValueError(
            f"target holds labels {values} outside 0..{num_classes - 1} (and {ignore_index} = ignore)"
        )


def _nearest_like_pil(target: Tensor, size: Sequence[int]) -> Tensor:
    """Downsample a label map the way PIL's ``NEAREST`` does (source pixel ``floor((i + 0.5) * in / out)``)."""
    return F.interpolate(target[:, None].float(), size=tuple(size), mode="nearest-exact")[:, 0].long()


def segmentation_cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = IGNORE_INDEX,
    at_logit_resolution: bool = False,
    average_over_ignored: bool = False,
) -> Tensor:
    """Softmax cross-entropy of dense logits against a label map with ignored pixels.

    Args:
        logits: ``(B, C, h, w)``.
        target: ``(B, H, W)`` int64 in ``0..C-1`` or ``ignore_index``.
        ignore_index: label that never contributes (255).
        at_logit_resolution: downsample the target to ``(h, w)`` (PIL-style nearest) instead of
            upsampling the logits bilinearly to ``(H, W)``.
        average_over_ignored: divide by all pixels instead of the labelled ones (mmseg 0.20).

    Returns:
        Scalar float32 loss; 0 (still attached to the graph) when no pixel is labelled.
    """
    if logits.ndim != 4 or target.ndim != 3 or logits.shape[0] != target.shape[0]:
        raise ValueError(f"expected logits (B, C, h, w) and target (B, H, W), got {tuple(logits.shape)} and {tuple(target.shape)}")
    check_target(target, logits.shape[1], ignore_index)
    if at_logit_resolution:
        if tuple(target.shape[-2:]) != tuple(logits.shape[-2:]):
            target = _nearest_like_pil(target, logits.shape[-2:])
    elif tuple(logits.shape[-2:]) != tuple(target.shape[-2:]):
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    denominator = target.numel() if average_over_ignored else int(valid.sum())
    # masked_fill keeps the ignored pixels out even if their logits were inf/nan
    return per_pixel.masked_fill(~valid, 0.0).sum() / max(denominator, 1)


# ------------------------------------------------------------------------------------------------
# the interface


ImageLike = Union["np.ndarray", "PIL.Image.Image"]


class Segmenter(nn.Module):
    """Base class of every network built by :func:`tag2mask.models.build_segmenter`.

    Subclasses set ``name`` and implement :meth:`logits` (or the per-pixel split
    :meth:`forward_features` + ``self.classifier``) and, when needed, :meth:`loss_logits` (extra
    deeply supervised outputs) or :meth:`training_loss` itself (Mask2Former).
    """

    name: ClassVar[str] = "segmenter"
    ignore_index: ClassVar[int] = IGNORE_INDEX

    def __init__(self, config: Any, num_classes: int, normalization: Normalization, output_stride: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.config = config
        self._num_classes = int(num_classes)
        self.normalization = normalization
        self.output_stride = int(output_stride)

    # -- classes ------------------------------------------------------------------------------
    @property
    def text_classifier(self) -> Optional[TextEmbeddingClassifier]:
        """The text-embedding head, if this network classifies against text embeddings."""
        for m in self.modules():
            if isinstance(m, TextEmbeddingClassifier):
                return m
        return None

    @property
    def num_classes(self) -> int:
        """Logit channels C (for a text head: its current number of embeddings, + background)."""
        head = self.text_classifier
        return head.num_outputs if head is not None else self._num_classes

    def set_text_embeddings(self, text_embeddings: Tensor) -> None:
        """Swap the class embeddings of the text head (e.g. seen + unseen names at test time)."""
        head = self.text_classifier
        if head is None:
            raise ValueError(f"{self.name} was built with a plain classifier; build it with text_embeddings")
        head.set_text_embeddings(text_embeddings)

    # -- forward / loss ---------------------------------------------------------------------------
    def forward_features(self, images: Tensor) -> Tensor:
        """Decoder features before the classifier ``(B, F, h, w)`` (per-pixel networks)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose pre-classifier features")

    def logits(self, images: Tensor) -> Tensor:
        """Normalised ``(B, 3, H, W)`` -> semantic logits ``(B, C, h, w)`` at ``output_stride`` (what subclasses implement)."""
        return self.classifier(self.forward_features(images))

    def forward(self, images: Tensor, target: Optional[Tensor] = None) -> Union[Tensor, dict[str, Tensor]]:
        """``model(images)`` -> logits (:meth:`logits`); ``model(images, target)`` -> :meth:`training_loss`.

        The second form lets a ``DistributedDataParallel`` wrapper compute the loss in its forward
        (DDP synchronises gradients only for what runs through its ``forward``).
        """
        if target is not None:
            return self.training_loss(images, target)
        return self.logits(images)

    def dense_embeddings(self, images: Tensor) -> Tensor:
        """Dense features in CLIP's joint space ``(B, D, h, w)`` (text-head networks only; not normalised)."""
        head = self.text_classifier
        if head is None:
            raise ValueError(f"{self.name} has no text-embedding head")
        return head.embed(self.forward_features(images))

    def loss_logits(self, images: Tensor) -> dict[str, tuple[Tensor, float]]:
        """Named logits that enter the loss, each with its weight (default: the main output, weight 1)."""
        return {"ce": (self(images), 1.0)}

    def training_loss(self, images: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Cross-entropy terms (ignore 255) and their weighted sum under ``"loss"``."""
        cfg = self.config
        out: dict[str, Tensor] = {}
        total: Optional[Tensor] = None
        for key, (logits, weight) in self.loss_logits(images).items():
            term = segmentation_cross_entropy(
                logits, target, self.ignore_index,
                at_logit_resolution=getattr(cfg, "loss_at_logit_resolution", False),
                average_over_ignored=getattr(cfg, "loss_average_over_ignored", False),
            )
            out[key] = term.detach()
            total = term * weight if total is None else total + term * weight
        assert total is not None
        out["loss"] = total
        return out

    # -- optimisation -------------------------------------------------------------------------------
    def head_modules(self) -> list[nn.Module]:
        """Modules that count as the head for :meth:`parameter_groups` (everything but the backbone)."""
        return [m for name, m in self.named_children() if name != "backbone"]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters: ``backbone``, ``head`` (weights, ndim > 1) and ``head_bias`` (the rest)."""
        head_ids = {id(p) for m in self.head_modules() for p in m.parameters()}
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": [], "head_bias": []}
        for p in self.parameters():
            if not p.requires_grad:
                continue
            if id(p) not in head_ids:
                groups["backbone"].append(p)
            else:
                groups["head" if p.ndim > 1 else "head_bias"].append(p)
        return groups

    # -- persistence ------------------------------------------------------------------------------
    def export_config(self) -> dict[str, Any]:
        """JSON config that rebuilds this architecture without external weight files."""
        d = config_to_dict(self.config)
        if "pretrained" in d:
            d["pretrained"] = None
        return d

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes not saved by :func:`~tag2mask.models.save_segmenter` (frozen, reloaded from their source)."""
        return ()

    # -- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_logits(
        self,
        images: Tensor,
        *,
        mode: str = "whole",
        crop: Union[int, Sequence[int]] = 512,
        stride: Union[int, Sequence[int]] = 341,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        crop_batch: int = 4,
    ) -> Tensor:
        """Test-time logits at the input size: normalised ``(B, 3, H, W)`` -> ``(B, C, H, W)`` float32.

        ``mode='slide'`` runs crops of ``crop`` every ``stride`` pixels (:func:`~tag2mask.inference.slide_logits`);
        ``scales`` / ``flip`` average over rescaled and mirrored inputs
        (:func:`~tag2mask.inference.multiscale_flip_logits`). Call ``eval()`` first.
        """
        if mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        fn = self if mode == "whole" else (lambda x: slide_logits(self, x, crop, stride, crop_batch))
        return multiscale_flip_logits(fn, images, scales, flip, out_size=images.shape[-2:])

    @torch.no_grad()
    def predict(self, image: ImageLike, *, long_side: Optional[int] = None, **options: Any) -> np.ndarray:
        """Segment one RGB image (PIL image or ``(H, W, 3)`` uint8 array) -> ``(H, W)`` int64 labels.

        ``long_side`` resizes the input first (bilinear); logits come back to the image size before
        the argmax. Other options go to :meth:`predict_logits`. The model is put in eval mode.
        """
        self.eval()
        rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
        device = next(self.parameters()).device
        x = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1)[None].float() / 255.0
        x = self.normalization(x)
        h, w = x.shape[-2:]
        if long_side is not None and long_side != max(h, w):
            r = long_side / max(h, w)
            x = F.interpolate(x, size=(max(1, round(h * r)), max(1, round(w * r))), mode="bilinear", align_corners=False)
        logits = self.predict_logits(x, **options)
        if tuple(logits.shape[-2:]) != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits[0].argmax(dim=0).cpu().numpy().astype(np.int64)
