"""CorrCLIP's dense features of one (padded) window: scope/value reconstruction and three branches.

What the official code (zdk258/CorrCLIP @ 103bc18, ``CorrCLIPv1``) computes per window (golden
arrays: ``tests/data/ovss2``; description in ``docs/open_vocabulary.md``):

1. DINO ``q + k`` of its last block on the ImageNet-normalised window, L2-normalised:
   ``f`` ``(hd*wd, Cd)``, ``sim = f fᵀ``;
2. region map -> DINO grid (nearest), mask merging (:func:`~.regions.merge_regions`), scope
   (:func:`~.regions.scope_mask`), ``A = softmax(4 sim)`` over allowed pairs;
3. CLIP blocks 1..L-1 with one "mask class token" per merged region (a CLS copy that attends to
   the CLS and its region's patches); spatial feature = mean of blocks 6..10 (12-layer models);
4. last block: main and spatial values (value projection of ``ln_1``, CLS dropped, resized to the
   DINO grid) mixed by ``A`` then ``out_proj``; semantic = the full last block's mask-token output
   of each token's region; ``ln_post(main) + ln_post(spatial) + 0.5 ln_post(semantic)``, ``@ proj``.

Features live on the DINO grid (stride 8 for ViT-B/8), not the CLIP grid.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tag2mask.clip.vision import VisionTransformer
from tag2mask.methods.corrclip.regions import merge_regions, scope_mask
from tag2mask.models.dino import DinoViT

__all__ = ["spatial_block_range", "corrclip_window", "ALPHA", "BETA", "TAU", "DBSCAN_EPS"]

ALPHA, BETA, TAU, DBSCAN_EPS = 1.0, 0.5, 4.0, 0.2  # hard-coded in the official code
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def spatial_block_range(num_layers: int) -> range:
    """0-based block indices averaged by the spatial branch (blocks 6..10 of a 12-layer ViT)."""
    n = {12: 5, 24: 12, 32: 28}.get(num_layers, num_layers - 4)
    return range(num_layers - 2 - n, num_layers - 2)


def _dino_input(x: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised ``(B, 3, H, W)`` -> ImageNet-normalised (padding zeros become the CLIP mean colour)."""
    def v(t):  # noqa: E306
        return torch.tensor(t, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)

    return (x * v(_CLIP_STD) + v(_CLIP_MEAN) - v(_IMAGENET_MEAN)) / v(_IMAGENET_STD)


def _nearest(region: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of an id map ``(h, w)`` int64 (through float32, as the official code; ids < 2^24)."""
    return F.interpolate(region[None, None].float(), size=size, mode="nearest")[0, 0].long()


def _mask_token_bias(region_clip: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive attention mask ``(R + 1 + L, R + 1 + L)`` and region indicators ``(R, L)`` of the CLIP grid.

    Rows/columns: R mask tokens, CLS, L patches. CLS and patches see CLS and patches; mask token r
    sees the CLS and the patches of region r.
    """
    ids = torch.unique(region_clip)
    member = ids[:, None] == region_clip.view(1, -1)  # (R, L)
    r, n = member.shape
    allowed = torch.zeros(r + 1 + n, r + 1 + n, dtype=torch.bool, device=region_clip.device)
    allowed[r:, r:] = True
    allowed[:r, r] = True
    allowed[:r, r + 1:] = member
    bias = torch.zeros(allowed.shape, dtype=dtype, device=region_clip.device).masked_fill(~allowed, float("-inf"))
    return bias, member


def _values(block, z: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Value projection of ``ln_1(z)`` ``(1, 1 + L, C)``, CLS dropped, bilinear to the DINO grid: ``(1, hd*wd, C)``."""
    width = z.shape[-1]
    w_v, b_v = block.attn.in_proj_weight[2 * width:], block.attn.in_proj_bias[2 * width:]
    v = F.linear(block.ln_1(z), w_v, b_v)[:, 1:].transpose(1, 2).reshape(1, width, *grid)
    return F.interpolate(v, size=size, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)


def corrclip_window(
    visual: VisionTransformer, dino: DinoViT, x: torch.Tensor, region: torch.Tensor, *,
    pos_mode: Optional[str] = "bicubic", pos_scale_offset: Optional[float] = 0.1,
    record: Optional[dict] = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Features of one padded window: x ``(1, 3, H, W)`` CLIP-normalised (H, W multiples of both
    patch sizes), region ``(H, W)`` int64 -> (``(hd*wd, D)`` not normalised, DINO grid ``(hd, wd)``).

    ``record`` receives ``dino_feats`` ``(hd*wd, Cd)``, ``scope`` ``(hd*wd, hd*wd)`` bool and ``dbscan``
    (cluster label per merged region, a list).
    """
    f, dgrid = dino.last_qk(_dino_input(x).to(dino.pos_embed.dtype))
    f = F.normalize(f[0].float(), dim=-1)
    sim = f @ f.T
    merged, clusters = merge_regions(_nearest(region, dgrid), f, DBSCAN_EPS)
    allowed = scope_mask(merged.view(-1), sim)
    attn = (sim.masked_fill(~allowed, float("-inf")) * TAU).softmax(dim=-1)
    if record is not None:
        record.update(dino_feats=f, scope=allowed, dbscan=clusters)

    tokens, grid = visual.embed(x, pos_mode=pos_mode, pos_scale_offset=pos_scale_offset)
    bias, member = _mask_token_bias(_nearest(merged, grid), tokens.dtype)
    r = member.shape[0]
    seq = torch.cat([tokens[:, :1].expand(1, r, -1), tokens], dim=1)
    spatial_ids = spatial_block_range(visual.num_blocks)
    spatial = []
    for i, blk in enumerate(visual.blocks[:-1]):  # a loop over blocks, as any ViT forward
        seq = blk(seq, attn_mask=bias)[0]
        if i in spatial_ids:
            spatial.append(seq[:, r:])
    block = visual.blocks[-1]
    out = []
    for z in (seq[:, r:], torch.stack(spatial).mean(0)):  # main and spatial branches
        out.append(block.attn.project_out(attn @ _values(block, z, grid, dgrid)))
    mask_tokens = block(seq, attn_mask=bias)[0][0, :r]  # (R, C)
    indicator = F.interpolate(member.view(1, r, *grid).float(), size=dgrid, mode="nearest")[0].flatten(1)
    out.append((indicator.T @ mask_tokens)[None])  # each DINO token: its region's mask token
    main, spatial_f, semantic = (visual.ln_post(o) for o in out)
    return ((main + spatial_f * ALPHA + semantic * BETA) @ visual.proj)[0], dgrid
