"""TagCLIP's tagger against the official golden fixtures (every TagCLIP set under tests/data).

Data-driven over each set's ``index.json`` (``tagclip_sets.py``): stage-isolated tests (each stage fed
the stored inputs of that stage, README 6.1), end to end through the API from the PNG and the
checkpoint (README 6.2 / 6.3), the corrected default versus the official bugs, and ``tag2mask tag``
(tag file lines, metrics, saved arrays).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tagclip_sets import (CASE_IDS, CASES, MODE_IDS, MODES, SETS, TINY_CLIP_PATH, TagCase,
                          compare_end_to_end, max_abs, rel)
from tag2mask.methods.tagclip import cwr as C
from tag2mask.methods.tagclip import local as L

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    from tag2mask.clip.loading import load_clip

    return load_clip(TINY_CLIP_PATH)


_TAGGERS: dict = {}


def tagger(model, case_or_set, mode: str | None = None, compat: bool = True):
    """One :class:`TagCLIP` per (set, mode, compat), built from the preset matching the mode's texts."""
    from tag2mask.methods.tagclip import TagCLIP, preset_for

    tagset = case_or_set.set if isinstance(case_or_set, TagCase) else case_or_set
    mode = mode or case_or_set.entry["mode"]
    key = (tagset.name, mode, compat)
    if key not in _TAGGERS:
        config = preset_for(tagset.preset_name(mode), compat=compat)
        other = _TAGGERS.get((tagset.name, mode, not compat))
        _TAGGERS[key] = other.with_config(config) if other else TagCLIP(model, config, text_cache_dir=False)
    return _TAGGERS[key]


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request) -> TagCase:
    return request.param


@pytest.fixture(params=MODES, ids=MODE_IDS)
def set_mode(request):
    return request.param


def test_sets_found_and_model_is_the_fixture_model():
    import hashlib

    assert SETS and all(s.index["cases"] for s in SETS)
    digest = hashlib.sha256(TINY_CLIP_PATH.read_bytes()).hexdigest()
    assert all(s.index["model"]["sha256"] == digest for s in SETS)


def test_preset_matches_official_settings(model, set_mode):
    from tag2mask.methods.tagclip.presets import preset_for

    tagset, mode = set_mode
    m = tagset.modes[mode]
    cfg = preset_for(tagset.preset_name(mode))
    assert list(cfg.texts) == m["class_names"] and cfg.num_classes == m["num_classes"]
    assert len(cfg.background) == m["n_background"]
    assert list(cfg.templates) == tagset.templates
    assert cfg.theta == m["thres_abs"] and list(cfg.attn_mean_layers) == m["attn_mean_layers"]
    assert m["attn_vote_layers"] == list(range(model.visual.num_blocks))  # the vote uses every block's map
    assert cfg.attn_vote_min_count == m["attn_vote_min_count"]
    assert cfg.last_block_mask == m["last_block_attn_mask"] and cfg.crop_cls_mask_value == m["crop_cls_mask_value"]
    assert cfg.cwr_fuse_weight == m["cwr_fuse_weight"] and model.visual.image_size == m["crop_size"]
    assert float(model.logit_scale.exp()) == pytest.approx(tagset.index["settings"]["logit_scale"], rel=1e-7)


def test_text_matrix(model, set_mode):
    tagset, mode = set_mode
    ours = tagger(model, tagset, mode).text.cpu().numpy()
    ref = tagset.text[f"cls.{mode}.text"]
    assert max_abs(ours, ref) <= max(10 * tagset.modes[mode]["text_fp64_deviation"], 1e-6)


# ---------------------------------------------------------------------------------------------- stage-isolated


def test_preprocessing_and_pos_table_exact(model, case):
    from tag2mask.methods.tagclip.encoder import positional_table
    from tag2mask.methods.tagclip.tagger import preprocess

    with Image.open(case.path("image")) as im:
        assert im.mode == case.entry["image_mode"]
        x = preprocess(im)
    np.testing.assert_array_equal(x.numpy(), case.arrays["cls.input"])
    assert list(x.shape[-2:]) == case.cls["input_hw"]
    h, w = case.cls["grid_hw"]
    table = positional_table(model.visual, h, w, round_fp16=True)
    np.testing.assert_array_equal(table.numpy(), case.arrays["cls.pos_emb_new"])
    assert torch.equal(table, table.half().float()) == case.cls["pos_emb_rounded_fp16"]


def test_vote_from_stored_attention(case):
    z = case.arrays
    if "cls.attn_layers" not in z:  # the fixture stores the maps only for small grids (README 3.1)
        assert np.prod(case.cls["grid_hw"]) > 64
        return
    n = z["cls.attn_layers"].shape[-1]
    maps = torch.zeros(z["cls.attn_layers"].shape[0], n + 1, n + 1)
    maps[:, 1:, 1:] = torch.from_numpy(z["cls.attn_layers"])
    vote = L.attention_vote(maps, case.mode["attn_mean_layers"], case.mode["attn_vote_min_count"])
    np.testing.assert_array_equal(vote.count.numpy(), z["cls.attn_vote_count"])
    assert int((vote.count >= case.mode["attn_vote_min_count"]).sum()) == case.cls["attn_vote_kept"]
    for ours, key in ((vote.layer_mean, "attn_layer_mean"), (vote.sel_mean, "attn_sel_mean"), (vote.weight, "attn_weight")):
        assert rel(ours, z[f"cls.{key}"]) <= 1e-5, key


def test_refinement_masks_and_refined_scores_from_stored(case):
    z = case.arrays
    W, coarse = torch.from_numpy(z["cls.attn_weight"]), torch.from_numpy(z["cls.logits_coarse"])
    attn = W @ coarse
    assert rel(attn, z["cls.logits_attn"]) <= 1e-6
    cm = L.class_box_masks(torch.from_numpy(z["cls.logits_attn"]), tuple(case.cls["grid_hw"]), edge_quirk=True)
    np.testing.assert_array_equal(cm.masks, z["cls.mask_attn_box_mask"])
    ma = case.cls["mask_attn"]
    assert int(cm.processed.sum()) == ma["n_classes_boxed"] and cm.thresholds[: len(ma["thr_uint8"])] == ma["thr_uint8"]
    for c, boxes in enumerate(ma["boxes_x0y0x1y1"]):
        assert sorted(cm.boxes[c]) == sorted(tuple(b) for b in boxes), f"text {c}"
    refined = L.refined_scores(W, coarse, torch.from_numpy(z["cls.logits_attn"]), z["cls.mask_attn_box_mask"], cm.processed)
    assert rel(refined, z["cls.logits_refined"]) <= 1e-6
    assert rel(refined.max(0).values, z["cls.logits_max"]) <= 1e-6


def _plan(case, edge_quirk=True, early_exit=True):
    z = case.arrays
    return C.plan_crops(torch.from_numpy(z["cls.logits_refined"]), torch.from_numpy(z["cls.logits_max"]),
                        case.mode["num_classes"], tuple(case.cls["grid_hw"]), case.mode["thres_abs"], edge_quirk, early_exit)


def test_cwr_decisions_crops_and_fusion_from_stored(model, case):
    from tag2mask.methods.tagclip.encoder import encode_crops, text_softmax

    z, cw = case.arrays, case.cls["cwr"]
    plan = _plan(case)
    assert plan.candidates == cw["candidates"] and plan.threshold == pytest.approx(cw["threshold"], rel=1e-6)
    assert [c for c, _, _ in plan.crops] == [p["cls"] for p in cw["processed"]]
    assert [list(b) for _, b, _ in plan.crops] == [p["box_y1y2x1x2"] for p in cw["processed"]]
    assert [list(b) for b in plan.before_clip] == [p["box_before_clip"] for p in cw["processed"]]
    early = cw["early_return"]
    assert plan.early_return == (None if early is None else early["cls"]) and plan.skipped == cw["skipped"]
    local = torch.from_numpy(z["cls.logits_max"])
    if not plan.crops:
        assert z["cls.crop_probs"].shape[0] == 0 == z["cls.crop_mask14"].shape[0]
        fused = C.fuse(local, torch.zeros(0, local.shape[0]), plan, case.mode["num_classes"], case.mode["cwr_fuse_weight"])
        assert max_abs(fused, z["cls.cwr_scores"]) <= 1e-7
        return
    crops, masks = C.crop_inputs(torch.from_numpy(z["cls.input"]), plan, model.visual.patch_size, case.mode["crop_size"])
    np.testing.assert_array_equal(masks.numpy().astype(np.uint8), z["cls.crop_mask14"])
    c = crops.shape[-1] // 2
    # crop inputs bit-exact (README 6.1), the sums over the whole crops too: numpy's float64 sum of
    # the float32 values (pairwise, independent of the thread count) reproduces the recorded ones exactly
    np.testing.assert_array_equal(crops[:, :, c - 16 : c + 16, c - 16 : c + 16].numpy(), z["cls.crop_input_center"])
    for j, p in enumerate(cw["processed"]):
        whole = L.minmax_no_eps(torch.from_numpy(z["cls.logits_refined"])[:, p["cls"]]) > 0.5
        assert p["mask_pixels"] == int(whole.sum()) >= int(plan.crops[j][2].sum())  # the box may cut the mask
        crop64 = crops[j].numpy().astype(np.float64)
        assert float(crop64.sum()) == p["crop_input_sum"] and float(np.abs(crop64).sum()) == p["crop_input_abs_sum"]
    text = tagger(model, case).text
    probs = text_softmax(encode_crops(model.visual, crops, masks, case.mode["crop_cls_mask_value"]), text, 100.0)
    assert max_abs(probs, z["cls.crop_probs"]) <= case.tol["classification"]["crop_probs"]
    fused = C.fuse(local, torch.from_numpy(z["cls.crop_probs"]), plan, case.mode["num_classes"], case.mode["cwr_fuse_weight"])
    assert max_abs(fused, z["cls.cwr_scores"]) <= 1e-7
    assert [pytest.approx(p["fused_score"], abs=1e-7) for p in cw["processed"]] == [float(fused[p["cls"]]) for p in cw["processed"]]


def test_tags_from_stored_scores(case):
    scores = torch.from_numpy(case.arrays["cls.cwr_scores"])
    tags, fallback = C.tags_from_scores(scores, case.mode["thres_abs"])
    final = case.cls["final"]
    assert tags == final["labels"] and fallback == final["argmax_fallback"]
    assert float(C.relative_threshold(scores, case.mode["thres_abs"])) == pytest.approx(final["threshold"], rel=1e-6)
    assert " ".join([case.name, *map(str, tags)]) == case.cls["label_line"]


# ---------------------------------------------------------------------------------------------- end to end


def test_end_to_end_api(model, case):
    with Image.open(case.path("image")) as im:
        result = tagger(model, case)(im, keep_arrays=True)
    compare_end_to_end(result.arrays, case)
    assert result.tags == case.cls["final"]["labels"]
    assert result.argmax_fallback == case.cls["final"]["argmax_fallback"]
    cw = case.cls["cwr"]
    assert result.info["cwr"]["candidates"] == cw["candidates"] and result.info["cwr"]["skipped"] == cw["skipped"]


def test_corrected_default_leaves_the_tolerance_where_an_official_bug_acts(model, case):
    """Without compat (the default) the clipped box ends and the early exit are fixed: where the fixture
    records one of them acting on CWR, the fused scores leave the tolerance; the encoder is unchanged."""
    cw = case.cls["cwr"]
    bug_acts = cw["early_return"] is not None or any(p["box_y1y2x1x2"] != p["box_before_clip"] for p in cw["processed"])
    with Image.open(case.path("image")) as im:
        fixed = tagger(model, case, compat=False)(im, keep_arrays=True)
    ref = case.cls_arrays()
    assert max_abs(fixed.arrays["image_features"], ref["image_features"]) <= case.tol["classification"]["image_features"]
    assert not tagger(model, case, compat=False).config.quirks.cwr_early_exit
    if bug_acts:
        assert rel(fixed.arrays["cwr_scores"], ref["cwr_scores"]) > case.tol["classification"]["cwr_scores_rel"]
        plan = _plan(case, edge_quirk=False, early_exit=False)
        assert plan.early_return is None and all(b == tuple(pb) for (_, b, _), pb in zip(plan.crops, plan.before_clip))


def _copy_mode_images(tagset, mode, dest: Path) -> list:
    dest.mkdir(parents=True)
    cases = tagset.cases_of(mode)
    for c in cases:  # the official scripts read '<id>.jpg'; the PNG bytes stand for it (README 1)
        shutil.copy(c.path("image"), dest / Path(c.entry["image"]).name)
    return cases


def test_tag_command(tmp_path, set_mode):
    """``tag2mask tag --compat`` writes the official tag file, the official metrics and the arrays."""
    tagset, mode = set_mode
    m = tagset.modes[mode]
    cases = _copy_mode_images(tagset, mode, tmp_path / "img")
    gt = tmp_path / "gt.txt"
    gt.write_text("".join(line + "\n" for line in m["gt_label_lines"]))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tag2mask", "tag", str(tmp_path / "img"), "--classes", tagset.preset_name(mode),
           "--weights", str(TINY_CLIP_PATH), "--device", "cpu", "--compat", "--gt", str(gt), "--save-arrays",
           "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (out / "tagclip.txt").read_text().splitlines() == m["tag_file_lines"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mAP_official"] == pytest.approx(m["mAP"], abs=1e-6)
    names = m["class_names"][: m["num_classes"]]
    assert [metrics["AP"][n] or 0.0 for n in names] == pytest.approx(m["AP"], abs=1e-6)
    for key in ("p", "r", "f1"):
        ref = m["F1"][key]
        assert (metrics["F1_overall_official"][key] is None) if ref is None else \
            metrics["F1_overall_official"][key] == pytest.approx(ref, abs=1e-6)
    with_pos = [a for a, n in zip(m["AP"], names) if metrics["AP"][n] is not None]
    assert metrics["mAP"] == pytest.approx(float(np.mean(with_pos)), abs=1e-6)
    tags = json.loads((out / "tags.json").read_text())
    for c in cases:
        with np.load(out / "arrays" / f"{c.name}.npz") as z:
            compare_end_to_end({k: z[k] for k in z.files}, c)
        assert tags[Path(c.entry["image"]).name] == [names[i] for i in c.cls["final"]["labels"]]
