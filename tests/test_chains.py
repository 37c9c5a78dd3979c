"""Documented command chains run end to end on the synthetic world (tiny settings, real commands).

Each test runs the commands a user types, in the order the README / docs give them, and checks that
the second command understands what the first one wrote.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tag2mask.cli.main import main

SIZE = 64


@pytest.fixture(autouse=True)
def _text_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A synth export with a train and a val split."""
    root = tmp_path_factory.mktemp("chains") / "S"
    assert main(["synth", "export", "--out", str(root), "--n", "4", "--val", "2", "--size", str(SIZE), "--quiet"]) == 0
    return root


def _last_json(capsys) -> dict:
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_label_crf_then_eval(world, tmp_path, capsys):
    """docs/clip_es.md: `label --refine crf` then `eval MASKS`: the CRF's 255 pixels are not scored, and said so."""
    pytest.importorskip("pydensecrf")
    from tag2mask.io.palette import read_label_png

    labels = tmp_path / "labels"
    assert main(["label", str(world), "--split", "train", "--classes", "synth", "--refine", "crf", "--out",
                 str(labels), "--device", "cpu", "--quiet"]) == 0
    masks = sorted((labels / "masks").glob("*.png"))
    assert masks
    gt_dir = world / "SegmentationClass"
    # 255 where the ground truth would score the pixel (its own 255 outline is ignored anyway)
    not_confident = sum(int(((read_label_png(m) == 255) & (read_label_png(gt_dir / m.name) != 255)).sum())
                        for m in masks)
    capsys.readouterr()
    # the docs' two evaluations, in their order: the CAM seeds, then the CRF pseudo-masks
    assert main(["eval", str(labels / "cams"), "--cams", "--gt", str(world / "SegmentationClass"), "--classes",
                 "synth", "--quiet"]) == 0
    assert 0.0 <= json.loads((labels / "cams" / "eval.json").read_text())["best_miou"] <= 1.0
    capsys.readouterr()
    assert main(["eval", str(labels / "masks"), "--gt", str(world / "SegmentationClass"), "--classes", "synth",
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    report = json.loads((labels / "masks" / "eval.json").read_text())
    assert report["unscored_pred_pixels"] == not_confident
    assert report["pred_pixels"] == sum(read_label_png(m).size for m in masks)
    assert 0.0 <= report["scores"]["Mean IoU"] <= 1.0
    assert not_confident > 0  # the CRF leaves unconfident pixels on these scenes: the case under test
    assert f"{not_confident} of {report['pred_pixels']} predicted pixels" in err
    assert any("not scored" in n for n in report["notes"])


def test_label_then_train_segmenter_clip_es_without_pretrained(world, tmp_path, capsys):
    """README row `train segmenter --preset clip-es --data ROOT --masks SEEDS` without --pretrained: no NaN.

    A random ResNet cannot keep frozen BatchNorm (its statistics mean nothing): the command trains it,
    warns naming --pretrained, and records norm_eval false in the run's config.
    """
    labels = tmp_path / "labels"
    assert main(["label", str(world), "--split", "train", "--classes", "synth", "--refine", "none", "--out",
                 str(labels), "--device", "cpu", "--quiet"]) == 0
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "segmenter", "--preset", "clip-es", "--data", str(world), "--masks", str(labels),
                 "--model-option", "variant=tiny", "--iters", "3", "--batch-size", "2", "--crop", "48",
                 "--out", str(run), "--device", "cpu", "--quiet"]) == 0
    report, err = _last_json(capsys)
    assert report["iterations"] == 3
    assert report["loss"] is not None and math.isfinite(report["loss"])
    assert "--pretrained" in err and "BatchNorm" in err
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["config"]["model_options"]["norm_eval"] is False
    # an explicit --model-option norm_eval is kept as given, without the warning
    from tag2mask.cli.main import build_parser
    from tag2mask.cli.train_segmenter import build_segmenter_config

    args = build_parser().parse_args(["train", "segmenter", "--preset", "clip-es", "--data", str(world), "--masks",
                                      str(labels), "--model-option", "norm_eval=true", "--out", str(run)])
    capsys.readouterr()
    assert build_segmenter_config(args, "voc").model_options["norm_eval"] is True
    assert "--pretrained" not in capsys.readouterr().err


def test_train_weclip_then_segment_then_eval(world, tmp_path, capsys):
    """`train weclip` -> `segment --checkpoint RUN` -> `eval`: eval takes WeCLIP's mIoU rule from the run."""
    from tag2mask.methods.weclip.model import WeCLIPConfig

    run = tmp_path / "run"
    assert main(["train", "weclip", "--data", str(world), "--out", str(run), "--iters", "1", "--batch-size", "1",
                 "--crop", str(SIZE), "--device", "cpu", "--no-compat", "--quiet"]) == 0
    seg = tmp_path / "seg"
    assert main(["segment", str(world / "JPEGImages"), "--checkpoint", str(run), "--out", str(seg), "--device",
                 "cpu", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(seg / "masks"), "--gt", str(world / "SegmentationClass"), "--classes", "synth",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    report = json.loads((seg / "masks" / "eval.json").read_text())
    rule = WeCLIPConfig.__dataclass_fields__["miou_rule"].default
    assert report["miou_rule"] == rule
    assert report["miou_rule_source"] == str((seg / "run.json").resolve())
    assert f"mIoU rule: {rule}" in out


def test_eval_reads_both_forms_of_the_method(tmp_path):
    from tag2mask.cli.eval_cmd import method_miou_rule
    from tag2mask.methods.weclip.model import WeCLIPConfig

    rule = WeCLIPConfig.__dataclass_fields__["miou_rule"].default
    for i, record in enumerate(({"method": "weclip"}, {"settings": {"method": "weclip"}})):
        folder = tmp_path / str(i) / "masks"
        folder.mkdir(parents=True)
        (folder.parent / "run.json").write_text(json.dumps(record))
        assert method_miou_rule(folder) == (rule, str((folder.parent / "run.json").resolve()))


def test_train_segmenter_on_an_export_without_val(tmp_path, capsys):
    """An export without a val split: the command says it validates on the training images, and does."""
    root = tmp_path / "S"
    assert main(["synth", "export", "--out", str(root), "--n", "3", "--size", str(SIZE), "--quiet"]) == 0
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "segmenter", "--data", str(root), "--out", str(run), "--preset", "clip-es",
                 "--model-option", "variant=tiny", "--iters", "1", "--batch-size", "2", "--crop", "32",
                 "--device", "cpu", "--quiet"]) == 0
    _, err = _last_json(capsys)
    assert "no val split" in err and "training images" in err
    evaluated = json.loads((run / "eval" / "eval.json").read_text())
    train_ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert evaluated["num_images"] == len(train_ids)
    assert evaluated["data"].startswith("VOC train") and "None" not in evaluated["data"]
    capsys.readouterr()
    assert main(["train", "segmenter", "--data", str(root), "--out", str(tmp_path / "run2"), "--preset", "clip-es",
                 "--model-option", "variant=tiny", "--iters", "1", "--batch-size", "2", "--crop", "32",
                 "--val-split", "none", "--no-eval", "--device", "cpu", "--quiet"]) == 0
    assert "no val split" not in capsys.readouterr().err
    assert main(["train", "segmenter", "--data", str(root), "--out", str(tmp_path / "run3"), "--preset", "clip-es",
                 "--model-option", "variant=tiny", "--iters", "1", "--batch-size", "2", "--crop", "32",
                 "--no-eval", "--device", "cpu", "--quiet"]) == 0
    assert "no val split" not in capsys.readouterr().err  # nothing is validated: nothing to warn about


def test_train_weclip_warns_when_the_run_ends_in_the_warm_up(tmp_path, capsys):
    from tag2mask.methods.weclip.model import preset

    warmup = preset("synth").warmup_iters
    assert main(["train", "weclip", "--data", "synth", "--synth-n", "2", "--synth-size", str(SIZE), "--out",
                 str(tmp_path / "run"), "--iters", "1", "--batch-size", "1", "--crop", str(SIZE), "--val-split",
                 "none", "--device", "cpu", "--no-compat", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"{warmup}-iteration learning-rate warm-up" in err


def test_eval_without_255_has_no_note(world, tmp_path, capsys):
    """GT copied as prediction: every pixel scored, no note, mIoU 1."""
    import shutil

    pred = tmp_path / "pred"
    shutil.copytree(world / "SegmentationClass", pred)
    from tag2mask.io.palette import read_label_png, save_label_png

    for p in pred.glob("*.png"):
        m = read_label_png(p)
        save_label_png(p, np.where(m == 255, 0, m).astype(np.uint8))
    capsys.readouterr()
    assert main(["eval", str(pred), "--gt", str(world / "SegmentationClass"), "--classes", "synth", "--quiet"]) == 0
    report = json.loads((pred / "eval.json").read_text())
    assert report["unscored_pred_pixels"] == 0 and report["notes"] == [] or all(
        "not scored" not in n for n in report["notes"])
    assert report["scores"]["Mean IoU"] == pytest.approx(1.0)
