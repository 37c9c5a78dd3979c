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
    bound = NUMERICS["weclip"].bind(rounded)
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
        seen.append((weights_are_fp16_exact(plain), self.round_pos_embed_fp16, torch.backends.cudnn.allow_tf32))
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


def test_weclip_on_a_plain_clip_equals_a_rounded_clip(plain):
    """WeCLIP applies compat numerics itself: a plain CLIP gives the same outputs as one rounded at load."""
    from tag2mask.methods.weclip.model import WeCLIP, preset

    rounded = load_clip(TINY_CLIP_PATH, round_fp16_weights=True)
    torch.manual_seed(0)
    a = WeCLIP(plain, preset("voc"), text_cache_dir=False).eval()
    torch.manual_seed(0)
    b = WeCLIP(rounded, preset("voc"), text_cache_dir=False).eval()
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        oa, ob = a(x), b(x)
    assert torch.equal(oa.seg_logits, ob.seg_logits) and torch.equal(a.fg_text, b.fg_text)
