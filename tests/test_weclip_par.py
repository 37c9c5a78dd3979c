"""PAR against ``tests/data/weclip/par.npz`` (official PAR, 20 iterations, dilations 1..24, float32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tag2mask.refinement.par import PAR, neighbour_offsets, par_refine

FIXTURE = Path(__file__).parent / "data" / "weclip" / "par.npz"
OUT_TOL = 1e-4  # README §4: fp32 official vs float64 <= 1.2e-5


def _cases() -> list[str]:
    with np.load(FIXTURE) as d:
        return sorted(k[: -len("_image")] for k in d.files if k.endswith("_image"))


@pytest.mark.parametrize("case", _cases())
def test_par_matches_fixture(case: str) -> None:
    with np.load(FIXTURE) as d:
        image, masks, out, argmax = (d[f"{case}_{s}"] for s in ("image", "masks", "out", "argmax"))
    with torch.no_grad():
        got = PAR()(torch.from_numpy(image), torch.from_numpy(masks)).numpy()
    assert got.shape == out.shape
    np.testing.assert_allclose(got, out, rtol=0, atol=OUT_TOL)
    np.testing.assert_array_equal(got.argmax(1).astype(np.uint8), argmax)


def test_par_batch_is_independent() -> None:
    """Refining a batch equals refining each image alone."""
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 3, 24, 20, generator=g)
    masks = torch.rand(3, 4, 24, 20, generator=g)
    full = par_refine(img, masks, num_iter=5)
    for i in range(3):
        torch.testing.assert_close(full[i : i + 1], par_refine(img[i : i + 1], masks[i : i + 1], num_iter=5))


def test_neighbour_order() -> None:
    assert neighbour_offsets([2])[:3] == [(-2, -2), (-2, 0), (-2, 2)]
    assert len(neighbour_offsets([1, 2, 4, 8, 12, 24])) == 48
