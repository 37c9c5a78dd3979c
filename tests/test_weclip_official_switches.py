"""WeCLIP switches that reproduce the released code: label source, mIoU rule, test-time flip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tag2mask.io.palette import save_label_png
from tag2mask.methods.weclip.data import open_images
from tag2mask.methods.weclip.model import preset
from tag2mask.vocab.classes import VOC_CLASSES


def _voc_root(tmp: Path) -> Path:
    """One image whose XML names person + dog while its GT mask holds person + cat (and void)."""
    root = tmp / "VOC2012"
    for d in ("JPEGImages", "Annotations", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    Image.new("RGB", (6, 4)).save(root / "JPEGImages" / "a.jpg")
    objs = "".join(f"<object><name>{n}</name></object>" for n in ("dog", "person"))
    (root / "Annotations" / "a.xml").write_text(f"<annotation>{objs}</annotation>")
    mask = np.zeros((4, 6), np.uint8)
    mask[0, :2], mask[1, 2:4], mask[3, :] = 15, 8, 255  # person (15 = 14 + 1), cat (8 = 7 + 1), void
    save_label_png(root / "SegmentationClassAug" / "a.png", mask)
    (root / "ImageSets/Segmentation/train_aug.txt").write_text("a\n")
    return root


def test_label_source_switch(tmp_path: Path):
    root = _voc_root(tmp_path)
    assert preset("voc").label_source == preset("coco").label_source == "gt_mask"  # the released code
    from_mask = open_images(str(root), "train_aug", VOC_CLASSES, label_source="gt_mask")
    from_xml = open_images(str(root), "train_aug", VOC_CLASSES, label_source="dataset")
    assert from_mask.item(0)[2] == [7, 14]  # np.unique(mask) - 1 without 255: cat, person (ascending)
    assert from_xml.item(0)[2] == [11, 14]  # the XML's dog, person
    with pytest.raises(ValueError, match="label_source"):
        open_images(str(root), "train_aug", VOC_CLASSES, label_source="xml")
    with pytest.raises(ValueError, match="label_source"):
        preset("voc", label_source="png")


def test_miou_rules_differ_and_presets_pick_their_papers():
    from tag2mask.evaluation.miou import ConfusionMatrix
    from tag2mask.methods.clip_es.pipeline import PRESETS

    cm = ConfusionMatrix(4)
    gt = np.array([[0, 0, 1, 1]], np.uint8)
    cm.update(np.array([[0, 2, 1, 1]], np.uint8), gt)  # class 2 predicted, never in GT; class 3 absent
    iou = cm.iou()
    assert np.isnan(iou[3]) and iou[2] == 0.0
    both = cm.scores("gt_or_pred")
    gt_only = cm.scores("gt")
    assert both["Mean IoU"] == pytest.approx((0.5 + 1.0 + 0.0) / 3) and both["miou_rule"] == "gt_or_pred"
    assert gt_only["Mean IoU"] == pytest.approx((0.5 + 1.0) / 2) and gt_only["miou_rule"] == "gt"
    assert preset("voc").miou_rule == "gt" and PRESETS["voc"].miou_rule == PRESETS["coco"].miou_rule == "gt_or_pred"
    with pytest.raises(ValueError, match="mIoU rule"):
        cm.scores("mean")


def test_multiscale_flip_averages_the_mirrored_logits(tiny_clip_path):
    """flip=True == (logits(x) + mirror(logits(mirror(x)))) / 2 at every scale, computed separately.

    Fails if the flipped copy is dropped, not mirrored back or not averaged (the decoder's logits are
    not mirror-symmetric, checked below).
    """
    from tag2mask.clip.loading import load_clip
    from tag2mask.methods.weclip.inference import multiscale_logits
    from tag2mask.methods.weclip.model import WeCLIP

    torch.manual_seed(0)
    # float32 decoder: the fp16 out-projection would turn batch-size-dependent sums into 1-ulp flips
    model = WeCLIP(load_clip(tiny_clip_path), preset("voc", compat_numerics=False), text_cache_dir=False).eval()
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    scales = (1.0, 0.75)
    got = multiscale_logits(model, x, scales=scales, flip=True)
    plain = multiscale_logits(model, x, scales=scales, flip=False)
    mirrored = multiscale_logits(model, x.flip(-1), scales=scales, flip=False).flip(-1)
    torch.testing.assert_close(got, (plain + mirrored) / 2, rtol=0, atol=1e-5)
    assert (plain - mirrored).abs().max() > 1e-2
    # the single-scale path is the model's own output
    with torch.no_grad():
        torch.testing.assert_close(multiscale_logits(model, x, scales=(1.0,), flip=False), model(x).seg_logits)
