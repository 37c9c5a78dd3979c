"""Label-value transforms shared by the segmenter's training crops and its evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tag2mask.data.segmentation import IGNORE

__all__ = ["reduce_zero_label"]


def reduce_zero_label(mask: Any) -> Any:
    """mmseg's ``reduce_zero_label`` on a label map (NumPy or torch): 0 -> 255, 255 stays, ``v`` -> ``v - 1``."""
    if isinstance(mask, torch.Tensor):
        return torch.where((mask == 0) | (mask == IGNORE), torch.full_like(mask, IGNORE), mask - 1)
    mask = np.asarray(mask)
    return np.where((mask == 0) | (mask == IGNORE), IGNORE, mask.astype(np.int64) - 1).astype(mask.dtype)
