"""The CLIP core reproduces the official CLIP-ES encoder numerics (tests/data/clip_es, README sections 2-3, 6.1).

Every test runs for every image of ``index.json`` (see ``clip_es_case`` in conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tag2mask.clip.loading import load_clip
from tag2mask.clip.text_embed import embed_names

ENCODER_TOL = 2e-4  # block11_out, ln1_act (README 6.1)
TEXT_TOL = 1e-5  # fg_text, bg_text


def _encoder_outputs(model, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(block11_out (L, C), ln1_act (C, h, w)) for one stored ``input`` (1, 3, H16, W16)."""
    visual = model.visual
    x = torch.from_numpy(image)
    with torch.no_grad():
        inter = visual.forward_intermediates(x, num_blocks=visual.num_blocks - 1, keep_tokens=False)
        block11 = inter.last[0]
        h, w = inter.grid
        ln1 = visual.blocks[-1].ln_1(block11)[1:]
    return block11, ln1.reshape(h, w, -1).permute(2, 0, 1)


def _max_abs(a: torch.Tensor, b: np.ndarray) -> float:
    assert tuple(a.shape) == b.shape, (tuple(a.shape), b.shape)
    return float((a.double() - torch.from_numpy(b).double()).abs().max())


def test_model_matches_readme(clip_es_model, clip_es_index):
    vis = clip_es_model.visual
    assert clip_es_model.is_vit
    assert vis.patch_size == 16 and vis.num_blocks == 12
    assert vis.positional_embedding.shape[0] == vis.pretrain_grid**2 + 1
    assert clip_es_model.fingerprint.startswith(clip_es_index["model"]["sha256"][:16])


def test_pos_emb_exact(clip_es_model, clip_es_case):
    z = clip_es_case.arrays
    h, w = clip_es_case.entry["grid_hw"]
    table = clip_es_model.visual.interpolate_pos_embed(h, w)
    assert table.dtype == torch.float32  # used in fp32 ...
    ref = z["pos_emb_new"]
    assert ref.dtype == np.float16
    ours = table.detach().half().numpy()
    assert ours.shape == ref.shape
    # ... but every value is an fp16 value, bit-identical to the official table
    assert torch.equal(table.detach(), torch.from_numpy(ours).float())
    np.testing.assert_array_equal(ours.view(np.uint16), ref.view(np.uint16))


def test_encoder_block11_and_ln1(clip_es_model, clip_es_case):
    z = clip_es_case.arrays
    H16, W16 = clip_es_case.entry["input_hw"]
    assert z["input"].shape == (1, 3, H16, W16)
    block11, ln1 = _encoder_outputs(clip_es_model, z["input"])
    assert _max_abs(block11, z["block11_out"]) <= ENCODER_TOL
    h, w = clip_es_case.entry["grid_hw"]
    assert ln1.shape == (clip_es_model.visual.width, h, w)
    assert _max_abs(ln1, z["ln1_act"]) <= ENCODER_TOL


def test_encoder_sensitive_to_fp16_weight_rounding(tiny_clip_path, clip_es_case):
    """Without the official fp16 round trip of the weights the encoder leaves the tolerance (README section 2)."""
    model = load_clip(tiny_clip_path, round_fp16_weights=False)
    model.visual.round_pos_embed_fp16 = True
    block11, _ = _encoder_outputs(model, clip_es_case.arrays["input"])
    assert _max_abs(block11, clip_es_case.arrays["block11_out"]) > ENCODER_TOL


@pytest.fixture(scope="module")
def clip_es_text(clip_es_model, clip_es_index) -> dict[str, torch.Tensor]:
    template = clip_es_index["settings"]["template"]
    return {
        "fg_text": embed_names(clip_es_model, clip_es_index["new_class_names"], [template], cache_dir=False),
        "bg_text": embed_names(clip_es_model, clip_es_index["background_category"], [template], cache_dir=False),
    }


@pytest.mark.parametrize("key", ["fg_text", "bg_text"])
def test_text_features(clip_es_text, clip_es_case, key):
    assert _max_abs(clip_es_text[key], clip_es_case.arrays[key]) <= TEXT_TOL
