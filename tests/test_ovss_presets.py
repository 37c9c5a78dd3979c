"""The OVSS presets: what ``default`` / ``published`` pin, how overrides combine, what the CLI says about them."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tag2mask.cli import segment_cmd
from tag2mask.clip.loading import load_clip
from tag2mask.methods.ovss.last_block import LAST_BLOCKS
from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter
from tag2mask.methods.ovss.presets import DATASET_SETTINGS, DATASETS, OvssPreset, get_preset
from tag2mask.methods.ovss.windows import centre_padding, window_boxes

METHODS = ("maskclip", "sclip", "clearclip", "naclip")


@pytest.fixture(scope="module")
def tiny(tiny_clip_path):
    return load_clip(tiny_clip_path)


def test_published_pins_the_official_harnesses():
    sclip, naclip, clear, mask = (get_preset(m, "published") for m in ("sclip", "naclip", "clearclip", "maskclip"))
    for p in (sclip, naclip, clear):
        assert p.numerics == "harness" and p.round_fp16_weights and p.mode == "slide" and p.pamr_guide == "input"
        assert p.templates == "imagenet80" and p.prob_threshold == 0 and p.area_threshold is None
    assert (sclip.short_side, sclip.crop, sclip.stride, sclip.logit_scale, sclip.pamr) == (336, 224, 112, 40, False)
    assert (naclip.short_side, naclip.crop, naclip.stride, naclip.logit_scale) == (336, 224, 112, 40)
    assert naclip.pamr and naclip.renormalise_probs and naclip.whole_upsample == "input"
    assert (clear.short_side, clear.crop, clear.stride, clear.logit_scale) == (448, 448, 224, 50)
    assert clear.window_padding == "centre" and clear.last_block == "clearclip"  # the paper's q-q attention
    assert sclip.whole_upsample == clear.whole_upsample == "direct"
    assert (mask.numerics, mask.templates, mask.short_side, mask.mode) == ("maskclip", "maskclip85", 512, "whole")
    assert mask.effective_logit_scale == 1.0 and not mask.round_fp16_weights


def test_default_keeps_the_documented_choices():
    for m in METHODS:
        d, p = get_preset(m, "default"), get_preset(m, "published")
        assert (d.short_side, d.mode, d.crop, d.stride) == (448, "slide", 224, 112)
        assert not d.round_fp16_weights and not d.pamr and d.pamr_guide == "image"
        assert d.numerics == "harness" and d.last_block == m
        same = ("templates", "window_padding", "whole_upsample", "renormalise_probs", "prob_threshold", "area_threshold")
        assert all(getattr(d, f) == getattr(p, f) for f in same)
        if m != "maskclip":
            assert d.logit_scale == p.logit_scale


def test_dataset_presets_and_errors():
    voc = get_preset("sclip", "published:voc21")
    assert (voc.logit_scale, voc.prob_threshold, voc.area_threshold, voc.short_side) == (65, 0.1, 0.1, 336)
    assert get_preset("naclip", "published:voc21").mode == "whole"
    assert get_preset("clearclip", "published:city_scapes").crop == 224
    assert get_preset("sclip", "published:ade20k") == get_preset("sclip", "published").replace(name="published:ade20k")
    assert set(DATASET_SETTINGS) <= set(METHODS) and all(set(v) <= set(DATASETS) for v in DATASET_SETTINGS.values())
    for bad, match in (("fast", "unknown preset"), ("default:voc21", "unknown preset"), ("published:kitti", "dataset")):
        with pytest.raises(ValueError, match=match):
            get_preset("sclip", bad)
    with pytest.raises(ValueError, match="unknown method"):
        get_preset("segformer")
    with pytest.raises(ValueError, match="window_padding"):
        OvssPreset(name="x", method="sclip", last_block="sclip", window_padding="reflect")
    with pytest.raises(TypeError, match="unknown preset fields"):
        get_preset("sclip").replace(colour="red")


def test_segmenter_applies_preset_and_overrides(tiny):
    seg = OpenVocabSegmenter(tiny, "cat, dog", "clearclip", preset="published", crop=96, text_cache=False)
    assert seg.settings.crop == 96 and seg.settings.stride == 224 and seg.settings.name == "published+custom"
    assert seg.logit_scale == 50 and seg.mode == "slide" and seg.settings.window_padding == "centre"
    same = OpenVocabSegmenter(tiny, "cat, dog", "clearclip", preset="published", crop=448, text_cache=False)
    assert same.settings.name == "published"  # an override equal to the preset is no change
    legacy = OpenVocabSegmenter(tiny, "cat", "sclip", compat=False, short_side=None, text_cache=False)
    assert legacy.settings.numerics == "model" and legacy.short_side is None
    with pytest.raises(KeyError, match="unknown method"):
        OpenVocabSegmenter(tiny, "cat", "sclip", last_block="segformer", text_cache=False)


def test_published_uses_an_already_rounded_model_as_is(tiny_clip_path):
    rounded = load_clip(tiny_clip_path, round_fp16_weights=True)
    assert OpenVocabSegmenter(rounded, "cat", "sclip", preset="published", text_cache=False).model is rounded
    plain = load_clip(tiny_clip_path)
    seg = OpenVocabSegmenter(plain, "cat", "sclip", preset="published", text_cache=False)
    assert seg.model is not plain and seg.model.fingerprint.endswith(":fp16r")
    assert not torch.equal(seg.model.visual.conv1.weight, plain.visual.conv1.weight)


def test_harness_positional_interpolation(tiny):
    vis = tiny.visual
    g = vis.pretrain_grid
    table = vis.interpolate_pos_embed(4, 6, mode="bicubic", scale_offset=0.1)
    grid = vis.positional_embedding[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(4.1 / g, 6.1 / g), mode="bicubic", align_corners=False,
                        recompute_scale_factor=False).permute(0, 2, 3, 1).reshape(24, -1)
    torch.testing.assert_close(table[1:], ref, rtol=0, atol=0)
    assert torch.equal(table[0], vis.positional_embedding[0])
    assert not torch.allclose(table, vis.interpolate_pos_embed(4, 6, mode="bicubic"))  # the offset matters
    assert vis.pos_interpolation == "bilinear"  # per call, the shared model is unchanged


def test_window_geometry():
    # every pixel covered, windows of crop size where the image allows, last ones flush with the border
    for h, w, crop, stride in ((96, 128, 64, 40), (131, 96, 64, 40), (50, 30, 64, 40), (448, 600, 224, 112)):
        boxes = window_boxes(h, w, crop, stride)
        cover = np.zeros((h, w), int)
        for y1, x1, y2, x2 in boxes:
            assert (y2 - y1, x2 - x1) == (min(crop, h), min(crop, w))
            cover[y1:y2, x1:x2] += 1
        assert cover.min() >= 1 and max(b[2] for b in boxes) == h and max(b[3] for b in boxes) == w
    assert centre_padding(88, 88, 16) == (4, 4, 4, 4)
    assert centre_padding(117, 90, 16) == (3, 3, 5, 6)  # floor left/top, ceil right/bottom
    assert centre_padding(64, 48, 16) == (0, 0, 0, 0)


def test_clearclip_window_padding_changes_the_logits(tiny):
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    kw = dict(preset="published", short_side=88, crop=96, stride=48, text_cache=False)
    padded = OpenVocabSegmenter(tiny, "cat, dog", "clearclip", **kw).predict(img, keep_arrays=True).arrays
    plain_preset = get_preset("clearclip", "published").replace(window_padding="none", short_side=88, crop=96, stride=48)
    plain = OpenVocabSegmenter(tiny, "cat, dog", "clearclip", preset=plain_preset, text_cache=False)
    floored = plain.predict(img, keep_arrays=True).arrays
    assert padded["win_feats"].shape[-2:] == (6, 6) and floored["win_feats"].shape[-2:] == (5, 6)  # 88 x 96 windows
    assert not np.allclose(padded["logits"], floored["logits"], atol=1e-4)


def test_cli_help_table_matches_the_presets():
    table = segment_cmd.PRESET_TABLE
    rows = {m: re.search(rf"^\s+{m}\s+published\s+(\d+)\s+(slide (\d+)/(\d+)|whole)\s+(\d+)", table, re.M) for m in METHODS}
    for m, row in rows.items():
        p = get_preset(m, "published")
        assert row, m
        assert int(row.group(1)) == p.short_side and (row.group(2) == "whole") == (p.mode == "whole")
        if p.mode == "slide":
            assert (int(row.group(3)), int(row.group(4))) == (p.crop, p.stride)
        assert float(row.group(5)) == p.effective_logit_scale
        line = row.group(0) + table[row.end():].split("\n")[0]
        assert (" on " in line) == p.pamr and ("fp16-rounded" in line) == p.round_fp16_weights
    d = get_preset("sclip", "default")
    assert re.search(rf"default\s+{d.short_side}\s+slide {d.crop}/{d.stride}\s+{d.logit_scale:g} \(clearclip "
                     rf"{get_preset('clearclip').logit_scale:g}\)", table)
    assert segment_cmd.DATASET_CHOICES == DATASETS
    assert set(segment_cmd.LAST_BLOCK_CHOICES) == set(LAST_BLOCKS)
