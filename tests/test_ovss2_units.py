"""SC-CLIP's and PEARL's building blocks against plain reference formulas, presets and option checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tag2mask.clip.loading import load_clip
from tag2mask.methods.ovss2 import NewerOvssSegmenter, get_preset
from tag2mask.methods.ovss2.pearl import _laplacian, polar_factor
from tag2mask.methods.ovss2.scclip import _outlier_map, lof_scores, outlier_mask, smooth_outliers


def _reference_scores(x: np.ndarray, k: int, textbook: bool) -> np.ndarray:
    """LOF by loops in float64: SC-CLIP's form (reach = own k-distance) or the textbook one."""
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, 1:k + 1]
    kd = np.array([d[i, order[i, -1]] for i in range(len(x))])
    if textbook:  # reach-dist_k(i, j) = max(kd_j, d_ij); lrd = 1 / mean reach
        lrd = np.array([1 / np.mean([max(kd[j], d[i, j]) for j in order[i]]) for i in range(len(x))])
    else:
        lrd = np.array([1 / np.mean([max(kd[i], d[i, j]) for j in order[i]]) for i in range(len(x))])
    return np.array([np.mean([lrd[j] / lrd[i] for j in order[i]]) for i in range(len(x))])


def test_lof_is_the_official_variant_not_the_textbook_one():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 6, generator=gen, dtype=torch.float64)
    x[:, 3] += 4.0  # a clear anomaly
    ours = lof_scores(x, k=30).numpy()
    for b in range(2):
        np.testing.assert_allclose(ours[b], _reference_scores(x[b].numpy(), 30, textbook=False), rtol=1e-10)
        assert not np.allclose(ours[b], _reference_scores(x[b].numpy(), 30, textbook=True), rtol=1e-3)
    flags = outlier_mask(torch.from_numpy(ours))
    assert flags[:, 3].all() and flags.sum(dim=1).tolist() == [2, 2]  # strictly above the 95 % quantile of 40


def test_lof_needs_k_plus_one_tokens():
    with pytest.raises(ValueError, match="at least 31 tokens"):
        lof_scores(torch.randn(1, 30, 4))


def test_smoothing_matches_a_loop_reference():
    gen = torch.Generator().manual_seed(1)
    fmap = torch.randn(1, 3, 5, 7, generator=gen, dtype=torch.float64)
    cells = torch.zeros(1, 5, 7, dtype=torch.bool)
    cells[0, 0, 0] = cells[0, 0, 1] = cells[0, 1, 0] = cells[0, 1, 1] = cells[0, 3, 6] = True
    ref = fmap.clone()
    for r, c in zip(*np.nonzero(cells[0].numpy())):
        nb = [(r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)
              and 0 <= r + dr < 5 and 0 <= c + dc < 7 and not cells[0, r + dr, c + dc]]
        if nb:
            ref[0, :, r, c] = torch.stack([fmap[0, :, i, j] for i, j in nb]).mean(0)
    out = smooth_outliers(fmap, cells)
    torch.testing.assert_close(out, ref)
    assert torch.equal(out[0, :, 0, 0], fmap[0, :, 0, 0])  # every neighbour is an anomaly: kept
    assert not torch.equal(out[0, :, 3, 6], fmap[0, :, 3, 6])


def test_token_map_official_is_wrong_for_non_square_grids():
    square = torch.zeros(1, 36, dtype=torch.bool)
    square[0, 7] = True
    assert torch.equal(_outlier_map(square, (6, 6), "official"), _outlier_map(square, (6, 6), "correct"))
    flags = torch.zeros(1, 48, dtype=torch.bool)
    flags[0, 7] = True  # row 0, column 7 of a 6x8 grid
    assert _outlier_map(flags, (6, 8), "correct")[0, 0, 7]
    official = _outlier_map(flags, (6, 8), "official")
    assert official[0, 1, 1] and official.sum() == 1  # (7 // 6, 7 % 6): another token is smoothed
    flags[0, 47] = True
    with pytest.raises(ValueError, match="official token mapping"):
        _outlier_map(flags, (6, 8), "official")


def test_polar_factor_approaches_the_orthogonal_polar_factor():
    gen = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(1, 8, 8, generator=gen, dtype=torch.float64))
    m = q @ torch.diag_embed(torch.linspace(1.0, 1.5, 8, dtype=torch.float64))[None]
    r = polar_factor(m, iters=12)
    torch.testing.assert_close(r, q, atol=1e-5, rtol=0)
    five = polar_factor(m, iters=5)  # the published 5 iterations: close, not exact
    assert 0 < float((five - q).abs().max()) < 0.05


def test_laplacian_is_the_weighted_graph_laplacian():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64)
    w_h = torch.rand(1, 1, 3, 4, generator=gen, dtype=torch.float64)
    w_v = torch.rand(1, 1, 3, 4, generator=gen, dtype=torch.float64)
    ref = torch.zeros_like(x)
    for i in range(3):
        for j in range(4):
            for (a, b), w in ((((i, j - 1), (i, j)), w_h[0, 0, i, j]), (((i - 1, j), (i, j)), w_v[0, 0, i, j])):
                if min(a) < 0:
                    continue
                flow = w * (x[0, :, b[0], b[1]] - x[0, :, a[0], a[1]])
                ref[0, :, b[0], b[1]] += flow
                ref[0, :, a[0], a[1]] -= flow
    torch.testing.assert_close(_laplacian(x, w_h, w_v), ref)


def test_published_dataset_presets():
    voc = get_preset("scclip", "published:voc21")
    assert (voc.short_side, voc.crop, voc.stride, voc.logit_scale, voc.prob_threshold, voc.area_threshold) == \
        (336, 224, 112, 50.0, 0.15, 0.1)
    assert get_preset("scclip", "published:coco_object").logit_scale == 55.0
    pv = get_preset("pearl", "published:voc21")
    assert (pv.mode, pv.prob_threshold, pv.alpha_kk, pv.tlp, pv.tlp_grid, pv.renormalise_probs) == \
        ("whole", 0.1, 0.08, True, 80, True)
    city = get_preset("pearl", "published:city_scapes")
    assert (city.short_side, city.alpha_kk, city.tlp_grid) == (560, 0.3, 224)
    assert get_preset("pearl", "published:ade20k").alpha_kk == 0.3
    assert get_preset("pearl", "default").round_fp16_weights is False
    with pytest.raises(ValueError, match="unknown dataset"):
        get_preset("pearl", "published:kitti")


def test_scclip_needs_eleven_blocks():
    from tag2mask.clip.shipped import tiny_clip_path as shipped

    with pytest.raises(ValueError, match="at least 11 blocks, this one has 6"):
        NewerOvssSegmenter(load_clip(shipped()), "cat, dog", "scclip", text_cache=False)


def test_options_of_another_method_are_errors(tiny_clip_path):
    model = load_clip(tiny_clip_path)
    with pytest.raises(ValueError, match="do not apply"):
        NewerOvssSegmenter(model, "cat, dog", "scclip", alpha_kk=0.3, text_cache=False)
    with pytest.raises(TypeError, match="pamr"):
        NewerOvssSegmenter(model, "cat, dog", "pearl", pamr=True, text_cache=False)
    with pytest.raises(ValueError, match="unknown method"):
        NewerOvssSegmenter(model, "cat, dog", "sclip", text_cache=False)


def test_non_square_whole_image_default_runs_and_official_mapping_is_a_switch(tiny_clip_path):
    model = load_clip(tiny_clip_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    kwargs = dict(mode="whole", short_side=96, text_cache=False, device="cpu")
    res = NewerOvssSegmenter(model, "cat, dog", "scclip", **kwargs).predict(image, keep_arrays=True)
    assert res.label.shape == (48, 64) and res.arrays["win_outliers"].shape == (1, 6, 8)
    assert res.arrays["win_outliers"].sum() == 3  # tokens above the 95 % quantile of 48
    try:
        official = NewerOvssSegmenter(model, "cat, dog", "scclip", scclip_token_map="official", **kwargs)
        other = official.predict(image, keep_arrays=True).arrays["win_outliers"]
    except ValueError as e:  # the released code raises IndexError for this window
        assert "official token mapping" in str(e)
    else:
        assert not np.array_equal(other, res.arrays["win_outliers"])


def test_cli_rejects_options_of_other_methods(tmp_path, tiny_clip_path, capsys):
    from tag2mask.cli.main import main

    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    base = ["segment", str(tmp_path / "a.png"), "--classes", "cat, dog", "--weights", str(tiny_clip_path),
            "--out", str(tmp_path / "out")]
    assert main(base + ["--method", "scclip", "--alpha-kk", "0.3"]) == 2
    assert "--alpha-kk" in capsys.readouterr().err
    assert main(base + ["--method", "pearl", "--pamr"]) == 2
    assert "--pamr" in capsys.readouterr().err
    assert main(base + ["--method", "naclip", "--token-map", "official"]) == 2
    assert "--token-map" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["scclip", "pearl"])
def test_cli_published_dataset_preset(method, tmp_path, tiny_clip_path):
    """``--preset published:voc21`` runs and records the benchmark's official settings."""
    from tag2mask.cli.main import main

    Image.fromarray(np.random.default_rng(2).integers(0, 255, (36, 50, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "cls.txt").write_text("sky, wall\ncat\ncar\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "a.png"), "--classes", str(tmp_path / "cls.txt"), "--first-line",
                 "background", "--method", method, "--preset", "published:voc21", "--weights", str(tiny_clip_path),
                 "--out", str(out), "--quiet"]) == 0
    resolved = json.loads((out / "run.json").read_text())["settings"]["resolved"]
    expected = get_preset(method, "published:voc21").to_dict()
    assert resolved == expected and resolved["name"] == "published:voc21"
    assert (resolved["logit_scale"], resolved["prob_threshold"]) == ((50.0, 0.15) if method == "scclip" else (40.0, 0.1))
