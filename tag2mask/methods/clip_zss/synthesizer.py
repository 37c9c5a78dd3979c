"""PLM's synthesizer: class weights for the seen and the potential categories from the student's own features.

::

    R (B, D, h, w) student embeddings, F (B, H, W) fused labels (seen ids, potential ids, 255)
      -> region centroids p_l = area-weighted mean of R under label l       (B, Q, D), Q = seen + max_regions
      -> transformer decoder: queries = centroids (self-attention among the image's present labels),
         keys / values = the teacher's CLS embedding (and optionally its dense tokens)
      -> prototypes (B, Q, D): P_seen (BCE towards the seen text embeddings), P_pseudo (pseudo class weights)

Training only: the student is used without it at test time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Synthesizer", "region_centroids", "bce_to_text"]


def region_centroids(dense: Tensor, labels: Tensor, num_ids: int, ignore: int = 255) -> tuple[Tensor, Tensor]:
    """Mean feature of every label's region.

    Each label pixel ``(y, x)`` of ``labels (B, H, W)`` falls into the feature cell
    ``(floor(y·h/H), floor(x·w/W))``; a cell's weight for label ``l`` is the number of its pixels
    labelled ``l``, so the centroid is exactly the pixel-average of the nearest-upsampled features.

    Args:
        dense: ``(B, D, h, w)``.
        labels: ``(B, H, W)`` int64 in ``0..num_ids-1`` or ``ignore``.

    Returns:
        ``(centroids (B, num_ids, D), present (B, num_ids) bool)``; absent labels get zero rows.
    """
    b, d, h, w = dense.shape
    _, hh, ww = labels.shape
    rows = (torch.arange(hh, device=labels.device) * h // hh)[:, None]
    cols = (torch.arange(ww, device=labels.device) * w // ww)[None, :]
    cell = (rows * w + cols).expand(hh, ww)
    valid = labels != ignore
    batch = torch.arange(b, device=labels.device)[:, None, None].expand_as(labels)
    index = ((batch * num_ids + labels.clamp(0, num_ids - 1)) * (h * w) + cell)[valid]
    weights = torch.bincount(index, minlength=b * num_ids * h * w).reshape(b, num_ids, h * w).to(dense.dtype)
    area = weights.sum(-1)
    sums = torch.einsum("bkl,bdl->bkd", weights, dense.reshape(b, d, h * w))
    present = area > 0
    return sums / area.clamp(min=1)[..., None], present


class Synthesizer(nn.Module):
    """Transformer decoder turning region centroids into class weights (pre-norm layers, no dropout).

    Args:
        dim: the joint embedding dimension D (queries, keys and outputs).
        depth: decoder layers; heads: attention heads (D must divide by it); ffn_mult: feed-forward width / D.
    """

    def __init__(self, dim: int, depth: int = 2, heads: int = 8, ffn_mult: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the synthesizer's width {dim} is not divisible by its {heads} heads")
        layer = nn.TransformerDecoderLayer(dim, heads, dim * ffn_mult, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, depth)
        self.memory_norm = nn.LayerNorm(dim)
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, centroids: Tensor, present: Tensor, memory: Tensor) -> Tensor:
        """``centroids (B, Q, D)``, ``present (B, Q)`` bool, ``memory (B, M, D)`` -> prototypes ``(B, Q, D)``.

        Absent queries take no part in the self-attention (their outputs are meaningless).
        """
        padding = ~present
        padding = padding & present.any(dim=1, keepdim=True)  # an image without any label: attend to all
        out = self.decoder(centroids, self.memory_norm(memory), tgt_key_padding_mask=padding)
        return self.out_norm(out)


def bce_to_text(prototypes: Tensor, classes: Tensor, text: Tensor, scale: float) -> Tensor:
    """``L_bce``: prototypes of seen classes towards their text embedding, away from the others.

    Args:
        prototypes: ``(N, D)`` seen-class prototypes.
        classes: ``(N,)`` int64 their class index into ``text``.
        text: ``(K, D)`` class embeddings (normalised here).
        scale: multiplier of the cosines (the logits of the sigmoid).

    Returns:
        Mean binary cross-entropy over the ``N × K`` pairs (0 when ``N == 0``, still in the graph).
    """
    logits = scale * F.normalize(prototypes, dim=-1) @ F.normalize(text.to(prototypes.dtype), dim=-1).t()
    if prototypes.shape[0] == 0:
        return logits.sum() * 0.0
    target = F.one_hot(classes, text.shape[0]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target)
