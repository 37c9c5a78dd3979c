"""The mask-proposal interface: a source turns an image into a set of binary masks.

Sources (all return :class:`MaskProposals`):

* :class:`tag2mask.proposals.sam.SamProposals` - SAM automatic masks (Hugging Face ``SamModel``),
  optionally FMA-WSSS's level-aware generator;
* :class:`tag2mask.proposals.rle_files.RLEFolderProposals` - precomputed masks, one COCO-RLE JSON
  per image (what SAM's ``amg.py --convert-to-rle`` writes; uncompressed RLE too);
* :class:`tag2mask.proposals.superpixels.SuperpixelProposals` - SLIC / Felzenszwalb superpixels
  (no model needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np

__all__ = ["MaskProposals", "ProposalSource", "ProposalError"]


class ProposalError(ValueError):
    """Proposals that cannot be used (bad file, wrong size ...); the message names the source."""


@dataclass
class MaskProposals:
    """S binary masks of one (H, W) image.

    masks: (S, H, W) bool.
    levels: (S,) int64 granularity (SAM: 0 sub-part, 1 part, 2 whole; 0 for sources without levels).
    areas: (S,) int64 pixel counts (a file's ``area`` field when it has one).
    scores: (S,) float32 quality scores (SAM's predicted IoU) or None.
    """

    masks: np.ndarray
    levels: np.ndarray
    areas: np.ndarray
    scores: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.masks = np.asarray(self.masks, dtype=bool)
        if self.masks.ndim != 3:
            raise ProposalError(f"masks must be (S, H, W), got shape {self.masks.shape}")
        s = self.masks.shape[0]
        self.levels = np.asarray(self.levels, dtype=np.int64).reshape(-1)
        self.areas = np.asarray(self.areas, dtype=np.int64).reshape(-1)
        if self.levels.shape != (s,) or self.areas.shape != (s,):
            raise ProposalError(f"{s} masks but {self.levels.size} levels and {self.areas.size} areas")
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
            if self.scores.shape != (s,):
                raise ProposalError(f"{s} masks but {self.scores.size} scores")

    @classmethod
    def from_masks(cls, masks: np.ndarray, levels: Optional[np.ndarray] = None,
                   scores: Optional[np.ndarray] = None) -> "MaskProposals":
        """Proposals with areas counted from the masks (levels default to 0)."""
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 3:
            raise ProposalError(f"masks must be (S, H, W), got shape {masks.shape}")
        lv = np.zeros(masks.shape[0], np.int64) if levels is None else levels
        return cls(masks, lv, masks.reshape(masks.shape[0], -1).sum(axis=1), scores)

    @classmethod
    def empty(cls, height: int, width: int) -> "MaskProposals":
        return cls(np.zeros((0, height, width), bool), np.zeros(0, np.int64), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    def select(self, index: np.ndarray) -> "MaskProposals":
        """The proposals at ``index`` (an index array or boolean mask), in that order."""
        return MaskProposals(self.masks[index], self.levels[index], self.areas[index],
                             None if self.scores is None else self.scores[index])


class ProposalSource(Protocol):
    """Anything that gives the proposals of an image.

    ``image``: (H, W, 3) uint8 RGB; ``key``: the item name (file stem, used by file-backed sources).
    """

    name: str

    def __call__(self, image: np.ndarray, key: str) -> MaskProposals: ...

    def describe(self) -> dict: ...
