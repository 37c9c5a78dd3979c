"""mIoU / accuracy on hand-made confusion cases, checked against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from tag2mask.evaluation.miou import ConfusionMatrix, harmonic_iou, seen_unseen_scores


def test_two_class_hand_computed() -> None:
    gt = np.array([[0, 0, 1, 1]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1]], dtype=np.uint8)
    cm = ConfusionMatrix(2)
    cm.update(pred, gt)
    s = cm.scores()
    # class 0: tp 1, union 2 -> 1/2; class 1: tp 2, union 3 -> 2/3
    assert s["Class IoU"] == pytest.approx([0.5, 2 / 3])
    assert s["Mean IoU"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert s["Pixel Accuracy"] == pytest.approx(3 / 4)
    assert s["Mean Accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert s["num_pixels"] == 4


def test_absent_classes_excluded() -> None:
    # 4 classes; class 2 absent from both GT and prediction -> None, not 0
    gt = np.array([[0, 1, 1, 3]])
    pred = np.array([[0, 1, 3, 3]])
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    s = cm.scores()
    assert s["Class IoU"][2] is None
    assert s["Class IoU"] == pytest.approx([1.0, 0.5, None, 0.5])
    assert s["Mean IoU"] == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_predicted_only_class_counts_as_zero() -> None:
    gt = np.array([[0, 0, 0, 0]])
    pred = np.array([[0, 0, 2, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    s = cm.scores()
    assert s["Class IoU"] == pytest.approx([0.5, None, 0.0])
    assert s["Mean IoU"] == pytest.approx(0.25)
    # class 2 is absent from the GT: no accuracy for it
    assert s["Mean Accuracy"] == pytest.approx(0.5)


def test_ignore_255_and_all_ignore_image() -> None:
    cm = ConfusionMatrix(3)
    gt = np.array([[1, 255, 1], [255, 2, 2]], dtype=np.uint8)
    pred = np.array([[1, 0, 2], [2, 2, 2]], dtype=np.uint8)
    cm.update(pred, gt)
    # an all-ignore image changes nothing, whatever it predicts
    cm.update(np.full((2, 2), 2, np.uint8), np.full((2, 2), 255, np.uint8))
    s = cm.scores()
    assert s["num_pixels"] == 4
    # class 0: absent from counted GT and pred -> None; class1: tp1, union 2; class 2: tp 2, union 3
    assert s["Class IoU"] == pytest.approx([None, 0.5, 2 / 3])
    assert s["Mean IoU"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert s["Pixel Accuracy"] == pytest.approx(3 / 4)


def test_only_all_ignore_gives_none_not_zero() -> None:
    cm = ConfusionMatrix(21)
    cm.update(np.zeros((3, 3), np.uint8), np.full((3, 3), 255, np.uint8))
    s = cm.scores()
    assert s["Mean IoU"] is None and s["Pixel Accuracy"] is None
    assert all(v is None for v in s["Class IoU"])


def test_one_class_only() -> None:
    cm = ConfusionMatrix(21)
    cm.update(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))
    s = cm.scores()
    assert s["Mean IoU"] == 1.0 and s["Pixel Accuracy"] == 1.0
    assert s["Class IoU"][0] == 1.0 and s["Class IoU"][1:] == [None] * 20


def test_accumulates_over_images_not_per_image_mean() -> None:
    cm = ConfusionMatrix(2)
    cm.update(np.array([[1]]), np.array([[1]]))
    cm.update(np.array([[0, 0, 0]]), np.array([[1, 1, 1]]))
    s = cm.scores()
    # dataset-level: class 1 tp 1, union 4 -> 0.25 ; class 0: tp 0, union 3 -> 0
    assert s["Class IoU"] == pytest.approx([0.0, 0.25])


def test_merge_equals_single_pass() -> None:
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 5, (6, 7)), rng.integers(0, 5, (6, 7))) for _ in range(4)]
    one = ConfusionMatrix(5)
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    for i, (p, g) in enumerate(pairs):
        one.update(p, g)
        (a if i % 2 else b).update(p, g)
    np.testing.assert_array_equal(a.merge(b).mat, one.mat)
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(4))


def test_errors_name_item() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="img_7.*differs"):
        cm.update(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8), name="img_7")
    with pytest.raises(ValueError, match="img_8.*class id 5"):
        cm.update(np.full((2, 2), 5, np.uint8), np.zeros((2, 2), np.uint8), name="img_8")
    with pytest.raises(ValueError, match="integer"):
        cm.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint8))
    # an out-of-range prediction on an ignored pixel is not an error (it is not counted)
    cm.update(np.array([[9]]), np.array([[255]]))


def test_seen_unseen_hiou() -> None:
    iou = [0.9, 0.6, None, 0.2, 0.4]
    s, u, h = seen_unseen_scores(iou, unseen_ids=[3, 4])
    assert s == pytest.approx((0.9 + 0.6) / 2)
    assert u == pytest.approx(0.3)
    assert h == pytest.approx(2 * 0.75 * 0.3 / 1.05)
    s2, _, _ = seen_unseen_scores(iou, unseen_ids=[3, 4], include_background=False)
    assert s2 == pytest.approx(0.6)
    assert harmonic_iou(0.0, 0.0) == 0.0
    assert seen_unseen_scores([0.5, None], [1]) == (0.5, None, None)
    with pytest.raises(ValueError):
        seen_unseen_scores(iou, [9])


@pytest.mark.parametrize("c", [2, 21, 81, 256])
def test_uint8_fast_path_equals_generic(c: int) -> None:
    rng = np.random.default_rng(c)
    for _ in range(5):
        g = rng.integers(0, 256, (17, 23)).astype(np.uint8)
        g[rng.random(g.shape) < 0.6] = rng.integers(0, c)
        p = rng.integers(0, c, (17, 23)).astype(np.uint8)
        fast, slow = ConfusionMatrix(c), ConfusionMatrix(c)
        fast.update(p, g)
        slow.update(p.astype(np.int64), g.astype(np.int64))
        np.testing.assert_array_equal(fast.mat, slow.mat)


def test_a_predicted_255_is_not_scored():
    from tag2mask.evaluation.miou import ConfusionMatrix, unscore_predicted_ignore

    gt = np.array([[1, 1, 255], [0, 2, 2]], dtype=np.uint8)
    pred = np.array([[1, 255, 255], [0, 255, 2]], dtype=np.uint8)
    masked, n = unscore_predicted_ignore(pred, gt, 3)
    assert n == 2  # (0, 2) was ignored by the ground truth already
    cm = ConfusionMatrix(3)
    cm.update(pred, masked)
    assert cm.mat.sum() == 3 and np.trace(cm.mat) == 3
    same, zero = unscore_predicted_ignore(pred, gt[:, :2], 3)
    assert zero == 0 and same.shape == (2, 2)
    with pytest.raises(ValueError, match="outside"):
        ConfusionMatrix(3).update(pred, gt)  # without it, a 255 on a scored pixel is an error
