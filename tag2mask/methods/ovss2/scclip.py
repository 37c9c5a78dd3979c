"""SC-CLIP (Bai et al., IEEE TIP 2025): self-calibrated dense features of a frozen CLIP ViT.

What the official code (SuleBai/SC-CLIP @ 0417ba9) computes per window, batched over windows and
without Python loops over tokens (golden arrays: ``tests/data/ovss2``; description in
``docs/open_vocabulary.md``):

1. blocks 1..L-1 as usual, every output kept;
2. anomaly tokens of block L-1 by :func:`lof_scores` (*not* sklearn's LOF: squared distances and the
   query's own k-distance in the reach distance) above the 95 % quantile;
3. :func:`smooth_outliers`: each anomaly token with a non-anomalous 8-neighbour becomes their mean;
4. two similarity maps (block 9 smoothed, block 4 raw, entries below 0.4 zeroed) re-aggregate the
   tokens around a last block whose attention is ``½ (softmax(G) + softmax(s k kᵀ))`` (G from block 9);
5. the same last block on the sum of blocks 4..10 (multi-level branch); features =
   ``ln_post(main + multi) @ proj``. The CLS token leaves after block L-1: outputs are patches only.

Token index -> (row, column): the official code uses ``(i // rows, i % rows)``, right only for
square windows (every official config uses 224x224 windows). ``token_map="correct"`` (default) uses
``(i // columns, i % columns)``; ``"official"`` reproduces the official mapping, which raises for
windows where it points outside the grid (:class:`ValueError` here) and smooths the wrong tokens
otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from tag2mask.clip.layers import ResidualAttentionBlock
from tag2mask.clip.vision import VisionTransformer

__all__ = ["SCClipConfig", "TOKEN_MAPS", "check_depth", "lof_scores", "outlier_mask", "smooth_outliers", "scclip_dense"]

TOKEN_MAPS = ("correct", "official")


@dataclass(frozen=True)
class SCClipConfig:
    """SC-CLIP's constants (official constructor defaults; the last four are hard-coded there).

    Block indices are 0-based positions in the list of block outputs 1..L-1 (``pre_adjust_idx`` 8 =
    block 9). ``token_map``: one of :data:`TOKEN_MAPS` (module docstring).
    """

    pre_adjust_idx: int = 8
    post_adjust_idx: int = 3
    multi_start_idx: int = 3
    multi_end_idx: int = 10
    res_cls: float = 0.3
    beta: float = 0.4
    lof_neighbours: int = 30
    contamination: float = 0.05
    attn_gain: float = 3.0
    token_map: str = "correct"

    def __post_init__(self) -> None:
        if self.token_map not in TOKEN_MAPS:
            raise ValueError(f"unknown token_map {self.token_map!r}; choose one of {list(TOKEN_MAPS)}")


def lof_scores(tokens: torch.Tensor, k: int = 30) -> torch.Tensor:
    """SC-CLIP's local-outlier scores: ``(B, N, C)`` tokens -> ``(B, N)`` float32 (same dtype as input).

    Distances are *squared* Euclidean; ``kd_i`` is the k-th neighbour distance (self excluded);
    reach distances use the query's own ``kd_i`` (a textbook LOF uses the neighbour's), so the
    score is ``mean_j kd_i / kd_j`` over the k nearest neighbours j, computed in the official
    order of operations so that float32 results agree.
    """
    n = tokens.shape[1]
    if n < k + 1:
        raise ValueError(f"SC-CLIP's LOF needs at least {k + 1} tokens per window, got {n}; use larger windows")
    # differences, not the matmul expansion: the official distances are |a - b|² of the raw tokens
    dist = torch.cdist(tokens, tokens, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    knn_d, knn_i = torch.topk(dist, k=k + 1, dim=-1, largest=False)
    knn_d, knn_i = knn_d[..., 1:], knn_i[..., 1:]
    reach = torch.maximum(knn_d, knn_d[..., -1:].expand_as(knn_d))
    lrd = k / torch.nan_to_num(reach.mean(dim=-1), nan=1e-6)  # (B, N)
    neighbour_lrd = torch.gather(lrd, 1, knn_i.flatten(1)).view_as(knn_i)
    return (neighbour_lrd / lrd.unsqueeze(-1)).mean(dim=-1)


def outlier_mask(scores: torch.Tensor, contamination: float = 0.05) -> torch.Tensor:
    """Anomalies: scores strictly above their ``1 - contamination`` quantile (float32, linear): ``(B, N)`` bool."""
    threshold = torch.quantile(scores.float(), 1.0 - contamination, dim=-1, keepdim=True)
    return scores > threshold


def _outlier_map(outliers: torch.Tensor, grid: tuple[int, int], token_map: str) -> torch.Tensor:
    """Token-order anomaly flags ``(B, h*w)`` -> the grid cells smoothed ``(B, h, w)`` bool."""
    h, w = grid
    if token_map == "correct" or h == w:
        return outliers.view(-1, h, w)
    # the official (row, col) = (i // h, i % h): other cells than the anomalous tokens for h != w
    b_idx, t_idx = torch.nonzero(outliers, as_tuple=True)
    rows, cols = torch.div(t_idx, h, rounding_mode="floor"), t_idx % h
    if bool((rows >= h).any()) or bool((cols >= w).any()):
        raise ValueError(f"SC-CLIP's official token mapping (token_map='official') points outside the {h}x{w} "
                         "grid of a non-square window (the official code raises IndexError here); use "
                         "token_map='correct' or square windows")
    cells = torch.zeros(outliers.shape[0], h, w, dtype=torch.bool, device=outliers.device)
    cells[b_idx, rows, cols] = True
    return cells


def smooth_outliers(fmap: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Replace flagged cells by the mean of their non-flagged 8-neighbours (inside the map).

    fmap ``(B, C, h, w)``, cells ``(B, h, w)`` bool -> ``(B, C, h, w)``; a flagged cell without a
    non-flagged neighbour keeps its value.
    """
    keep = (~cells).to(fmap.dtype).unsqueeze(1)  # (B, 1, h, w)
    ring = torch.ones(1, 1, 3, 3, dtype=fmap.dtype, device=fmap.device)
    ring[..., 1, 1] = 0
    c = fmap.shape[1]
    total = F.conv2d(F.pad(fmap * keep, (1, 1, 1, 1)), ring.expand(c, 1, 3, 3), groups=c)
    count = F.conv2d(F.pad(keep, (1, 1, 1, 1)), ring)
    mean = total / torch.where(count == 0, torch.ones_like(count), count)
    update = cells.unsqueeze(1).to(fmap.dtype) * (count > 0).to(fmap.dtype)
    return fmap * (1 - update) + mean * update


def check_depth(num_blocks: int, config: SCClipConfig = SCClipConfig()) -> None:
    """SC-CLIP's block indices are fixed (ViT-B/16's 12 blocks); fail clearly on a shallower tower."""
    needed = max(config.pre_adjust_idx, config.post_adjust_idx, config.multi_end_idx - 1) + 2
    if num_blocks < needed:
        raise ValueError(f"SC-CLIP uses the outputs of blocks {config.post_adjust_idx + 1}, "
                         f"{config.pre_adjust_idx + 1} and {config.multi_start_idx + 1}..{config.multi_end_idx}: it "
                         f"needs a ViT with at least {needed} blocks, this one has {num_blocks}")


def unsupported_reason(model: Any) -> Optional[str]:
    """Why ``model`` cannot run SC-CLIP (the registry's ``supports`` check), or ``None`` when it can."""
    blocks = getattr(getattr(model, "visual", None), "num_blocks", None)
    if blocks is None:
        return "SC-CLIP needs a ViT CLIP (this model's image tower has no transformer blocks)"
    try:
        check_depth(blocks)
    except ValueError as exc:
        return str(exc)
    return None


def _tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, h*w, C)`` row-major -> ``(B, C, h, w)``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def _similarity(tokens: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of rows: ``(B, N, C)`` -> ``(B, N, N)``."""
    t = tokens / tokens.norm(dim=-1, keepdim=True)
    return t @ t.transpose(1, 2)


def _aggregate(tokens: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
    """``diag(rowsum + 1e-6)⁻¹ S F``: ``(B, N, C)``, ``(B, N, N)`` -> ``(B, N, C)``."""
    return (sim / (sim.sum(dim=-1, keepdim=True) + 1e-6)) @ tokens


def _calibrated_attention(block: ResidualAttentionBlock, a: torch.Tensor, mid_sim: torch.Tensor,
                          gain: float) -> torch.Tensor:
    """``out_proj(½ (softmax(G) + softmax(s k kᵀ)) v)`` of ``a = ln_1(x)`` ``(B, N, C)`` -> ``(B, N, C)``.

    ``G = gain (S_mid - mean(S_mid))`` with negative entries -> -inf, one matrix for every head.
    """
    _, k, v = block.attn.qkv(a)  # (B, heads, N, d)
    g = (mid_sim - mid_sim.mean(dim=(-2, -1), keepdim=True)) * gain
    g = g.masked_fill(g < 0, float("-inf")).softmax(dim=-1).unsqueeze(1)  # (B, 1, N, N)
    weights = (g + ((k * k.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)) / 2
    return block.attn.project_out(block.attn.merge_heads(weights @ v))


def scclip_dense(
    visual: VisionTransformer, images: torch.Tensor, config: SCClipConfig = SCClipConfig(), *,
    pos_mode: Optional[str] = None, pos_scale_offset: Optional[float] = None,
    record: Optional[dict[str, torch.Tensor]] = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """SC-CLIP's dense features: ``(B, 3, H, W)`` -> (``(B, h*w, D)`` not normalised, grid ``(h, w)``).

    ``record`` (a dict) receives the intermediate arrays named as in the golden fixtures:
    ``lof_scores`` (B, h*w), ``outliers`` (B, h, w) bool (the cells smoothed), ``mid_simi`` /
    ``pre_sim_thd`` / ``post_sim_thd`` (B, h*w, h*w), ``main`` / ``multi`` (B, h*w, width).
    """
    check_depth(visual.num_blocks, config)
    x, grid = visual.embed(images, pos_mode=pos_mode, pos_scale_offset=pos_scale_offset)
    outs = visual.run_blocks(x, 0, visual.num_blocks - 1, keep_tokens=True).tokens  # blocks 1..L-1
    last = outs[-1]
    cls = last[:, :1]
    scores = lof_scores(last[:, 1:], config.lof_neighbours)
    cells = _outlier_map(outlier_mask(scores, config.contamination), grid, config.token_map)
    smooth = lambda t: smooth_outliers(_tokens_to_map(t, grid), cells).flatten(2).transpose(1, 2)  # noqa: E731
    x = smooth(last[:, 1:])
    mid_sim = _similarity(smooth(outs[config.pre_adjust_idx][:, 1:]))
    pre_sim = mid_sim.masked_fill(mid_sim < config.beta, 0.0)
    post_sim = _similarity(outs[config.post_adjust_idx][:, 1:])
    post_sim = post_sim.masked_fill(post_sim < config.beta, 0.0)
    block = visual.blocks[-1]
    main = _calibrated_attention(block, block.ln_1(_aggregate(x, pre_sim)), mid_sim, config.attn_gain)
    main = _aggregate(main + config.res_cls * cls, post_sim)
    multi = torch.stack(outs[config.multi_start_idx:config.multi_end_idx]).sum(dim=0)
    multi_out = _calibrated_attention(block, block.ln_1(multi[:, 1:]), mid_sim, config.attn_gain)
    multi_out = _aggregate(multi_out + config.res_cls * multi[:, :1], post_sim)
    if record is not None:
        record.update(lof_scores=scores, outliers=cells, mid_simi=mid_sim, pre_sim_thd=pre_sim,
                      post_sim_thd=post_sim, main=main, multi=multi_out)
    return visual.head(main + multi_out), grid
