"""WeCLIP RFM / CAA refinement against ``rfm.npz`` (and stage-wise against ``forward.npz``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tag2mask.localization.affinity import transition_matrix
from tag2mask.methods.weclip.rfm import (
    attention_mass,
    batched_transition_matrix,
    caa_affinity,
    refine_image_cams,
    refine_with_affinity,
    rfm_affinity,
    rfm_keep_from_mass,
    rfm_keep_mask,
)

DATA = Path(__file__).parent / "data" / "weclip"
MAT_TOL = 1e-6  # trans_out, affinities, transition matrices, refined_lowres (rfm.npz)
HIGHRES_TOL = 1e-4
STAGE_TOL = 1e-5  # forward.npz stage-wise: gradcam + affinity -> refined_lowres
BRANCHES = ("caa", "rfm")


@pytest.fixture(scope="module")
def rfm() -> dict[str, np.ndarray]:
    with np.load(DATA / "rfm.npz") as d:
        return {k: d[k] for k in d.files}


def _box_masks(boxes: np.ndarray, k: int, h: int, w: int) -> np.ndarray:
    """Masks from fixture boxes ``[k, x0, y0, x1, y1]`` (end-exclusive)."""
    m = np.zeros((k, h, w), np.float32)
    for c, x0, y0, x1, y1 in boxes:
        m[c, y0:y1, x0:x1] = 1
    return m


def test_trans_out(rfm: dict) -> None:
    got = transition_matrix(torch.from_numpy(rfm["trans_in"]))
    np.testing.assert_allclose(got.numpy(), rfm["trans_out"], rtol=0, atol=MAT_TOL)
    batched = batched_transition_matrix(torch.from_numpy(np.stack([rfm["trans_in"]] * 2)))
    np.testing.assert_allclose(batched[1].numpy(), rfm["trans_out"], rtol=0, atol=MAT_TOL)


def test_keep_mask_exact_and_independent_of_decoder(rfm: dict) -> None:
    maps = torch.from_numpy(rfm["attn_maps"])
    n = rfm["rfm_keep"].shape[0]
    np.testing.assert_allclose(attention_mass(maps, maps.shape[0]).numpy(), rfm["layer_mass"], rtol=1e-6)
    np.testing.assert_array_equal(rfm_keep_mask(maps, n).numpy().astype(np.uint8), rfm["rfm_keep"])
    np.testing.assert_array_equal(rfm_keep_from_mass(rfm["layer_mass"], n).numpy().astype(np.uint8), rfm["rfm_keep"])
    # Batched maps give the same per-image masks.
    batched = rfm_keep_mask(torch.stack([maps, maps]), n)
    np.testing.assert_array_equal(batched[1].numpy().astype(np.uint8), rfm["rfm_keep"])


@pytest.mark.parametrize("branch", BRANCHES)
def test_affinity(rfm: dict, branch: str) -> None:
    maps, a_f = torch.from_numpy(rfm["attn_maps"]), torch.from_numpy(rfm["A_f"])
    n = rfm["rfm_keep"].shape[0]
    got = rfm_affinity(maps, a_f, num_layers=n) if branch == "rfm" else caa_affinity(maps)
    np.testing.assert_allclose(got.numpy(), rfm[f"{branch}_affinity"], rtol=0, atol=MAT_TOL)
    # Batched form.
    got_b = rfm_affinity(torch.stack([maps] * 2), torch.stack([a_f] * 2), n) if branch == "rfm" else caa_affinity(
        torch.stack([maps] * 2)
    )
    np.testing.assert_allclose(got_b[0].numpy(), rfm[f"{branch}_affinity"], rtol=0, atol=MAT_TOL)


@pytest.mark.parametrize("branch", BRANCHES)
def test_refinement_end_to_end(rfm: dict, branch: str) -> None:
    """attn maps (+ A_f) + CAMs → trans, boxes, refined_lowres, refined_highres."""
    cams = rfm["cams"]
    k, h, w = cams.shape
    out = refine_image_cams(
        cams,
        torch.from_numpy(rfm["attn_maps"]),
        torch.from_numpy(rfm["A_f"]),
        use_rfm=branch == "rfm",
        rfm_layers=rfm["rfm_keep"].shape[0],
        out_size=rfm[f"{branch}_refined_highres"].shape[1:],
    )
    np.testing.assert_allclose(out.trans.numpy(), rfm[f"{branch}_trans"], rtol=0, atol=MAT_TOL)
    np.testing.assert_array_equal(out.box_masks.numpy(), _box_masks(rfm[f"{branch}_boxes"], k, h, w))
    np.testing.assert_allclose(out.refined_lowres.numpy(), rfm[f"{branch}_refined_lowres"], rtol=0, atol=MAT_TOL)
    np.testing.assert_allclose(out.refined_highres.numpy(), rfm[f"{branch}_refined_highres"], rtol=0, atol=HIGHRES_TOL)


@pytest.mark.parametrize("branch", BRANCHES)
def test_torch_resize_path(rfm: dict, branch: str) -> None:
    out = refine_image_cams(
        rfm["cams"],
        torch.from_numpy(rfm["attn_maps"]),
        torch.from_numpy(rfm["A_f"]),
        use_rfm=branch == "rfm",
        out_size=rfm[f"{branch}_refined_highres"].shape[1:],
        exact_cv2_resize=False,
    )
    np.testing.assert_allclose(out.refined_highres.numpy(), rfm[f"{branch}_refined_highres"], rtol=0, atol=HIGHRES_TOL)


def _forward_images() -> list[tuple[str, int]]:
    path = DATA / "forward.npz"
    if not path.exists():
        return []
    with np.load(path) as d:
        n = sum(1 for k in d.files if k.startswith("img") and k.endswith("_keys"))
    return [(b, i) for b in BRANCHES for i in range(n)]


@pytest.mark.parametrize("branch,i", _forward_images())
def test_forward_stagewise(branch: str, i: int) -> None:
    """forward.npz: official gradcam + affinity → boxes (exact), refined_lowres (1e-5); mass → keep."""
    with np.load(DATA / "forward.npz") as d:
        cam = d[f"img{i}_gradcam"]
        aff = torch.from_numpy(d[f"{branch}_img{i}_affinity"])
        boxes = d[f"{branch}_img{i}_boxes"]
        low = d[f"{branch}_img{i}_refined_lowres"]
        if branch == "rfm":
            keep = d[f"rfm_img{i}_keep"]
            np.testing.assert_array_equal(
                rfm_keep_from_mass(d[f"img{i}_layer_mass"], keep.shape[0]).numpy().astype(np.uint8), keep
            )
    k, h, w = cam.shape
    out = refine_with_affinity(cam, aff, box_threshold=0.4)
    np.testing.assert_array_equal(out.box_masks.numpy(), _box_masks(boxes, k, h, w))
    np.testing.assert_allclose(out.refined_lowres.numpy(), low, rtol=0, atol=STAGE_TOL)
