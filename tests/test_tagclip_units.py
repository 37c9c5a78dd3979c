"""TagCLIP pieces on hand-made inputs: metrics, tag files, block indices, the corrected bugs, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tag2mask.methods.tagclip import cwr as C
from tag2mask.methods.tagclip import local as L
from tag2mask.methods.tagclip.metrics import average_precision, classification_metrics, overall_f1
from tag2mask.methods.tagclip.presets import coco_stuff_182_to_171, preset_for, COCO_STUFF_CLASSES
from tag2mask.methods.tagclip.tagfile import gt_matrix, read_tag_lines, write_tag_lines
from tag2mask.methods.tagclip.tagger import resolve_layers


def test_official_and_corrected_map():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.1], [0.6, 0.7, 0.2]], dtype=np.float32)
    gt = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0]])  # class 2 has no positive
    ap, has_pos = average_precision(scores, gt)
    assert list(has_pos) == [True, True, False]
    assert ap[0] == pytest.approx(1.0) and ap[1] == pytest.approx(1.0) and ap[2] == 0.0
    m = classification_metrics(scores, gt, 0.5, ["a", "b", "c"])
    assert m["mAP"] == pytest.approx(1.0) and m["mAP_official"] == pytest.approx(2 / 3)
    assert m["AP"]["c"] is None and m["classes_with_positives"] == 2
    # ranking: positive of class 0 second -> AP 1/2
    ap, _ = average_precision(np.array([[0.1], [0.9]], np.float32), np.array([[1], [0]]))
    assert ap[0] == pytest.approx(0.5)


def test_overall_f1_relative_threshold_and_nan():
    scores = np.array([[0.9, 0.1, 0.4], [0.2, 0.8, 0.1]], dtype=np.float32)
    gt = np.array([[1, 0, 1], [0, 0, 1]])
    f = overall_f1(scores, gt, 0.5)  # predicted: {0} (0.4 is below 0.5) and {1}
    assert f["p"] == pytest.approx(0.5) and f["r"] == pytest.approx(1 / 3)
    assert f["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    none = overall_f1(scores, np.array([[0, 1, 0], [1, 0, 0]]), 0.5)
    assert none["p"] == 0.0 and math.isnan(none["f1"])


def test_tag_lines_roundtrip_and_coco_stuff_ids(tmp_path):
    path = tmp_path / "t.txt"
    write_tag_lines(path, [("a", [1, 3]), ("b", [0])])
    assert path.read_text() == "a 1 3\nb 0\n"
    assert read_tag_lines(path) == {"a": [1, 3], "b": [0]}
    m = coco_stuff_182_to_171()
    assert len(m) == len(COCO_STUFF_CLASSES) and max(m.values()) == len(COCO_STUFF_CLASSES) - 1
    path.write_text("x 0 181\n")
    assert read_tag_lines(path, m) == {"x": [0, len(COCO_STUFF_CLASSES) - 1]}
    unused = next(i for i in range(182) if i not in m)
    path.write_text(f"x {unused}\n")
    with pytest.raises(ValueError, match="not in this vocabulary"):
        read_tag_lines(path, m)
    y, kept = gt_matrix(["a", "zz"], {"a": [2]}, 3)
    assert kept == ["a"] and y.tolist() == [[0, 0, 1]]


def test_block_indices_kept_from_the_last_block():
    assert resolve_layers((8, 9, 10), 12) == (8, 9, 10)
    assert resolve_layers((8, 9, 10), 6) == (2, 3, 4)
    assert resolve_layers(tuple(range(11)), 6) == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="no block"):
        resolve_layers((0,), 2)


def _last_column_scores(h=3, w=4, k=2):
    """Refined scores where class 0 lives in the last patch column only (the official empty-box case)."""
    s = torch.full((h * w, k + 1), 0.01)
    grid = s[:, 0].reshape(h, w)
    grid[:, w - 1] = 1.0
    s[:, 0] = grid.flatten()
    s[0, 1] = 0.9  # class 1: a candidate after class 0
    return s


def test_cwr_early_exit_only_with_the_official_bug():
    s = _last_column_scores()
    local = s.max(0).values
    official = C.plan_crops(s, local, 2, (3, 4), 0.5, edge_quirk=True, early_exit=True)
    assert official.candidates == [0, 1] and official.early_return == 0 and official.skipped == [0, 1]
    assert not official.crops
    skip_one = C.plan_crops(s, local, 2, (3, 4), 0.5, edge_quirk=True, early_exit=False)
    assert skip_one.skipped == [0] and [c for c, _, _ in skip_one.crops] == [1]
    fixed = C.plan_crops(s, local, 2, (3, 4), 0.5, edge_quirk=False, early_exit=False)
    assert fixed.early_return is None and fixed.skipped == []
    assert [b for _, b, _ in fixed.crops] == [(0, 3, 3, 4), (0, 1, 0, 1)]  # the last column is kept


def test_class_masks_edge_quirk_and_constant_column():
    attn = torch.zeros(6, 2)
    attn[:, 0] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 1.0])  # 2x3 grid, last column
    attn[:, 1] = 0.5  # constant: min-max without epsilon is NaN officially
    cm = L.class_box_masks(attn, (2, 3), edge_quirk=True)
    assert cm.masks[0].sum() == 0 and cm.boxes[0] == [(2, 0, 2, 1)]  # clipped: the box is empty
    assert not cm.processed[1] and cm.masks[1].sum() == 0  # no crash (official: int(NaN) error); column kept
    refined = L.refined_scores(torch.eye(6), attn, attn, cm.masks, cm.processed)
    assert torch.equal(refined[:, 1], attn[:, 1])
    fixed = L.class_box_masks(attn, (2, 3), edge_quirk=False)
    assert fixed.masks[0].tolist() == [[0, 0, 1], [0, 0, 1]]


def test_tags_argmax_fallback_and_compat_switch():
    assert C.tags_from_scores(torch.tensor([0.2, 0.2, 0.2]), 0.5) == ([0], True)
    assert C.tags_from_scores(torch.tensor([0.1, 0.9, 0.6]), 0.5) == ([1, 2], False)
    assert not preset_for("voc").quirks.cwr_early_exit and preset_for("voc", compat=True).quirks.box_edge_quirk
    with pytest.raises(ValueError, match="unknown TagCLIP preset"):
        preset_for("pascal")


def test_tagger_refuses_fp16_rounded_weights():
    from tag2mask.cmdline.options import shipped_weights_path
    from tag2mask.clip.loading import load_clip
    from tag2mask.methods.tagclip import TagCLIP

    model = load_clip(shipped_weights_path(), round_fp16_weights=True)
    with pytest.raises(ValueError, match="unrounded"):
        TagCLIP(model, preset_for("synth"), text_cache_dir=False)


def test_gt_from_a_label_file_or_official_lines(tmp_path):
    from tag2mask.methods.tagclip.job import gt_tags

    names, files = ["a", "sub/b"], ["a.jpg", "sub/b.png"]
    classes = preset_for("voc").class_names
    js = tmp_path / "gt.json"
    js.write_text('{"a.jpg": ["dog", "person"], "sub/b.png": ["cat"]}')
    assert gt_tags(str(js), names, files, "voc", classes) == {"a": [11, 14], "sub/b": [7]}
    txt = tmp_path / "gt.txt"
    txt.write_text("a 11 14\nb 7\n")  # official ids are image stems
    assert gt_tags(str(txt), names, files, "voc", classes) == {"a": [11, 14], "sub/b": [7]}
    txt.write_text("a 181\n")  # COCO-Stuff: 182-space ids
    assert gt_tags(str(txt), names, files, "cocostuff", COCO_STUFF_CLASSES) == {"a": [len(COCO_STUFF_CLASSES) - 1]}


def test_unreadable_tag_files_are_one_line_naming_the_file(tmp_path):
    """Official tag lines that are not UTF-8, and a damaged per-image record, name their file."""
    from tag2mask.io.json_files import JSONFileError
    from tag2mask.methods.tagclip.tagfile import read_tag_lines

    bad = tmp_path / "gt.txt"
    bad.write_bytes(b"a 1\n\xff\xfe 2\n")
    with pytest.raises(ValueError, match="gt.txt: not UTF-8"):
        read_tag_lines(bad)
    from types import SimpleNamespace

    from tag2mask.methods.tagclip.job import finalize_tags

    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "x.json").write_text('{"image": "x.png", "scores": [' + "[" * 100000 + "]")
    with pytest.raises(JSONFileError, match="x.json"):
        finalize_tags(tmp_path, SimpleNamespace(names=["x"]), preset_for("voc"), "voc", None, {})
    assert not (tmp_path / "tags.json").exists()  # nothing half-written from a damaged run
