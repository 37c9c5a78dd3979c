"""Run folders written before the #24 layout still load: ``segment --checkpoint`` gives the same outputs.

The runs, images and expected outputs are listed in ``tests/data/runs_v0/index.json`` (how they were
made: ``tests/data/runs_v0/README.md``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tag2mask.cli.main import main

ROOT = Path(__file__).parent / "data" / "runs_v0"
RUNS = json.loads((ROOT / "index.json").read_text())["runs"]


@pytest.mark.parametrize("case", RUNS, ids=[r["run"] for r in RUNS])
def test_old_run_folder_segments_as_before(case, tmp_path):
    from tag2mask.clip.shipped import SHIPPED_WEIGHTS
    from tag2mask.io.palette import read_label_png

    out = tmp_path / "seg"
    args = ["segment", str(ROOT / case["images"]), "--checkpoint", str(ROOT / case["run"]), "--out", str(out),
            "--device", "cpu", "--quiet", "--save-logits"]
    if case["clip_weights"] == "shipped":
        args += ["--weights", str(SHIPPED_WEIGHTS)]
    assert main(args) == 0
    expected = ROOT / case["expected"]
    masks = sorted((expected / "masks").glob("*.png"))
    assert masks, expected
    for mask in masks:
        np.testing.assert_array_equal(read_label_png(out / "masks" / mask.name), read_label_png(mask))
        want = np.load(expected / "logits" / f"{mask.stem}.npz")
        got = np.load(out / "logits" / f"{mask.stem}.npz")
        assert list(got["class_names"]) == list(want["class_names"])
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-6)
