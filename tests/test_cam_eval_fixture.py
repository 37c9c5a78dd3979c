"""The CLIP-ES seed evaluation reproduces the official numbers stored in tests/data/clip_es.

See tests/data/clip_es/README.md section 4.10: bg = (1 - max) ** p in float16, float16
scores, first-index argmax; labels must match exactly and mIoU to 1e-12.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tag2mask.evaluation.cam_eval import cam_to_label, evaluate_cams, load_cam_npz

DATA = Path(__file__).parent / "data" / "clip_es"
INDEX = json.loads((DATA / "index.json").read_text())
IMAGES = INDEX["images"]


def _load(entry: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    z = np.load(DATA / entry["arrays"])
    gt = np.array(Image.open(DATA / entry["gt"]))
    return z["attn_highres"], z["keys"], gt, z


@pytest.mark.parametrize("entry", IMAGES, ids=[e["name"] for e in IMAGES])
@pytest.mark.parametrize("p", [1, 2])
def test_labels_exact(entry: dict, p: int) -> None:
    cams, keys, _, z = _load(entry)
    assert cams.dtype == np.float16
    pred = cam_to_label(cams, keys, bg_power=p)
    assert pred.dtype == np.uint8
    np.testing.assert_array_equal(pred, z[f"evalcam_pred_p{p}"])


def test_fp32_background_would_differ() -> None:
    # guards the float16 rule: the fixture records pixels that change if bg is computed in fp32
    entry = max(IMAGES, key=lambda e: e["diagnostics"]["evalcam_pred_diff_if_bg_in_fp32_p2"])
    cams, keys, _, z = _load(entry)
    wrong = cam_to_label(cams.astype(np.float32), keys, bg_power=2)
    n = int((wrong != z["evalcam_pred_p2"]).sum())
    assert n > 0


def _compare(ours: dict, ref: dict) -> None:
    for k in ("Mean IoU", "Pixel Accuracy", "Mean Accuracy", "Frequency Weighted IoU"):
        assert ours[k] == pytest.approx(ref[k], abs=1e-12), k
    ref_iou = [ref["Class IoU"][str(i)] for i in range(len(ref["Class IoU"]))]
    assert len(ours["Class IoU"]) == len(ref_iou)
    for a, b in zip(ours["Class IoU"], ref_iou):
        if b is None:
            assert a is None
        else:
            assert a == pytest.approx(b, abs=1e-12)


def test_eval_cam_scores_match_official() -> None:
    items = (_load(e)[:3] for e in IMAGES)  # generator: streamed once
    res = evaluate_cams(items, num_classes=21, powers=(1, 2), names=[e["name"] for e in IMAGES])
    ref = INDEX["eval_cam"]
    _compare(res["p=1"], ref["p=1"])
    _compare(res["p=2"], ref["p=2"])
    assert res["best_p"] == ref["best_p"]
    assert res["best_miou"] == pytest.approx(ref["best_miou"], abs=1e-12)
    assert res["num_images"] == len(IMAGES)


def test_load_cam_npz_accepts_fixture_and_label_format(tmp_path: Path) -> None:
    cams, keys = load_cam_npz(DATA / IMAGES[0]["arrays"])
    assert cams.dtype == np.float16 and keys.shape == (cams.shape[0],)
    np.savez(tmp_path / "x.npz", keys=keys, cams=cams)
    c2, k2 = load_cam_npz(tmp_path / "x.npz")
    np.testing.assert_array_equal(c2, cams)
    np.savez(tmp_path / "bad.npz", foo=keys)
    with pytest.raises(ValueError, match="bad.npz.*keys"):
        load_cam_npz(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        load_cam_npz(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="gone.npz"):
        load_cam_npz(tmp_path / "gone.npz")


def test_ties_first_wins_and_threshold_mode() -> None:
    cams = np.array([[[0.5, 0.25]], [[0.5, 0.75]]], dtype=np.float16)  # (2, 1, 2)
    keys = np.array([3, 7])
    # pixel 0: max 0.5, bg = 0.5 -> tie of all three -> background
    np.testing.assert_array_equal(cam_to_label(cams, keys, bg_power=1), [[0, 8]])
    np.testing.assert_array_equal(cam_to_label(cams, keys, threshold=0.4), [[4, 8]])
    # equal settings: the first one is kept as best
    gt = np.array([[4, 8]], dtype=np.uint8)
    res = evaluate_cams([(cams, keys, gt)], num_classes=21, thresholds=(0.3, 0.4, 0.45))
    assert res["best"] == "t=0.3" and res["best_threshold"] == 0.3
    assert cam_to_label(np.zeros((0, 2, 3), np.float16), np.zeros(0, int)).tolist() == [[0] * 3] * 2
