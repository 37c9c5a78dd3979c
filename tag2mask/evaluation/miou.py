"""Confusion-matrix based segmentation metrics (mIoU, pixel accuracy, seen/unseen hIoU).

The matrix is accumulated image by image so that evaluating a data set never needs more
than one image in memory. Conventions follow the usual semantic-segmentation protocol
(and the CLIP-ES / WeCLIP evaluation scripts):

* ground-truth pixels equal to ``ignore_index`` (and any other value outside
  ``[0, num_classes)``, e.g. VOC's 255 void border) are not counted;
* a class whose union is empty (absent from both ground truth and prediction over the
  whole set) has IoU ``None``;
* which classes the mean IoU averages is a named rule (:data:`MIOU_RULES`), because the official
  scripts differ: CLIP-ES (``eval_cam.py``, deeplab-pytorch's ``scores``) takes ``nanmean`` over the
  classes present in the ground truth **or** the prediction (``gt_or_pred``: a class predicted but
  never in the ground truth counts with IoU 0); WeCLIP (``utils/evaluate.py``) averages over the
  classes present in the ground truth only (``gt``). Every report names the rule it used.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from tag2mask.evaluation.rules import DEFAULT_MIOU_RULE, MIOU_RULES, check_miou_rule

__all__ = ["ConfusionMatrix", "MIOU_RULES", "DEFAULT_MIOU_RULE", "check_miou_rule", "seen_unseen_scores", "harmonic_iou",
           "unscore_predicted_ignore", "unscored_note"]



class ConfusionMatrix:
    """Accumulated ``(C, C)`` int64 confusion matrix; rows = ground truth, columns = prediction.

    Args:
        num_classes: number of classes ``C`` (background included, e.g. 21 for VOC).
        ignore_index: ground-truth value that is never counted (255 by default). Any other
            ground-truth value ``>= num_classes`` or ``< 0`` is ignored too, as in the official
            scripts (``mask = (gt >= 0) & (gt < C)``).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mat = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray, name: str = "<item>") -> None:
        """Add one image.

        Args:
            pred: ``(H, W)`` integer label map with values in ``[0, C)`` (prediction pixels
                are never ignored, except where the ground truth is ignored).
            gt: ``(H, W)`` integer label map; ``ignore_index`` / out-of-range values skipped.
            name: item name used in error messages.

        Raises:
            ValueError: shapes differ, arrays are not 2-D / integer, or a prediction id is
                outside ``[0, C)`` at a counted pixel.
        """
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.ndim != 2 or gt.ndim != 2:
            raise ValueError(f"{name}: expected 2-D label maps, got pred {pred.shape} and gt {gt.shape}")
        if pred.shape != gt.shape:
            raise ValueError(f"{name}: prediction size {pred.shape} differs from ground-truth size {gt.shape}")
        for arr, what in ((pred, "prediction"), (gt, "ground truth")):
            if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
                raise ValueError(f"{name}: {what} must be an integer label map, got dtype {arr.dtype}")
        c = self.num_classes
        if (pred.dtype == np.uint8 and gt.dtype == np.uint8 and c <= 256 and pred.size
                and int(pred.max()) < c):
            # fast path for the common uint8 case: no masking copy. g * c + p fits in uint16;
            # rows g >= c (ignore / out of range) land at indices >= c * c and are dropped.
            idx = gt.astype(np.uint16) * np.uint16(c) + pred
            self.mat += np.bincount(idx.ravel(), minlength=256 * c)[: c * c].reshape(c, c)
            return
        gt64 = gt.astype(np.int64, copy=False)
        valid = (gt64 >= 0) & (gt64 < c)
        p = pred[valid].astype(np.int64, copy=False)
        g = gt64[valid]
        if p.size and (p.min() < 0 or p.max() >= c):
            bad = int(p.max()) if p.max() >= c else int(p.min())
            raise ValueError(f"{name}: predicted class id {bad} outside [0, {c}) (num_classes={c})")
        self.mat += np.bincount(g * c + p, minlength=c * c).reshape(c, c)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix (e.g. from a worker) in place and return ``self``."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge confusion matrices of {other.num_classes} and {self.num_classes} classes")
        self.mat += other.mat
        return self

    def iou(self) -> np.ndarray:
        """Per-class IoU as ``(C,)`` float64, NaN where the union is empty."""
        m = self.mat.astype(np.float64)
        tp = np.diag(m)
        union = m.sum(0) + m.sum(1) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)

    def scores(self, rule: str = DEFAULT_MIOU_RULE) -> dict:
        """Metrics of everything accumulated so far.

        Args:
            rule: which classes ``"Mean IoU"`` averages (:data:`MIOU_RULES`).

        Returns:
            dict with ``"Class IoU"`` (list of C floats, ``None`` where the union is empty),
            ``"Mean IoU"`` (by ``rule``), ``"miou_rule"``, ``"Pixel Accuracy"``, ``"Mean Accuracy"``
            (mean over classes present in the ground truth), ``"Frequency Weighted IoU"``,
            ``"num_pixels"``. Means are ``None`` if nothing was counted.
        """
        check_miou_rule(rule)
        m = self.mat.astype(np.float64)
        tp = np.diag(m)
        gt_count = m.sum(1)
        total = m.sum()
        iou = self.iou()
        with np.errstate(divide="ignore", invalid="ignore"):
            acc_cls = np.where(gt_count > 0, tp / np.where(gt_count > 0, gt_count, 1), np.nan)
        freq = gt_count / total if total > 0 else np.zeros_like(gt_count)
        fw = freq > 0
        averaged = iou[gt_count > 0] if rule == "gt" else iou
        return {
            "Class IoU": [None if math.isnan(v) else float(v) for v in iou],
            "Mean IoU": _nanmean(averaged),
            "miou_rule": rule,
            "Pixel Accuracy": float(tp.sum() / total) if total > 0 else None,
            "Mean Accuracy": _nanmean(acc_cls),
            "Frequency Weighted IoU": float((freq[fw] * iou[fw]).sum()) if total > 0 else None,
            "num_pixels": int(total),
        }


def unscore_predicted_ignore(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255,
                             value: int = 255) -> tuple[np.ndarray, int]:
    """``(gt, n)``: ``gt`` ignored where ``pred == value``, and how many scored pixels that took out.

    ``pred``, ``gt``: ``(H, W)`` integer label maps. A prediction of ``value`` (``label --refine crf``'s
    "not confident") is then neither right nor wrong: :meth:`ConfusionMatrix.update` skips the pixel
    (its ground truth becomes -1, outside ``[0, C)``). Only pixels the ground truth would have scored
    are counted. Other sizes, or ``num_classes > value``, are returned unchanged (``update`` names them).
    """
    if pred.shape != gt.shape or num_classes > value:
        return gt, 0
    hit = (pred == value) & (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    n = int(hit.sum())
    return (np.where(hit, -1, gt.astype(np.int64)), n) if n else (gt, 0)


def unscored_note(unscored: int, pixels: int) -> str:
    """The report's line about predicted ``255`` pixels that were not scored."""
    return (f"{unscored} of {pixels} predicted pixels ({100 * unscored / max(pixels, 1):.1f} %) are 255 (not confident, "
            "e.g. label --refine crf) and are not scored: the mIoU is over the confident pixels only")


def _nanmean(values: np.ndarray) -> float | None:
    """Mean over non-NaN entries; ``None`` when all are NaN (never a silent 0 or NaN)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else None


def harmonic_iou(seen: float | None, unseen: float | None) -> float | None:
    """hIoU = 2 * seen * unseen / (seen + unseen); 0 when both are 0, ``None`` if either is missing."""
    if seen is None or unseen is None:
        return None
    if seen + unseen == 0:
        return 0.0
    return 2.0 * seen * unseen / (seen + unseen)


def seen_unseen_scores(
    iou: Sequence[float | None] | np.ndarray,
    unseen_ids: Iterable[int],
    include_background: bool = True,
) -> tuple[float | None, float | None, float | None]:
    """mIoU over seen and unseen classes and their harmonic mean (zero-shot protocol).

    Args:
        iou: per-class IoU, length C; ``None``/NaN entries are excluded from both means.
        unseen_ids: class ids (0-based, background = 0) of the unseen classes.
        include_background: count class 0 among the seen classes (ZegCLIP-style splits do).

    Returns:
        ``(mIoU_seen, mIoU_unseen, hIoU)``; a value is ``None`` if its group has no
        evaluable class.
    """
    vals = np.array([np.nan if v is None else float(v) for v in iou], dtype=np.float64)
    unseen = sorted({int(i) for i in unseen_ids})
    for i in unseen:
        if not 0 <= i < len(vals):
            raise ValueError(f"unseen class id {i} outside [0, {len(vals)})")
    is_unseen = np.zeros(len(vals), dtype=bool)
    is_unseen[unseen] = True
    is_seen = ~is_unseen
    if not include_background and len(vals):
        is_seen[0] = False
    s = _nanmean(vals[is_seen])
    u = _nanmean(vals[is_unseen])
    return s, u, harmonic_iou(s, u)
