"""FMA-WSSS prompts, image side and GradCAM against the official golden set (tests/data/fma).

Loops over ``index.json``; shapes, class lists, settings and tolerances come from there.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fma_data as D
from tag2mask.methods.fma.losses import cam_activation_loss, multilabel_contrastive_loss
from tag2mask.methods.fma.model import FMAClip, masked_softmax
from tag2mask.methods.fma.prompts import draw_context, seed_from_string

SETTINGS = D.prompt_settings()
IMAGE_CASES = D.cases("image_gradcam")

# the loss each official training config logs as ``multi_cls`` (README 4.2): the classification
# config trains with the contrastive loss, the segmentation config logs a soft-margin loss at weight 0
MULTI_CLS_LOSS = {
    "cls": lambda fg_logits, labels: multilabel_contrastive_loss(fg_logits, labels, "pos_mean"),
    "seg": lambda fg_logits, labels: F.multilabel_soft_margin_loss(fg_logits, labels.float()),
}


# ------------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize("setting", SETTINGS)
def test_prompt_assembly_is_exact(setting):
    z = D.arrays("prompt")
    entry = D.files()["prompt"][setting]
    learner = D.prompt_learner(setting)
    assert seed_from_string(entry["config"]["initialize_seed"]) == entry["config"]["initialize_seed_hash"]
    assert np.array_equal(learner.ctx.detach().numpy(), z[f"{setting}_ctx"])
    assert np.array_equal(learner.token_ids.numpy(), z[f"{setting}_token_ids"].astype(np.int64))
    assert learner.eot_positions.tolist() == entry["eot_index"]
    assert np.array_equal(learner.name_lens.numpy(), z[f"{setting}_name_lens"])
    with torch.no_grad():
        prompts = learner()
    rows = z[f"{setting}_prompt_rows"]
    assert np.array_equal(prompts[rows].numpy(), z[f"{setting}_prompts"])
    # only the context is trainable / saved
    assert [n for n, _ in learner.named_parameters()] == ["ctx"]
    assert list(learner.state_dict()) == ["ctx"]


@pytest.mark.parametrize("setting", SETTINGS)
def test_text_features(setting):
    z = D.arrays("prompt")
    tol = D.files()["prompt"][setting]["tolerance"]["text_features"]["tol_abs"]
    model = D.fma_model(setting)
    with torch.no_grad():
        feats = model.text_features()
    D.assert_close(feats.numpy(), z[f"{setting}_text_features"], tol, f"{setting} text_features")
    sub = torch.tensor([0, model.prompts.num_classes - 1])
    with torch.no_grad():
        part = model.text_features(rows=sub)
    D.assert_close(part.numpy(), feats[sub].numpy(), 1e-6, "subset of rows")


def test_initial_context_of_the_real_run():
    entry = D.files()["prompt"]["init_ctx_16x512"]
    ref = D.arrays("prompt")["init_ctx_16x512"]
    assert seed_from_string(entry["seed"]) == entry["seed_hash"]
    before = torch.random.get_rng_state()
    assert np.array_equal(draw_context(ref.shape, entry["std"], entry["seed"]).numpy(), ref)
    assert torch.equal(torch.random.get_rng_state(), before), "drawing a context must not touch the global RNG"


# --------------------------------------------------------------------------------------- image side


def _run(case, create_graph: bool, vjp_mode: str = "auto"):
    z = D.arrays("image_gradcam")
    c = case["name"]
    model = D.fma_model(case["setting"])
    x = D.normalise(z[f"{c}_img_u8"])
    pad = z.get(f"{c}_padding_mask")
    out = model(x, torch.from_numpy(z[f"{c}_fg_cls_lb"]), None if pad is None else torch.from_numpy(pad),
                create_graph=create_graph, vjp_mode=vjp_mode)
    return model, x, out


@pytest.mark.parametrize("case", IMAGE_CASES, ids=D.case_ids("image_gradcam"))
def test_image_side_and_gradcam(case):
    z = D.arrays("image_gradcam")
    c, tol = case["name"], case["tolerance"]
    _, x, out = _run(case, create_graph=case["mode"] == "train")
    assert hashlib.sha256(x.numpy().tobytes()).hexdigest() == case["img_float32_sha256"]
    assert out.grid == tuple(case["grid_hw"])
    assert np.array_equal(out.pos_pairs.numpy(), z[f"{c}_pos_pairs"])
    for name, value in (("img_emb", out.img_emb), ("logits", out.logits), ("sm_logits", out.sm_logits),
                        ("grad_weights", out.grad_weights)):
        D.assert_close(value.detach().numpy(), z[f"{c}_{name}"], tol[name]["tol_abs"], f"{c} {name}")
    cams = out.pos_cam.detach().numpy()
    assert cams.shape == z[f"{c}_pos_cam"].shape
    for p, pair in enumerate(case["pos_cam_per_pair"]):
        assert list(z[f"{c}_pos_pairs"][p]) == pair["pair"]
        D.assert_close(cams[p], z[f"{c}_pos_cam"][p], pair["tol_abs"], f"{c} pos_cam pair {p}")
    if f"{c}_pos_emb" in z:
        D.assert_close(out.pos_embed.numpy(), z[f"{c}_pos_emb"], tol["pos_emb"]["tol_abs"], f"{c} pos_emb")
    if f"{c}_gcam_avt" in z:  # stored token-major (L, N, C)
        D.assert_close(out.activation.transpose(0, 1).numpy(), z[f"{c}_gcam_avt"], tol["gcam_avt"]["tol_abs"], f"{c} gcam_avt")
    if f"{c}_att_last8_fp32" in z:
        D.assert_close(out.attention.numpy(), z[f"{c}_att_last8_fp32"], tol["att_last8_fp32"]["tol_abs"], f"{c} attention")
    if f"{c}_key_padding_mask" in z:
        assert np.array_equal(out.key_padding.numpy(), z[f"{c}_key_padding_mask"])
    # the official masked softmax is not a softmax over the mask (global max, absolute epsilon)
    logits = out.logits.detach()
    mask = torch.ones_like(logits)
    mask[:, : z[f"{c}_fg_cls_lb"].shape[1]] = torch.from_numpy(z[f"{c}_fg_cls_lb"]).float()
    plain = torch.where(mask > 0, logits, torch.full_like(logits, -torch.inf)).softmax(-1)
    diff = (out.sm_logits.detach() - plain).abs().max().item()
    assert diff == pytest.approx(case["sm_logits_max_abs_diff_vs_plain_softmax_over_mask"], rel=0.05, abs=2e-6)


def test_padding_layout_matches_the_stored_boxes():
    from tag2mask.methods.fma.model import padding_layout

    z = D.arrays("image_gradcam")
    padded = [c for c in IMAGE_CASES if f"{c['name']}_padding_mask" in z]
    assert padded, "the set has a padded case"
    for case in padded:
        c = case["name"]
        layout = padding_layout(torch.from_numpy(z[f"{c}_padding_mask"]), 16)
        assert np.array_equal(layout.boxes.numpy(), z[f"{c}_pad_pos"])
        assert np.array_equal(layout.key_padding.numpy(), z[f"{c}_key_padding_mask"])


@pytest.mark.parametrize("case", [c for c in IMAGE_CASES if c["mode"] == "eval"],
                         ids=[c["name"] for c in IMAGE_CASES if c["mode"] == "eval"])
def test_saved_attention_is_the_float16_cast(case):
    z, caa = D.arrays("image_gradcam"), D.arrays("caa")
    c = case["name"]
    stored = z[f"{c}_att_last8_fp32"]
    _, _, out = _run(case, create_graph=False)
    ours = out.attention.numpy().astype(np.float16)
    for n in range(stored.shape[0]):
        key = f"{c}_img{n}_att"
        if key not in caa:
            continue
        assert np.array_equal(stored[n].astype(np.float16), caa[key])
        # ours differs from the stored float32 mean by float32 noise: at most one fp16 step
        ulp = np.spacing(np.abs(caa[key]).astype(np.float16)).astype(np.float32)
        assert np.all(np.abs(ours[n].astype(np.float32) - caa[key].astype(np.float32)) <= ulp)


TRAIN_CASES = [c for c in IMAGE_CASES if c["mode"] == "train"]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c["name"] for c in TRAIN_CASES])
def test_training_step_losses_and_context_gradient(case):
    z = D.arrays("image_gradcam")
    c = case["name"]
    model, _, out = _run(case, create_graph=True)
    n_fg = model.n_fg
    labels = torch.from_numpy(z[f"{c}_fg_cls_lb"])
    fg, bg = cam_activation_loss(out.pos_cam, out.pos_pairs, torch.from_numpy(z[f"{c}_lb"]))
    multi = MULTI_CLS_LOSS[case["setting"]](out.logits[:, :n_fg], labels)
    w = case["loss_weights"]
    total = w["multi_cls"] * multi + w["cam_lb"][0] * fg + w["cam_lb"][1] * bg
    tl = case["tolerance_losses"]
    for name, value in (("total_loss", total), ("multi_cls", multi), ("cam_lb_fg", fg), ("cam_lb_bg", bg)):
        D.assert_close(value.detach().numpy(), z[f"{c}_loss_{name}"], tl[name]["tol_abs"], f"{c} {name}")
    total.backward()
    grad = model.prompts.ctx.grad
    D.assert_close(grad.numpy(), z[f"{c}_ctx_grad"], case["tolerance"]["ctx_grad"]["tol_abs"], f"{c} ctx_grad")
    if case.get("ctx_grad_nonzero_rows") is not None:
        nonzero = torch.nonzero(grad.flatten(1).abs().sum(1)).flatten().tolist()
        assert nonzero == case["ctx_grad_nonzero_rows"]
    # the frozen CLIP receives no gradient
    assert all(p.grad is None for p in model.clip.parameters())


@pytest.mark.parametrize("case", TRAIN_CASES[:1], ids=[c["name"] for c in TRAIN_CASES[:1]])
def test_batched_and_sequential_vjps_agree_in_training(case):
    grads = {}
    for mode in ("vmap", "loop"):
        model, _, out = _run(case, create_graph=True, vjp_mode=mode)
        (out.pos_cam.square().sum() + out.logits.sum()).backward()
        grads[mode] = (out.grad_weights.detach(), model.prompts.ctx.grad.clone())
    for k in range(2):
        a, b = grads["vmap"][k], grads["loop"][k]
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (k, (a - b).abs().max(), b.abs().max())


def test_masked_softmax_definition():
    logits = torch.tensor([[3.0, 1.0, 0.5, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    e = torch.exp(logits - 3.0) * mask
    assert torch.allclose(masked_softmax(logits, mask), e / (e.sum() + 1e-5))
    # an absent class holding the global maximum gets gradient through the max
    l = logits.clone().requires_grad_(True)
    masked_softmax(l, mask)[0, 1].backward()
    assert l.grad[0, 0] != 0 and l.grad[0, 3] == 0


def test_model_rejects_images_without_positives():
    learner = D.prompt_learner(SETTINGS[0])
    n_fg = D.files()["prompt"][SETTINGS[0]]["n_fg"]
    model = FMAClip(D.fixture_clip(), learner, n_fg=n_fg)
    labels = torch.zeros(2, n_fg, dtype=torch.long)
    labels[0, 0] = 1
    with pytest.raises(ValueError, match="no positive"):
        model(torch.zeros(2, 3, 32, 32), labels)


def test_numerics_are_applied_by_the_method_and_leave_the_callers_clip_alone():
    """FMAClip rounds the weights itself: a plain float32 CLIP and a CLIP loaded with the official
    rounding give the same outputs and context gradients, and the plain CLIP keeps its weights."""
    from tag2mask.clip.loading import load_clip
    from tag2mask.clip.numerics import NUMERICS, weights_are_fp16_exact

    case = TRAIN_CASES[0]
    z = D.arrays("image_gradcam")
    c = case["name"]
    plain = load_clip(D.TINY_CLIP)
    assert not weights_are_fp16_exact(plain)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    results = []
    for clip in (plain, load_clip(D.TINY_CLIP, round_fp16_weights=True)):
        model = D.fma_model(case["setting"], clip)
        assert (model.clip is clip) == (clip is not plain) and not model.numerics.copies_weights
        out = model(D.normalise(z[f"{c}_img_u8"]), torch.from_numpy(z[f"{c}_fg_cls_lb"]), create_graph=True)
        (out.pos_cam.square().sum() + out.logits.sum()).backward()  # backward after the call returned
        results.append((out.logits.detach(), out.pos_cam.detach(), model.prompts.ctx.grad.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    after = plain.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the caller's float32 weights must be kept"
    # float32 numerics (models trained in float32) differ from the official rounding
    model = FMAClip(plain, D.prompt_learner(case["setting"]), n_fg=model.n_fg, numerics=NUMERICS["float32"])
    with torch.no_grad():
        assert not torch.equal(model.text_features(), D.fma_model(case["setting"], plain).text_features())
