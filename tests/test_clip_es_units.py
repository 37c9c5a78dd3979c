"""CLIP-ES building blocks on hand-made inputs, and API behaviour beyond the golden arrays.

The golden-fixture tests live in ``test_clip_es_golden.py``; the few tests here that read fixture data
loop over every golden set (``golden_sets.py``) and pick cases by their recorded diagnostics.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from golden_sets import CASES, SETS, TINY_CLIP_PATH, GoldenCase
from tag2mask.evaluation.cam_eval import cam_to_label, evaluate_cams, load_cam_npz
from tag2mask.localization.affinity import mean_attention, refine_cams, transition_matrix
from tag2mask.localization.boxes import cam_box_mask
from tag2mask.localization.labels import label_table, labels_from_scores, with_background
from tag2mask.localization.scaling import minmax_scale, resize_bilinear, resize_bilinear_like_cv2


@pytest.fixture(scope="module")
def tiny():
    from tag2mask.clip.loading import load_clip

    return load_clip(TINY_CLIP_PATH)


@pytest.fixture(scope="module")
def voc_maker(tiny):
    from tag2mask.methods.clip_es.pipeline import ClipES, preset_for

    return ClipES(tiny, config=preset_for("voc"), text_cache_dir=False)


# ---------------------------------------------------------------------------------------------- CAA parts


def test_mean_attention_layout():
    maps = torch.rand(12, 5, 5, generator=torch.Generator().manual_seed(0))
    W = mean_attention(list(maps), last=8)
    assert W.shape == (4, 4) and torch.allclose(W, maps[4:, 1:, 1:].mean(0))
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


def test_refine_mask_acts_on_columns():
    T = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    r = refine_cams(T, torch.ones(1, 2, 2), torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))
    assert torch.equal(r.reshape(-1), T[:, 0])  # every pixel receives from source patch 0


def test_minmax_scale_absolute_eps():
    x = np.array([[[0.0, 1e-8], [2e-8, 4e-8]]], np.float32)
    y = minmax_scale(x)
    assert y.max() < 0.5  # eps = 1e-7 dominates a tiny range
    assert np.array_equal(minmax_scale(np.zeros((2, 3, 3), np.float32)), np.zeros((2, 3, 3), np.float32))
    assert np.allclose(minmax_scale(torch.from_numpy(x)).numpy(), y)
    xr = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    assert np.allclose(resize_bilinear(torch.from_numpy(xr), (9, 11)).numpy(), resize_bilinear_like_cv2(xr, (9, 11)),
                       atol=1e-6)


# ---------------------------------------------------------------------------------------------- labels


def test_labels_helper_ties_confidence_and_torch():
    s = np.array([[[0.5, 0.2]], [[0.5, 0.7]], [[0.0, 0.1]]], np.float16)  # (3, 1, 2) = [bg; 2 classes]
    assert label_table([4, 9]).tolist() == [0, 5, 10]
    assert labels_from_scores(s, [4, 9]).tolist() == [[0, 5]]  # tie -> first channel (background)
    assert labels_from_scores(s, [4, 9], confidence=0.6).tolist() == [[255, 5]]
    t = labels_from_scores(torch.from_numpy(s.astype(np.float32)), [4, 9], confidence=0.6)
    assert t.dtype == torch.long and t.tolist() == [[255, 5]]
    with pytest.raises(ValueError, match="keys"):
        labels_from_scores(s, [4])
    cams = np.array([[[0.5, 0.25]], [[0.5, 0.75]]], dtype=np.float16)
    assert with_background(cams).dtype == np.float16
    assert torch.equal(with_background(torch.from_numpy(cams.astype(np.float32)))[0], torch.tensor([[0.5, 0.25]]))


def test_ties_first_wins_and_threshold_mode():
    cams = np.array([[[0.5, 0.25]], [[0.5, 0.75]]], dtype=np.float16)  # (2, 1, 2)
    keys = np.array([3, 7])
    # pixel 0: max 0.5, bg = 0.5 -> tie of all three -> background
    np.testing.assert_array_equal(cam_to_label(cams, keys, bg_power=1), [[0, 8]])
    np.testing.assert_array_equal(cam_to_label(cams, keys, threshold=0.4), [[4, 8]])
    res = evaluate_cams([(cams, keys, np.array([[4, 8]], dtype=np.uint8))], num_classes=21, thresholds=(0.3, 0.4, 0.45))
    assert res["best"] == "t=0.3" and res["best_threshold"] == 0.3  # equal settings: the first is kept
    assert cam_to_label(np.zeros((0, 2, 3), np.float16), np.zeros(0, int)).tolist() == [[0] * 3] * 2


def test_fp32_background_would_differ():
    """Guards the float16 background rule: the case whose diagnostics record the most flips must flip."""
    case = max(CASES, key=lambda c: c.entry["diagnostics"]["evalcam_pred_diff_if_bg_in_fp32_p2"])
    z = case.arrays
    wrong = cam_to_label(z["attn_highres"].astype(np.float32), z["keys"], bg_power=2)
    assert int((wrong != z["evalcam_pred_p2"]).sum()) > 0


def test_load_cam_npz_formats(tmp_path: Path):
    cams, keys = load_cam_npz(CASES[0].path("arrays"))
    assert cams.dtype == np.float16 and keys.shape == (cams.shape[0],)
    np.savez(tmp_path / "x.npz", keys=keys, cams=cams)
    np.testing.assert_array_equal(load_cam_npz(tmp_path / "x.npz")[0], cams)
    np.savez(tmp_path / "bad.npz", foo=keys)
    with pytest.raises(ValueError, match="bad.npz.*keys"):
        load_cam_npz(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        load_cam_npz(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="gone.npz"):
        load_cam_npz(tmp_path / "gone.npz")


# ---------------------------------------------------------------------------------------------- stage 2


def test_crf_image_wraps():
    from tag2mask.methods.clip_es.label_maps import clip_es_crf_image

    out = clip_es_crf_image(np.array([[[120, 116, 99]]], np.uint8))[0, 0]  # R, G, B -> BGR (99, 116, 120)
    # 99-104.008=-5.008 -> -5 -> 251; 116-116.669 -> -0.669 -> 0; 120-122.675 -> -2 -> 254
    assert out.tolist() == [251, 0, 254]


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


# ---------------------------------------------------------------------------------------------- the method


@pytest.mark.parametrize("vjp_mode", ["vmap", "loop"])
@pytest.mark.parametrize("golden", SETS, ids=[s.name for s in SETS])
def test_batched_gradcam_equals_per_class_loop(voc_maker, golden, vjp_mode):
    """All classes from one forward (vmapped or sequential VJPs) == one GradCAM call per class."""
    from tag2mask.localization.gradcam import softmax_gradcam

    z = GoldenCase(golden, golden.images[0]).arrays
    keys = [int(k) for k in z["keys"]]
    text = torch.cat([torch.from_numpy(z["fg_text"])[keys], torch.from_numpy(z["bg_text"])])
    x = torch.from_numpy(z["block11_out"])[None]
    grid = tuple(golden.images[0]["grid_hw"])
    visual, scale = voc_maker.model.visual, voc_maker.logit_scale
    with voc_maker.numerics:
        batched = softmax_gradcam(visual, x, grid, text, list(range(len(keys))), scale, vjp_mode)
        for k in range(len(keys)):
            single = softmax_gradcam(visual, x, grid, text, [k], scale)
            assert torch.allclose(batched.cams_raw[k], single.cams_raw[0], rtol=1e-5, atol=1e-9)


def test_text_rows_select_synonyms_in_label_order():
    from tag2mask.clip.text_embed import TextEmbeddings

    emb = TextEmbeddings(torch.arange(10.0).reshape(5, 2), torch.tensor([0, 0, 1, 2, 2]), 3)
    feats, targets = emb.select([2, 0], append=torch.full((2, 2), -1.0))
    assert targets == [[0, 1], [2, 3]]
    assert feats[:, 0].tolist() == [6.0, 8.0, 0.0, 2.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="outside"):
        emb.select([3])


def test_batch_equals_single_images(voc_maker):
    """Equal-size images share one encoder pass; results match one-by-one calls."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(3)]
    images.append(Image.fromarray(rng.integers(0, 255, (48, 33, 3), dtype=np.uint8)))  # another size
    labels = [[14, 11], [2], [7, 8, 9], [0]]
    for im, ids, res in zip(images, labels, voc_maker.batch(images, labels)):
        single = voc_maker(im, ids)
        assert np.array_equal(res.keys, single.keys) and res.cams.shape == (len(ids), im.size[1], im.size[0])
        assert np.abs(res.cams.astype(np.float32) - single.cams.astype(np.float32)).max() <= 2e-3


def test_flip_averages_the_mirrored_view(tiny, voc_maker):
    """flip=True == (CAMs of the image + mirrored-back CAMs of the mirrored image) / 2, computed separately.

    Fails if the flipped view is dropped, not mirrored back, or not averaged.
    """
    from tag2mask.methods.clip_es.pipeline import ClipES, preset_for

    case = CASES[0]
    with Image.open(case.path("image")) as f:
        image = f.convert("RGB")
    ids = case.entry["label_ids"]
    flipped = ClipES(tiny, config=preset_for("voc", flip=True), text_cache_dir=False)(image, ids).cams
    plain = voc_maker(image, ids).cams.astype(np.float32)
    mirror = voc_maker(image.transpose(Image.FLIP_LEFT_RIGHT), ids).cams.astype(np.float32)[:, :, ::-1]
    expected = ((plain + mirror) / 2).astype(np.float16)
    assert np.abs(flipped.astype(np.float32) - expected.astype(np.float32)).max() <= 1e-3  # fp16 rounding only
    assert np.abs(flipped.astype(np.float32) - plain).max() > 1e-2  # the mirrored view really changes the maps


def test_multiscale_and_bf16_run(tiny, voc_maker):
    """Test-time scales average views at the image size; bf16 autocast stays close to fp32."""
    from tag2mask.methods.clip_es.pipeline import ClipES, preset_for

    case = CASES[0]
    with Image.open(case.path("image")) as f:
        image = f.convert("RGB")
    ids = case.entry["label_ids"]
    base = voc_maker(image, ids)
    tta = ClipES(tiny, config=replace(preset_for("voc"), scales=(1.0, 0.75)), text_cache_dir=False)(image, ids)
    assert tta.cams.shape == base.cams.shape and tta.cams.dtype == np.float16
    assert not np.array_equal(tta.cams, base.cams)
    assert 0.0 <= float(tta.cams.min()) and float(tta.cams.max()) <= 1.0
    bf16 = ClipES(tiny, config=preset_for("voc", precision="bf16"), text_cache_dir=False)(image, ids)
    assert bf16.cams.shape == base.cams.shape
    assert np.abs(bf16.cams.astype(np.float32) - base.cams.astype(np.float32)).mean() < 0.1


def test_default_vocabulary_comes_from_the_preset(voc_maker):
    from tag2mask.methods.clip_es.pipeline import PRESETS, preset_for

    assert voc_maker.vocab.names[14] == "person" and len(voc_maker.vocab.background) == 25
    with pytest.raises(ValueError, match="unknown CLIP-ES preset"):
        preset_for("ade")
    with pytest.raises(ValueError, match="miou_rule"):
        replace(PRESETS["voc"], miou_rule="best")
