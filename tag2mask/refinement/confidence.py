"""Label maps from per-class scores, with the CLIP-ES confidence mask.

CLIP-ES's "confidence-guided loss" is, in the released code, only this: pixels
whose winning CRF marginal is below 0.95 are written as 255 (ignored by the
segmentation network's cross-entropy).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["IGNORE_INDEX", "labels_from_scores", "pad_keys"]

IGNORE_INDEX = 255


def pad_keys(keys: Union[Sequence[int], np.ndarray]) -> np.ndarray:
    """``[0, keys + 1]``: channel index -> VOC-style label id (0 = background).

    Args:
        keys: ``(K,)`` 0-based foreground class ids in channel order.

    Returns:
        ``(K + 1,)`` int64.
    """
    k = np.asarray(keys, dtype=np.int64).reshape(-1)
    return np.concatenate([np.zeros(1, dtype=np.int64), k + 1])


def labels_from_scores(scores: Union[np.ndarray, torch.Tensor], keys_padded: Union[Sequence[int], np.ndarray],
                       confidence: Optional[float] = None) -> np.ndarray:
    """Arg-max label map with an optional low-confidence ignore mask.

    Args:
        scores: ``(C, H, W)`` per-channel scores (any float dtype; comparisons are
            done in that dtype, so float16 ties stay ties).
        keys_padded: ``(C,)`` label id of every channel, e.g. :func:`pad_keys`;
            ids must fit in uint8 and must not be 255.
        confidence: if given, pixels whose maximum score is ``< confidence``
            (strict) become 255.

    Returns:
        ``(H, W)`` uint8 label map. Ties go to the first channel (numpy argmax),
        i.e. background first, then label order, as in the official scripts.
    """
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    if s.ndim != 3:
        raise ValueError(f"expected (C, H, W) scores, got shape {s.shape}")
    lut = np.asarray(keys_padded, dtype=np.int64).reshape(-1)
    if lut.shape[0] != s.shape[0]:
        raise ValueError(f"{lut.shape[0]} label ids for {s.shape[0]} channels")
    if lut.size and (lut.min() < 0 or lut.max() >= IGNORE_INDEX):
        raise ValueError("label ids must lie in [0, 254]")
    idx = np.argmax(s, axis=0)  # first maximal index wins
    label = lut.astype(np.uint8)[idx]
    if confidence is not None:
        label[s.max(axis=0) < confidence] = IGNORE_INDEX
    return label
