"""FMA-WSSS losses, learning-rate schedule and CAA against the official golden set (tests/data/fma).

Stage-isolated: each test feeds the stored inputs of its stage. Loops over ``index.json``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fma_data as D
from tag2mask.localization.affinity import transition_matrix
from tag2mask.localization.boxes import cam_box_mask, cam_box_masks
from tag2mask.methods.fma.config import CAASettings, caa_refine, cam_score
from tag2mask.methods.fma.losses import REDUCTIONS, cam_activation_loss, multilabel_contrastive_loss
from tag2mask.engine.schedules.cosine import WarmupCosineSchedule, warmup_cosine_lr

# ------------------------------------------------------------------------------ contrastive loss


@pytest.mark.parametrize("case", D.cases("cl_loss"), ids=D.case_ids("cl_loss"))
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_contrastive_loss(case, reduce):
    z = D.arrays("cl_loss")
    c = case["name"]
    scores = torch.from_numpy(z[f"{c}_S"]).requires_grad_(True)
    labels = torch.from_numpy(z[f"{c}_cls_lb"])
    loss = multilabel_contrastive_loss(scores, labels, reduce)
    loss.backward()
    entry = case[reduce]
    tol = entry.get("tolerance", {})
    ref_loss, ref_grad = z[f"{c}_{reduce}_loss"], z[f"{c}_{reduce}_grad"]
    D.assert_close(loss.detach().numpy(), ref_loss, tol.get("loss", {}).get("tol_abs", D.default_tol(ref_loss)), f"{c} loss")
    D.assert_close(scores.grad.numpy(), ref_grad, tol.get("grad", {}).get("tol_abs", D.default_tol(ref_grad)), f"{c} grad")
    if entry.get("loss_is_nan"):
        assert torch.isnan(loss)
        assert int(torch.isnan(scores.grad).sum()) == entry["grad_nan_count"]
    valid = [bool(v) for v in case["valid_rows"]]
    if not any(valid):
        assert loss.item() == 0.0 and not scores.grad.any()


def test_contrastive_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="reduce"):
        multilabel_contrastive_loss(torch.zeros(1, 3), torch.zeros(1, 3), "sum")
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        multilabel_contrastive_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# -------------------------------------------------------------------------------- CAM loss


@pytest.mark.parametrize("case", D.cases("cam_loss"), ids=D.case_ids("cam_loss"))
def test_cam_activation_loss(case):
    z = D.arrays("cam_loss")
    c, tol = case["name"], case["tolerance"]
    cams = torch.from_numpy(z[f"{c}_pos_cam"]).requires_grad_(True)
    pairs = torch.nonzero(torch.from_numpy(z[f"{c}_fg_cls_lb"]))
    assert pairs.tolist() == case["pairs"]
    seeds = torch.from_numpy(z[f"{c}_lb"])
    fg, bg = cam_activation_loss(cams, pairs, seeds)
    (grad_fg,) = torch.autograd.grad(fg, cams, retain_graph=True)
    (grad_bg,) = torch.autograd.grad(bg, cams)
    D.assert_close(fg.detach().numpy(), z[f"{c}_fg_loss"], tol["fg_loss"]["tol_abs"], f"{c} fg")
    D.assert_close(bg.detach().numpy(), z[f"{c}_bg_loss"], tol["bg_loss"]["tol_abs"], f"{c} bg")
    D.assert_close(grad_fg.numpy(), z[f"{c}_grad_fg"], tol["grad_fg"]["tol_abs"], f"{c} grad_fg")
    D.assert_close(grad_bg.numpy(), z[f"{c}_grad_bg"], tol["grad_bg"]["tol_abs"], f"{c} grad_bg")
    # pixel counts per pair, as index.json lists them
    seed = seeds[pairs[:, 0]].long()
    own = seed == (pairs[:, 1] + 1)[:, None, None]
    other = ~own & (seed != 255)
    assert own.flatten(1).sum(1).tolist() == case["fg_pixels"]
    assert other.flatten(1).sum(1).tolist() == case["bg_pixels"]


# --------------------------------------------------------------------------- learning rate


@pytest.mark.parametrize("case", D.cases("lr_schedule"), ids=D.case_ids("lr_schedule"))
def test_warmup_cosine_schedule(case):
    z = D.arrays("lr_schedule")
    k = case["name"]
    warm, main = case["warm"], case["main"]
    assert warm["start_factor"] == warm["end_factor"], "the official warm-up is flat"
    assert main["T_max"] == case["max_iter"] - warm["warm_iters"]
    sched = WarmupCosineSchedule(base_lr=case["base_lr"], max_iters=case["max_iter"], warmup_iters=warm["warm_iters"],
                                 warmup_factor=warm["start_factor"], eta_min=main["eta_min"])
    iters, ref = z[f"{k}_iter"], z[f"{k}_lr"]
    ours = np.array([sched.lr(int(t)) for t in iters])
    rel = np.abs(ours - ref) / np.abs(ref)
    assert rel.max() <= case["tolerance"]["rel"], rel.max()
    assert ours[0] == pytest.approx(case["lr_first"], rel=1e-12)
    assert ours[-1] == pytest.approx(case["lr_last"], rel=1e-9) and ours[-1] > 0
    w = warm["warm_iters"]
    assert sched.lr(w) == case["lr_at_warm_end"] and sched.lr(w - 1) == pytest.approx(case["lr_at_warm_end_minus_1"])
    # apply() sets every group of an SGD optimiser as the official run does
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=case["base_lr"], momentum=case["momentum"],
                          weight_decay=case["weight_decay"])
    assert sched.apply(opt, w + 1) == pytest.approx(case["lr_at_warm_end_plus_1"], rel=1e-12)
    assert opt.param_groups[0]["lr"] == sched.lr(w + 1)


def test_warmup_cosine_arguments():
    with pytest.raises(ValueError):
        warmup_cosine_lr(-1, base_lr=1.0, max_iters=10)
    with pytest.raises(ValueError):
        warmup_cosine_lr(0, base_lr=1.0, max_iters=10, warmup_iters=10)
    assert warmup_cosine_lr(0, base_lr=2.0, max_iters=10) == 2.0


# ------------------------------------------------------------------------------------------ CAA


def _caa_inputs(case):
    z = D.arrays("caa")
    i = case["name"]
    return z, i, torch.from_numpy(z[f"{i}_att"]).float(), torch.from_numpy(z[f"{i}_cam"])


@pytest.mark.parametrize("case", D.cases("caa"), ids=D.case_ids("caa"))
def test_caa_score_and_affinity(case):
    z, i, att, cam = _caa_inputs(case)
    tol = case["tolerance"]
    D.assert_close(cam_score(cam).numpy(), z[f"{i}_score"], tol["score"]["tol_abs"], f"{i} score")
    D.assert_close(transition_matrix(att, rounds=1, power=1).numpy(), z[f"{i}_aff_n1"], tol["aff_n1"]["tol_abs"], "aff_n1")
    D.assert_close(transition_matrix(att, rounds=1, power=2).numpy(), z[f"{i}_aff_n1_pow2"],
                   tol["aff_n1_pow2"]["tol_abs"], "aff_n1_pow2")


CAA_CONFIGS = [(c, k) for c in D.cases("caa") for k in c["configs"]]


@pytest.mark.parametrize("case,config", CAA_CONFIGS, ids=[f"{c['name']}-{k}" for c, k in CAA_CONFIGS])
def test_caa_boxes_and_refinement(case, config):
    z, i, att, cam = _caa_inputs(case)
    cfg = case["configs"][config]
    assert cfg["to_in_bbox"] == cfg["to_out_bbox"] == "in_bbox"
    settings = CAASettings(rounds=cfg["n_iter"], power=cfg["n_iters"], threshold=cfg["thresh"], refine=cfg["aff_at"])
    score = cam_score(cam)
    masks = cam_box_masks(score, settings.threshold)
    assert np.array_equal(masks.numpy().astype(np.uint8), z[f"{i}_{config}_col_mask"])
    for p in range(score.shape[0]):
        _, boxes = cam_box_mask(score[p], settings.threshold)
        assert sorted(boxes) == sorted(tuple(b) for b in cfg["boxes_x0y0x1y1"][p]), f"map {p}"
        s255 = int((score[p].numpy() * np.float32(255)).astype(np.uint8).max())
        assert s255 == cfg["score_uint8_max"][p]
        assert int(settings.threshold * s255) == cfg["thr_uint8"][p]
    out = caa_refine(att, cam, settings)
    D.assert_close(out.numpy(), z[f"{i}_{config}_out"], cfg["tolerance"]["tol_abs"], f"{i} {config} out")


def test_caa_settings_validate():
    with pytest.raises(ValueError, match="refine"):
        CAASettings(refine="both")


def test_caa_runs_through_the_shared_cam_pipeline(monkeypatch):
    """config.py only chooses settings: the refinement is the CAM pipeline's, with FMA's mapping."""
    import tag2mask.methods.fma.config as fma_config
    from tag2mask.localization import cam_pipeline

    calls = []

    def spy(cams, affinity, settings):
        calls.append(settings)
        return cam_pipeline.refine_with_affinity(cams, affinity, settings)

    monkeypatch.setattr(fma_config, "refine_with_affinity", spy)
    case = D.cases("caa")[0]
    z, i, att, cam = _caa_inputs(case)
    for name, cfg in case["configs"].items():
        settings = CAASettings(rounds=cfg["n_iter"], power=cfg["n_iters"], threshold=cfg["thresh"], refine=cfg["aff_at"])
        out = caa_refine(att, cam, settings)
        D.assert_close(out.numpy(), z[f"{i}_{name}_out"], cfg["tolerance"]["tol_abs"], f"{i} {name} out")
        s = calls[-1]
        assert (s.sinkhorn_rounds, s.affinity_power, s.box_threshold, s.propagate) == \
            (cfg["n_iter"], cfg["n_iters"], cfg["thresh"], cfg["aff_at"])
        assert s.score == "clamp_minmax" and s.attention_dtype == "float16" and s.box_edge_quirk
    assert len(calls) == len(case["configs"])
