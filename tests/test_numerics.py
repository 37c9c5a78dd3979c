"""Official numerics as one object the method applies: weights, positional embedding, TF32, sharing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from golden_sets import TINY_CLIP_PATH
from tag2mask.clip.loading import load_clip
from tag2mask.clip.numerics import NUMERICS, Numerics, fp16_rounded_tensors, tf32_disabled, weights_are_fp16_exact


@pytest.fixture()
def plain():
    return load_clip(TINY_CLIP_PATH)


def test_weights_swapped_in_only_inside_the_context(plain):
    before = [p.detach().clone() for p in fp16_rounded_tensors(plain)]
    fingerprint = plain.fingerprint
    bound = NUMERICS["clip_es"].bind(plain)
    assert bound.copies_weights and not weights_are_fp16_exact(plain)
    with bound:
        assert weights_are_fp16_exact(plain)
        assert plain.visual.round_pos_embed_fp16 and plain.fingerprint == fingerprint + ":fp16r"
        with bound:  # re-entrant
            assert weights_are_fp16_exact(plain)
        assert weights_are_fp16_exact(plain)
    assert all(torch.equal(a, p) for a, p in zip(before, fp16_rounded_tensors(plain)))
    assert not plain.visual.round_pos_embed_fp16 and plain.fingerprint == fingerprint


def test_restored_after_an_exception(plain):
    before = [p.detach().clone() for p in fp16_rounded_tensors(plain)]
    saved = torch.backends.cudnn.allow_tf32
    with pytest.raises(RuntimeError, match="boom"):
        with NUMERICS["clip_es"].bind(plain):
            raise RuntimeError("boom")
    assert all(torch.equal(a, p) for a, p in zip(before, fp16_rounded_tensors(plain)))
    assert not plain.visual.round_pos_embed_fp16 and torch.backends.cudnn.allow_tf32 == saved


def test_random_models_stay_uncached(plain):
    plain.fingerprint = "random-init"
    assert NUMERICS["clip_es"].bind(plain).fingerprint == "random-init"


def test_rounded_model_needs_no_copies():
    rounded = load_clip(TINY_CLIP_PATH, round_fp16_weights=True)
    bound = NUMERICS["clip_es"].bind(rounded)
    assert not bound.copies_weights and bound.fingerprint == rounded.fingerprint
    assert rounded.fingerprint.endswith(":fp16r")


def test_fma_rounds_weights_but_not_the_positional_embedding(plain):
    h, w = 5, 7
    with NUMERICS["fma"].bind(plain):
        assert weights_are_fp16_exact(plain)
        table = plain.visual.interpolate_pos_embed(h, w)
    assert not torch.equal(table, table.half().float())  # FMA keeps the interpolated table in float32
    with NUMERICS["clip_es"].bind(plain):
        rounded = plain.visual.interpolate_pos_embed(h, w)
    assert torch.equal(rounded, rounded.half().float()) and torch.allclose(rounded, table, atol=1e-3)


def test_float32_numerics_change_nothing(plain):
    bound = NUMERICS["float32"].bind(plain)
    assert not bound.copies_weights
    with bound:
        assert not weights_are_fp16_exact(plain) and not plain.visual.round_pos_embed_fp16


def test_tf32_turned_off_and_restored():
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
        with tf32_disabled():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        model = load_clip(TINY_CLIP_PATH)
        with NUMERICS["clip_es"].bind(model):
            assert not torch.backends.cudnn.allow_tf32
        with Numerics(allow_tf32=True).bind(model):
            assert torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_methods_apply_their_numerics_during_their_passes(plain, monkeypatch):
    """ClipES / WeCLIP run the CLIP inside their numerics (TF32 off, rounded weights) and leave it after."""
    from PIL import Image

    from tag2mask.methods.clip_es.pipeline import ClipES, preset_for
    from tag2mask.methods.weclip.model import WeCLIP, normalize_rgb, preset

    seen = []
    original = type(plain.visual).embed

    def spy(self, images, *args, **kwargs):
        w = self.conv1.weight  # fp16-rounded (CLIP-ES) or fp16 (WeCLIP's fp16 compute) inside the method
        seen.append((torch.equal(w, w.half().to(w.dtype)), self.round_pos_embed_fp16, torch.backends.cudnn.allow_tf32))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(type(plain.visual), "embed", spy)
    torch.backends.cudnn.allow_tf32 = True
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    ClipES(plain, config=preset_for("voc"), text_cache_dir=False)(image, [3])
    model = WeCLIP(plain, preset("voc"), text_cache_dir=False).eval()
    x = normalize_rgb(np.asarray(image))[None]
    model.online_pseudo_labels(x, [[3]], use_rfm=False)
    assert seen and all(s == (True, True, False) for s in seen)
    assert torch.backends.cudnn.allow_tf32 and not weights_are_fp16_exact(plain)


def test_weclip_fp16_compute_inside_and_restored_after(plain):
    """WeCLIP's numerics run the CLIP in fp16 (Conv/Linear, residual stream) with float32 in_proj and restore it."""
    from tag2mask.clip.layers import Attention
    from tag2mask.clip.numerics import fp16_compute_tensors

    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    bound = NUMERICS["weclip"].bind(plain)
    attns = [m for m in plain.modules() if isinstance(m, Attention)]
    with bound:
        assert plain.fingerprint.endswith(":fp16c")
        assert all(p.dtype == torch.float16 for p in fp16_compute_tensors(plain))
        assert all(m.fp16_mixed and m.in_proj_weight.dtype == torch.float32 for m in attns)
        x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
        inter = plain.visual.forward_intermediates(x, 2, return_attention=True)
        assert all(t.dtype == torch.float16 for t in inter.tokens)  # the residual stream is fp16
        assert all(a.dtype == torch.float32 for a in inter.attentions)  # softmax maps are float32
        assert torch.equal(plain.visual.blocks[0].attn.in_proj_weight, before["visual.transformer.resblocks.0.attn.in_proj_weight"])
        # on a CPU the image tower emulates its fp16 products, the text tower runs the half kernels
        assert "forward" in plain.visual.conv1.__dict__ and "forward" in plain.visual.blocks[0].mlp.c_fc.__dict__
        assert "forward" not in plain.transformer.resblocks[0].mlp.c_fc.__dict__
        assert plain.visual.blocks[0].attn.fp16_emulated and not plain.transformer.resblocks[0].attn.fp16_emulated
    assert not any(m.fp16_mixed for m in attns) and not plain.fingerprint.endswith(":fp16c")
    assert not any("forward" in m.__dict__ for m in plain.modules())
    for n, p in plain.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n


def test_fp16_compute_excludes_weight_rounding():
    with pytest.raises(ValueError, match="in_proj"):
        Numerics(round_weights_fp16=True, fp16_compute=True)


def test_emulated_fp16_linear_is_one_rounding_of_the_fp16_product():
    """fp16 operands, float32 arithmetic, one rounding: within one fp16 ulp of torch's half kernel and
    exactly the float64 product rounded to fp16 wherever that is not a near tie."""
    from tag2mask.clip.layers import fp16_linear

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(37, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    emulated, native = fp16_linear(x, w, b, emulated=True), fp16_linear(x, w, b, emulated=False)
    assert emulated.dtype == native.dtype == torch.float16
    exact = torch.nn.functional.linear(x.half().double(), w.half().double(), b.half().double())
    ulp = torch.finfo(torch.float16).eps * exact.abs().clamp_min(2 ** -14)
    assert ((emulated.double() - exact).abs() <= ulp).all()
    assert ((emulated.double() - native.double()).abs() <= ulp).all()
    assert (emulated.double() == exact.half().double()).float().mean() > 0.99
