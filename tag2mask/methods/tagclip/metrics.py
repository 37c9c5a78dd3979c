"""Multi-label classification metrics: the official ``compute_AP`` / ``compute_F1`` and a corrected mAP.

Spec 4.9. The official mAP gives a class without any positive image AP = 0 and still averages it in,
which lowers the mean on any subset that lacks some classes; :func:`classification_metrics` reports
that value as ``mAP_official`` next to ``mAP`` (the mean over classes with at least one positive).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["average_precision", "overall_f1", "classification_metrics"]


def average_precision(scores: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AP without interpolation (official ``compute_AP``).

    Args:
        scores: ``(N, K)`` float32 image scores.
        gt: ``(N, K)`` 0/1 ground truth.

    Returns:
        ``(K,)`` float32 AP (0 for a class without positives, as the official code stores it) and
        ``(K,)`` bool: the class has at least one positive.
    """
    s = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    y = torch.as_tensor(np.asarray(gt) > 0)
    ap = torch.zeros(s.shape[1], dtype=torch.float32)
    has_pos = y.any(dim=0)
    for k in range(s.shape[1]):
        if not bool(has_pos[k]):
            continue
        order = torch.sort(s[:, k], descending=True, stable=True).indices
        hits = y[order, k].float()
        tp = hits.cumsum(0)
        precision = tp / torch.arange(1, len(hits) + 1, dtype=torch.float32)
        ap[k] = (hits * precision).sum() / hits.sum()
    return ap.numpy(), has_pos.numpy()


def overall_f1(scores: np.ndarray, gt: np.ndarray, theta: float) -> dict[str, float]:
    """Official ``compute_F1(..., 'overall', theta, use_relative=True)``.

    An image predicts class k when its score is strictly above ``min + theta * (max - min)`` of its
    own scores (no argmax fallback here, unlike the tags); precision, recall and F1 are pooled over
    all (image, class) pairs. F1 is NaN when there is no true positive (0 / 0).
    """
    s = np.asarray(scores, dtype=np.float32)
    y = np.asarray(gt) > 0
    lo, hi = s.min(axis=1, keepdims=True), s.max(axis=1, keepdims=True)
    pred = s > lo + np.float32(theta) * (hi - lo)
    tp = float((pred & y).sum())
    fp = float((pred & ~y).sum())
    fn = float((~pred & y).sum())
    p = tp / (tp + fp) if tp + fp else math.nan
    r = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * p * r / (p + r) if (p + r) and not math.isnan(p + r) else math.nan
    return {"p": p, "r": r, "f1": f1}


def _json_float(x: float) -> Any:
    return None if math.isnan(x) else float(x)


def classification_metrics(scores: np.ndarray, gt: np.ndarray, theta: float, class_names) -> dict[str, Any]:
    """Both mAPs, per-class AP and the official overall F1, JSON-ready (NaN -> ``None``).

    ``mAP``: mean AP over the classes with at least one positive image (``None`` if there is none);
    ``mAP_official``: the official mean over all K classes (AP 0 for classes without positives).
    """
    ap, has_pos = average_precision(scores, gt)
    f1 = overall_f1(scores, gt, theta)
    return {
        "images": int(np.asarray(scores).shape[0]),
        "classes_with_positives": int(has_pos.sum()),
        "mAP": _json_float(float(ap[has_pos].mean())) if has_pos.any() else None,
        "mAP_official": float(ap.mean()),
        "F1_overall_official": {k: _json_float(v) for k, v in f1.items()} | {"theta": theta},
        "AP": {name: (float(a) if pos else None) for name, a, pos in zip(class_names, ap, has_pos)},
    }
