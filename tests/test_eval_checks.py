"""`tag2mask eval` accepts --classes like the other commands and says when the scores may mislead:
part of the ground truth without predictions, or a class list that does not fit the data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tag2mask.cli.main import main
from tag2mask.io.palette import read_label_png, save_label_png

TOY = "the tiny CLIP shipped with tag2mask knows only the synthetic shapes world"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "S"
    assert main(["synth", "export", "--out", str(root), "--n", "3", "--val", "2", "--size", "48", "--quiet"]) == 0
    return root


def _predictions(export: Path, folder: Path, split: str = "train", run_record: dict | None = None) -> Path:
    """Perfect predictions (copies of the GT) for one split, optionally with a run.json beside them."""
    masks = folder / "masks"
    masks.mkdir(parents=True)
    for name in (export / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split():
        shutil.copy(export / "SegmentationClass" / f"{name}.png", masks / f"{name}.png")
    if run_record is not None:
        (folder / "run.json").write_text(json.dumps(run_record))
    return masks


def test_eval_synth_classes_and_coverage_note(export, tmp_path, capsys):
    masks = _predictions(export, tmp_path / "run")
    out = tmp_path / "eval.json"
    assert main(["eval", str(masks), "--gt", str(export / "SegmentationClass"), "--classes", "synth", "--quiet",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    report = json.loads(out.read_text())
    assert report["class_names"][1:4] == ["star", "ring", "cross"] and len(report["class_names"]) == 13
    assert report["scores"]["Mean IoU"] == pytest.approx(1.0)
    assert report["warnings"] == []
    # 3 train predictions against a GT folder holding train + val: said on stderr and in the report
    (note,) = report["notes"]
    assert "3 predictions were scored" in note and "5 masks" in note and "2 images have no prediction" in note
    assert f"note: {note}" in captured.err


def test_eval_inline_classes(export, tmp_path):
    from tag2mask.synth.world import OBJECT_NAMES

    masks = _predictions(export, tmp_path / "run")
    out = tmp_path / "e.json"
    assert main(["eval", str(masks), "--gt", str(export / "SegmentationClass"), "--classes", ", ".join(OBJECT_NAMES),
                 "--quiet", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["class_names"] == ["background", *OBJECT_NAMES]


def test_wrong_class_list_is_named(export, tmp_path, capsys):
    masks = _predictions(export, tmp_path / "run")
    out = tmp_path / "e.json"
    # VOC names on synthetic data: classes.txt beside the GT says otherwise
    assert main(["eval", str(masks), "--gt", str(export / "SegmentationClass"), "--quiet", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    warnings = json.loads(out.read_text())["warnings"]
    assert any("classes.txt lists 12 classes" in w and "--classes synth" in w for w in warnings)
    assert "warning: " in err
    # too few classes: GT values without a name are not scored -- said, not silent
    assert main(["eval", str(masks), "--gt", str(export / "SegmentationClass"), "--classes", "star, ring",
                 "--quiet", "--out", str(out)]) == 0
    warnings = json.loads(out.read_text())["warnings"]
    gt_values = set()
    for p in masks.iterdir():
        gt_values.update(int(v) for v in np.unique(read_label_png(p)) if v != 255)
    beyond = sorted(v for v in gt_values if v >= 3)
    assert beyond and any(f"label values {', '.join(map(str, beyond))}" in w and "not scored" in w for w in warnings)


@pytest.mark.parametrize("record", [
    {"classes": ["cat", "dog"]},                                     # tag2mask label: value k + 1 = classes[k]
    {"label_values": {"background": 0, "cat": 1, "dog": 2}},         # tag2mask segment
])
def test_predictions_run_with_other_classes(tmp_path, capsys, record):
    gt, pred = tmp_path / "gt", tmp_path / "run" / "masks"
    lab = np.zeros((8, 8), np.uint8)
    lab[2:5, 2:5] = 1
    save_label_png(gt / "a.png", lab)
    save_label_png(pred / "a.png", lab)
    (tmp_path / "run" / "run.json").write_text(json.dumps(record))
    out = tmp_path / "e.json"
    assert main(["eval", str(pred), "--gt", str(gt), "--classes", "voc", "--quiet", "--out", str(out)]) == 0
    (warning,) = json.loads(out.read_text())["warnings"]
    assert "label value 1 for 'cat'" in warning and "'aeroplane'" in warning
    assert main(["eval", str(pred), "--gt", str(gt), "--classes", "cat, dog", "--quiet", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["warnings"] == []


def test_eval_html_carries_the_runs_warnings(export, tmp_path):
    masks = _predictions(export, tmp_path / "run", split="val", run_record={"classes": [], "warnings": [TOY + "."]})
    html = tmp_path / "report"
    out = tmp_path / "e.json"
    assert main(["eval", str(masks), "--gt", str(export / "SegmentationClass"), "--classes", "synth", "--quiet",
                 "--out", str(out), "--html", str(html), "--images", str(export / "JPEGImages")]) == 0
    page = (html / "index.html").read_text()
    assert TOY in page and "class='note warning'" in page
    assert "2 predictions were scored" in page  # the coverage note is on the page too
    names = (export / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    for name in names:  # one grid row per image: input, prediction, ground truth
        assert page.count(f"<b>{name}</b>") == 1
        assert (html / "overlays" / f"{name}.png").is_file() and (html / "gt_overlays" / f"{name}.png").is_file()
    assert "<svg" in page and json.loads(out.read_text())["warnings"] == [TOY + "."]
