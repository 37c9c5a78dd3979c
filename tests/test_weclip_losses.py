"""WeCLIP losses against ``tests/data/weclip/aff_loss.npz`` (official radius mask, affinity label/loss, balanced CE)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tag2mask.methods.weclip.losses import (
    affinity_loss,
    balanced_ce_loss,
    balanced_ce_terms,
    cams_to_affinity_label,
    radius_window_mask,
    weclip_total_loss,
)

FIXTURE = Path(__file__).parent / "data" / "weclip" / "aff_loss.npz"
LOSS_TOL = 1e-5  # README §4: fp32 vs float64 <= 5.4e-7


def _cases() -> list[str]:
    with np.load(FIXTURE) as d:
        return sorted({k[: -len("_label")] for k in d.files if k.endswith("_label") and not k.endswith("aff_label")})


CASES = _cases()


def _load(case: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as d:
        return {k[len(case) + 1 :]: d[k] for k in d.files if k.startswith(case + "_")}


def _close_or_nan(got: torch.Tensor, want: np.ndarray) -> None:
    g = float(got)
    w = float(want)
    if np.isnan(w):
        assert np.isnan(g), f"expected NaN, got {g}"
    else:
        assert abs(g - w) <= LOSS_TOL, (g, w)


@pytest.mark.parametrize("case", CASES)
def test_radius_mask_exact(case: str) -> None:
    d = _load(case)
    h, w = d["label"].shape[1] // 16, d["label"].shape[2] // 16
    got = radius_window_mask(h, w, radius=8)
    np.testing.assert_array_equal(got.numpy().astype(np.uint8), d["radius_mask"])


@pytest.mark.parametrize("case", CASES)
def test_affinity_label_and_counts_exact(case: str) -> None:
    d = _load(case)
    label = torch.from_numpy(d["label"].astype(np.int64))
    mask = torch.from_numpy(d["radius_mask"]).bool()
    aff = cams_to_affinity_label(label, mask=mask, ignore_index=255)
    np.testing.assert_array_equal(aff.numpy(), d["aff_label"].astype(np.int64))
    _, pos, neg = affinity_loss(torch.from_numpy(d["attn_pred"].astype(np.float32)), aff)
    assert int(pos) == int(d["pos_count"]) and int(neg) == int(d["neg_count"])


@pytest.mark.parametrize("case", CASES)
def test_losses_match(case: str) -> None:
    d = _load(case)
    label = torch.from_numpy(d["label"].astype(np.int64))
    logits = torch.from_numpy(d["seg_logits"])
    attn = torch.from_numpy(d["attn_pred"].astype(np.float32))
    aff = torch.from_numpy(d["aff_label"].astype(np.int64))

    attn_loss, _, _ = affinity_loss(attn, aff)
    _close_or_nan(attn_loss, d["attn_loss"])
    _close_or_nan(balanced_ce_loss(logits, label), d["seg_loss"])

    up = torch.nn.functional.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    ce_bg, ce_fg = balanced_ce_terms(up, label)
    _close_or_nan(ce_bg, d["ce_bg"])
    _close_or_nan(ce_fg, d["ce_fg"])

    total = weclip_total_loss(logits, attn, label)  # builds the radius-8 mask itself
    _close_or_nan(total.total, d["total_loss"])
    _close_or_nan(total.aff, d["attn_loss"])
    assert int(total.pos_count) == int(d["pos_count"])


def test_nan_without_foreground_is_kept() -> None:
    assert "nofg" in CASES
    d = _load("nofg")
    assert np.isnan(d["seg_loss"])
    loss = balanced_ce_loss(torch.from_numpy(d["seg_logits"]), torch.from_numpy(d["label"].astype(np.int64)))
    assert torch.isnan(loss)


def test_affinity_label_ignores_pairs_with_ignored_cells() -> None:
    label = torch.zeros(1, 32, 48, dtype=torch.long)
    label[0, :16, :16] = 255  # cell 0 ignored
    label[0, 16:, 32:] = 3
    aff = cams_to_affinity_label(label, mask=radius_window_mask(2, 3, radius=1))
    assert (aff[0, 0] == 255).all() and (aff[0, :, 0] == 255).all()
    assert aff[0, 1, 5] == 0 and aff[0, 1, 2] == 1
    assert aff[0, 2, 3] == 255  # |Δcol| = 2 > radius
