"""Stage-isolated fidelity tests against the official CLIP-ES fixtures (README section 6.1).

Every test loops over ``tests/data/clip_es/index.json``; nothing is hard-coded
about the images, so another fixture set of the same format can be dropped in.
Each stage is fed the *stored* inputs of that stage, so a failure pinpoints it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

from tag2mask.localization.affinity import mean_attention, refine_cams, sinkhorn_normalize, transition_matrix
from tag2mask.localization.boxes import cam_box_mask, cam_box_masks
from tag2mask.localization.scaling import minmax_scale, resize_bilinear, resize_bilinear_like_cv2, scale_and_resize
from tag2mask.refinement.confidence import labels_from_scores, pad_keys

DATA = Path(__file__).parent / "data" / "clip_es"
INDEX: Dict[str, Any] = json.loads((DATA / "index.json").read_text())
IMAGES: List[Dict[str, Any]] = INDEX["images"]
SETTINGS: Dict[str, Any] = INDEX["settings"]
IDS = [im["name"] for im in IMAGES]


def _arrays(im: Dict[str, Any]) -> Dict[str, np.ndarray]:
    with np.load(DATA / im["arrays"]) as z:
        return {k: z[k] for k in z.files}


def _rgb(im: Dict[str, Any]) -> np.ndarray:
    with Image.open(DATA / im["image"]) as f:
        return np.asarray(f.convert("RGB"))


@pytest.fixture(params=IMAGES, ids=IDS)
def case(request):
    im = request.param
    return im, _arrays(im)


# ---------------------------------------------------------------- stage 1: CAA


def test_trans_mat(case):
    im, z = case
    T = transition_matrix(torch.from_numpy(z["attn_mean8"]), rounds=SETTINGS["sinkhorn_rounds"]).numpy()
    ref = z["trans_mat"]
    assert T.shape == ref.shape == (np.prod(im["grid_hw"]),) * 2
    assert np.abs(T - ref).max() <= 1e-5 * np.abs(ref).max()


def test_sinkhorn_rows_sum_to_one(case):
    _, z = case
    S = sinkhorn_normalize(z["attn_mean8"], rounds=3)
    assert torch.allclose(S.sum(1), torch.ones(S.shape[0]), atol=1e-5)
    # 3 rounds only approach double stochasticity: columns are close, not exact
    assert torch.allclose(S.sum(0), torch.ones(S.shape[0]), atol=0.1)


def test_mean_attention_layout():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(12, 5, 5, generator=g)
    W = mean_attention(list(maps), last=8)
    assert W.shape == (4, 4)
    assert torch.allclose(W, maps[4:, 1:, 1:].mean(0))
    assert torch.allclose(mean_attention(maps[:, None], last=8), W)  # (n_layers, 1, L, L) accepted
    assert mean_attention(maps, last=2, drop_cls=False).shape == (5, 5)
    # like the official [-8:] slice, a model with fewer blocks averages all of its maps
    assert torch.allclose(mean_attention(maps, last=13), maps[:, 1:, 1:].mean(0))
    with pytest.raises(ValueError):
        mean_attention(maps, last=0)


def test_transition_power_is_one_matmul():
    W = torch.rand(6, 6, generator=torch.Generator().manual_seed(1)) + 0.1
    T1 = transition_matrix(W, power=1)
    assert torch.allclose(T1, T1.t())
    assert torch.equal(transition_matrix(W, power=2), T1 @ T1)


def test_box_mask_and_boxes(case):
    im, z = case
    thr = SETTINGS["box_threshold"]
    K = len(im["labels"])
    for k in range(K):
        mask, boxes = cam_box_mask(z["cam_lowres"][k], thr)
        assert mask.dtype == np.float32
        assert np.array_equal(mask, z["box_mask"][k]), f"label {k}"
        # same multiset of boxes (the official order follows OpenCV's contour tree)
        ref = sorted(tuple(b) for b in im["boxes_x0y0x1y1"][k])
        assert sorted(boxes) == ref, f"label {k}"
    batched = cam_box_masks(z["cam_lowres"], thr)
    assert np.array_equal(batched, z["box_mask"])
    batched_t = cam_box_masks(torch.from_numpy(z["cam_lowres"]), thr)
    assert isinstance(batched_t, torch.Tensor) and np.array_equal(batched_t.numpy(), z["box_mask"])


def test_box_edge_quirk_and_empty():
    cam = np.zeros((4, 5), np.float32)
    mask, boxes = cam_box_mask(cam, 0.4)
    assert boxes == [(0, 0, 0, 0)] and not mask.any()
    cam[1:, 3:] = 0.9  # blob touching the right and bottom borders
    mask, boxes = cam_box_mask(cam, 0.4)
    assert boxes == [(3, 1, 4, 3)] and mask.sum() == 2  # lost last row and column
    mask, boxes = cam_box_mask(cam, 0.4, edge_quirk=False)
    assert boxes == [(3, 1, 5, 4)] and mask.sum() == 6
    one = np.zeros((4, 5), np.float32)
    one[1:3, 4] = 0.9  # one-pixel-wide blob on the right edge -> empty box
    mask, boxes = cam_box_mask(one, 0.4)
    assert boxes == [(4, 1, 4, 3)] and not mask.any()


def test_refined_lowres(case):
    _, z = case
    r = refine_cams(z["trans_mat"], z["cam_lowres"], z["box_mask"])
    ref = z["refined_lowres"]
    assert r.shape == ref.shape and r.dtype == np.float32
    assert np.abs(r - ref).max() <= 1e-5 * max(np.abs(ref).max(), np.finfo(np.float32).tiny)
    rt = refine_cams(torch.from_numpy(z["trans_mat"]), torch.from_numpy(z["cam_lowres"]),
                     torch.from_numpy(z["box_mask"]).bool())
    assert isinstance(rt, torch.Tensor) and np.abs(rt.numpy() - ref).max() <= 1e-5 * np.abs(ref).max()


def test_refine_mask_acts_on_columns():
    T = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    cam = torch.ones(1, 2, 2)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    r = refine_cams(T, cam, mask)
    assert torch.equal(r.reshape(-1), T[:, 0])  # every pixel receives from source patch 0


def test_attn_highres_exact(case):
    im, z = case
    H, W = im["height"], im["width"]
    high = scale_and_resize(z["refined_lowres"], (H, W))
    ref = z["attn_highres"]
    assert high.dtype == np.float16 and high.shape == ref.shape == (len(im["labels"]), H, W)
    assert np.array_equal(high, ref)


def test_attn_highres_torch_within_one_fp16_ulp(case):
    im, z = case
    H, W = im["height"], im["width"]
    high = scale_and_resize(z["refined_lowres"], (H, W), exact_cv2=False).astype(np.float32)
    assert np.abs(high - z["attn_highres"].astype(np.float32)).max() <= 4.9e-4


def test_minmax_scale_absolute_eps():
    x = np.array([[[0.0, 1e-8], [2e-8, 4e-8]]], np.float32)
    y = minmax_scale(x)
    assert y.max() < 0.5  # eps = 1e-7 dominates a tiny range
    assert np.array_equal(minmax_scale(np.zeros((2, 3, 3), np.float32)), np.zeros((2, 3, 3), np.float32))
    t = minmax_scale(torch.from_numpy(x))
    assert np.allclose(t.numpy(), y)
    xr = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    assert np.allclose(resize_bilinear(torch.from_numpy(xr), (9, 11)).numpy(),
                       resize_bilinear_like_cv2(xr, (9, 11)), atol=1e-6)


# ---------------------------------------------------------------- stage 2: CRF


def test_crf_image_exact(case):
    from tag2mask.refinement.crf import clip_es_crf_image

    im, z = case
    assert np.array_equal(clip_es_crf_image(_rgb(im)), z["crf_image"])


def test_crf_image_wraps():
    from tag2mask.refinement.crf import clip_es_crf_image

    px = np.array([[[120, 116, 99]]], np.uint8)  # R, G, B -> BGR (99, 116, 120)
    out = clip_es_crf_image(px)[0, 0]
    # 99-104.008=-5.008 -> -5 -> 251; 116-116.669 -> -0.669 -> 0; 120-122.675 -> -2 -> 254
    assert out.tolist() == [251, 0, 254]


def test_crf_labels_exact(case):
    pytest.importorskip("pydensecrf")
    from tag2mask.refinement.crf import clip_es_pseudo_label

    im, z = case
    conf = SETTINGS["crf"]["confidence"]
    label, label_noignore, q = clip_es_pseudo_label(z["attn_highres"], z["keys"], _rgb(im), confidence=conf)
    assert label.dtype == np.uint8 and label.shape == (im["height"], im["width"])
    assert np.array_equal(label, z["crf_label"])
    assert np.array_equal(label_noignore, z["crf_label_noignore"])
    assert int((label == 255).sum()) == im["crf_ignored_pixels"]
    assert np.abs(q - z["crf_prob"]).max() <= 1e-6


def test_crf_presets():
    from tag2mask.refinement.crf import CLIP_ES_CRF, WECLIP_CRF

    crf = SETTINGS["crf"]
    assert (CLIP_ES_CRF.iterations, CLIP_ES_CRF.gaussian_sxy, CLIP_ES_CRF.gaussian_compat,
            CLIP_ES_CRF.bilateral_sxy, CLIP_ES_CRF.bilateral_srgb, CLIP_ES_CRF.bilateral_compat) == (
        crf["iter_max"], crf["pos_xy_std"], crf["pos_w"], crf["bi_xy_std"], crf["bi_rgb_std"], crf["bi_w"])
    assert (WECLIP_CRF.gaussian_sxy, WECLIP_CRF.bilateral_sxy, WECLIP_CRF.bilateral_srgb) == (3, 64, 5)


def test_missing_pydensecrf_message(monkeypatch):
    import builtins

    from tag2mask.refinement import crf as crf_mod

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("pydensecrf"):
            raise ImportError("no pydensecrf")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"tag2mask\[crf\]"):
        crf_mod.dense_crf(np.ones((2, 3, 3), np.float32) / 2, np.zeros((3, 3, 3), np.uint8))


def test_labels_from_scores_ties_and_mask():
    s = np.array([[[0.5, 0.2]], [[0.5, 0.7]], [[0.0, 0.1]]], np.float16)  # (3, 1, 2)
    lut = pad_keys([4, 9])
    assert lut.tolist() == [0, 5, 10]
    assert labels_from_scores(s, lut, None).tolist() == [[0, 5]]  # tie -> first channel
    assert labels_from_scores(s, lut, 0.6).tolist() == [[255, 5]]
    assert labels_from_scores(torch.from_numpy(s.astype(np.float32)), lut, 0.6).tolist() == [[255, 5]]
