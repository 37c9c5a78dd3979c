"""WeCLIP end to end against ``tests/data/weclip/forward.npz`` (official ``WeCLIP.forward``, VOC).

Two comparisons, as the fixture README recommends:

* **end to end, pure float32** (``compat_numerics=False``): image → CLIP → decoder → GradCAM →
  CAA / RFM → boxes → refined CAMs → PAR → pseudo label, against the ``fp32ref_*`` arrays (the
  official code with its fp16 casts disabled), tight tolerances;
* **end to end, official numerics** (``compat_numerics=True``: the CLIP computes in fp16 where the
  official GPU run does): against the stored reference. Where the fp16 compute brings us closer than
  any float32 run can get (text features, GradCAM probabilities, CLIP block outputs),
  the test uses a bound between the two and asserts that plain float32 *fails* it, so the mode has
  teeth; elsewhere the README's loose rows (see ``_LOOSE_REASON``);
* **stage-wise** from the stored official intermediates through the model's own stage functions.

Everything is read from the arrays / ``index.json`` (number of images, label ids, shapes), so the
same tests run on another fixture set of the same format.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tag2mask.clip.loading import load_clip
from tag2mask.models.weclip_decoder import load_official_decoder_state
from tag2mask.localization.cam_pipeline import scale_to_size
from tag2mask.localization.labels import labels_from_scores, with_background
from tag2mask.methods.weclip.model import WeCLIP, normalize_rgb, preset

DATA = Path(__file__).parent / "data" / "weclip"
BRANCHES = ("caa", "rfm")


def _load(name: str) -> dict[str, np.ndarray]:
    with np.load(DATA / name) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    return _load("forward.npz")


@pytest.fixture(scope="module")
def conditions() -> dict:
    return json.loads((DATA / "index.json").read_text())["files"]["forward.npz"]["conditions"]


def _num_images(fx: dict) -> int:
    return fx["image"].shape[0]


def _label_ids(fx: dict) -> list[list[int]]:
    """Image-level labels exactly as the official forward reads them: unique PNG values − 1, no 255/254."""
    out = []
    for png in fx["gt_png"]:
        vals = (np.unique(png).astype(np.uint8) - np.uint8(1)).astype(np.int64)  # uint8 wrap as in the original
        out.append(sorted(int(v) for v in vals if v not in (254, 255)))
    return out


def _box_masks(boxes: np.ndarray, k: int, h: int, w: int) -> np.ndarray:
    """Masks from fixture boxes ``[k, x0, y0, x1, y1]`` (end-exclusive)."""
    m = np.zeros((k, h, w), np.float32)
    for c, x0, y0, x1, y1 in boxes:
        m[c, y0:y1, x0:x1] = 1
    return m


def _model(tiny_clip_path: Path, compat: bool) -> WeCLIP:
    # a plain float32 CLIP: WeCLIP applies its numerics itself (fp16 compute with compat)
    clip = load_clip(tiny_clip_path)
    model = WeCLIP(clip, preset("voc", compat_numerics=compat), text_cache_dir=False)
    model.decoder.load_state_dict(load_official_decoder_state(_load("decoder_state.npz")))
    return model.eval()  # the fixture was made in eval mode (Dropout2d off)


def _run(model: WeCLIP, fx: dict) -> dict:
    """Decoder outputs and per-branch pseudo labels + intermediates."""
    torch.manual_seed(0)
    images = torch.from_numpy(fx["image"])
    out = model(images)
    res = {"seg_logits": out.seg_logits.detach().numpy(), "attn_pred": out.affinity.detach().numpy()}
    for branch in BRANCHES:
        details: list[dict] = []
        label = model.online_pseudo_labels(images, _label_ids(fx), use_rfm=branch == "rfm", output=out, details=details)
        res[f"{branch}_pseudo_label"] = label.numpy()
        res[f"{branch}_details"] = details
    return res


@pytest.fixture(scope="module")
def fp32_run(fx, tiny_clip_path) -> dict:
    return _run(_model(tiny_clip_path, compat=False), fx)


@pytest.fixture(scope="module")
def compat_run(fx, tiny_clip_path) -> dict:
    return _run(_model(tiny_clip_path, compat=True), fx)


# ----------------------------------------------------------------------------------------------
# pure float32, against fp32ref_*


def test_label_ids_match_index(fx: dict, conditions: dict) -> None:
    assert _label_ids(fx) == [sorted(ids) for ids in conditions["label_ids"]]
    for i in range(_num_images(fx)):
        np.testing.assert_array_equal(fx[f"img{i}_keys"], _label_ids(fx)[i])


def test_fp32_decoder(fx: dict, fp32_run: dict) -> None:
    np.testing.assert_allclose(fp32_run["seg_logits"], fx["fp32ref_seg_logits"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(fp32_run["attn_pred"], fx["fp32ref_attn_pred"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("branch", BRANCHES)
def test_fp32_gradcam_and_probs(fx: dict, fp32_run: dict, branch: str) -> None:
    for i, d in enumerate(fp32_run[f"{branch}_details"]):
        np.testing.assert_allclose(d["probs"].numpy(), fx[f"fp32ref_img{i}_probs"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(d["gradcam"].numpy(), fx[f"fp32ref_img{i}_gradcam"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("branch", BRANCHES)
def test_fp32_boxes_and_refined(fx: dict, fp32_run: dict, branch: str) -> None:
    for i, d in enumerate(fp32_run[f"{branch}_details"]):
        ref = fx[f"fp32ref_{branch}_img{i}_refined_lowres"]
        k, h, w = ref.shape
        np.testing.assert_array_equal(d["box_masks"].numpy(), _box_masks(fx[f"fp32ref_{branch}_img{i}_boxes"], k, h, w))
        np.testing.assert_allclose(d["refined_lowres"].numpy(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("branch", BRANCHES)
def test_fp32_pseudo_label(fx: dict, fp32_run: dict, branch: str) -> None:
    got, ref = fp32_run[f"{branch}_pseudo_label"], fx[f"fp32ref_{branch}_pseudo_label"]
    assert got.shape == ref.shape
    agreement = float((got == ref).mean())
    assert agreement >= 0.999, agreement


def test_branches_differ(fp32_run: dict) -> None:
    """RFM changes the affinity (sanity: the two branches are really different code paths)."""
    a, b = fp32_run["caa_details"][0]["affinity"], fp32_run["rfm_details"][0]["affinity"]
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------------------------
# official numerics, against the stored fp16 reference

#: Bounds between what the fp16 compute reaches and what float32 reaches (measured on the public set,
#: CPU, 1 thread: fp16 compute / float32): text features 0 / 7.4e-4, GradCAM probabilities
#: 9.8e-4 / 7.4e-3, CLIP block outputs bit-identical to the fp16 reference in 37 % / 0.002 % of the
#: values. Pseudo-label agreement does not separate them (99.957 % / 99.933 % CAA, 99.983 % / 99.977 %
#: RFM): it keeps the README's 98 %.
TEXT_TOL = 2.5e-4  # one fp16 ulp for |x| in [0.125, 0.25); the features are unit vectors of width 64
PROBS_TOL = 2.5e-3
LABEL_AGREEMENT = 0.98
IDENTICAL_FEATURES = 0.10

#: Why the other compat rows stay at the README's loose (pure float32) tolerances: the official run
#: executed its fp16 patch-embedding convolution on a CPU whose kernel sums in another order than
#: ours; for 59 % of the patches that flips one fp16 ulp of conv1's output, and the peaked attention
#: of the tiny CLIP amplifies those flips through 11 blocks (block outputs up to 2.0e-2 apart, the
#: float32 run 2.2e-2). Decoder outputs, affinities and CAMs inherit that (measured fp16 compute vs
#: float32: seg_logits 1.2e-3 / 1.3e-3, affinities 2.2e-3 / 2.5e-3, refined CAMs 1.1e-3 / 5.7e-4).
_LOOSE_REASON = "fp16 conv1 kernel order of the fixture machine (see above)"


def _text_error(model: WeCLIP, fx: dict) -> float:
    fg = np.abs(model.fg_text.numpy() - fx["fg_text_features"].astype(np.float32)).max()
    bg = np.abs(model.bg_text.numpy() - fx["bg_text_features"].astype(np.float32)).max()
    return float(max(fg, bg))


def test_compat_text_features(fx: dict, tiny_clip_path: Path) -> None:
    """Prompt embeddings (VOC names with synonyms + background words) = the official fp16 ones; float32 fails."""
    compat, plain = _model(tiny_clip_path, compat=True), _model(tiny_clip_path, compat=False)
    assert compat.fg_text.shape == fx["fg_text_features"].shape and compat.bg_text.shape == fx["bg_text_features"].shape
    assert _text_error(compat, fx) <= TEXT_TOL
    assert _text_error(plain, fx) > TEXT_TOL


def test_image_rgb_u8_normalises_to_the_input(fx: dict) -> None:
    """RGB uint8 crops → ImageNet-normalised network input, exactly as the official dataset code."""
    x = normalize_rgb(fx["image_rgb_u8"], "imagenet")
    assert x.dtype == torch.float32
    np.testing.assert_array_equal(x.numpy(), fx["image"])


def _feature_agreement(model: WeCLIP, fx: dict) -> float:
    vis = model.clip.visual
    with torch.no_grad(), model.numerics:
        inter = vis.forward_intermediates(torch.from_numpy(fx["image"]), vis.num_blocks - 1)
    got = torch.stack([t[0] for t in inter.tokens]).float().numpy()  # image 0, CLS included
    return float((got == fx["img0_clip_feats"].astype(np.float32)).mean())


def test_compat_clip_features_follow_the_fp16_reference(fx: dict, tiny_clip_path: Path) -> None:
    """fp16 compute reproduces many block outputs bit for bit; a float32 CLIP almost none."""
    assert _feature_agreement(_model(tiny_clip_path, compat=True), fx) >= IDENTICAL_FEATURES
    assert _feature_agreement(_model(tiny_clip_path, compat=False), fx) < 0.1 * IDENTICAL_FEATURES


def _probs_error(run: dict, fx: dict) -> float:
    return max(float(np.abs(d["probs"].numpy() - fx[f"img{i}_probs"]).max())
               for b in BRANCHES for i, d in enumerate(run[f"{b}_details"]))


def _agreement(run: dict, fx: dict) -> float:
    return min(float((run[f"{b}_pseudo_label"] == fx[f"{b}_pseudo_label"]).mean()) for b in BRANCHES)


def test_compat_probs_tight_and_labels(fx: dict, compat_run: dict, fp32_run: dict) -> None:
    """GradCAM probabilities: fp16 compute within the tight bound, float32 outside; labels (loose)."""
    assert _probs_error(compat_run, fx) <= PROBS_TOL
    assert _probs_error(fp32_run, fx) > PROBS_TOL
    assert _agreement(compat_run, fx) >= LABEL_AGREEMENT


def test_compat_decoder(fx: dict, compat_run: dict) -> None:
    np.testing.assert_allclose(compat_run["seg_logits"], fx["seg_logits"], rtol=0, atol=1e-2)
    np.testing.assert_allclose(compat_run["attn_pred"], fx["attn_pred"], rtol=0, atol=3e-3)


@pytest.mark.parametrize("branch", BRANCHES)
def test_compat_pipeline(fx: dict, compat_run: dict, branch: str) -> None:
    """Loose rows of the README (reason: ``_LOOSE_REASON``), including the crop-size maps end to end."""
    for i, d in enumerate(compat_run[f"{branch}_details"]):
        np.testing.assert_allclose(d["gradcam"].numpy(), fx[f"img{i}_gradcam"], rtol=0, atol=1e-1)
        np.testing.assert_allclose(d["affinity"].numpy(), fx[f"{branch}_img{i}_affinity"], rtol=0, atol=1e-2)
        np.testing.assert_allclose(d["refined_lowres"].numpy(), fx[f"{branch}_img{i}_refined_lowres"], rtol=0, atol=5e-2)
        if branch == "rfm":
            np.testing.assert_array_equal(d["keep"].numpy().astype(np.uint8), fx[f"rfm_img{i}_keep"])
    for i in _detail_images(fx, branch):
        d = compat_run[f"{branch}_details"][i]
        np.testing.assert_allclose(d["cams_before_par"].numpy(), fx[f"{branch}_img{i}_cams_before_par"], rtol=0, atol=2e-1)
        np.testing.assert_allclose(d["cams_after_par"].numpy(), fx[f"{branch}_img{i}_cams_after_par"], rtol=0, atol=2e-1)


# ----------------------------------------------------------------------------------------------
# stage-wise from the stored official intermediates (tight)


def _detail_images(fx: dict, branch: str) -> list[int]:
    return sorted(int(k.split("_img")[1].split("_")[0]) for k in fx if k.startswith(f"{branch}_img") and k.endswith("_cams_after_par"))


@pytest.mark.parametrize("branch", BRANCHES)
def test_stage_refined_to_label(fx: dict, tiny_clip_path: Path, branch: str) -> None:
    """refined_lowres → before-PAR maps (1e-5) → PAR (1e-4) → label (exact) via ``WeCLIP.refine_to_label``."""
    model = _model(tiny_clip_path, compat=True)
    imgs = _detail_images(fx, branch)
    assert imgs, "fixture has no full-detail image"
    for i in imgs:
        low = torch.from_numpy(fx[f"{branch}_img{i}_refined_lowres"])
        keys = fx[f"img{i}_keys"].tolist()
        image = torch.from_numpy(fx["image"][i])
        res = model.refine_to_label(image, low, keys)
        np.testing.assert_allclose(res["cams_before_par"].numpy(), fx[f"{branch}_img{i}_cams_before_par"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(res["cams_after_par"].numpy(), fx[f"{branch}_img{i}_cams_after_par"], rtol=0, atol=1e-4)
        # PAR from the stored before-PAR maps, then the label.
        after = model.par(image[None], torch.from_numpy(fx[f"{branch}_img{i}_cams_before_par"])[None])[0]
        np.testing.assert_allclose(after.numpy(), fx[f"{branch}_img{i}_cams_after_par"], rtol=0, atol=1e-4)
        label = labels_from_scores(torch.from_numpy(fx[f"{branch}_img{i}_cams_after_par"]), keys)
        np.testing.assert_array_equal(label.numpy(), fx[f"{branch}_pseudo_label"][i])


def test_stage_helpers_shapes() -> None:
    low = torch.rand(2, 4, 5)
    high = scale_to_size(low, (64, 80))
    assert high.shape == (2, 64, 80) and float(high.max()) < 1.0
    cams = with_background(high)
    assert cams.shape == (3, 64, 80)
    torch.testing.assert_close(cams[0], 1 - high.max(0).values)


def test_clip_features_stage(fx: dict, tiny_clip_path: Path) -> None:
    """image → outputs of blocks 1..11 of image 0 (official numerics, README tolerance 0.1)."""
    model = _model(tiny_clip_path, compat=True)
    feats = model.encode(torch.from_numpy(fx["image"][:1])).features  # (n, 1, C, h, w)
    n, _, c, h, w = feats.shape
    got = feats[:, 0].reshape(n, c, h * w).transpose(1, 2).numpy()
    ref = fx["img0_clip_feats"].astype(np.float32)[:, 1:]  # CLS dropped, as the decoder sees them
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-1)


def test_decoder_stage_from_official_features(fx: dict, tiny_clip_path: Path) -> None:
    """Stored block outputs of image 0 → decoder = stored seg_logits / attn_pred (official numerics).

    Image 0 alone (batch 1, the fixture ran batch 2) changes float32 summation order, and the fp16
    out-projection turns that into 1-ulp fp16 flips (~2.5e-4): the logits get the README's 2e-3.
    """
    model = _model(tiny_clip_path, compat=True)
    feats = torch.from_numpy(fx["img0_clip_feats"].astype(np.float32))[:, 1:]  # (n, hw, C)
    n, hw, c = feats.shape
    h, w = fx["seg_logits"].shape[-2:]
    x = feats.transpose(1, 2).reshape(n, 1, c, h, w)
    out = model.decoder(x)
    np.testing.assert_allclose(out.seg_logits[0].detach().numpy(), fx["seg_logits"][0], rtol=0, atol=2e-3)
    np.testing.assert_allclose(out.affinity[0].detach().numpy(), fx["attn_pred"][0], rtol=0, atol=1e-5)


STAGE_PROBS_TOL = 1e-3  # measured from the stored block outputs: fp16 compute 2.4e-4 (1 fp16 ulp), float32 4.0e-3


def _feature_images(fx: dict) -> list[int]:
    return sorted(int(k[3:].split("_")[0]) for k in fx if k.startswith("img") and k.endswith("_clip_feats"))


@pytest.mark.parametrize("compat", [True, False])
def test_gradcam_stage_from_official_block_outputs(fx: dict, tiny_clip_path: Path, compat: bool) -> None:
    """Stored block-11 output + text features → last block → probabilities and GradCAM.

    With WeCLIP's numerics (fp16 last block, official fp16 GradCAM arithmetic) the probabilities are
    within ``STAGE_PROBS_TOL``; a float32 last block is not. The maps keep the README's GradCAM row
    (1e-1; measured 1.8e-3 / 2.1e-3).
    """
    from tag2mask.localization.gradcam import softmax_gradcam

    model = _model(tiny_clip_path, compat=compat)
    images = _feature_images(fx)
    assert images, "fixture has no CLIP-feature image"
    for i in images:
        text, targets = model._text_rows(fx[f"img{i}_keys"].tolist())
        last = torch.from_numpy(fx[f"img{i}_clip_feats"][-1])[None]  # (1, L, C), the fp16 block-11 output
        with model.numerics:
            gc = softmax_gradcam(model.clip.visual, last if compat else last.float(), tuple(fx["seg_logits"].shape[-2:]),
                                 text, targets, model.logit_scale, fp16_arithmetic=compat)
        err = float(np.abs(gc.probs.float().numpy() - fx[f"img{i}_probs"]).max())
        assert (err <= STAGE_PROBS_TOL) == compat, err
        np.testing.assert_allclose(gc.cams.float().numpy(), fx[f"img{i}_gradcam"], rtol=0, atol=1e-1)
