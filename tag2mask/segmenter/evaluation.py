"""Prediction, scoring and export for trained segmenters (validation, end of run, ``segment --checkpoint``).

Prediction of one image: normalise with the network's ``normalization``; optionally resize so the
long side is ``test_long_side``, or to fit ``test_reference_size = (long, short)`` keeping the aspect
ratio (mmseg's test ``Resize(img_scale, keep_ratio=True)``); logits from the network's ``predict_logits`` (whole image or
sliding window, scales, flip: :mod:`tag2mask.models`) or, for a bare network, one forward pass;
bilinear to the image size; argmax. Scores use the same confusion matrix and report layout as
``tag2mask eval`` (``eval.json``: ``mode``, ``num_images``, ``class_names``, ``scores``,
``per_image_miou``), so ``tag2mask eval OUT/eval/masks --gt GT`` gives the same numbers (except with
``reduce_zero_label``, where the ground truth's background is not scored and the written masks hold
the network's labels). A recipe that hid some classes' labels during training (``unlabeled_classes``,
a strict subset: transductive zero-shot) also gets ``zero_shot``: mIoU over the seen and the unseen
classes and their harmonic mean (hIoU).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tag2mask.data.segmentation import IGNORE, SegmentationSource
from tag2mask.evaluation.miou import ConfusionMatrix

__all__ = ["predict_logits", "score_predictions", "evaluate_source", "export_model"]


@torch.no_grad()
def predict_logits(model: nn.Module, rgb: np.ndarray, config: Any) -> torch.Tensor:
    """``(C, H, W)`` float32 logits of one ``(H, W, 3)`` uint8 image at its own size (model in eval mode)."""
    device = next(model.parameters()).device
    h, w = rgb.shape[:2]
    x = torch.from_numpy(np.array(rgb, dtype=np.float32)).to(device).permute(2, 0, 1)[None] / 255.0
    x = model.normalization(x)
    long_side = getattr(config, "test_long_side", None)
    box = getattr(config, "test_reference_size", None)
    r = long_side / max(h, w) if long_side else (min(box[0] / max(h, w), box[1] / min(h, w)) if box else 1.0)
    if r != 1.0:
        # mmcv rescale: int(side * r + 0.5)
        size = (max(1, int(h * r + 0.5)), max(1, int(w * r + 0.5))) if box else (max(1, int(h * r)), max(1, int(w * r)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if hasattr(model, "predict_logits"):
        logits = model.predict_logits(x, mode=config.test_mode, crop=config.test_crop, stride=config.test_stride,
                                      scales=tuple(config.test_scales), flip=config.test_flip)
    else:
        logits = model(x)
    logits = logits.float()
    if tuple(logits.shape[-2:]) != (h, w):
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits[0]


def score_predictions(model: nn.Module, source: SegmentationSource, config: Any, num_classes: int, ctx: Any = None,
                      limit: Optional[int] = None, write_dir: Optional[Path] = None, label_offset: int = 0,
                      transform_gt: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                      ) -> tuple[ConfusionMatrix, dict[str, Optional[float]], int]:
    """Predict and score the first ``limit`` images of ``source``, sharded over the processes of ``ctx``.

    Predictions are ``argmax + label_offset``; ``transform_gt`` maps each ground truth before scoring.
    With ``write_dir`` the predictions go to ``write_dir/masks/<name>.png``. Returns the confusion matrix
    summed over the processes, ``{image: mIoU}`` (gathered; only with ``write_dir``) and the image count.
    """
    from tag2mask.io.palette import save_label_png

    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    was_training = model.training
    model.eval()
    total = ConfusionMatrix(num_classes, IGNORE)
    per_image: dict[str, Optional[float]] = {}
    n = len(source) if limit is None else min(limit, len(source))
    for i in range(rank, n, world):
        name, rgb, gt = source.load(i)
        if transform_gt is not None:
            gt = transform_gt(gt)
        with ctx.autocast() if ctx is not None else nullcontext():
            logits = predict_logits(model, rgb, config)
        pred = (logits.argmax(dim=0) + label_offset).cpu().numpy().astype(np.uint8)
        one = ConfusionMatrix(num_classes, IGNORE)
        one.update(pred, gt, name=str(source.items[i].mask))
        total.merge(one)
        if write_dir is not None:
            save_label_png(write_dir / "masks" / f"{name}.png", pred)
            per_image[name] = one.scores()["Mean IoU"]
    model.train(was_training)
    if ctx is not None and world > 1:
        total.mat = ctx.all_reduce_sum(torch.from_numpy(total.mat)).numpy()
        if write_dir is not None:
            merged: dict[str, Optional[float]] = {}
            for part in ctx.all_gather(per_image):
                merged.update(part)
            per_image = merged
    return total, per_image, n


def evaluate_source(model: nn.Module, source: SegmentationSource, config: Any, ctx: Any = None,
                    limit: Optional[int] = None, write_dir: Optional[Path] = None) -> dict[str, Any]:
    """mIoU of ``model`` on ``source`` (sharded over the processes of ``ctx``).

    With ``write_dir``, the predictions go to ``write_dir/masks/<name>.png`` and the report to
    ``write_dir/eval.json`` (rank 0).
    """
    rank = ctx.rank if ctx is not None else 0
    num_classes = config.num_classes
    transform_gt = None
    if getattr(config, "reduce_zero_label", False):
        from tag2mask.segmenter.label_values import reduce_zero_label as transform_gt
    total, per_image, n = score_predictions(model, source, config, num_classes, ctx=ctx, limit=limit,
                                            write_dir=write_dir, transform_gt=transform_gt)
    report = {"mode": "labels", "num_images": n, "class_names": config.class_names, "scores": total.scores(),
              "per_image_miou": dict(sorted(per_image.items())), "data": source.description}
    unseen = sorted({int(c) for c in getattr(config, "unlabeled_classes", ()) if 0 <= int(c) < num_classes})
    if 0 < len(unseen) < num_classes:
        from tag2mask.evaluation.miou import seen_unseen_scores

        seen_miou, unseen_miou, hiou = seen_unseen_scores(report["scores"]["Class IoU"], unseen)
        report["zero_shot"] = {"unseen_classes": [config.class_names[c] for c in unseen], "miou_seen": seen_miou,
                               "miou_unseen": unseen_miou, "hiou": hiou}
    if write_dir is not None and rank == 0:
        from tag2mask.io.atomic import atomic_write_text

        atomic_write_text(write_dir / "eval.json", json.dumps(report, indent=1, allow_nan=False, default=_plain))
    return report


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)


def export_model(model: nn.Module, path: Path, config: Any) -> Optional[Path]:
    """Save a :mod:`tag2mask.models` network with ``save_segmenter`` (other modules: nothing, returns None)."""
    try:
        from tag2mask.models import Segmenter, save_segmenter
    except ImportError:  # pragma: no cover - the models package ships with tag2mask
        return None
    if not isinstance(model, Segmenter):
        return None
    save_segmenter(model, path, metadata={"class_names": json.dumps(config.class_names),
                                          "trained_by": "tag2mask train segmenter"})
    return path
