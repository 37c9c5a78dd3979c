"""The ViT's dense hooks: intermediates, attention maps, partial runs, custom last blocks, positional interpolation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tag2mask.clip.layers import Attention
from tag2mask.clip.loading import load_clip


@pytest.fixture(scope="module")
def vit(tiny_clip_path):
    """The tiny CLIP's image tower (fp32, plain numerics; a private copy, so tests may not disturb others)."""
    model = load_clip(tiny_clip_path)
    model.requires_grad_(False)
    return model.visual


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 80, 112, generator=g)  # grid 5 x 7, not the 14 x 14 pretrain grid


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def test_intermediates_with_attention(vit, images):
    out = vit.forward_intermediates(images, return_attention=True)
    b, n_blocks = images.shape[0], vit.num_blocks
    h, w = out.grid
    assert (h, w) == (images.shape[2] // vit.patch_size, images.shape[3] // vit.patch_size)
    L = 1 + h * w
    assert len(out.tokens) == n_blocks and len(out.attentions) == n_blocks
    for t, a in zip(out.tokens, out.attentions):
        assert t.shape == (b, L, vit.width)
        assert a.shape == (b, L, L)
        assert (a >= 0).all()
        assert torch.allclose(a.sum(-1), torch.ones(b, L), atol=1e-5)

    # each map is the head average of softmax(q k^T / sqrt(d)) of that block's ln_1 input
    x, _ = vit.embed(images)
    for i, block in enumerate(vit.blocks):
        q, k, _ = block.attn.qkv(block.ln_1(x))
        probs = ((q @ k.transpose(-2, -1)) * block.attn.head_dim**-0.5).softmax(-1)
        assert probs.shape[1] == block.attn.heads
        assert _max_diff(probs.mean(1), out.attentions[i]) <= 1e-5
        x = out.tokens[i]


@torch.no_grad()
def test_sdpa_path_equals_explicit_attention(vit, images):
    fast = vit.forward_intermediates(images, return_attention=False)
    slow = vit.forward_intermediates(images, return_attention=True)
    assert fast.attentions == []
    # block by block, from the same input: the two paths agree to float32 round-off
    x, _ = vit.embed(images)
    for block in vit.blocks:
        y_fast, none = block(x)
        y_slow, weights = block(x, need_weights=True)
        assert none is None and weights is not None
        assert _max_diff(y_fast, y_slow) <= 1e-5
        x = y_fast
    # through the whole stack the round-off accumulates (peaked attention amplifies it): relative bound
    for a, b in zip(fast.tokens, slow.tokens):
        assert _max_diff(a, b) <= 1e-5 * float(b.abs().max())


@torch.no_grad()
def test_attention_paths_agree_with_a_causal_mask():
    torch.manual_seed(0)
    attn = Attention(64, 4).eval()
    x = torch.randn(3, 9, 64)
    mask = torch.full((9, 9), float("-inf")).triu_(1)
    y_fast, none = attn(x, attn_mask=mask)
    y_slow, weights = attn(x, attn_mask=mask, need_weights=True)
    assert none is None and weights.shape == (3, 9, 9)
    assert _max_diff(y_fast, y_slow) <= 1e-5
    assert torch.all(weights.triu(1) == 0)  # causal: no attention to later tokens
    assert torch.allclose(weights.sum(-1), torch.ones(3, 9), atol=1e-6)


@torch.no_grad()
def test_keep_tokens_false_keeps_only_the_last(vit, images):
    full = vit.forward_intermediates(images)
    last_only = vit.forward_intermediates(images, keep_tokens=False)
    assert len(last_only.tokens) == 1
    assert torch.equal(last_only.last, full.last)
    part = vit.forward_intermediates(images, num_blocks=4)
    assert len(part.tokens) == 4 and torch.equal(part.last, full.tokens[3])


@torch.no_grad()
@pytest.mark.parametrize("start", [1, 6, 11])
def test_run_blocks_from_an_intermediate(vit, images, start):
    full = vit.forward_intermediates(images)
    rest = vit.run_blocks(full.tokens[start - 1], start)
    assert len(rest.tokens) == vit.num_blocks - start
    assert torch.equal(rest.last, full.last)
    for got, ref in zip(rest.tokens, full.tokens[start:]):
        assert torch.equal(got, ref)


@torch.no_grad()
def test_forward_dense_last_block_hook(vit, images):
    default, grid = vit.forward_dense(images)
    h, w = grid
    assert default.shape == (images.shape[0], h * w, vit.output_dim)

    calls = []

    def same_block(block, x, g):
        calls.append((x.shape, g))
        return block(x)[0]

    hooked, grid2 = vit.forward_dense(images, last_block=same_block)
    assert grid2 == grid and calls == [((images.shape[0], 1 + h * w, vit.width), grid)]
    assert torch.equal(hooked, default)

    # default = the standard tower's head applied to every patch token
    full = vit.forward_intermediates(images, keep_tokens=False)
    assert _max_diff(default, vit.head(full.last)[:, 1:]) <= 1e-6

    # a last block that returns its input skips block 12 entirely
    skipped, _ = vit.forward_dense(images, last_block=lambda block, x, g: x)
    before_last = vit.forward_intermediates(images, num_blocks=vit.num_blocks - 1, keep_tokens=False).last
    assert torch.equal(skipped, vit.head(before_last)[:, 1:])
    assert not torch.allclose(skipped, default)


@torch.no_grad()
def test_forward_dense_cls_consistent_with_forward(vit):
    x = torch.randn(1, 3, vit.image_size, vit.image_size)
    full = vit.forward_intermediates(x, keep_tokens=False).last
    assert _max_diff(vit.head(full)[:, 0], vit(x)) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_pos_interpolation_identity_at_pretrain_grid(vit, mode):
    g = vit.pretrain_grid
    table = vit.interpolate_pos_embed(g, g, mode=mode, round_fp16=False)
    assert torch.equal(table, vit.positional_embedding)
    # the resize itself is the identity at the same size too (no special case needed)
    patch = vit.positional_embedding[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    same = F.interpolate(patch, size=(g, g), mode=mode, align_corners=False)
    assert _max_diff(same, patch) <= 1e-6


@torch.no_grad()
def test_pos_interpolation_modes_and_rounding(vit):
    g = vit.pretrain_grid
    bil = vit.interpolate_pos_embed(g + 3, g - 2, mode="bilinear", round_fp16=False)
    bic = vit.interpolate_pos_embed(g + 3, g - 2, mode="bicubic", round_fp16=False)
    assert bil.shape == bic.shape == (1 + (g + 3) * (g - 2), vit.width)
    assert torch.equal(bil[0], vit.positional_embedding[0]) and torch.equal(bic[0], bil[0])  # CLS row kept
    assert (bil - bic).abs().max() > 1e-4
    rounded = vit.interpolate_pos_embed(g + 3, g - 2, mode="bilinear", round_fp16=True)
    assert rounded.dtype == bil.dtype and torch.equal(rounded, bil.half().float())
    assert not torch.equal(rounded, bil)
    # the default follows the model attributes
    assert torch.equal(vit.interpolate_pos_embed(g + 3, g - 2), bil)


@torch.no_grad()
def test_pos_interpolation_attribute_changes_the_features(tiny_clip_path, images):
    model = load_clip(tiny_clip_path).visual
    a, _ = model.forward_dense(images)
    model.pos_interpolation = "bicubic"
    b, _ = model.forward_dense(images)
    assert (a - b).abs().max() > 1e-4


@torch.no_grad()
def test_odd_sizes_floor_to_patch_multiples(vit):
    p = vit.patch_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 5 * p + 7, 3 * p + (p - 1), generator=g)
    dense, grid = vit.forward_dense(x)
    assert grid == (5, 3) and dense.shape == (1, 15, vit.output_dim)
    cropped, grid_c = vit.forward_dense(x[:, :, : 5 * p, : 3 * p])
    assert grid_c == grid
    assert _max_diff(dense, cropped) <= 1e-6
    inter = vit.forward_intermediates(x, num_blocks=1)
    assert inter.grid == (5, 3) and inter.last.shape[1] == 16


@torch.no_grad()
def test_bf16_autocast_close_to_fp32(vit, images):
    ref, grid = vit.forward_dense(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, grid_bf = vit.forward_dense(images)
        inter = vit.forward_intermediates(images, return_attention=True)
    assert grid_bf == grid and low.shape == ref.shape
    assert torch.isfinite(low.float()).all()
    # bf16 residual stream through 12 blocks: ~8% mean relative error on this random-weight model
    assert float((low.float() - ref).abs().mean()) <= 0.15 * float(ref.abs().mean())
    cos = F.cosine_similarity(low.float().flatten(0, 1), ref.flatten(0, 1), dim=-1)
    assert float(cos.mean()) > 0.99 and float(cos.min()) > 0.95
    for a in inter.attentions:
        assert torch.allclose(a.float().sum(-1), torch.ones(a.shape[:2]), atol=2e-2)
