"""``train segmenter --preset fma``: FMA-WSSS stage 2 (Mask2Former) runs end to end with its recipe.

A tiny Mask2Former (``tiny-swin``) stands in for Swin-L; what is pinned is what the preset decides:
the optimiser groups (backbone lr, head x10, no weight decay on head biases), gradient clipping, the
schedule, and that ``--stop-at`` leaves at the reported iteration of a longer schedule.
"""

from __future__ import annotations

import json

import pytest

from _seg_double import make_dataset
from tag2mask.engine.logs import read_log
from tag2mask.methods.fma.recipe import SEGMENTER_RECIPES as SEGMENTER_PRESETS

pytest.importorskip("transformers")

TINY_M2F = ["backbone=tiny-swin", "num_queries=5", "hidden_dim=32", "decoder_layers=2", "encoder_layers=1"]


def test_fma_preset_trains_mask2former_with_its_recipe_and_stops_at_the_reported_iteration(tmp_path, capsys):
    from tag2mask.cli.main import main
    from tag2mask.runs.layout import read_run_checkpoint

    data = make_dataset(tmp_path / "data", n=4, size=(40, 48))
    out = tmp_path / "run"
    args = ["train", "segmenter", "--preset", "fma", "--data", str(data / "images"), "--masks", str(data / "labels"),
            "--iters", "4", "--stop-at", "2", "--batch-size", "2", "--crop", "64", "--log-every", "1",
            "--val-split", "none", "--out", str(out), "--device", "cpu", "--quiet"]
    for option in TINY_M2F:
        args += ["--model-option", option]
    assert main(args) == 0
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())["config"]
    fma = SEGMENTER_PRESETS["fma"]
    assert config["model"] == "mask2former" and config["max_iters"] == 4
    for key in ("optimizer", "lr", "weight_decay", "head_lr_mult", "max_grad_norm", "poly_power", "min_lr", "scales"):
        assert config[key] == (list(fma[key]) if isinstance(fma[key], tuple) else fma[key]), key
    rows = read_log(out / "train_log.csv")
    assert [r["iteration"] for r in rows] == [1, 2]  # left at --stop-at
    # the learning rate follows the 4-iteration poly schedule, not a 2-iteration one
    assert rows[-1]["lr"] == pytest.approx(fma["lr"] * (1 - 1 / 4) ** fma["poly_power"], rel=1e-4)
    ckpt = read_run_checkpoint(out, task="segmenter")
    assert ckpt["iteration"] == 2
    groups = [(g["initial_lr"], g["weight_decay"]) for g in ckpt["optimizer"]["param_groups"]]
    # backbone; pixel decoder + transformer decoder + classifier at x10; their biases without weight decay
    assert groups == [pytest.approx((1e-5, 0.05)), pytest.approx((1e-4, 0.05)), pytest.approx((1e-4, 0.0))]
