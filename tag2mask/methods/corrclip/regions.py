"""CorrCLIP's class-agnostic regions: where region maps come from, how they are merged and used.

A *region map* is an ``(H, W)`` int64 array of region ids at the image size; the smallest id in a
window is treated as "unsegmented" (the official code's rule, normally id 0). Sources:

* :class:`RegionFolder`: pre-generated maps per image (the official default): ``<stem>.npz``
  (``instance_mask``, the official files, or a single array), ``<stem>.png`` (an id map), or
  ``<stem>.json`` (RLE masks, painted as below);
* :class:`ProposalRegions`: any :class:`~tag2mask.proposals.base.ProposalSource` (our SAM, SLIC or
  Felzenszwalb), masks painted in ascending area so larger ones overwrite smaller ones (ids 1..S,
  0 = unsegmented), as the official SAM2 path does.

:func:`merge_regions` (DBSCAN with min_samples 1 = connected components of the eps-graph, computed
by boolean matrix closure), :func:`scope_mask` and :func:`correct_labels` are vectorised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch

from tag2mask.proposals.base import MaskProposals, ProposalError

__all__ = ["paint_by_area", "RegionFolder", "ProposalRegions", "merge_regions", "scope_mask", "correct_labels",
           "MERGED_OFFSET", "PAD_ID"]

MERGED_OFFSET = 10000  # merged regions get 10000 + cluster id (official)
PAD_ID = 10000  # region id of window padding (official)


def paint_by_area(proposals: MaskProposals) -> np.ndarray:
    """Masks ``(S, H, W)`` -> region map ``(H, W)`` int64: ids 1..S in ascending area, larger painted last."""
    h, w = proposals.image_size
    region = np.zeros((h, w), np.int64)
    if len(proposals) == 0:
        return region
    order = np.argsort(proposals.areas, kind="stable")
    # the last (largest) mask covering a pixel wins: its rank among the covering masks is the highest
    ranks = np.where(proposals.masks[order], np.arange(1, len(order) + 1)[:, None, None], 0)
    return ranks.max(axis=0)


class RegionFolder:
    """Region maps read from ``<folder>/<stem>.npz|.png|.json`` (first that exists)."""

    name = "folder"

    def __init__(self, folder: Union[str, Path]):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"--regions: region folder not found: {self.folder}")

    def __call__(self, image: np.ndarray, key: str) -> np.ndarray:
        """``(H, W, 3)`` uint8 image, file stem -> ``(H, W)`` int64 region map."""
        size = image.shape[:2]
        for suffix in (".npz", ".png", ".json"):
            path = self.folder / f"{key}{suffix}"
            if path.is_file():
                region = self._read(path, size)
                if region.shape != size:
                    raise ProposalError(f"{path}: region map is {region.shape}, the image is {size}")
                return region
        raise FileNotFoundError(f"no region map for {key!r} in {self.folder} (.npz, .png or .json)")

    @staticmethod
    def _read(path: Path, size: tuple[int, int]) -> np.ndarray:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                key = "instance_mask" if "instance_mask" in z.files else (z.files[0] if len(z.files) == 1 else None)
                if key is None:
                    raise ProposalError(f"{path}: expected an 'instance_mask' array, found {z.files}")
                return np.asarray(z[key]).astype(np.int64)
        if path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                if im.mode not in ("L", "P", "I", "I;16"):
                    raise ProposalError(f"{path}: a region PNG must be a single-channel id map, not mode {im.mode}")
                return np.asarray(im).astype(np.int64)
        from tag2mask.proposals.rle_files import read_proposals_json

        return paint_by_area(read_proposals_json(path, image_size=size))

    def describe(self) -> dict:
        return {"source": "folder", "folder": str(self.folder)}


class ProposalRegions:
    """Region maps painted from a proposal source (SAM, SLIC, Felzenszwalb)."""

    def __init__(self, source):
        self.source, self.name = source, source.name

    def __call__(self, image: np.ndarray, key: str) -> np.ndarray:
        return paint_by_area(self.source(image, key))

    def describe(self) -> dict:
        return self.source.describe()


def _components(adjacent: torch.Tensor) -> torch.Tensor:
    """Connected-component labels ``(K,)`` of a symmetric boolean adjacency ``(K, K)``, numbered in the
    order of each component's smallest index (the order DBSCAN discovers clusters in)."""
    reach = adjacent | torch.eye(adjacent.shape[0], dtype=torch.bool, device=adjacent.device)
    while True:  # transitive closure by squaring: at most log2(K) steps
        nxt = (reach.float() @ reach.float()) > 0
        if torch.equal(nxt, reach):
            break
        reach = nxt
    first = reach.float().argmax(dim=1)  # smallest index of each point's component
    return torch.unique(first, return_inverse=True)[1]


def merge_regions(region: torch.Tensor, feats: torch.Tensor, eps: float = 0.2) -> tuple[torch.Tensor, list[int]]:
    """CorrCLIP's mask merging on the DINO grid.

    region ``(h, w)`` int64 ids, feats ``(h*w, C)`` L2-normalised -> (merged ``(h, w)`` int64, cluster
    label per region except the smallest id, ascending id order). With more than two ids, regions
    r_1.. (r_0 = smallest is left alone) are clustered by DBSCAN (precomputed distance
    ``max(G) - G`` of their mean-feature cosines, eps 0.2, min_samples 1) and get id 10000 + cluster.
    """
    ids, inverse = torch.unique(region, return_inverse=True)
    if ids.numel() <= 2:
        return region, []
    onehot = torch.nn.functional.one_hot(inverse.view(-1), ids.numel()).to(feats.dtype)  # (L, K)
    means = torch.nn.functional.normalize((onehot.T @ feats) / onehot.sum(0)[:, None], dim=1)[1:]
    sim = means @ means.T
    labels = _components((sim.max() - sim) <= eps)
    new_ids = torch.cat([ids[:1], labels.to(ids.dtype) + MERGED_OFFSET])
    return new_ids[inverse], labels.tolist()


def scope_mask(region: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
    """Allowed attention pairs ``(L, L)`` bool of merged region ids ``(L,)`` and DINO similarities ``(L, L)``.

    Pairs inside one region other than the smallest id, plus pairs touching the smallest-id
    ("unsegmented") region whose similarity is above the mean similarity.
    """
    unsegmented = region == region.min()
    same = (region[:, None] == region[None, :]) & ~unsegmented[:, None]
    return same | ((unsegmented[:, None] | unsegmented[None, :]) & (sim > sim.mean()))


def correct_labels(label: torch.Tensor, region: torch.Tensor, n_labels: int) -> torch.Tensor:
    """CorrCLIP's map correction: every region except the smallest id takes the mode of its labels
    (ties -> the smallest label). label, region ``(H, W)`` -> ``(H, W)`` int64."""
    ids, inverse = torch.unique(region, return_inverse=True)
    counts = torch.zeros(ids.numel(), n_labels, dtype=torch.long, device=label.device)
    counts.index_put_((inverse.view(-1), label.view(-1)), torch.ones_like(label.view(-1)), accumulate=True)
    mode = counts.argmax(dim=1)  # first maximum = the smallest label among ties
    corrected = mode[inverse]
    return torch.where(inverse == 0, label, corrected)
