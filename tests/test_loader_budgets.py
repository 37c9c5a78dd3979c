"""Budget checks before allocation (issue #30): a tiny crafted file is refused without allocating.

Each loader runs on its crafted file (benchmarks/loader_peak_rss.py builds them) in a subprocess,
which reports its peak RSS over its baseline: the file must be refused with an error naming it, and
the peak must stay far below what the file asks for (hundreds of MB to GBs before the checks).
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

BENCH = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "loader_peak_rss.py"))
#: peak RSS a refused file may add (recipe cases load the tiny CLIP itself; a GB before the checks)
MAX_PEAK_MB = 300


@pytest.mark.parametrize("case", BENCH["CASES"])
def test_crafted_file_is_refused_before_allocating(tmp_path, case):
    path = BENCH["craft"](case, tmp_path, inflate_mb=256)  # zip bombs of 256 MB: over the ratio limit
    result = BENCH["measure"](case, path, 4 << 30)
    outcome = result["outcome"]
    assert outcome != "loaded" and "MemoryError" not in outcome and not outcome.startswith("crashed"), result
    if case not in ("weclip_recipe", "fma_prompt_metadata"):  # recipes are checked as values, not files
        assert path.name in outcome or str(path) in outcome, result  # the error names the file
    assert result["peak_over_baseline_mb"] < MAX_PEAK_MB, result


def test_tensor_storage_check_refuses_stride0_and_overlaps():
    import torch

    from tag2mask.io.budget import BudgetError, check_tensor_storage

    base = torch.zeros(1 << 20)
    check_tensor_storage({"a": base, "b": base[:50]}, "f")  # views inside stored bytes: fine
    with pytest.raises(BudgetError, match="stride-0"):
        check_tensor_storage({"w": torch.zeros(1).expand(1000, 1000)}, "f.pt")
    with pytest.raises(BudgetError, match="overlapping"):
        check_tensor_storage({f"v{i}": base for i in range(3)}, "f.pt")


def test_good_files_still_load(tiny_clip_path, tmp_path):
    """The checks leave real files alone: the shipped CLIP, a torch.save'd state dict, a real CAM npz."""
    import numpy as np
    import torch

    from tag2mask.clip.loading import load_clip
    from tag2mask.evaluation.cam_eval import load_cam_npz
    from tag2mask.proposals.rle_files import read_proposals_json, write_proposals_json

    model = load_clip(tiny_clip_path)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    assert load_clip(tmp_path / "sd.pt").config.describe() == model.config.describe()
    cams = np.random.default_rng(0).random((2, 20, 30)).astype(np.float16)
    np.savez_compressed(tmp_path / "c.npz", cams=cams, keys=np.array([3, 5]))
    got, keys = load_cam_npz(tmp_path / "c.npz")
    assert np.array_equal(got, cams) and keys.tolist() == [3, 5]
    from tag2mask.proposals.base import MaskProposals

    m = np.zeros((1, 8, 9), bool)
    m[0, 2:5, 3:7] = True
    write_proposals_json(tmp_path / "p.json", MaskProposals(m, np.array([0]), np.array([12])))
    assert read_proposals_json(tmp_path / "p.json", image_size=(8, 9)).masks.sum() == 12
