"""Math pins for the training-free OVSS methods (MaskCLIP, SCLIP, ClearCLIP, NACLIP) and the segmenter.

Every last-block variant is compared with an explicit, loop-per-head computation from the block's
weights (float64, so tolerances are tight); MaskCLIP's prompt denoising and key smoothing are
compared with direct NumPy implementations of the spec's description.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tag2mask.clip.layers import QuickGELU
from tag2mask.clip.loading import load_clip
from tag2mask.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig
from tag2mask.methods.ovss.last_block import LAST_BLOCKS, get_last_block
from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter
from tag2mask.methods.ovss.last_block import NAClipBlock, maskclip_keys, neighbourhood_prior
from tag2mask.methods.ovss.maskclip_refine import key_smooth, key_smoothing_weights, prompt_denoise
from tag2mask.methods.ovss.numerics import maskclip_numerics
from tag2mask.vocab.vocabulary import Vocabulary

GRID = (4, 5)


@pytest.fixture(scope="module")
def tiny(tiny_clip_path) -> CLIP:
    return load_clip(tiny_clip_path).eval()


@pytest.fixture(scope="module")
def tiny64(tiny) -> CLIP:
    return copy.deepcopy(tiny).double()


@pytest.fixture()
def stream(tiny64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 1 + GRID[0] * GRID[1], tiny64.visual.width, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# explicit reference computations


def _ln(x, m, eps=None):
    eps = m.eps if eps is None else eps
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * m.weight + m.bias


def _ffn(block, x, eps=None, act=lambda t: t * torch.sigmoid(1.702 * t)):
    h = _ln(x, block.ln_2, eps) @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
    return act(h) @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


def _qkv(block, x, eps=None):
    y = _ln(x, block.ln_1, eps)
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    c = x.shape[-1]
    return [y @ w[i * c : (i + 1) * c].T + b[i * c : (i + 1) * c] for i in range(3)]


def _out(block, t):
    return t @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def _softmax_rows(s):
    s = s - s.max(-1, keepdim=True).values
    e = torch.exp(s)
    return e / e.sum(-1, keepdim=True)


def _per_head(block, x, attention):
    """``out_proj(concat_h attention(q_h, k_h) @ v_h)`` with an explicit loop over heads."""
    q, k, v = _qkv(block, x)
    heads, d = block.attn.heads, block.attn.head_dim
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        outs.append(attention(q[..., sl], k[..., sl], d) @ v[..., sl])
    return _out(block, torch.cat(outs, dim=-1))


def _prior_loops(grid, std):
    h, w = grid
    n = h * w
    prior = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for a in range(n):
        for b in range(n):
            (i, j), (k, l) = divmod(a, w), divmod(b, w)
            prior[1 + a, 1 + b] = math.exp(-((i - k) ** 2 + (j - l) ** 2) / (2 * std**2))
    return prior


# ------------------------------------------------------------------------------------------------
# last-block variants


def test_registry_names():
    assert set(LAST_BLOCKS) == {"clip", "maskclip", "sclip", "clearclip", "naclip",
                                "clip-reduced", "maskclip-reduced", "sclip-reduced"}
    assert LAST_BLOCKS["naclip"].std == 5.0
    assert get_last_block("NACLIP", std=3.0).std == 3.0
    with pytest.raises(KeyError, match="unknown method"):
        get_last_block("segformer")
    with pytest.raises(TypeError):
        get_last_block("sclip", std=1.0)


def test_maskclip_identity_attention_equals_explicit(tiny64, stream):
    block = tiny64.visual.blocks[-1]
    _, _, v = _qkv(block, stream)
    x1 = stream + _out(block, v)
    expected = x1 + _ffn(block, x1)
    got = LAST_BLOCKS["maskclip"](block, stream, GRID)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # same thing as the unchanged block run with an attention mask that only allows the diagonal
    n = stream.shape[1]
    eye_mask = torch.full((n, n), float("-inf"), dtype=torch.float64).fill_diagonal_(0.0)
    torch.testing.assert_close(got, block(stream, attn_mask=eye_mask)[0], rtol=1e-10, atol=1e-10)


def test_maskclip_dense_features_are_ln_post_proj_of_identity_block(tiny64):
    vis = tiny64.visual
    img = torch.randn(1, 3, 64, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x, grid = vis.embed(img)
    for blk in vis.blocks[:-1]:
        x = blk(x)[0]
    block = vis.blocks[-1]
    _, _, v = _qkv(block, x)
    x1 = x + _out(block, v)
    expected = (_ln(x1 + _ffn(block, x1), vis.ln_post) @ vis.proj)[:, 1:]
    got, g = vis.forward_dense(img, last_block=LAST_BLOCKS["maskclip"])
    assert g == grid == (4, 5)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_maskclip_compat_numerics_and_restore(tiny64, stream):
    block = tiny64.visual.blocks[-1]
    _, _, v = _qkv(block, stream, eps=1e-6)
    x1 = stream + _out(block, v)
    erf_gelu = lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))  # noqa: E731
    expected = x1 + _ffn(block, x1, eps=1e-6, act=erf_gelu)
    with maskclip_numerics(tiny64.visual):
        assert tiny64.visual.pos_interpolation == "bicubic"
        got = LAST_BLOCKS["maskclip"](block, stream, GRID)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # the shared model is back to CLIP's numerics
    assert isinstance(block.mlp.gelu, QuickGELU) and block.ln_1.eps == 1e-5
    assert tiny64.visual.ln_post.eps == 1e-5 and tiny64.visual.pos_interpolation == "bilinear"


def test_maskclip_keys_go_through_out_proj(tiny64, stream):
    block = tiny64.visual.blocks[-1]
    _, k, _ = _qkv(block, stream)
    torch.testing.assert_close(maskclip_keys(block, stream), _out(block, k), rtol=1e-10, atol=1e-10)


def test_sclip_is_qq_plus_kk_with_residual_and_ffn(tiny64, stream):
    block = tiny64.visual.blocks[-1]

    def csa(q, k, d):
        return _softmax_rows(q @ q.transpose(-1, -2) / math.sqrt(d)) + _softmax_rows(k @ k.transpose(-1, -2) / math.sqrt(d))

    x1 = stream + _per_head(block, stream, csa)
    torch.testing.assert_close(LAST_BLOCKS["sclip"](block, stream, GRID), x1 + _ffn(block, x1), rtol=1e-10, atol=1e-10)


def test_clearclip_is_qq_attention_without_residual_or_ffn(tiny64, stream):
    block = tiny64.visual.blocks[-1]
    expected = _per_head(block, stream, lambda q, k, d: _softmax_rows(q @ q.transpose(-1, -2) / math.sqrt(d)))
    got = LAST_BLOCKS["clearclip"](block, stream, GRID)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # the residual really is gone: adding the input back gives something else
    assert not torch.allclose(got, expected + stream)


def test_naclip_prior_matches_gaussian_definition():
    prior = neighbourhood_prior(GRID, std=5.0, dtype=torch.float64)
    torch.testing.assert_close(prior, _prior_loops(GRID, 5.0), rtol=1e-12, atol=1e-12)
    assert prior.shape == (21, 21) and prior[0].abs().sum() == 0 and prior[:, 0].abs().sum() == 0
    assert torch.all(prior[1:, 1:].diagonal() == 1.0)


def test_naclip_is_kk_plus_prior_reduced_block(tiny64, stream):
    block = tiny64.visual.blocks[-1]
    prior = _prior_loops(GRID, 5.0)
    expected = _per_head(block, stream, lambda q, k, d: _softmax_rows(k @ k.transpose(-1, -2) / math.sqrt(d) + prior))
    got = LAST_BLOCKS["naclip"](block, stream, GRID)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # the prior is really used: with small keys (flat k-k attention) sigma changes the output
    flat = copy.deepcopy(block)
    with torch.no_grad():
        flat.attn.in_proj_weight.mul_(0.01)
    assert not torch.allclose(NAClipBlock(std=1.0)(flat, stream, GRID), NAClipBlock(std=5.0)(flat, stream, GRID))


def test_clip_variant_is_the_unchanged_block(tiny64, stream):
    block = tiny64.visual.blocks[-1]
    torch.testing.assert_close(LAST_BLOCKS["clip"](block, stream, GRID), block(stream)[0])


# ------------------------------------------------------------------------------------------------
# MaskCLIP refinements vs direct implementations of the spec


def _softmax_np(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_prompt_denoising_matches_direct():
    rng = np.random.RandomState(0)
    logits = rng.uniform(-0.05, 0.05, size=(2, 6, 3, 4))
    logits[:, 2] += 0.05  # a strong prompt so the others lose confidence somewhere
    expected = logits.copy()
    probs = _softmax_np(100 * logits, axis=1)
    for b in range(2):
        for c in range(6):
            if probs[b, c].max() < 0.5:
                expected[b, c] = -100.0
    got = prompt_denoise(torch.from_numpy(logits), threshold=0.5)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=0)
    assert (got == -100).any() and (got != -100).any()
    assert torch.equal(prompt_denoise(torch.from_numpy(logits), threshold=0.0), torch.from_numpy(logits))


@pytest.mark.parametrize("paper_form", [False, True])
def test_key_smoothing_matches_direct(paper_form):
    rng = np.random.RandomState(1)
    b, c, h, w, ch = 2, 4, 3, 5, 7
    logits = rng.uniform(-0.03, 0.03, size=(b, c, h, w))
    keys = rng.randn(b, h * w, ch)
    threshold = 0.7
    probs = _softmax_np(100 * logits, axis=1).reshape(b, c, h * w).transpose(0, 2, 1)  # (b, hw, c)
    expected = probs.copy()
    for n in range(b):
        if paper_form:  # cos(k_i, k_j)
            kn = keys[n] / np.linalg.norm(keys[n], axis=1, keepdims=True)
        else:  # official: every channel normalised over positions
            kn = keys[n] / np.linalg.norm(keys[n], axis=0, keepdims=True)
        weight = kn @ kn.T
        for i in range(h * w):
            if probs[n, i].max() < threshold:
                expected[n, i] = sum(weight[i, j] * probs[n, j] for j in range(h * w))
    expected = expected.transpose(0, 2, 1).reshape(b, c, h, w)
    got = key_smooth(torch.from_numpy(logits), torch.from_numpy(keys), threshold=threshold, paper_form=paper_form)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    selected = probs.max(-1) < threshold
    assert selected.any() and (~selected).any()  # the test exercises both branches


def test_key_smoothing_forms_differ():
    keys = torch.randn(1, 12, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    official, paper = key_smoothing_weights(keys), key_smoothing_weights(keys, paper_form=True)
    torch.testing.assert_close(paper.diagonal(dim1=1, dim2=2), torch.ones(1, 12, dtype=torch.float64))
    assert not torch.allclose(official, paper)
    # official form: trace = number of channels (each channel has unit norm over positions)
    torch.testing.assert_close(official.diagonal(dim1=1, dim2=2).sum(), torch.tensor(5.0, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# segmenter


def _image(w=333, h=250, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


VOCAB = "cat, dog|puppy; background: sky, grass"


@pytest.mark.parametrize("method", ["maskclip", "sclip", "clearclip", "naclip"])
@pytest.mark.parametrize("mode", ["whole", "slide"])
@pytest.mark.parametrize("compat", [False, True])
def test_output_has_image_size_and_valid_labels(tiny, method, mode, compat):
    seg = OpenVocabSegmenter(tiny, VOCAB, method=method, mode=mode, compat=compat, prob_threshold=0.1, text_cache=False)
    res = seg.predict(_image())
    assert res.label.shape == (250, 333) and res.label.dtype == np.uint8
    assert res.logits.shape == (3, 250, 333) and res.logits.dtype == np.float32
    assert np.isfinite(res.logits).all()
    assert res.class_names == ("background", "cat", "dog") and res.has_background
    assert res.label.max() < len(res.class_names)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_small_odd_image_without_resize(tiny, mode):
    seg = OpenVocabSegmenter(tiny, "cat, dog", method="sclip", mode=mode, short_side=None, text_cache=False)
    res = seg.predict(_image(101, 37))
    assert res.label.shape == (37, 101) and res.logits.shape == (2, 37, 101)
    assert res.class_names == ("cat", "dog") and not res.has_background
    assert set(res.present()) <= {0, 1}


def test_compat_does_not_mutate_the_model(tiny):
    seg = OpenVocabSegmenter(tiny, VOCAB, method="maskclip", compat=True, text_cache=False)
    assert seg.logit_scale == 1.0
    seg.predict(_image())
    vis = tiny.visual
    assert vis.pos_interpolation == "bilinear" and vis.ln_post.eps == 1e-5
    assert all(isinstance(b.mlp.gelu, QuickGELU) for b in vis.blocks)


def test_key_smoothing_in_segmenter_uses_out_proj_keys(tiny):
    plain = OpenVocabSegmenter(tiny, VOCAB, method="maskclip", text_cache=False)
    ks = OpenVocabSegmenter(tiny, VOCAB, method="maskclip", key_smoothing=0.9, text_cache=False)
    img = plain._preprocess(_image())[..., :64, :80]
    captured = {}

    def grab(block, x, grid):
        captured["keys"] = maskclip_keys(block, x)[:, 1:]
        return LAST_BLOCKS["maskclip"](block, x, grid)

    tiny.visual.forward_dense(img, last_block=grab, pos_mode="bicubic", pos_scale_offset=0.1)  # harness numerics
    expected = key_smooth(plain.dense_logits(img), captured["keys"], 0.9)
    torch.testing.assert_close(ks.dense_logits(img), expected)


def test_decide_synonyms_threshold_and_area(tiny):
    vocab = Vocabulary.from_names([["cat", "kitten"], "dog"], background=["sky"])
    seg = OpenVocabSegmenter(tiny, vocab, method="sclip", logit_scale=1.0, prob_threshold=0.4, text_cache=False)
    # prompts: sky, cat, kitten, dog -> labels 0, 1, 1, 2 (background first, as line 0 of the official name sets)
    assert seg.prompt_label.tolist() == [0, 1, 1, 2]
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.5, 0.3], [0.6, 0.1, 0.3], [0.2, 0.2, 0.1]]))
    label, class_logit = seg._decide(logits.reshape(4, 1, 3))  # rows = prompts, columns = pixels
    # pixel 0: kitten 0.6 -> cat; pixel 1: cat 0.5 -> cat; pixel 2: probs .3/.3/.3/.1 -> below 0.4 -> background
    assert label.flatten().tolist() == [1, 1, 0]
    torch.testing.assert_close(class_logit[1, 0], torch.maximum(logits[1], logits[2]))
    # area threshold: 'dog' wins only 1 of 3 foreground pixels -> suppressed at 0.5
    seg2 = OpenVocabSegmenter(tiny, vocab, method="sclip", logit_scale=1.0, area_threshold=0.5, text_cache=False)
    per_pixel = [[0.1, 0.7, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.3, 0.1, 0.1, 0.5]]  # sky, cat, kitten, dog
    lg = torch.log(torch.tensor(per_pixel)).T.reshape(4, 1, 3)
    assert seg2._decide(lg)[0].flatten().tolist() == [1, 1, 0]


def test_wordless_background_row_is_minus_inf(tiny):
    seg = OpenVocabSegmenter(tiny, "cat, dog", method="clearclip", prob_threshold=0.99, text_cache=False)
    res = seg.predict(_image(64, 48))
    assert res.class_names[0] == "background" and np.isneginf(res.logits[0]).all()
    # one prompt per class, so softmax over the class rows is the decision probability
    probs = torch.from_numpy(res.logits[1:]).softmax(dim=0)
    best, arg = probs.max(dim=0)
    expected = torch.where(best < 0.99, 0, arg + 1).numpy()
    np.testing.assert_array_equal(res.label, expected)


def test_errors(tiny):
    with pytest.raises(ValueError, match="unknown method"):
        OpenVocabSegmenter(tiny, "cat", method="segformer", text_cache=False)
    with pytest.raises(ValueError, match="mode"):
        OpenVocabSegmenter(tiny, "cat", mode="tiles", text_cache=False)
    with pytest.raises(ValueError, match="MaskCLIP"):
        OpenVocabSegmenter(tiny, "cat", method="sclip", key_smoothing=1.0, text_cache=False)
    with pytest.raises(ValueError):
        OpenVocabSegmenter(tiny, "", text_cache=False)


@pytest.fixture(scope="module")
def tiny_resnet() -> CLIP:
    torch.manual_seed(0)
    cfg = CLIPConfig(embed_dim=32, vision=VisionConfig(width=8, layers=(1, 1, 1, 1), heads=4, image_size=64),
                     text=TextConfig(width=32, layers=1, heads=2))
    return CLIP(cfg).eval()


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_resnet_maskclip_path(tiny_resnet, mode):
    seg = OpenVocabSegmenter(tiny_resnet, VOCAB, method="maskclip", mode=mode, key_smoothing=1.0,
                             prompt_denoising=0.5, text_cache=False)
    res = seg.predict(_image())
    assert res.label.shape == (250, 333) and res.label.max() < 3
    # dense features are c_proj(v_proj(x)) per position, no positional embedding
    x = seg._preprocess(_image())[..., :96, :128]
    pool = tiny_resnet.visual.attnpool
    fmap = tiny_resnet.visual.forward_features(x)
    feats = F.normalize(pool.c_proj(pool.v_proj(fmap.flatten(2).transpose(1, 2))), dim=-1)
    plain = OpenVocabSegmenter(tiny_resnet, VOCAB, method="maskclip", text_cache=False)
    expected = (feats @ plain.text.T).transpose(1, 2).reshape(1, -1, *fmap.shape[-2:])
    torch.testing.assert_close(plain.dense_logits(x), expected)
    with pytest.raises(ValueError, match="ViT"):
        OpenVocabSegmenter(tiny_resnet, VOCAB, method="sclip", text_cache=False)


def test_pamr_refines_the_upsampled_logits(tiny):
    img = _image(80, 60)
    plain = OpenVocabSegmenter(tiny, VOCAB, method="naclip", mode="whole", text_cache=False).predict(img)
    refined = OpenVocabSegmenter(tiny, VOCAB, method="naclip", mode="whole", pamr=True, text_cache=False).predict(img)
    assert refined.label.shape == (60, 80) and refined.logits.shape == plain.logits.shape
    assert not np.allclose(refined.logits, plain.logits)
