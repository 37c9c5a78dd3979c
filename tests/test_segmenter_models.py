"""`tag2mask train segmenter` end to end with real tag2mask.models networks (tiny configurations).

The models package is part of tag2mask: an import error here is a failure, never a skip.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tag2mask.models  # noqa: F401  (our own package: must import)
from _seg_double import CLASSES, make_dataset
from tag2mask.cli.main import main
from tag2mask.runs.layout import read_run_checkpoint
from tag2mask.engine.logs import read_log


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("segdata"), n=4, size=(36, 44))


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "segmenter", "--data", str(data / "images"), "--masks", str(data / "labels"),
                 "--out", str(out), "--device", "cpu", "--quiet", "--batch-size", "2", "--crop", "32",
                 "--log-every", "1", "--ckpt-every", "2", *extra])


DEEPLAB_TINY = ["--preset", "clip-es", "--model-option", "variant=tiny", "--model-option", "aspp_channels=16"]


def test_clip_es_preset_trains_deeplab_evaluates_exports_and_segments(tmp_path, data, capsys):
    from tag2mask.models import load_segmenter

    run = tmp_path / "run"
    assert _train(data, run, *DEEPLAB_TINY, "--iters", "4", "--val-data", str(data / "images"),
                  "--val-masks", str(data / "labels" / "masks")) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert printed["eval"]["miou"] == report["scores"]["Mean IoU"] and report["num_images"] == 4
    ckpt = read_run_checkpoint(run, task="segmenter")
    assert ckpt["config"]["model"] == "deeplab-v2" and ckpt["config"]["lr_step"] == 10
    assert ckpt["meta"]["network"]["name"] == "deeplab-v2"
    model = load_segmenter(run / "model.safetensors")
    assert model.num_classes == len(CLASSES) + 1
    # a run folder is never silently overwritten
    assert _train(data, run, *DEEPLAB_TINY, "--iters", "4") == 2
    assert "--resume" in capsys.readouterr().err
    # segment --checkpoint reads the run
    seg = tmp_path / "seg"
    assert main(["segment", str(data / "images"), "--checkpoint", str(run), "--out", str(seg), "--device", "cpu",
                 "--quiet"]) == 0
    from tag2mask.io.palette import read_label_png

    assert read_label_png(seg / "masks" / "im0.png").shape == (36, 44)
    assert json.loads((seg / "run.json").read_text())["class_names"] == ["background", *CLASSES]


def test_resume_with_a_real_network_is_exact(tmp_path, data):
    straight, part = tmp_path / "straight", tmp_path / "part"
    args = [*DEEPLAB_TINY, "--iters", "4", "--no-eval"]
    assert _train(data, straight, *args) == 0
    assert _train(data, part, *args, "--stop-at", "2") == 0
    assert _train(data, part, *args, "--resume") == 0
    a = read_run_checkpoint(straight, task="segmenter")["modules"]["model"]
    b = read_run_checkpoint(part, task="segmenter")["modules"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_log(straight / "train_log.csv")] == [r["loss"] for r in read_log(part / "train_log.csv")]


def test_weclip_fully_supervised_preset_keeps_the_frozen_clip_out_of_checkpoints(tmp_path, data, tiny_clip_path):
    run = tmp_path / "fs"
    assert _train(data, run, "--preset", "weclip-fs", "--weights", str(tiny_clip_path), "--iters", "2",
                  "--model-option", "embed_dim=16", "--model-option", "depth=1", "--model-option", "heads=2",
                  "--model-option", "compat_numerics=false", "--no-eval") == 0
    ckpt = read_run_checkpoint(run, task="segmenter")
    assert ckpt["config"]["optimizer"] == "adamw" and ckpt["config"]["warmup_iters"] == 50
    assert ckpt["modules"]["model"] and not any(k.startswith("backbone.") for k in ckpt["modules"]["model"])
    rows = read_log(run / "train_log.csv")
    assert [r["iteration"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    seg = tmp_path / "seg"
    assert main(["segment", str(data / "images"), "--checkpoint", str(run), "--out", str(seg), "--device", "cpu",
                 "--quiet"]) == 0
