"""SAM-based seeding (SAMS) and the level-overlap filter against the official golden set.

Loops over ``tests/data/fma/index.json`` (files ``sams`` and ``rsw``).
"""

from __future__ import annotations

import numpy as np
import pytest

import fma_data as D
from tag2mask.proposals.base import MaskProposals
from tag2mask.proposals.filters import level_overlap_filter, overlap_counts
from tag2mask.proposals.seeding import resize_cams, seed_from_proposals

SAMS = [(c, a) for c in D.cases("sams") for a in c["alphas"]]


@pytest.mark.parametrize("case,alpha", SAMS, ids=[f"{c['name']}-{a}" for c, a in SAMS])
def test_sams_seed_map(case, alpha):
    z = D.arrays("sams")
    c = case["name"]
    cfg = case["alphas"][alpha]
    assert cfg["bg_method"]["method"] == "pow" and cfg["gather_method"] == "mean"
    assert cfg["priority"] == ["level_bigger", "conf_bigger"]
    proposals = MaskProposals(z[f"{c}_masks"], z[f"{c}_levels"], z[f"{c}_areas"])
    assert proposals.image_size == tuple(case["image_hw"])
    result = seed_from_proposals(z[f"{c}_cam"], z[f"{c}_fg_cls"], proposals, cfg["bg_method"]["pow"])
    D.assert_close(result.cam_full, z[f"{c}_cam_full"], case["tolerance_cam_full"]["tol_abs"], "cam_full")
    D.assert_close(result.mask_scores, z[f"{c}_{alpha}_mask_scores"], cfg["tolerance"]["mask_scores"]["tol_abs"], "scores")
    D.assert_close(result.mask_conf, z[f"{c}_{alpha}_mask_conf"], cfg["tolerance"]["mask_conf"]["tol_abs"], "conf")
    assert np.array_equal(result.mask_label, z[f"{c}_{alpha}_mask_seed"])
    assert result.mask_label.tolist() == cfg["mask_seed"]
    assert np.array_equal(result.paint_order, z[f"{c}_{alpha}_paint_order"])
    assert result.paint_order.tolist() == cfg["paint_order"]
    assert np.array_equal(result.seed, z[f"{c}_{alpha}_seed"])
    covered = proposals.masks.any(axis=0)
    assert int((~covered).sum()) == cfg["uncovered_pixels"]
    # exact conf ties are decided by the original index (stable sort)
    for i, j in cfg["same_level_conf_exact_tie_pairs"]:
        order = result.paint_order.tolist()
        assert result.mask_conf[i] == result.mask_conf[j]
        assert (order.index(i) < order.index(j)) == (i < j)


def test_uncovered_pixels_can_be_ignored():
    case = D.cases("sams")[0]
    z = D.arrays("sams")
    c = case["name"]
    proposals = MaskProposals(z[f"{c}_masks"], z[f"{c}_levels"], z[f"{c}_areas"])
    alpha = next(iter(case["alphas"].values()))["bg_method"]["pow"]
    seed = seed_from_proposals(z[f"{c}_cam"], z[f"{c}_fg_cls"], proposals, alpha, uncovered=255).seed
    covered = proposals.masks.any(axis=0)
    assert np.all(seed[~covered] == 255)
    assert np.array_equal(seed[covered], seed_from_proposals(z[f"{c}_cam"], z[f"{c}_fg_cls"], proposals, alpha).seed[covered])


def test_seed_without_proposals_or_cams():
    empty = MaskProposals.empty(6, 7)
    r = seed_from_proposals(np.zeros((2, 3, 3), np.float32), np.array([0, 4]), empty, 0.6)
    assert r.seed.shape == (6, 7) and not r.seed.any()
    one = MaskProposals.from_masks(np.ones((1, 6, 7), bool))
    r = seed_from_proposals(np.zeros((0, 3, 3), np.float32), np.zeros(0, np.int64), one, 0.6)
    assert not r.seed.any() and r.mask_scores.shape == (1, 1)


def test_resize_cams_is_identity_at_the_image_size():
    cams = np.random.default_rng(0).normal(size=(2, 5, 4)).astype(np.float32)
    assert np.array_equal(resize_cams(cams, (5, 4)), cams)


@pytest.mark.parametrize("case", D.cases("rsw"), ids=D.case_ids("rsw"))
def test_level_overlap_filter(case):
    z = D.arrays("rsw")
    c = case["name"]
    proposals = MaskProposals.from_masks(z[f"{c}_masks"], z[f"{c}_levels"])
    assert proposals.areas.tolist() == case["areas"]
    assert proposals.levels.tolist() == case["levels"]
    recall = overlap_counts(proposals.masks, proposals.masks) / proposals.areas[:, None]
    assert np.allclose(recall, np.array(case["recall_matrix_rows_lower_cols_any"]), atol=5e-5)
    kept = level_overlap_filter(proposals, D.files()["rsw"]["config"]["rock_sand_water_thresh"])
    assert np.array_equal(kept, z[f"{c}_kept"])
    assert kept.tolist() == case["kept_in_output_order"]
