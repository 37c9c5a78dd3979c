"""Label maps from per-class scores, with the CLIP-ES confidence mask.

CLIP-ES's "confidence-guided loss" is, in the released code, only this: pixels
whose winning CRF marginal is below 0.95 are written as 255 (ignored by the
segmentation network's cross-entropy). The arg-max helper itself lives in
:mod:`tag2mask.localization.labels` (one implementation for every method); it is
re-exported here for the refiners.
"""

from __future__ import annotations

from tag2mask.localization.labels import IGNORE_INDEX, label_table, labels_from_scores

__all__ = ["IGNORE_INDEX", "labels_from_scores", "label_table"]
