"""Superpixel proposals (scikit-image SLIC or Felzenszwalb): the seeding fallback that needs no model.

Superpixels partition the image, so every pixel is covered and all proposals have level 0.
Needs scikit-image (``pip install 'tag2mask[superpixels]'``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tag2mask.proposals.base import MaskProposals

__all__ = ["SuperpixelSettings", "SuperpixelProposals", "labels_to_proposals", "METHODS"]

METHODS = ("slic", "felzenszwalb")


@dataclass(frozen=True)
class SuperpixelSettings:
    """slic: ``n_segments``, ``compactness``, ``sigma``; felzenszwalb: ``scale``, ``sigma``, ``min_size``."""

    n_segments: int = 100
    compactness: float = 10.0
    sigma: float = 0.8
    scale: float = 100.0
    min_size: int = 50


def _skimage_segmentation():
    try:
        from skimage import segmentation
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "superpixel proposals need scikit-image (pip install 'tag2mask[superpixels]'); "
            f"importing it failed: {e}"
        ) from e
    return segmentation


def labels_to_proposals(labels: np.ndarray) -> MaskProposals:
    """(H, W) integer segment map -> one level-0 proposal per segment (ascending label order)."""
    labels = np.asarray(labels)
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    masks = inverse[None] == np.arange(ids.size)[:, None, None]
    return MaskProposals.from_masks(masks)


class SuperpixelProposals:
    """:class:`tag2mask.proposals.base.ProposalSource` of SLIC or Felzenszwalb superpixels."""

    def __init__(self, method: str = "slic", settings: SuperpixelSettings = SuperpixelSettings()):
        if method not in METHODS:
            raise ValueError(f"superpixel method must be one of {METHODS}, got {method!r}")
        self.name = method
        self.method = method
        self.settings = settings
        self._seg = _skimage_segmentation()  # fail at start-up, not on the first image

    def segment(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (H, W) int segment labels."""
        s = self.settings
        if self.method == "slic":
            return self._seg.slic(image, n_segments=s.n_segments, compactness=s.compactness, sigma=s.sigma,
                                  start_label=0, channel_axis=-1)
        return self._seg.felzenszwalb(image, scale=s.scale, sigma=s.sigma, min_size=s.min_size, channel_axis=-1)

    def __call__(self, image: np.ndarray, key: str) -> MaskProposals:
        return labels_to_proposals(self.segment(np.ascontiguousarray(image)))

    def describe(self) -> dict:
        return {"source": self.method, "settings": asdict(self.settings)}
