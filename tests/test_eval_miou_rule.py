"""``tag2mask eval --miou-rule``: the rule is chosen (explicitly or from the run that wrote PRED) and reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tag2mask.cli.main import main
from tag2mask.io.palette import save_label_png


def _folders(tmp: Path) -> tuple[Path, Path, Path]:
    """One image: GT has classes 1 and 2, the prediction adds class 3 (never in GT)."""
    pred, gt, images = tmp / "run" / "masks", tmp / "gt", tmp / "images"
    for d in (pred, gt, images):
        d.mkdir(parents=True)
    g = np.zeros((4, 6), np.uint8)
    g[:, 2:4], g[:, 4:] = 1, 2
    p = g.copy()
    p[0, 0] = 3
    save_label_png(gt / "a.png", g)
    save_label_png(pred / "a.png", p)
    Image.new("RGB", (6, 4)).save(images / "a.png")
    return pred, gt, images


def _eval(pred: Path, gt: Path, *extra: str) -> dict:
    assert main(["eval", str(pred), "--gt", str(gt), "--classes", "voc", "--quiet", *extra]) == 0
    return json.loads((pred / "eval.json").read_text())


def test_rule_option_auto_from_run_record_and_reports(tmp_path: Path, capsys):
    pred, gt, images = _folders(tmp_path)
    default = _eval(pred, gt)
    assert default["miou_rule"] == "gt_or_pred" and default["miou_rule_source"] == "default"
    gt_only = _eval(pred, gt, "--miou-rule", "gt")
    assert gt_only["miou_rule"] == "gt" and gt_only["scores"]["Mean IoU"] > default["scores"]["Mean IoU"]
    assert "mIoU rule: gt (" in capsys.readouterr().out
    # a WeCLIP run folder (segment --checkpoint writes method 'weclip') -> WeCLIP's rule
    (pred.parent / "run.json").write_text(json.dumps({"method": "weclip"}))
    auto = _eval(pred, gt)
    assert auto["miou_rule"] == "gt" and auto["miou_rule_source"].endswith("run.json")
    # a CLIP-ES label run records its preset's rule
    (pred.parent / "run.json").write_text(json.dumps({"command": "label", "miou_rule": "gt_or_pred"}))
    assert _eval(pred, gt)["miou_rule"] == "gt_or_pred"
    html = tmp_path / "html"
    _eval(pred, gt, "--miou-rule", "gt", "--html", str(html), "--images", str(images))
    assert "mIoU rule" in (html / "index.html").read_text() and "gt: mean over classes present in the ground truth" in (
        html / "index.html").read_text()


def test_cams_mode_reports_the_rule(tmp_path: Path):
    pred, gt, _ = _folders(tmp_path)
    cams = tmp_path / "cams"
    cams.mkdir()
    c = np.zeros((2, 4, 6), np.float16)
    c[0, :, 2:4], c[1, :, 4:] = 0.9, 0.8
    np.savez(cams / "a.npz", keys=np.array([0, 1]), cams=c)
    assert main(["eval", str(cams), "--cams", "--gt", str(gt), "--classes", "voc", "--quiet", "--miou-rule", "gt"]) == 0
    report = json.loads((cams / "eval.json").read_text())
    assert report["miou_rule"] == "gt" and all(s["miou_rule"] == "gt" for s in report["settings"].values())
    with pytest.raises(SystemExit):
        main(["eval", str(cams), "--cams", "--gt", str(gt), "--miou-rule", "best"])
