"""PLM's pseudo-labels: class-agnostic regions from CLIP's dense tokens, pasted into the unlabelled pixels.

Per image, with the teacher's dense tokens ``X (D, h, w)`` (L2-normalised)::

    for each window fraction f:                 side = round(f · grid), stride = side
        seeds_f   = mean of X inside every window (windows shifted inwards at the border)   "mask seeds"
        centroids_f, masks_f = spherical K-means(X, init = seeds_f, iterations)             cosine distance
    fusion: seeds of all scales in order; an unused seed takes every later unused seed with
            cosine > λ (each seed, hence each mask, used once); a group's centroid = normalised mean
    regions: each pixel goes to the most similar fused centroid (similarities bilinearly upsampled)
    fused labels F: ground truth where labelled; the ignored pixels of the largest regions become
                    potential categories num_seen, num_seen + 1, ... (at most ``max_regions``,
                    each covering at least ``min_pixels`` ignored pixels); the rest stays ignored

No draw from any random generator: the K-means initialisation is the window means, so the result
is a function of the tokens alone (bitwise on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["window_seeds", "spherical_kmeans", "multiscale_kmeans", "fuse_seeds", "region_map",
           "pseudo_regions", "fuse_labels", "IGNORE"]

IGNORE = 255


def _starts(n: int, side: int) -> list[int]:
    """Window starts along one axis: every ``side`` pixels, the last one shifted to end at the border."""
    if side >= n:
        return [0]
    starts = list(range(0, n - side + 1, side))
    if starts[-1] + side < n:
        starts.append(n - side)
    return starts


def window_seeds(tokens: Tensor, side: int) -> Tensor:
    """Mean token of every ``side × side`` window: ``(D, h, w) -> (K, D)`` (L2-normalised), row-major windows."""
    d, h, w = tokens.shape
    side_h, side_w = min(side, h), min(side, w)
    seeds = [tokens[:, y:y + side_h, x:x + side_w].mean(dim=(1, 2))
             for y in _starts(h, side_h) for x in _starts(w, side_w)]
    return F.normalize(torch.stack(seeds), dim=-1)


def spherical_kmeans(points: Tensor, init: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """K-means with cosine similarity: ``points (N, D)``, ``init (K, D)`` (both unit rows).

    Returns ``(centroids (K, D) unit rows, assignment (N,) int64)``; a cluster that loses every
    point keeps its previous centroid.
    """
    centroids = init.clone()
    assign = (points @ centroids.t()).argmax(dim=1)
    for _ in range(iters):
        one_hot = F.one_hot(assign, centroids.shape[0]).to(points.dtype)  # (N, K)
        sums = one_hot.t() @ points                                       # (K, D)
        counts = one_hot.sum(0)
        centroids = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), centroids)
        new_assign = (points @ centroids.t()).argmax(dim=1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return centroids, assign


def multiscale_kmeans(tokens: Tensor, windows: tuple[float, ...], iters: int) -> list[tuple[Tensor, Tensor]]:
    """K-means of ``(D, h, w)`` tokens at every window scale: ``[(centroids (K_f, D), masks (K_f, h, w) bool)]``.

    Clusters left without a token are dropped. Window side = ``max(1, round(f · min(h, w)))``.
    """
    d, h, w = tokens.shape
    x = F.normalize(tokens.float(), dim=0)
    points = x.reshape(d, -1).t()
    out = []
    for f in windows:
        side = max(1, round(f * min(h, w)))
        centroids, assign = spherical_kmeans(points, window_seeds(x, side), iters)
        masks = F.one_hot(assign, centroids.shape[0]).t().reshape(-1, h, w).bool()
        keep = masks.flatten(1).any(dim=1)
        out.append((centroids[keep], masks[keep]))
    return out


def fuse_seeds(centroids: list[Tensor], threshold: float) -> tuple[Tensor, list[list[int]]]:
    """Mask fusion: group the seeds of all scales whose cosine similarity exceeds ``threshold``.

    Seeds are visited in order (scale by scale); an unused seed opens a group with every later unused
    seed more similar than ``threshold`` to it, so each seed (and its mask) is used once.

    Returns:
        ``(fused centroids (G, D) unit rows, members)``: ``members[g]`` = indices into the
        concatenated seeds.
    """
    seeds = F.normalize(torch.cat(centroids).float(), dim=-1)
    sim = seeds @ seeds.t()
    used = torch.zeros(seeds.shape[0], dtype=torch.bool)
    groups: list[list[int]] = []
    for i in range(seeds.shape[0]):
        if used[i]:
            continue
        take = (~used) & (sim[i] > threshold)
        take[i] = True
        take[:i] = False
        members = [int(j) for j in torch.nonzero(take).flatten()]
        used[members] = True
        groups.append(members)
    fused = torch.stack([F.normalize(seeds[g].mean(0), dim=-1) for g in groups])
    return fused, groups


def region_map(tokens: Tensor, fused: Tensor, size: tuple[int, int]) -> Tensor:
    """Each pixel's fused region: ``tokens (D, h, w)``, ``fused (G, D)`` -> ``(H, W)`` int64 region ids."""
    x = F.normalize(tokens.float(), dim=0)
    sim = torch.einsum("gd,dhw->ghw", fused, x)[None]
    if tuple(sim.shape[-2:]) != tuple(size):
        sim = F.interpolate(sim, size=size, mode="bilinear", align_corners=False)
    return sim[0].argmax(dim=0)


def pseudo_regions(dense: Tensor, size: tuple[int, int], windows: tuple[float, ...], iters: int,
                   threshold: float) -> Tensor:
    """Class-agnostic regions of a batch: ``dense (B, D, h, w)`` teacher tokens -> ``(B, H, W)`` int64 ids."""
    maps = []
    for tokens in dense:
        scales = multiscale_kmeans(tokens, windows, iters)
        fused, _ = fuse_seeds([c for c, _ in scales], threshold)
        maps.append(region_map(tokens, fused, size))
    return torch.stack(maps)


def fuse_labels(target: Tensor, regions: Tensor, num_seen: int, max_regions: int,
                min_pixels: int) -> tuple[Tensor, Tensor]:
    """Paste regions into the ignored pixels: ``F = target`` where labelled, potential categories elsewhere.

    Args:
        target: ``(B, H, W)`` int64, seen labels ``0..num_seen-1`` or ``IGNORE``.
        regions: ``(B, H, W)`` int64 region ids (:func:`pseudo_regions`).
        num_seen: the first potential category is ``num_seen``.
        max_regions: at most this many potential categories per image (the largest inside the ignored area).
        min_pixels: smaller regions (counted inside the ignored area) stay ignored.

    Returns:
        ``(F (B, H, W) int64, number of potential categories per image (B,) int64)``. Labelled pixels
        are never changed.
    """
    fused = target.clone()
    counts = torch.zeros(target.shape[0], dtype=torch.int64)
    for b in range(target.shape[0]):
        ignored = target[b] == IGNORE
        if not bool(ignored.any()):
            continue
        ids, areas = torch.unique(regions[b][ignored], return_counts=True)
        order = torch.argsort(areas, descending=True, stable=True)
        slot = 0
        for k in order.tolist():
            if slot >= max_regions or int(areas[k]) < min_pixels:
                break
            fused[b][ignored & (regions[b] == ids[k])] = num_seen + slot
            slot += 1
        counts[b] = slot
    return fused, counts
