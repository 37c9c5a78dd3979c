"""CLIP-ES against the official golden fixtures, every set under tests/data (VOC and COCO paths).

One module for every set of this format (see ``golden_sets.py``): the set's ``index.json`` gives the
images, sizes, labels, settings, class lists and per-label tolerances (README sections 6.1 / 6.2 of
``tests/data/clip_es``; the COCO README lists only what differs). Three kinds of test:

* stage-isolated: each stage fed the stored inputs of that stage (a failure pinpoints the stage);
* end to end through the Python API: a :class:`ClipES` built from the preset that matches the set
  (its own numerics applied to a plain float32 model) from the PNG alone;
* end to end through the commands: ``tag2mask label`` (folder + label file, or a COCO root with its
  split file, as the official COCO script reads labels) with ``--save-arrays`` and the CRF, then
  ``tag2mask eval`` on the CAMs and on the CRF labels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from golden_sets import CASE_IDS, CASES, SET_IDS, SETS, TINY_CLIP_PATH, GoldenCase, GoldenSet
from tag2mask.localization.affinity import refine_cams, sinkhorn_normalize, transition_matrix
from tag2mask.localization.boxes import cam_box_mask, cam_box_masks, cam_to_uint8
from tag2mask.localization.scaling import scale_and_resize

ENCODER_TOL = 2e-4  # block11_out, ln1_act (README 6.1)
TEXT_TOL = 1e-5  # fg_text, bg_text


@pytest.fixture(scope="module")
def plain_model():
    """The tiny CLIP in plain float32: the methods must apply the official numerics themselves."""
    from tag2mask.clip.loading import load_clip

    return load_clip(TINY_CLIP_PATH)


_MAKERS: dict[str, object] = {}


def _maker(plain_model, golden: GoldenSet):
    """The :class:`ClipES` of the preset matching ``golden`` (one per set, shared by the tests)."""
    from tag2mask.methods.clip_es.pipeline import ClipES, preset_for

    if golden.name not in _MAKERS:
        _MAKERS[golden.name] = ClipES(plain_model, config=preset_for(golden.preset_name()), text_cache_dir=False)
    return _MAKERS[golden.name]


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request) -> GoldenCase:
    return request.param


@pytest.fixture(params=SETS, ids=SET_IDS)
def golden(request) -> GoldenSet:
    return request.param


def _max_abs(a, b) -> float:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    assert a.shape == np.shape(b), (a.shape, np.shape(b))
    return float(np.abs(a.astype(np.float64) - np.asarray(b, dtype=np.float64)).max())


# ---------------------------------------------------------------------------------------------- the preset


def test_sets_found_and_model_is_the_fixture_model():
    import hashlib

    assert SETS and all(s.images for s in SETS)
    digest = hashlib.sha256(TINY_CLIP_PATH.read_bytes()).hexdigest()
    assert all(s.index["model"]["sha256"] == digest for s in SETS)


def test_preset_matches_official_settings(golden: GoldenSet):
    """The preset the method applies has the set's class prompts, background words, threshold, template."""
    from tag2mask.methods.clip_es.pipeline import PRESETS
    from tag2mask.refinement.crf import CLIP_ES_CRF
    from tag2mask.vocab.vocabulary import get_vocabulary

    config = PRESETS[golden.preset_name()]
    vocab = get_vocabulary(config.vocabulary)
    assert list(vocab.background) == golden.background_words
    assert list(vocab.names) == golden.plain_names  # display names = the official plain list (ids -> names)
    assert config.box_threshold == golden.settings["box_threshold"]
    assert config.templates == (golden.template,)
    assert config.attention_layers == 8 and config.sinkhorn_rounds == golden.settings["sinkhorn_rounds"]
    assert config.scales == tuple(golden.settings["scales"]) and config.flip == golden.settings["flip"]
    assert len(vocab) + 1 == golden.eval_num_classes
    assert config.numerics.round_weights_fp16 and config.numerics.round_pos_embed_fp16
    crf = golden.settings["crf"]
    assert (CLIP_ES_CRF.iterations, CLIP_ES_CRF.gaussian_sxy, CLIP_ES_CRF.gaussian_compat, CLIP_ES_CRF.bilateral_sxy,
            CLIP_ES_CRF.bilateral_srgb, CLIP_ES_CRF.bilateral_compat) == (
        crf["iter_max"], crf["pos_xy_std"], crf["pos_w"], crf["bi_xy_std"], crf["bi_rgb_std"], crf["bi_w"])
    for entry in golden.images:  # the label names of every image are the official synonym strings
        assert [golden.prompt_names[i] for i in entry["label_ids"]] == entry["labels"]


def test_text_features(plain_model, golden: GoldenSet):
    maker = _maker(plain_model, golden)
    z = GoldenCase(golden, golden.images[0]).arrays
    assert maker.fg.is_one_per_class
    assert _max_abs(maker.fg.features, z["fg_text"]) <= TEXT_TOL
    assert _max_abs(maker.bg.features, z["bg_text"]) <= TEXT_TOL


# ---------------------------------------------------------------------------------------------- encoder


def _encoder_outputs(visual, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(block11_out (L, C), ln1_act (C, h, w)) for one stored ``input`` (1, 3, H16, W16)."""
    with torch.no_grad():
        inter = visual.forward_intermediates(torch.from_numpy(image), num_blocks=visual.num_blocks - 1, keep_tokens=False)
        block11 = inter.last[0]
        h, w = inter.grid
        ln1 = visual.blocks[-1].ln_1(block11)[1:]
    return block11, ln1.reshape(h, w, -1).permute(2, 0, 1)


def test_pos_emb_exact(plain_model, case: GoldenCase):
    h, w = case.entry["grid_hw"]
    maker = _maker(plain_model, case.set)
    with maker.numerics:
        table = plain_model.visual.interpolate_pos_embed(h, w)
    ref = case.arrays["pos_emb_new"]
    assert table.dtype == torch.float32 and ref.dtype == np.float16  # used in fp32, every value an fp16 value
    ours = table.detach().half().numpy()
    assert torch.equal(table.detach(), torch.from_numpy(ours).float())
    np.testing.assert_array_equal(ours.view(np.uint16), ref.view(np.uint16))
    assert not plain_model.visual.round_pos_embed_fp16  # the shared model is left as it was


def test_encoder_block11_and_ln1(plain_model, case: GoldenCase):
    z = case.arrays
    assert z["input"].shape == (1, 3, *case.entry["input_hw"])
    maker = _maker(plain_model, case.set)
    with maker.numerics:
        block11, ln1 = _encoder_outputs(plain_model.visual, z["input"])
    assert _max_abs(block11, z["block11_out"]) <= ENCODER_TOL
    assert ln1.shape == (plain_model.visual.width, *case.entry["grid_hw"])
    assert _max_abs(ln1, z["ln1_act"]) <= ENCODER_TOL
    # outside the method's numerics (plain float32 weights) the encoder leaves the tolerance (README 2)
    plain, _ = _encoder_outputs(plain_model.visual, z["input"])
    assert _max_abs(plain, z["block11_out"]) > ENCODER_TOL


def test_gradcam_from_block11(plain_model, case: GoldenCase):
    """Stored block11_out + text + keys -> probs and cam_lowres (README 6.1, per-label tolerances)."""
    from tag2mask.localization.gradcam import softmax_gradcam

    z, tol = case.arrays, case.entry["suggested_tolerance"]
    keys = [int(k) for k in z["keys"]]
    text = torch.cat([torch.from_numpy(z["fg_text"])[keys], torch.from_numpy(z["bg_text"])])
    maker = _maker(plain_model, case.set)
    with maker.numerics:
        gc = softmax_gradcam(plain_model.visual, torch.from_numpy(z["block11_out"])[None], tuple(case.entry["grid_hw"]),
                             text, list(range(len(keys))), maker.logit_scale)
    assert _max_abs(gc.activation, z["ln1_act"]) <= ENCODER_TOL
    for k in range(len(keys)):
        assert _max_abs(gc.probs, z["probs"][k]) <= tol["probs"][k]
        assert _max_abs(gc.cams[k], z["cam_lowres"][k]) <= tol["cam_lowres_from_block11_out"][k]
        # no README tolerance for these two: relative to each map's magnitude (measured <= 7.3e-6)
        for ours, name in ((gc.grad_weights[k], "grad_weights"), (gc.cams_raw[k], "cam_raw")):
            assert _max_abs(ours, z[name][k]) <= 1e-4 * max(np.abs(z[name][k]).max(), 1e-30), name


# ---------------------------------------------------------------------------------------------- stage 1: CAA


def test_trans_mat(case: GoldenCase):
    z = case.arrays
    T = transition_matrix(torch.from_numpy(z["attn_mean8"]), rounds=case.set.settings["sinkhorn_rounds"]).numpy()
    assert T.shape == z["trans_mat"].shape == (int(np.prod(case.entry["grid_hw"])),) * 2
    assert np.abs(T - z["trans_mat"]).max() <= 1e-5 * np.abs(z["trans_mat"]).max()
    S = sinkhorn_normalize(z["attn_mean8"], rounds=case.set.settings["sinkhorn_rounds"])
    assert torch.allclose(S.sum(1), torch.ones(S.shape[0]), atol=1e-5)


def test_box_mask_and_boxes(case: GoldenCase):
    z, thr = case.arrays, case.set.settings["box_threshold"]
    for k in range(len(case.entry["labels"])):
        mask, boxes = cam_box_mask(z["cam_lowres"][k], thr)
        assert mask.dtype == np.float32
        assert np.array_equal(mask, z["box_mask"][k]), f"label {k}"
        # same multiset of boxes (the official order follows OpenCV's contour tree)
        assert sorted(boxes) == sorted(tuple(b) for b in case.entry["boxes_x0y0x1y1"][k]), f"label {k}"
        top = int(cam_to_uint8(z["cam_lowres"][k]).max())
        assert top == case.entry["cam_uint8_max"][k] and int(thr * top) == case.entry["box_thr_uint8"][k]
    assert np.array_equal(cam_box_masks(z["cam_lowres"], thr), z["box_mask"])
    as_tensor = cam_box_masks(torch.from_numpy(z["cam_lowres"]), thr)
    assert isinstance(as_tensor, torch.Tensor) and np.array_equal(as_tensor.numpy(), z["box_mask"])


def test_refined_lowres(case: GoldenCase):
    z = case.arrays
    ref = z["refined_lowres"]
    r = refine_cams(z["trans_mat"], z["cam_lowres"], z["box_mask"])
    assert r.shape == ref.shape and r.dtype == np.float32
    assert np.abs(r - ref).max() <= 1e-5 * max(np.abs(ref).max(), np.finfo(np.float32).tiny)


def test_cam_pipeline_stage(case: GoldenCase):
    """The shared CAM pipeline (affinity -> boxes -> propagation) with CLIP-ES's settings, from stored inputs."""
    from tag2mask.localization.cam_pipeline import CAMSettings, refine_with_affinity

    z = case.arrays
    settings = CAMSettings(box_threshold=case.set.settings["box_threshold"],
                           sinkhorn_rounds=case.set.settings["sinkhorn_rounds"])
    out = refine_with_affinity(z["cam_lowres"], torch.from_numpy(z["attn_mean8"]), settings)
    assert np.array_equal(out.box_masks.numpy(), z["box_mask"])
    assert np.abs(out.trans.numpy() - z["trans_mat"]).max() <= 1e-5 * np.abs(z["trans_mat"]).max()
    assert np.abs(out.refined_lowres.numpy() - z["refined_lowres"]).max() <= 1e-4 * np.abs(z["refined_lowres"]).max()


def test_attn_highres_exact(case: GoldenCase):
    z, (H, W) = case.arrays, (case.entry["height"], case.entry["width"])
    high = scale_and_resize(z["refined_lowres"], (H, W))
    assert high.dtype == np.float16 and high.shape == z["attn_highres"].shape == (len(case.entry["labels"]), H, W)
    assert np.array_equal(high, z["attn_highres"])
    torch_path = scale_and_resize(z["refined_lowres"], (H, W), exact_cv2=False).astype(np.float32)
    assert np.abs(torch_path - z["attn_highres"].astype(np.float32)).max() <= 4.9e-4  # <= 1 fp16 ulp


# ---------------------------------------------------------------------------------------------- stage 2 + eval


def test_crf_image_exact(case: GoldenCase):
    from tag2mask.methods.clip_es.label_maps import clip_es_crf_image

    assert np.array_equal(clip_es_crf_image(case.rgb()), case.arrays["crf_image"])


def test_crf_labels_exact(case: GoldenCase):
    pytest.importorskip("pydensecrf")
    from tag2mask.methods.clip_es.label_maps import clip_es_pseudo_label

    z = case.arrays
    label, label_noignore, q = clip_es_pseudo_label(z["attn_highres"], z["keys"], case.rgb(),
                                                    confidence=case.set.settings["crf"]["confidence"])
    assert label.dtype == np.uint8 and label.shape == (case.entry["height"], case.entry["width"])
    assert np.array_equal(label, z["crf_label"])
    assert np.array_equal(label_noignore, z["crf_label_noignore"])
    assert int((label == 255).sum()) == case.entry["crf_ignored_pixels"]
    assert np.abs(q - z["crf_prob"]).max() <= 1e-6


@pytest.mark.parametrize("p", [1, 2])
def test_eval_labels_exact(case: GoldenCase, p: int):
    from tag2mask.evaluation.cam_eval import cam_to_label

    z = case.arrays
    pred = cam_to_label(z["attn_highres"], z["keys"], bg_power=p)
    assert pred.dtype == np.uint8
    np.testing.assert_array_equal(pred, z[f"evalcam_pred_p{p}"])


def _compare_scores(ours: dict, ref: dict) -> None:
    for k in ("Mean IoU", "Pixel Accuracy", "Mean Accuracy", "Frequency Weighted IoU"):
        assert ours[k] == pytest.approx(ref[k], abs=1e-12), k
    ref_iou = [ref["Class IoU"][str(i)] for i in range(len(ref["Class IoU"]))]
    assert len(ours["Class IoU"]) == len(ref_iou)
    for a, b in zip(ours["Class IoU"], ref_iou):
        assert (a is None) if b is None else a == pytest.approx(b, abs=1e-12)


def test_eval_cam_scores_match_official(golden: GoldenSet):
    from tag2mask.evaluation.cam_eval import evaluate_cams
    from tag2mask.methods.clip_es.pipeline import PRESETS

    cases = [GoldenCase(golden, e) for e in golden.images]
    rule = PRESETS[golden.preset_name()].miou_rule
    res = evaluate_cams(((c.arrays["attn_highres"], c.arrays["keys"], c.gt()) for c in cases),
                        num_classes=golden.eval_num_classes, powers=(1, 2), miou_rule=rule)
    ref = golden.index["eval_cam"]
    _compare_scores(res["p=1"], ref["p=1"])
    _compare_scores(res["p=2"], ref["p=2"])
    assert res["best_p"] == ref["best_p"] and res["best_miou"] == pytest.approx(ref["best_miou"], abs=1e-12)
    assert res["miou_rule"] == rule


def test_crf_eval_only_scores_match_official(golden: GoldenSet):
    from tag2mask.evaluation.miou import ConfusionMatrix
    from tag2mask.methods.clip_es.pipeline import PRESETS

    cm = ConfusionMatrix(golden.eval_num_classes)
    for entry in golden.images:
        c = GoldenCase(golden, entry)
        cm.update(c.arrays["crf_label_noignore"], c.gt(), name=c.id)
    _compare_scores(cm.scores(PRESETS[golden.preset_name()].miou_rule), golden.index["crf_eval_only_scores"])


# ---------------------------------------------------------------------------------------------- end to end


def _check_arrays(ours: dict, ref: dict, entry: dict) -> None:
    tol = entry["suggested_tolerance"]
    assert np.array_equal(ours["input"], ref["input"])
    assert np.array_equal(ours["keys"], ref["keys"]) and np.array_equal(ours["keys"], entry["label_ids"])
    for k in range(len(ref["keys"])):
        assert np.abs(ours["probs"][k] - ref["probs"][k]).max() <= tol["probs"][k]
        assert np.abs(ours["cam_lowres"][k] - ref["cam_lowres"][k]).max() <= tol["cam_lowres_end_to_end"][k]
        scale = max(np.abs(ref["refined_lowres"][k]).max(), 1e-12)
        assert np.abs(ours["refined_lowres"][k] - ref["refined_lowres"][k]).max() <= max(
            tol["refined_lowres_rel_end_to_end"][k], 1e-4) * scale
        diff = np.abs(ours["attn_highres"][k].astype(np.float32) - ref["attn_highres"][k].astype(np.float32))
        assert diff.max() <= tol["attn_highres_end_to_end"][k]
    for name in ("attn_mean8", "trans_mat"):
        assert np.abs(ours[name] - ref[name]).max() <= 1e-4 * np.abs(ref[name]).max()
    assert np.array_equal(ours["box_mask"], ref["box_mask"])
    assert ours["attn_highres"].dtype == np.float16


def test_python_api_end_to_end(plain_model, case: GoldenCase):
    """PNG (as stored: RGB or single-channel) + preset -> every array, the method applying its numerics."""
    maker = _maker(plain_model, case.set)
    with Image.open(case.path("image")) as image:
        result = maker(image, case.entry["label_ids"], keep_arrays=True)
    _check_arrays(result.arrays, case.arrays, case.entry)
    from tag2mask.clip.numerics import weights_are_fp16_exact

    # the numerics were applied for the call only: the caller's model is unchanged
    assert not plain_model.visual.round_pos_embed_fp16 and not weights_are_fp16_exact(plain_model)


def _label_inputs(golden: GoldenSet, tmp: Path) -> list[str]:
    """The ``tag2mask label`` arguments that read the set's labels the way its official script does.

    Sets with split-file label lines (the COCO path) become a COCO root with that split file; the
    others a folder of images with a label file of the objects as drawn (names, repeats kept).
    """
    if all("label_line" in e for e in golden.images):
        root = tmp / "coco_root"
        for sub in ("JPEGImages", "SegmentationClass"):
            (root / sub).mkdir(parents=True)
        for e in golden.images:
            shutil.copy(golden.root / e["image"], root / "JPEGImages" / Path(e["image"]).name)
            shutil.copy(golden.root / e["gt"], root / "SegmentationClass" / Path(e["gt"]).name)
        (root / "fixture_split.txt").write_text("".join(e["label_line"] + "\n" for e in golden.images))
        return [str(root), "--split", "fixture_split"]
    labels = {Path(e["image"]).name: e["objects"] for e in golden.images}
    (tmp / "labels.json").write_text(json.dumps(labels))
    return [str(golden.root / "images"), "--labels", str(tmp / "labels.json")]


def test_commands_reproduce_fixture(tmp_path: Path, golden: GoldenSet):
    """``tag2mask label --classes <preset> --refine crf --save-arrays``, then ``tag2mask eval`` on its outputs."""
    pytest.importorskip("pydensecrf")  # the crf extra is installed in CI (.ci/run installs .[test,crf])
    from tag2mask.cli.main import main
    from tag2mask.io.palette import read_label_png, save_label_png

    preset, out = golden.preset_name(), tmp_path / "run"
    rc = main(["label", *_label_inputs(golden, tmp_path), "--classes", preset, "--weights", str(TINY_CLIP_PATH),
               "--out", str(out), "--refine", "crf", "--save-arrays", "--device", "cpu", "--quiet"])
    assert rc == 0
    noignore = tmp_path / "noignore"
    for entry in golden.images:
        ref = GoldenCase(golden, entry).arrays
        arrays = np.load(out / "arrays" / f"{entry['name']}.npz")
        _check_arrays(arrays, ref, entry)
        frac = entry["suggested_tolerance"]["crf_label_frac_end_to_end"]
        assert (arrays["crf_label"] != ref["crf_label"]).mean() <= max(frac, 0.005)
        assert (arrays["crf_label_noignore"] != ref["crf_label_noignore"]).mean() <= max(frac, 0.005)
        assert np.array_equal(read_label_png(out / "masks" / f"{entry['name']}.png"), arrays["crf_label"])
        cams = np.load(out / "cams" / f"{entry['name']}.npz")
        assert cams["cams"].dtype == np.float16 and np.array_equal(cams["keys"], ref["keys"])
        save_label_png(noignore / f"{entry['name']}.png", arrays["crf_label_noignore"])
    record = json.loads((out / "run.json").read_text())
    assert record["written"] == len(golden.images) and record["failed"] == 0
    assert sorted(json.loads(line)["item"] for line in (out / "manifest.jsonl").read_text().splitlines()) == sorted(
        e["name"] for e in golden.images)

    gt_dir = golden.root / "gt"
    assert main(["eval", str(out), "--cams", "--gt", str(gt_dir), "--classes", preset, "--quiet"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert len(report["class_names"]) == golden.eval_num_classes
    assert report["miou_rule"] == record["miou_rule"] and report["miou_rule_source"].endswith("run.json")
    for p in ("p=1", "p=2"):  # the CAMs of the command score like the official ones (within the tolerances)
        assert report["settings"][p]["Mean IoU"] == pytest.approx(golden.index["eval_cam"][p]["Mean IoU"], abs=2e-3)
    assert main(["eval", str(noignore), "--gt", str(gt_dir), "--classes", preset, "--quiet",
                 "--miou-rule", record["miou_rule"]]) == 0
    scores = json.loads((noignore / "eval.json").read_text())["scores"]
    assert scores["Mean IoU"] == pytest.approx(golden.index["crf_eval_only_scores"]["Mean IoU"], abs=5e-3)
